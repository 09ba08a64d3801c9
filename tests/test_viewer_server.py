"""The run viewer's server (``adag serve``, :mod:`adag.viewer`): pages, run files and the JSON
API over a hand-made run directory; path traversal refused; qParams saves checked, atomic and
safe under concurrent writers. No model: the graphs are built by hand, the server runs on a free
port in a daemon thread and is shut down by every test."""

from __future__ import annotations

import http.client
import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import adag.viewer.server as viewer_server
from adag.cli import app
from adag.errors import AdagError
from adag.graphs.export import INDEX_FILE, viewer_node_ids, write_index, write_viewer
from adag.graphs.graph import Graph
from adag.io import write_text
from adag.nodes import circuit_tracer_fields
from adag.viewer import make_server, serve
from adag.viewer.server import exposure_warning, host_allowed, origin_allowed

SECRET = b"TOPSECRET-outside-the-run"
SLUG_A = "0000-the-cafe"
SLUG_B = "0001-a-dog"


def make_graph(prompt_tokens: list[str], attribution: float) -> Graph:
    """2 embeddings, 3 neurons over 2 layers, 2 logits (targets 21 and 22). ``attribution`` is
    neuron:0:1:5's, so the two graphs of the run sort differently in /api/unit."""
    f = np.float64
    return Graph(
        node_ids=[
            "embed:0",
            "embed:1",
            "neuron:0:1:5",
            "neuron:0:1:7",
            "neuron:1:1:3",
            "logit:21",
            "logit:22",
        ],
        node_kinds=["embed", "embed", "neuron", "neuron", "neuron", "logit", "logit"],
        node_layer=np.array([-1, -1, 0, 0, 1, 2, 2], dtype=np.int64),
        node_position=np.array([0, 1, 1, 1, 1, 1, 1], dtype=np.int64),
        node_index=np.array([11, 12, 5, 7, 3, 21, 22], dtype=np.int64),
        node_activation=np.array([1.5, 0.75, 2.0, -0.5, 1.25, 4.5, 3.25], dtype=f),
        node_attribution=np.array([0.25, 1.0, attribution, -0.125, 0.75, 0.75, -0.5], dtype=f),
        node_tokens=[prompt_tokens[0], prompt_tokens[1], *[prompt_tokens[1]] * 3, " sat", " ran"],
        edge_source=np.array([0, 1, 1, 2, 3, 4, 3, 4], dtype=np.int64),
        edge_target=np.array([2, 2, 3, 4, 4, 5, 5, 6], dtype=np.int64),
        edge_weight=np.array([0.5, -1.5, 2.0, 1.25, -0.75, 0.5, 0.5, -1.0], dtype=f),
        edge_flow=np.array([0.125, -0.5, 0.25, 0.375, -0.25, 0.5, 0.25, -0.75], dtype=f),
        input_attr=np.zeros((7, 2), dtype=f),
        output_attr=np.zeros((7, 2), dtype=f),
        target_ids=np.array([21, 22], dtype=np.int64),
        target_tokens=[" sat", " ran"],
        target_coef=np.array([1.0, -1.0], dtype=f),
        target_logits=np.array([4.5, 3.25], dtype=f),
        target_probs=np.array([0.75, 0.25], dtype=f),
        prompt_ids=np.array([11, 12], dtype=np.int64),
        prompt_tokens=prompt_tokens,
        prompt="".join(prompt_tokens),
        metric=1.25,
        settings={"model": "tiny-llama", "n_layers": 2},
    )


GRAPH_A = make_graph(["The", " café\n"], 0.5)
GRAPH_B = make_graph(["A", " dog"], -2.0)
IDS = viewer_node_ids(GRAPH_A)  # both graphs have the same node ids
F2 = str(circuit_tracer_fields("neuron", 0, 1, 5)["feature"])  # IDS[2]'s feature: clerps' key


def clerps(pairs: Any) -> str:
    """circuit-tracer's encoding of node labels: a JSON string of [[feature, label], ...]."""
    return json.dumps(pairs, separators=(",", ":"), ensure_ascii=False)


NEURON = IDS[2]  # neuron:0:1:5

