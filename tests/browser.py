"""Headless Chromium for the browser tests: Debian's ``/usr/bin/chromium`` driven by the
``playwright`` package (which never downloads a browser of its own here), in a fresh profile.

Every request that is not to a ``file:``/``data:``/``blob:``/``about:`` URL or to a loopback
host is aborted and recorded, so a test can assert that a page is self-contained (the machine
running the tests may have no network, and a report must never need one).

>>> res = screenshot(run_dir / "report.html", tmp_path / "report.png")
>>> assert not res["blocked"] and not res["console_errors"] and not is_blank(tmp_path / "report.png")
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("ADAG_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOCAL_SCHEMES = {"file", "data", "blob", "about"}
LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


def available() -> bool:
    """Whether the browser and playwright are installed (``make browser`` installs Chromium)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return os.access(CHROMIUM, os.X_OK)


def is_local(url: str) -> bool:
    """Whether ``url`` stays on this machine: a local scheme or a loopback host."""
    parts = urlsplit(url)
    if parts.scheme in LOCAL_SCHEMES:
        return True
    return (parts.hostname or "") in LOOPBACK or (parts.hostname or "").startswith("127.")


@contextmanager
def open_page(
    url_or_path: str | os.PathLike[str],
    *,
    width: int = 1280,
    height: int = 900,
    timeout_ms: float = 30_000,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """Open ``url_or_path`` (a URL, or a file path opened as ``file://``) in headless Chromium
    in a fresh profile, wait for the ``load`` event and yield ``(page, log)``: the playwright
    page and a dict that keeps filling while the page is used, ``{"url", "title",
    "console_errors", "page_errors", "failed_requests", "blocked", "requests"}``: console
    messages of type error, uncaught exceptions, requests that failed (``"url: reason"``),
    requests aborted for leaving the machine, and every request's URL except ``data:`` ones,
    in order."""
    from playwright.sync_api import Route, sync_playwright

    text = os.fspath(url_or_path)
    url = (
        text
        if "://" in text or text.startswith(("data:", "about:"))
        else Path(text).resolve().as_uri()
    )
    out: dict[str, Any] = {
        "url": url,
        "title": None,
        "console_errors": [],
        "page_errors": [],
        "failed_requests": [],
        "blocked": [],
        "requests": [],
    }

    def route(r: Route) -> None:
        if is_local(r.request.url):
            r.continue_()
        else:
            out["blocked"].append(r.request.url)
            r.abort("blockedbyclient")

    with tempfile.TemporaryDirectory(prefix="adag-chromium-") as profile, sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=ARGS,
            headless=True,
            viewport={"width": width, "height": height},
            offline=False,
        )
        try:
            context.set_default_timeout(timeout_ms)
            context.route("**/*", route)
            page = context.new_page()
            page.on(
                "console",
                lambda m: out["console_errors"].append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: out["page_errors"].append(str(e)))
            page.on(
                "request",
                lambda r: None if r.url.startswith("data:") else out["requests"].append(r.url),
            )
            page.on(
                "requestfailed",
                lambda r: out["failed_requests"].append(f"{r.url}: {r.failure}"),
            )
            page.goto(url, wait_until="load", timeout=timeout_ms)
            out["title"] = page.title()
            yield page, out
        finally:
            context.close()


def screenshot(
    url_or_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    *,
    width: int = 1280,
    height: int = 900,
    full_page: bool = True,
    timeout_ms: float = 30_000,
) -> dict[str, Any]:
    """Open ``url_or_path`` with :func:`open_page`, write a PNG screenshot to ``png_path`` and
    return the page's log (see :func:`open_page`)."""
    with open_page(url_or_path, width=width, height=height, timeout_ms=timeout_ms) as (page, out):
        page.screenshot(path=os.fspath(png_path), full_page=full_page, timeout=timeout_ms)
    return out


def is_blank(png_path: str | os.PathLike[str], *, tol: float = 0.01) -> bool:
    """Whether a PNG is (nearly) one colour: the standard deviation of its grey levels (0..1)
    is below ``tol``."""
    import matplotlib.image as mpimg
    import numpy as np

    img = np.asarray(mpimg.imread(os.fspath(png_path)), dtype=np.float64)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=-1)
    return bool(img.size == 0 or img.std() < tol)


def synthetic_graph(n_nodes: int = 1000, n_edges: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """A synthetic viewer graph of the issue's size: 10 positions, 20 layers of neurons, 5
    logits, random influence and edges from lower to higher layers."""
    import numpy as np

    rng = np.random.default_rng(seed)
    T, L = 10, 20
    nodes: list[dict[str, Any]] = []

    def node(kind: str, layer: int, pos: int, index: int, infl: float | None) -> None:
        nid = f"{layer}_{index}_{pos}"
        nodes.append(
            {
                "node_id": nid,
                "feature": index,
                "layer": str(layer),
                "ctx_idx": pos,
                "feature_type": "mlp reconstruction error" if kind == "error" else kind,
                "token_prob": 0.2 if kind == "logit" else 0.0,
                "is_target_logit": kind == "logit",
                "run_idx": 0,
                "reverse_ctx_idx": 0,
                "jsNodeId": nid,
                "clerp": "",
                "influence": infl,
                "activation": 1.0,
                "adag_id": f"{kind}:{layer}:{pos}:{index}",
                "adag_kind": kind,
                "adag_layer": layer,
                "adag_index": index,
                "adag_activation": float(rng.normal()),
                "attribution": float(rng.normal()),
                "token": f"t{pos}",
                "input_attr": rng.normal(size=T).tolist(),
                "output_attr": rng.normal(size=5).tolist(),
            }
        )

    for p in range(T):
        node("embed", -1, p, 100 + p, float(rng.uniform()))
    for j in range(5):
        node("logit", L, T - 1, 500 + j, None)
    i = 0
    while len(nodes) < n_nodes:
        node("neuron", i % L, int(rng.integers(T)), 1000 + i, float(rng.uniform()))
        i += 1
    layer = np.array([n["adag_layer"] for n in nodes])
    links, seen = [], set()
    while len(links) < n_edges:
        a, b = (int(x) for x in rng.integers(len(nodes), size=2))
        if layer[a] >= layer[b] or (a, b) in seen:
            continue
        seen.add((a, b))
        links.append(
            {
                "source": nodes[a]["node_id"],
                "target": nodes[b]["node_id"],
                "weight": float(rng.normal()),
            }
        )
    groups = [
        ["G1", *[n["node_id"] for n in nodes[20:60]]],
        ["G2", *[n["node_id"] for n in nodes[60:90]]],
    ]
    return {
        "metadata": {
            "slug": "big",
            "scan": "synthetic",
            "transcoder_list": [],
            "prompt_tokens": [f"t{p}" for p in range(T)],
            "prompt": " ".join(f"t{p}" for p in range(T)),
            "node_threshold": 0.8,
            "schema_version": 1,
            "adag_targets": [
                {"token": f"x{j}", "token_id": 500 + j, "prob": 0.2, "logit": 3.0, "coef": 1.0}
                for j in range(5)
            ],
        },
        "qParams": {
            "pinnedIds": [],
            "supernodes": groups,
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": nodes,
        "links": links,
    }
