"""The graph viewer (``adag/viewer/static``) in a real headless Chromium, served by ``adag serve``'s
server on 127.0.0.1 (issue 14): the index page, the drawn node / edge / supernode counts against
the graph files, the detail panel's values against the graph's, live thresholds, supernodes,
saving edits to ``qParams``, a 1,000-node / 20,000-edge graph, and a screenshot that is not
blank. Every request the pages make is recorded: none may leave 127.0.0.1.

The screenshot in the README is the one :func:`test_smollm2_run_with_clusters` writes
(``ADAG_UPDATE_SCREENSHOT=1`` copies it to ``docs/viewer.png``)."""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from adag.cli import app
from adag.viewer import make_server

from . import browser

DOCS_PNG = Path(__file__).resolve().parents[1] / "docs" / "viewer.png"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _needs_browser() -> None:
    assert browser.available(), "the browser tests need Chromium: make browser"


class Served:
    def __init__(self, run_dir: Path, read_only: bool = False) -> None:
        self.server = make_server(run_dir, port=0, read_only=read_only)
        host, port = self.server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def serve() -> Iterator[Any]:
    started: list[Served] = []

    def start(run_dir: Path, read_only: bool = False) -> Served:
        s = Served(run_dir, read_only)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


@pytest.fixture(scope="module")
def tiny_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two graphs traced from the tiny random Llama by ``adag trace`` (no clusters)."""
    d = tmp_path_factory.mktemp("tiny-run")
    prompts = d / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "The capital of France is"}\n{"prompt": "Mary and John went to the"}\n'
    )
    out = d / "run"
    r = runner.invoke(
        app,
        ["trace", str(tiny_dir), "--prompts", str(prompts), "--out", str(out), "-k", "2"],
    )
    assert r.exit_code == 0, r.output
    return out


def graph_json(run_dir: Path, slug: str) -> dict[str, Any]:
    return json.loads((run_dir / "viewer" / f"{slug}.json").read_text(encoding="utf-8"))


def slugs(run_dir: Path) -> list[str]:
    index = json.loads((run_dir / "viewer" / "graph-metadata.json").read_text(encoding="utf-8"))
    return [g["slug"] for g in index["graphs"]]


def expected_counts(
    data: dict[str, Any],
    node_t: float = 1.0,
    edge_t: float = 0.0,
    collapsed: bool = False,
) -> dict[str, int]:
    """What the viewer must draw: the node rule of viewer.js's ``nodeVisible`` and the edge rule
    of ``compute`` (a collapsed supernode replaces its visible members and sums their edges)."""

    def visible(n: dict[str, Any]) -> bool:
        if n["adag_kind"] in ("logit", "embed"):
            return True
        return n["influence"] is None or n["influence"] <= node_t + 1e-12

    member: dict[str, str] = {}
    for group in data["qParams"]["supernodes"]:
        for nid in group[1:]:
            member.setdefault(nid, group[0])
    item: dict[str, str] = {}
    for n in data["nodes"]:
        if visible(n):
            nid = n["node_id"]
            item[nid] = "S:" + member[nid] if collapsed and nid in member else "N:" + nid
    max_abs = max((abs(link["weight"]) for link in data["links"]), default=0.0)
    cut = edge_t * max_abs
    direct = 0
    summed: dict[tuple[str, str], float] = {}
    for link in data["links"]:
        a, b = item.get(link["source"]), item.get(link["target"])
        if a is None or b is None or a == b:
            continue
        if a.startswith("N:") and b.startswith("N:"):
            direct += abs(link["weight"]) >= cut and link["weight"] != 0
        else:
            summed[a, b] = summed.get((a, b), 0.0) + link["weight"]
    edges = direct + sum(abs(w) >= cut and w != 0 for w in summed.values())
    return {
        "nodes": sum(v.startswith("N:") for v in item.values()),
        "edges": edges,
        "supernodes": len({v for v in item.values() if v.startswith("S:")}),
    }


def drawn(page: Any) -> dict[str, int]:
    ds = page.eval_on_selector(
        "#graph",
        "c => ({nodes: c.dataset.nodes, edges: c.dataset.edges, sn: c.dataset.supernodes})",
    )
    return {"nodes": int(ds["nodes"]), "edges": int(ds["edges"]), "supernodes": int(ds["sn"])}


def set_range(page: Any, selector: str, value: float) -> None:
    page.eval_on_selector(
        selector,
        "(e, v) => { e.value = String(v); e.dispatchEvent(new Event('input', {bubbles: true})); }",
        value,
    )


def click_item(page: Any, kind: str, item_id: str, **kwargs: Any) -> None:
    """A real mouse click at the drawn item's position on the canvas."""
    pos = page.evaluate("([t, i]) => window.adagViewer.screenPos(t, i)", [kind, item_id])
    assert pos is not None, f"{kind} {item_id} is not drawn"
    box = page.locator("#graph").bounding_box()
    page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"], **kwargs)