SUMMARY = {
    "model": "tiny-llama",
    "clusters": [
        {
            "name": "C0",
            "label": "cafés",
            "size": 2,
            "input": {"score": 0.5, "explanation": "café tokens"},
            "steering": {"factor": 0.0, "dprob": -0.25},
        },
        {"name": "C1", "label": None, "size": 1, "input": None, "steering": None},
    ],
}


def _profiles(path: Path) -> None:
    rows = [
        # C0: strongest on B (|-3|), then A; C1 only on a prompt id that is no graph's slug
        ("C0", SLUG_A, "input", 0, "The", 1.0),
        ("C0", SLUG_A, "input", 1, " café\n", 2.0),
        ("C0", SLUG_B, "input", 1, " dog", -3.0),
        ("C0", SLUG_A, "output", 0, " sat", 9.0),
        ("C1", "elsewhere", "input", 2, "x\ty", 0.5),
    ]
    cols = list(zip(*rows, strict=True))
    names = ["cluster", "prompt_id", "side", "position", "token", "value"]
    pq.write_table(pa.table(dict(zip(names, cols, strict=True))), path)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory beside a secret file: two viewer graphs (the index lists B first),
    config.yaml, summary.json, clusters.json, cluster-profiles.parquet; a symlink pointing out of
    the run and a leftover temp file."""
    run = tmp_path / "run"
    viewer = run / "viewer"
    write_viewer(GRAPH_A, viewer, slug=SLUG_A, supernodes=[["C0", "neuron:0:1:5", "neuron:0:1:7"]])
    write_viewer(GRAPH_B, viewer, slug=SLUG_B)
    write_index(viewer, [SLUG_B, SLUG_A])
    (run / "config.yaml").write_text("model: tiny-llama-config\n", encoding="utf-8")
    (run / "summary.json").write_text(json.dumps(SUMMARY), encoding="utf-8")
    (run / "clusters.json").write_text(
        json.dumps({"names": ["C0", "C1"], "sizes": [2, 1]}), encoding="utf-8"
    )
    _profiles(run / "cluster-profiles.parquet")
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_bytes(SECRET)
    (run / "link").symlink_to(tmp_path / "secret")
    (run / "linkdir").symlink_to(tmp_path / "outside")
    (viewer / f".{SLUG_A}.json.abcd1234.tmp").write_bytes(SECRET)
    return run


@contextmanager
def running(run: Path, **kwargs: Any) -> Iterator[Any]:
    server = make_server(run, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def server(run_dir: Path) -> Iterator[Any]:
    with running(run_dir) as s:
        yield s


class Reply:
    def __init__(self, r: http.client.HTTPResponse) -> None:
        self.status = r.status
        self.headers = {k.lower(): v for k, v in r.getheaders()}
        self.body = r.read()

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json; charset=utf-8"
        assert self.headers["cache-control"] == "no-store"
        return json.loads(self.body)


def call(
    server: Any,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request with the path sent as is (http.client does not normalise it)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = Reply(conn.getresponse())
    finally:
        conn.close()
    assert reply.headers["x-content-type-options"] == "nosniff"
    return reply


def save(server: Any, slug: str, edits: Any, headers: dict[str, str] | None = None) -> Reply:
    body = edits if isinstance(edits, bytes) else json.dumps(edits).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    return call(server, "POST", f"/api/graphs/{slug}/qparams", body, h)


def graph_file(run: Path, slug: str) -> Path:
    return run / "viewer" / f"{slug}.json"


# -- pages and files ---------------------------------------------------------------------------


def test_pages_and_static_files(server: Any, tmp_path: Path) -> None:
    static = tmp_path / "static"
    (static / "sub").mkdir(parents=True)
    (static / "index.html").write_text("<p>index</p>", encoding="utf-8")
    (static / "graph.html").write_text("<p>graph</p>", encoding="utf-8")
    (static / "app.js").write_text("let x = 1;", encoding="utf-8")
    (static / "style.css").write_text("p {}", encoding="utf-8")
    (static / "icon.svg").write_text("<svg/>", encoding="utf-8")
    (static / "sub" / "deep.js").write_text("deep", encoding="utf-8")
    server.static_dir = static
    expected = {
        "/": (b"<p>index</p>", "text/html; charset=utf-8"),
        "/graph.html": (b"<p>graph</p>", "text/html; charset=utf-8"),
        "/graph.html?slug=x": (b"<p>graph</p>", "text/html; charset=utf-8"),
        "/static/app.js": (b"let x = 1;", "text/javascript; charset=utf-8"),
        "/static/style.css": (b"p {}", "text/css; charset=utf-8"),
        "/static/icon.svg": (b"<svg/>", "image/svg+xml; charset=utf-8"),
    }
    for path, (body, ctype) in expected.items():
        r = call(server, "GET", path)
        assert (r.status, r.body, r.headers["content-type"]) == (200, body, ctype), path
    head = call(server, "HEAD", "/static/app.js")
    assert (head.status, head.body, head.headers["content-length"]) == (200, b"", "10")
    for path in ("/static/sub/deep.js", "/static/nope.js", "/static/", "/nope", "/static/sub"):
        assert call(server, "GET", path).status == 404, path


def test_the_package_pages_are_served(server: Any) -> None:
    for path in ("/", "/graph.html"):
        r = call(server, "GET", path)
        assert r.status == 200, path
        assert r.headers["content-type"] == "text/html; charset=utf-8"


def test_run_files_are_served_read_only(server: Any, run_dir: Path) -> None:
    path = graph_file(run_dir, SLUG_A)
    r = call(server, "GET", f"/run/viewer/{SLUG_A}.json")
    assert r.status == 200
    assert r.body == path.read_bytes()
    assert r.headers["content-type"] == "application/json; charset=utf-8"
    assert r.headers["content-security-policy"] == "sandbox"
    head = call(server, "HEAD", f"/run/viewer/{SLUG_A}.json")
    assert (head.status, head.body) == (200, b"")
    assert head.headers["content-length"] == str(path.stat().st_size)
    assert call(server, "GET", "/run/config.yaml").body == b"model: tiny-llama-config\n"
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS", "POST"):
        r = call(server, method, "/run/config.yaml", b"x", {"Content-Type": "application/json"})
        assert r.status == 405, method
    assert call(server, "POST", "/api/run", b"{}").json()["error"]


BLOCKED = {
    "/run/../secret": 403,
    "/run/%2e%2e/secret": 403,
    "/run/%2E%2E/secret": 403,
    "/run/viewer/../../secret": 403,
    "/run/%252e%252e/secret": 404,  # decoded once: the literal segment "%2e%2e"
    "/run//etc/passwd": 403,
    "/run/%2fetc%2fpasswd": 403,
    "/run/%2Fetc/passwd": 403,
    "/run/..%5csecret": 403,
    "/run/.%00": 403,
    "/run/./config.yaml": 403,
    "/run/link": 403,  # a symlink in the run pointing outside
    "/run/linkdir/secret": 403,
    f"/run/viewer/.{SLUG_A}.json.abcd1234.tmp": 404,  # hidden: a temp file
    f"/run/viewer/%2e{SLUG_A}.json.abcd1234.tmp": 404,
    "/run/viewer": 404,  # directories: no listings
    "/run/viewer/": 404,
    "/run/": 404,
    "/run/nope.json": 404,
    "/static/../server.py": 403,
    "/static/%2e%2e/server.py": 403,
    "/static/..%2fserver.py": 403,
    "/static/%2e%2e%2f%2e%2e%2fdata.py": 403,
    "/static//etc/passwd": 403,
}


@pytest.mark.parametrize("path", BLOCKED)
def test_paths_outside_are_refused(server: Any, path: str) -> None:
    r = call(server, "GET", path)
    assert r.status == BLOCKED[path]
    assert SECRET not in r.body
    assert b"root:" not in r.body
    assert b"import" not in r.body  # no source file of the package


def test_bad_request_paths(server: Any) -> None:
    assert call(server, "GET", "/run/%ff%fe").status == 400  # not UTF-8 once decoded
    assert call(server, "GET", "http://127.0.0.1/run/config.yaml").status == 400


# -- the API -----------------------------------------------------------------------------------


def test_api_run(server: Any, run_dir: Path) -> None:
    info = call(server, "GET", "/api/run").json()
    assert info["run"] == "run"
    assert info["model"] == "tiny-llama-config"
    assert info["read_only"] is False
    assert info["report"] is None
    assert [g["slug"] for g in info["graphs"]] == [SLUG_B, SLUG_A]  # the index's order
    a = info["graphs"][1]
    assert a["prompt"] == "The café\n"
    assert a["prompt_tokens"] == ["The", " café⏎"]
    assert a["targets"] == [
        {"token": " sat", "prob": 0.75, "node_id": IDS[5]},
        {"token": " ran", "prob": 0.25, "node_id": IDS[6]},
    ]
    assert (a["n_nodes"], a["n_links"], a["n_supernodes"]) == (7, 8, 1)
    assert info["graphs"][0]["n_supernodes"] == 0
    assert set(info["graphs"][0]) == set(a)

    (run_dir / "report.html").write_text("<p>report</p>", encoding="utf-8")
    (run_dir / "config.yaml").unlink()
    info = call(server, "GET", "/api/run").json()
    assert info["report"] == "run/report.html"
    assert info["model"] == "tiny-llama"  # the graphs' scan
    assert call(server, "GET", "/run/report.html").body == b"<p>report</p>"
    assert call(server, "HEAD", "/api/run").body == b""


def test_api_run_sees_changed_and_new_graphs(server: Any, run_dir: Path) -> None:
    assert len(call(server, "GET", "/api/run").json()["graphs"]) == 2
    path = graph_file(run_dir, SLUG_A)
    data = json.loads(path.read_text(encoding="utf-8"))
    data["metadata"]["prompt"] = "changed"
    write_text(path, json.dumps(data))
    write_viewer(GRAPH_B, run_dir / "viewer", slug="0002-late")  # not in the index: last
    (run_dir / "viewer" / "not a slug.json").write_text("{}", encoding="utf-8")
    graphs = call(server, "GET", "/api/run").json()["graphs"]
    assert [g["slug"] for g in graphs] == [SLUG_B, SLUG_A, "0002-late"]
    assert graphs[1]["prompt"] == "changed"
    occ = call(server, "GET", "/api/unit?kind=neuron&layer=0&index=5").json()["occurrences"]
    assert [o["slug"] for o in occ] == [SLUG_B, "0002-late", SLUG_A]


def test_api_clusters(server: Any, run_dir: Path) -> None:
    clusters = call(server, "GET", "/api/clusters").json()["clusters"]
    assert [c["name"] for c in clusters] == ["C0", "C1"]
    c0 = clusters[0]
    for key, value in SUMMARY["clusters"][0].items():  # type: ignore[union-attr]
        assert c0[key] == value
    assert c0["records"] == [
        {"prompt_id": SLUG_B, "tokens": ["A", " dog"], "values": [0.0, -3.0]},
        {"prompt_id": SLUG_A, "tokens": ["The", " café⏎"], "values": [1.0, 2.0]},
    ]
    # a prompt id that is no graph's slug: the covered positions, tokens shown as the graphs'
    assert clusters[1]["records"] == [
        {"prompt_id": "elsewhere", "tokens": ["x→y"], "values": [0.5]}
    ]

    (run_dir / "summary.json").unlink()
    clusters = call(server, "GET", "/api/clusters").json()["clusters"]
    assert [(c["name"], c["size"]) for c in clusters] == [("C0", 2), ("C1", 1)]
    assert set(clusters[0]) == {"name", "size", "records"}

    (run_dir / "clusters.json").unlink()
    assert call(server, "GET", "/api/clusters").json() == {"clusters": []}


def test_api_unit(server: Any) -> None:
    def unit(query: str) -> Reply:
        return call(server, "GET", f"/api/unit?{query}")

    occ = unit("kind=neuron&layer=0&index=5").json()["occurrences"]
    assert [(o["slug"], o["attribution"]) for o in occ] == [(SLUG_B, -2.0), (SLUG_A, 0.5)]
    assert occ[0] == {
        "slug": SLUG_B,
        "prompt": "A dog",
        "node_id": NEURON,
        "ctx_idx": 1,
        "token": " dog",
        "activation": 2.0,
        "attribution": -2.0,
        "influence": occ[0]["influence"],
    }
    assert isinstance(occ[0]["influence"], float)
    assert len(unit("kind=neuron&layer=0&index=5&limit=1").json()["occurrences"]) == 1
    assert unit("kind=neuron&layer=0&index=999").json() == {"occurrences": []}
    embed = unit("kind=embed&layer=-1&index=11").json()["occurrences"]
    assert [o["activation"] for o in embed] == [1.5, 1.5]  # adag_activation: set for embeddings
    for bad in (
        "",
        "layer=0&index=5",
        "kind=neuron&index=5",
        "kind=neuron&layer=x&index=5",
        "kind=neuron&layer=0&index=5.5",
        "kind=neuron&layer=0&index=5&limit=0",
        "kind=neuron&layer=0&index=5&limit=many",
    ):
        r = unit(bad)
        assert r.status == 400, bad
        assert "\n" not in r.json()["error"]
    r = call(server, "GET", "/api/nope")
    assert r.status == 404 and r.json()["error"]


# -- binding -----------------------------------------------------------------------------------


def test_binds_loopback_by_default(run_dir: Path) -> None:
    with running(run_dir) as s:
        assert s.server_address[0] == "127.0.0.1"


def test_exposure_warning() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, 8046, read_only=False) is None
    text = exposure_warning("0.0.0.0", 8046, read_only=False)
    assert text is not None and "\n" not in text
    assert "0.0.0.0:8046" in text
    assert "anyone who can reach this machine can read the run" in text
    assert "edit its graphs unless --read-only" in text
    quiet = exposure_warning("192.168.1.5", 8046, read_only=True)
    assert quiet is not None and "edit its graphs unless" not in quiet


def test_serve_prints_url_and_warning_and_stops_on_ctrl_c(
    run_dir: Path, capsys: Any, monkeypatch: Any
) -> None:
    closed = []

    def interrupted(self: Any, poll_interval: float = 0.5) -> None:
        closed.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(viewer_server._Server, "serve_forever", interrupted)
    serve(run_dir, host="0.0.0.0", port=0)
    out, err = capsys.readouterr()
    port = closed[0].server_address[1]
    assert f"http://127.0.0.1:{port}/" in out
    assert "stopped" in out
    assert f"0.0.0.0:{port}" in err and "anyone who can reach this machine" in err
    assert closed[0].socket.fileno() == -1  # closed

    serve(run_dir, port=0, quiet=True)
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")


def test_port_in_use(server: Any, run_dir: Path) -> None:
    port = server.server_address[1]
    with pytest.raises(AdagError, match=rf"127\.0\.0\.1:{port}.*--port 0") as e:
        make_server(run_dir, port=port)
    assert "\n" not in str(e.value)


def test_make_server_refuses_what_is_no_run(tmp_path: Path) -> None:
    with pytest.raises(AdagError, match="does not exist"):
        make_server(tmp_path / "nope", port=0)
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(AdagError, match="not a directory"):
        make_server(tmp_path / "file", port=0)
    (tmp_path / "empty" / "viewer").mkdir(parents=True)
    (tmp_path / "empty" / "viewer" / INDEX_FILE).write_text('{"graphs": []}', encoding="utf-8")
    with pytest.raises(AdagError, match="has no viewer graphs; run `adag trace` or `adag run`"):
        make_server(tmp_path / "empty", port=0)


def test_cli_serve_errors_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["serve", str(tmp_path / "nope")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adag: error: run directory")
    r = runner.invoke(app, ["serve", str(tmp_path), "--port", "70000"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1


def test_host_and_origin_rules() -> None:
    assert host_allowed(None) and host_allowed("127.0.0.1:8046") and host_allowed("localhost")
    assert host_allowed("[::1]:8046")
    assert not host_allowed("evil.example:8046")
    here = ("127.0.0.1", 8046)
    assert origin_allowed("http://127.0.0.1:8046", "127.0.0.1:8046", here)
    assert origin_allowed("http://localhost:8046", "localhost:8046", here)
    assert origin_allowed("http://127.0.0.1:8046", None, here)
    for origin in (
        "null",
        "http://evil.example:8046",
        "http://127.0.0.1:9999",
        "https://127.0.0.1:8046",
    ):
        assert not origin_allowed(origin, "127.0.0.1:8046", here), origin


def test_dns_rebinding_host_is_refused(server: Any) -> None:
    assert call(server, "GET", "/api/run", headers={"Host": "evil.example:8046"}).status == 403
    assert call(server, "GET", "/", headers={"Host": "evil.example"}).status == 403
    port = server.server_address[1]
    assert call(server, "GET", "/api/run", headers={"Host": f"localhost:{port}"}).status == 200


# -- saving qParams ----------------------------------------------------------------------------


def _no_temp_files(run: Path) -> bool:
    return not [
        p
        for p in (run / "viewer").iterdir()
        if p.name.endswith(".tmp") and "abcd1234" not in p.name
    ]


def test_save_qparams(server: Any, run_dir: Path) -> None:
    path = graph_file(run_dir, SLUG_A)
    before = json.loads(path.read_text(encoding="utf-8"))
    index = (run_dir / "viewer" / INDEX_FILE).read_bytes()
    edits = {
        "pinnedIds": [IDS[2], IDS[4]],
        "supernodes": [["two neurons", IDS[2], IDS[3]], ["one", IDS[4]]],
        "linkType": "input",
        "clickedId": IDS[5],
        "sg_pos": "1,2;3,4",
        "clerps": clerps([[F2, "café detector"]]),
    }
    r = save(server, SLUG_A, edits)
    assert r.status == 200
    reply = r.json()
    assert reply == {"ok": True, "qParams": edits}
    text = path.read_text(encoding="utf-8")
    after = json.loads(text)
    assert after["qParams"] == edits
    assert list(after["qParams"])[:5] == [
        "pinnedIds",
        "supernodes",
        "linkType",
        "clickedId",
        "sg_pos",
    ]
    for key in ("metadata", "nodes", "links"):
        assert after[key] == before[key]
    assert list(after) == list(before)
    assert text == json.dumps(after, separators=(",", ":"), ensure_ascii=False)  # compact
    assert (run_dir / "viewer" / INDEX_FILE).read_bytes() == index
    assert _no_temp_files(run_dir)
    assert call(server, "GET", "/api/run").json()["graphs"][1]["n_supernodes"] == 2

    r = save(server, SLUG_A, {"linkType": "output", "clickedId": ""})  # the rest is kept
    assert r.status == 200
    assert r.json()["qParams"] == {**edits, "linkType": "output", "clickedId": ""}
    assert save(server, SLUG_A, {}).json()["qParams"]["linkType"] == "output"
    assert (
        json.loads(graph_file(run_dir, SLUG_B).read_text(encoding="utf-8"))["qParams"]["pinnedIds"]
        == []
    )  # the other graph is untouched
    same = {"Origin": f"http://127.0.0.1:{server.server_address[1]}"}
    assert save(server, SLUG_A, {"pinnedIds": []}, same).status == 200
    charset = {"Content-Type": "application/json; charset=utf-8"}
    assert save(server, SLUG_A, {"pinnedIds": []}, charset).status == 200


LONG = "x" * 100_001
BAD_EDITS: list[Any] = [
    {"pinnedIds": ["no_such_node"]},
    {"pinnedIds": IDS[2]},
    {"pinnedIds": [5]},
    {"bogus": 1},
    {"supernodes": [["name only"]]},
    {"supernodes": [["", IDS[2]]]},
    {"supernodes": [[3, IDS[2]]]},
    {"supernodes": [["n", "no_such_node"]]},
    {"supernodes": "C0"},
    {"linkType": "sideways"},
    {"linkType": None},
    {"clickedId": 5},
    {"clickedId": "no_such_node"},
    {"sg_pos": 3},
    {"sg_pos": LONG},
    {"clerps": clerps([[F2]])},
    {"clerps": clerps([[F2, "y" * 1001]])},
    {"clerps": clerps([["999", "label"]])},  # no neuron of the graph
    {"clerps": clerps([[IDS[0], "label"]])},  # a node id, not a feature
    {"clerps": clerps([[str(circuit_tracer_fields("embed", -1, 0, 11)["feature"]), "x"]])},
    {"clerps": [[F2, "label"]]},  # a list: circuit-tracer's frontend JSON.parses a string
    {"clerps": "[[not json"},
    {"clerps": clerps({F2: "label"})},
    [1, 2],
    "pinnedIds",
    b"{not json",
    b"\xff\xfe",
]


@pytest.mark.parametrize("edits", BAD_EDITS, ids=range(len(BAD_EDITS)))
def test_refused_edits_are_400_and_write_nothing(server: Any, run_dir: Path, edits: Any) -> None:
    path = graph_file(run_dir, SLUG_A)
    before = path.read_bytes()
    r = save(server, SLUG_A, edits)
    assert r.status == 400
    message = r.json()["error"]
    assert message and "\n" not in message
    assert path.read_bytes() == before


def _raw_post(server: Any, path: str, headers: dict[str, str], body: bytes = b"") -> Reply:
    """A POST whose headers are sent as given (no Content-Length added)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest("POST", path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        if body:
            conn.send(body)
        return Reply(conn.getresponse())
    finally:
        conn.close()


def test_save_refusals(server: Any, run_dir: Path) -> None:
    path = graph_file(run_dir, SLUG_A)
    before = path.read_bytes()
    url = f"/api/graphs/{SLUG_A}/qparams"
    json_type = {"Content-Type": "application/json"}
    too_big = _raw_post(server, url, {**json_type, "Content-Length": str(2 << 20)})
    assert too_big.status == 413 and too_big.json()["error"]
    assert _raw_post(server, url, json_type).status == 411
    chunked = {**json_type, "Transfer-Encoding": "chunked"}
    assert _raw_post(server, url, chunked, b"2\r\n{}\r\n0\r\n\r\n").status == 411
    assert _raw_post(server, url, {**json_type, "Content-Length": "x"}).status == 400
    assert save(server, SLUG_A, {}, {"Content-Type": "text/plain"}).status == 415
    assert call(server, "POST", url, b"{}").status == 415  # no Content-Type
    foreign = save(server, SLUG_A, {}, {"Origin": "http://evil.example"})
    assert foreign.status == 403 and "origin" in foreign.json()["error"]
    assert save(server, SLUG_A, {}, {"Origin": "null"}).status == 403
    assert save(server, "no-such-graph", {}).status == 404
    assert save(server, "bad%20slug", {}).status == 404
    assert save(server, "..%2f..%2fsecret", {}).status == 405  # not the save route at all
    assert call(server, "GET", url).status == 405
    assert path.read_bytes() == before
    assert _no_temp_files(run_dir)


def test_read_only_refuses_saves(run_dir: Path) -> None:
    path = graph_file(run_dir, SLUG_A)
    before = path.read_bytes()
    with running(run_dir, read_only=True) as s:
        assert call(s, "GET", "/api/run").json()["read_only"] is True
        r = save(s, SLUG_A, {"pinnedIds": [IDS[2]]})
        assert r.status == 403
        assert "--read-only" in r.json()["error"]
    assert path.read_bytes() == before


def test_concurrent_saves_leave_one_whole_state(server: Any, run_dir: Path) -> None:
    states = [[IDS[j] for j in range(7) if (i >> (j % 4)) & 1] + [IDS[i % 7]] for i in range(16)]

    def one(pins: list[str]) -> int:
        return save(server, SLUG_A, {"pinnedIds": pins, "sg_pos": str(len(pins))}).status

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, states))
    assert statuses == [200] * 16
    data = json.loads(graph_file(run_dir, SLUG_A).read_text(encoding="utf-8"))
    pins = data["qParams"]["pinnedIds"]
    assert pins in states
    assert data["qParams"]["sg_pos"] == str(len(pins))  # both keys from the same save
    assert len(data["nodes"]) == 7 and len(data["links"]) == 8
    assert _no_temp_files(run_dir)
    assert not [p for p in os.listdir(run_dir) if p.endswith(".tmp")]
