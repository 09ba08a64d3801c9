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


def screenshot(
    url_or_path: str | os.PathLike[str],
    png_path: str | os.PathLike[str],
    *,
    width: int = 1280,
    height: int = 900,
    full_page: bool = True,
    timeout_ms: float = 30_000,
) -> dict[str, Any]:
    """Open ``url_or_path`` (a URL, or a file path opened as ``file://``) in headless Chromium,
    wait for the ``load`` event and write a PNG screenshot to ``png_path``.

    Returns ``{"url", "title", "console_errors", "page_errors", "failed_requests", "blocked",
    "requests"}``: console messages of type error, uncaught exceptions, requests that failed
    (``"url: reason"``), requests aborted for leaving the machine, and every request's URL
    except ``data:`` ones, in order."""
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
            page.screenshot(path=os.fspath(png_path), full_page=full_page, timeout=timeout_ms)
        finally:
            context.close()
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
