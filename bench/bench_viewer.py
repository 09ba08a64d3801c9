"""The graph viewer's responsiveness (issue 14): a synthetic 1,000-node, 20,000-edge graph
(``tests/browser.py``'s ``synthetic_graph``) served by ``adag serve``'s server and drawn in
Debian's headless Chromium (software rendering, no GPU: a desktop browser is faster).

Reports, in milliseconds (median of ``--repeats``): the first full draw, a node-threshold
change, an edge-threshold change, a click that selects a node (redraw + detail panel), a
supernode collapse, and a hover redraw. Writes ``bench/results/viewer.json``.

Run with ``make bench`` or ``python bench/bench_viewer.py [--nodes 1000 --edges 20000]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import browser  # noqa: E402  (the tests' Chromium driver and synthetic graph)

TIMED = """([what, value]) => {
  const S = window.adagViewer.state;
  const t = performance.now();
  if (what === 'node' || what === 'edge') {
    const e = document.getElementById(what + '-threshold');
    e.value = String(value); e.dispatchEvent(new Event('input'));
  } else if (what === 'select') {
    window.adagViewer.select('node', S.nodes[value].node_id);
  } else if (what === 'collapse') {
    const e = document.getElementById('collapse');
    e.checked = !e.checked; e.dispatchEvent(new Event('change'));
  } else if (what === 'hover') {
    const it = S.items[value];
    const c = document.getElementById('graph');
    c.dispatchEvent(new MouseEvent('mousemove', {clientX: c.getBoundingClientRect().left + it.x,
      clientY: c.getBoundingClientRect().top + it.y}));
  }
  document.getElementById('graph').getContext('2d').getImageData(0, 0, 1, 1);  // flush
  return performance.now() - t;
}"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--edges", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    if not browser.available():
        sys.exit("bench_viewer needs Chromium and playwright: make browser")

    from adag.graphs.export import write_index
    from adag.viewer import make_server

    with tempfile.TemporaryDirectory() as tmp:
        viewer = Path(tmp) / "run" / "viewer"
        viewer.mkdir(parents=True)
        data = browser.synthetic_graph(args.nodes, args.edges)
        (viewer / "big.json").write_text(json.dumps(data), encoding="utf-8")
        write_index(viewer)
        server = make_server(viewer.parent, port=0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{server.server_address[1]}/graph.html?slug=big"
        times: dict[str, list[float]] = {}
        try:
            with browser.open_page(url, width=1400, height=900) as (page, log):
                page.wait_for_selector("body[data-ready='1']")
                first = page.evaluate("window.adagViewer.state.renderMs")
                for r in range(args.repeats):
                    for what, value in (
                        ("node", 0.5 + 0.01 * r),
                        ("node", 1.0),
                        ("edge", 0.01 * (r + 1)),
                        ("edge", 0.0),
                        ("select", 100 + r),
                        ("collapse", 0),
                        ("collapse", 0),
                        ("hover", 200 + r),
                    ):
                        times.setdefault(what, []).append(page.evaluate(TIMED, [what, value]))
                drawn = page.eval_on_selector("#graph", "c => [c.dataset.nodes, c.dataset.edges]")
                assert not log["blocked"] and not log["page_errors"], log
        finally:
            server.shutdown()
            server.server_close()
    result = {
        "nodes": args.nodes,
        "edges": args.edges,
        "drawn": [int(x) for x in drawn],
        "first_draw_ms": round(first, 1),
        **{f"{k}_ms": round(statistics.median(v), 1) for k, v in times.items()},
        "repeats": args.repeats,
        "chromium": browser.CHROMIUM,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    out = ROOT / "bench" / "results" / "viewer.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"viewer {args.nodes} nodes / {args.edges} edges (drawn {result['drawn']}): first draw "
        f"{result['first_draw_ms']} ms; node threshold {result['node_ms']} ms, edge threshold "
        f"{result['edge_ms']} ms, select {result['select_ms']} ms, collapse "
        f"{result['collapse_ms']} ms, hover {result['hover_ms']} ms (medians of {args.repeats})"
    )


if __name__ == "__main__":
    main()