def open_graph(page: Any, url: str, slug: str) -> None:
    page.goto(f"{url}/graph.html?slug={slug}", wait_until="load")
    page.wait_for_selector("body[data-ready='1']")


def assert_local(log: dict[str, Any], url: str) -> None:
    assert not log["blocked"], log["blocked"]
    assert not log["console_errors"] and not log["page_errors"], log
    assert log["requests"] and all(r.startswith(url + "/") for r in log["requests"]), log


def close(a: float, b: float, rel: float = 1e-4) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-9)


def test_tiny_run_index_graph_detail_and_thresholds(
    tiny_run: Path, serve: Any, tmp_path: Path
) -> None:
    s = serve(tiny_run)
    names = slugs(tiny_run)
    with browser.open_page(s.url + "/") as (page, log):
        page.wait_for_selector("#graphs tbody tr")
        rows = page.eval_on_selector_all(
            "#graphs tbody tr",
            "rs => rs.map(r => [r.dataset.slug, ...[...r.cells].map(c => c.textContent)])",
        )
        assert [r[0] for r in rows] == names
        for row in rows:
            data = graph_json(tiny_run, row[0])
            assert row[2] == data["metadata"]["prompt"]
            assert int(row[4]) == len(data["nodes"]) and int(row[5]) == len(data["links"])
        page.click(f"#graphs tbody tr[data-slug='{names[0]}'] a.graph-link")
        page.wait_for_selector("body[data-ready='1']")
        data = graph_json(tiny_run, names[0])
        assert drawn(page) == expected_counts(data)

        # a click on the most attributed neuron fills the panel with its values
        neurons = [n for n in data["nodes"] if n["adag_kind"] == "neuron"]
        assert neurons, "the tiny run has no neurons to click"
        n = max(neurons, key=lambda x: abs(x["attribution"]))
        click_item(page, "node", n["node_id"])
        page.wait_for_selector(f"#detail[data-id='{n['node_id']}']")
        value = page.eval_on_selector("#detail dd[data-key='activation']", "e => e.textContent")
        assert close(float(value), n["adag_activation"])
        value = page.eval_on_selector("#detail dd[data-key='attribution']", "e => e.textContent")
        assert close(float(value), n["attribution"])
        shown = page.eval_on_selector_all(
            "#detail .input-profile span", "s => s.map(e => Number(e.dataset.value))"
        )
        want = [v / n["adag_activation"] for v in n["input_attr"]]
        assert len(shown) == len(want) and all(
            close(a, b, 1e-12) for a, b in zip(shown, want, strict=True)
        )
        out = page.eval_on_selector_all(
            "#detail .output-profile span[data-value]", "s => s.map(e => Number(e.dataset.value))"
        )
        targets = data["metadata"]["adag_targets"]
        want = [v / t["logit"] for v, t in zip(n["output_attr"], targets, strict=True)]
        assert all(close(a, b, 1e-12) for a, b in zip(out, want, strict=True))
        incoming = page.eval_on_selector_all(
            "#detail ul.edges >> nth=0 >> li span.mono", "s => s.map(e => Number(e.textContent))"
        )
        strongest = sorted(
            (x["weight"] for x in data["links"] if x["target"] == n["node_id"]),
            key=abs,
            reverse=True,
        )[:8]
        assert len(incoming) == len(strongest)
        assert all(close(a, b, 1e-2) for a, b in zip(incoming, strongest, strict=True))
        # the same neuron in the run's other prompt, fetched from the server
        page.wait_for_selector("#others ul.others li")

        # thresholds change what is drawn, exactly as the rules say
        infl = sorted(x["influence"] for x in data["nodes"] if x["influence"] is not None)
        node_t = round(infl[len(infl) // 2], 2)
        set_range(page, "#node-threshold", node_t)
        assert drawn(page) == expected_counts(data, node_t=node_t)
        set_range(page, "#edge-threshold", 0.2)
        assert drawn(page) == expected_counts(data, node_t=node_t, edge_t=0.2)
        assert drawn(page)["edges"] < expected_counts(data)["edges"]
        set_range(page, "#node-threshold", 1)
        set_range(page, "#edge-threshold", 0)
        assert drawn(page) == expected_counts(data)

        # search and keyboard navigation
        page.fill("#search", n["adag_id"])
        assert page.text_content("#matches") == "1 match"
        page.press("#search", "Enter")
        page.wait_for_selector(f"#detail[data-id='{n['node_id']}']")
        page.focus("#graph")
        page.keyboard.press("ArrowUp")  # to its strongest drawn output
        up = page.eval_on_selector("#detail", "d => d.dataset.id")
        assert up != n["node_id"]
        assert any(x["source"] == n["node_id"] and x["target"] == up for x in data["links"])
        page.keyboard.press("Escape")
        assert page.eval_on_selector("#detail", "d => d.dataset.id || ''") in ("", up)

        png = tmp_path / "tiny.png"
        page.screenshot(path=str(png))
        assert not browser.is_blank(png)
    assert_local(log, s.url)


def test_smollm2_run_with_clusters(small_run: Path, serve: Any, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(small_run, run)  # the test saves edits: keep the shared run untouched
    s = serve(run)
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    clusters = {c["name"]: c for c in summary["clusters"]}
    names = slugs(run)
    data = graph_json(run, names[0])
    groups = data["qParams"]["supernodes"]
    assert groups, "the small run's first graph has no supernodes"
    with browser.open_page(s.url + "/", width=1400, height=900) as (page, log):
        page.wait_for_selector("#report-link")
        open_graph(page, s.url, names[0])
        assert drawn(page) == expected_counts(data)
        page.check("#collapse")
        counts = drawn(page)
        assert counts == expected_counts(data, collapsed=True)
        assert counts["supernodes"] == len(groups)

        # a click on a supernode: its cluster's label, descriptions and scores
        name = max(groups, key=len)[0]
        click_item(page, "super", name)
        page.wait_for_selector(f"#detail[data-id='{name}']")
        c = clusters[name]
        title = page.text_content("#detail-title")
        assert name in title and (c["label"] is None or c["label"] in title)
        members = page.text_content("#detail dd[data-key='members']")
        assert int(members) == len(next(g for g in groups if g[0] == name)) - 1
        if c["input"]["explanation"]:
            assert page.text_content("#detail .description-input") == c["input"]["explanation"]
        if c["input"]["score"] is not None:
            shown = page.text_content("#detail dd[data-key='input-score']")
            assert close(float(shown), c["input"]["score"], 1e-2)
        assert page.locator("#detail .records .record").count() >= 1

        # expand again; pin a node with the keyboard, save, reload: the pin is in qParams
        page.uncheck("#collapse")
        assert drawn(page) == expected_counts(data)
        neuron = next(n for n in data["nodes"] if n["adag_kind"] == "neuron")
        click_item(page, "node", neuron["node_id"])
        page.keyboard.press("p")
        page.fill("#detail input[aria-label='label']", "capital détecteur")
        page.click("#detail .edit button:has-text('Set label')")
        assert page.text_content("#detail-title") == "capital détecteur"
        page.click("#save")
        page.wait_for_function("document.getElementById('status').textContent === 'saved'")
        saved = graph_json(run, names[0])["qParams"]
        assert saved["pinnedIds"] == [neuron["node_id"]]
        assert saved["supernodes"] == groups and saved["clickedId"] == neuron["node_id"]
        # labels as circuit-tracer's frontend stores them: a JSON string, keyed by feature
        assert json.loads(saved["clerps"]) == [[str(neuron["feature"]), "capital détecteur"]]
        open_graph(page, s.url, names[0])
        assert page.evaluate("[...window.adagViewer.state.pinned]") == [neuron["node_id"]]
        click_item(page, "node", neuron["node_id"])
        assert page.text_content("#detail-title") == "capital détecteur"

        # the screenshot of the README: the clusters collapsed, one selected
        page.check("#collapse")
        click_item(page, "super", name)
        png = tmp_path / "viewer.png"
        page.screenshot(path=str(png))
        assert not browser.is_blank(png)
        if os.environ.get("ADAG_UPDATE_SCREENSHOT") == "1":
            DOCS_PNG.parent.mkdir(exist_ok=True)
            shutil.copyfile(png, DOCS_PNG)
    assert_local(log, s.url)


def test_read_only_server_disables_saving(tiny_run: Path, serve: Any) -> None:
    s = serve(tiny_run, read_only=True)
    slug = slugs(tiny_run)[0]
    before = (tiny_run / "viewer" / f"{slug}.json").read_bytes()
    with browser.open_page(f"{s.url}/graph.html?slug={slug}") as (page, log):
        page.wait_for_selector("body[data-ready='1']")
        assert page.is_disabled("#save")
        page.focus("#graph")
        page.keyboard.press("ArrowDown")  # selects the top logit
        page.keyboard.press("p")
        assert "read-only" in page.text_content("#status")
    assert (tiny_run / "viewer" / f"{slug}.json").read_bytes() == before
    assert_local(log, s.url)


def test_big_graph_draws_every_edge(tmp_path: Path, serve: Any) -> None:
    from adag.graphs.export import write_index

    data = browser.synthetic_graph()
    viewer = tmp_path / "run" / "viewer"
    viewer.mkdir(parents=True)
    (viewer / "big.json").write_text(json.dumps(data), encoding="utf-8")
    write_index(viewer)
    s = serve(tmp_path / "run")
    with browser.open_page(f"{s.url}/graph.html?slug=big") as (page, log):
        page.wait_for_selector("body[data-ready='1']")
        assert (
            drawn(page)
            == expected_counts(data)
            == {"nodes": 1000, "edges": 20_000, "supernodes": 0}
        )
        set_range(page, "#node-threshold", 0.5)
        set_range(page, "#edge-threshold", 0.3)
        assert drawn(page) == expected_counts(data, node_t=0.5, edge_t=0.3)
        page.check("#collapse")
        assert drawn(page) == expected_counts(data, node_t=0.5, edge_t=0.3, collapsed=True)
        # hover and click still hit the right node among 1,000
        target = data["nodes"][500]["node_id"]
        page.uncheck("#collapse")
        set_range(page, "#node-threshold", 1)
        click_item(page, "node", target)
        page.wait_for_selector(f"#detail[data-id='{target}']")
        png = tmp_path / "big.png"
        page.screenshot(path=str(png))
        assert not browser.is_blank(png)
    assert_local(log, s.url)
