"""Viewer JSON (``adag.graphs.export``): circuit-tracer's graph format, pinned by a golden file;
the graph files and the index written by ``write_viewer`` / ``write_index``."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adag.errors import AdagError
from adag.graphs.export import (
    INDEX_FILE,
    slugify,
    to_circuit_tracer,
    viewer_node_ids,
    write_index,
    write_viewer,
)
from adag.graphs.graph import Graph
from adag.graphs.prune import cumulative_influence, node_influence, prune

from .test_prune import make_graph, random_dag

GOLDEN = Path(__file__).parent / "golden" / "viewer_graph.json"

# circuit-tracer's field order (pydantic models in circuit_tracer/frontend/graph_models.py)
NODE_FIELDS = [
    "node_id",
    "feature",
    "layer",
    "ctx_idx",
    "feature_type",
    "token_prob",
    "is_target_logit",
    "run_idx",
    "reverse_ctx_idx",
    "jsNodeId",
    "clerp",
    "influence",
    "activation",
]
METADATA_FIELDS = [
    "slug",
    "scan",
    "transcoder_list",
    "prompt_tokens",
    "prompt",
    "node_threshold",
    "schema_version",
]


def golden_graph(dtype: Any = np.float64) -> Graph:
    """2 embeddings, 3 neurons over 2 layers, 2 logits, 8 edges; all values dyadic, so every
    number in the export (influences included) is computed exactly on any machine."""
    f = np.dtype(dtype)
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
        node_attribution=np.array([0.25, 1.0, 0.5, -0.125, 0.75, 0.75, -0.5], dtype=f),
        node_tokens=["The", " café\n", " café\n", " café\n", " café\n", " sat", " ran"],
        edge_source=np.array([0, 1, 1, 2, 3, 4, 3, 4], dtype=np.int64),
        edge_target=np.array([2, 2, 3, 4, 4, 5, 5, 6], dtype=np.int64),
        edge_weight=np.array([0.5, -1.5, 2.0, 1.25, -0.75, 0.5, 0.5, -1.0], dtype=f),
        edge_flow=np.array([0.125, -0.5, 0.25, 0.375, -0.25, 0.5, 0.25, -0.75], dtype=f),
        input_attr=np.array(
            [
                [0.5, 0.0],
                [0.0, 1.0],
                [0.25, -0.5],
                [0.0, 0.75],
                [0.125, 0.5],
                [1.5, 2.0],
                [-1.0, 0.5],
            ],
            dtype=f,
        ),
        output_attr=np.array(
            [
                [0.5, -0.5],
                [1.0, -1.25],
                [0.25, 0.0],
                [0.5, -0.25],
                [1.0, -1.0],
                [4.5, 0.0],
                [0.0, 3.25],
            ],
            dtype=f,
        ),
        target_ids=np.array([21, 22], dtype=np.int64),
        target_tokens=[" sat", " ran"],
        target_coef=np.array([1.0, -1.0], dtype=f),
        target_logits=np.array([4.5, 3.25], dtype=f),
        target_probs=np.array([0.75, 0.25], dtype=f),
        prompt_ids=np.array([11, 12], dtype=np.int64),
        prompt_tokens=["The", " café\n"],
        prompt="The café\n",
        metric=1.25,
        settings={
            "model": "tiny-llama",
            "n_layers": 2,
            "pruning": {"node_threshold": 0.8, "edge_threshold": 0.98},
        },
    )


def golden_text() -> str:
    data = to_circuit_tracer(golden_graph(), slug="golden")
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def test_golden_viewer_json() -> None:
    # The viewer JSON is a contract (circuit-tracer's frontend and Neuronpedia read it). To change
    # it deliberately, regenerate the file and review the diff field by field against
    # circuit-tracer's graph_models.py:
    #     ADAG_REGEN_GOLDEN=1 .venv/bin/pytest -q tests/test_export.py -k golden
    text = golden_text()
    if os.environ.get("ADAG_REGEN_GOLDEN") == "1":
        from adag.io import write_text

        write_text(GOLDEN, text)
    assert GOLDEN.read_text(encoding="utf-8") == text


def test_fields_follow_circuit_tracer() -> None:
    g = golden_graph()
    data = to_circuit_tracer(g, slug="golden")
    assert list(data) == ["metadata", "qParams", "nodes", "links"]
    meta = data["metadata"]
    assert list(meta)[:7] == METADATA_FIELDS
    assert meta["slug"] == "golden"
    assert meta["scan"] == "tiny-llama"
    assert meta["transcoder_list"] == []
    assert meta["prompt_tokens"] == ["The", " café⏎"]  # circuit-tracer's process_token
    assert meta["prompt"] == "The café\n"
    assert meta["node_threshold"] == 0.8
    assert meta["schema_version"] == 1
    assert data["qParams"] == {
        "pinnedIds": [],
        "supernodes": [],
        "linkType": "both",
        "clickedId": "",
        "sg_pos": "",
    }
    nodes = {n["adag_id"]: n for n in data["nodes"]}
    assert all(list(n)[:13] == NODE_FIELDS for n in data["nodes"])
    # influence: raw 0.90234375, 0.625, 0.609375, 0.390625, 0.09765625 (embed:1, neuron:1:1:3,
    # neuron:0:1:7, neuron:0:1:5, embed:0); total 2.625; cumulative fraction in that order
    cum = {"embed:1": 0.90234375 / 2.625, "neuron:1:1:3": 1.52734375 / 2.625}
    base = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0}
    assert {k: nodes["neuron:1:1:3"][k] for k in NODE_FIELDS} == {
        **base,
        "node_id": "1_3_1",
        "feature": (1 + 3) * (1 + 3 + 1) // 2 + 3,  # Node.feature_node's cantor_pairing
        "layer": "1",
        "ctx_idx": 1,
        "feature_type": "cross layer transcoder",
        "jsNodeId": "1_3-0",
        "clerp": "",
        "influence": cum["neuron:1:1:3"],
        "activation": 1.25,
    }
    assert {k: nodes["embed:1"][k] for k in NODE_FIELDS} == {
        **base,
        "node_id": "E_12_1",
        "feature": 1,
        "layer": "E",
        "ctx_idx": 1,
        "feature_type": "embedding",
        "jsNodeId": "E_12-1",
        "clerp": "",
        "influence": cum["embed:1"],
        "activation": None,
    }
    assert {k: nodes["logit:21"][k] for k in NODE_FIELDS} == {
        **base,
        "node_id": "3_21_1",  # layer n_layers + 1
        "feature": 21,
        "layer": "3",
        "ctx_idx": 1,
        "feature_type": "logit",
        "token_prob": 0.75,
        "is_target_logit": True,
        "jsNodeId": "L_21-1",
        "clerp": 'Output " sat" (p=0.750)',
        "influence": None,
        "activation": None,
    }
    assert nodes["logit:22"]["is_target_logit"] is True
    assert nodes["logit:22"]["token_prob"] == 0.25
    # weight: the raw direct effect (edge_weight x the target's activation 2.0), as circuit-tracer
    assert data["links"][0] == {
        "source": "E_11_0",
        "target": "0_5_1",
        "weight": 1.0,
        "adag_weight": 0.5,
        "flow": 0.125,
    }
    assert data["links"][-1] == {
        "source": "1_3_1",
        "target": "3_22_1",
        "weight": -3.25,
        "adag_weight": -1.0,
        "flow": -0.75,
    }


def test_error_node_fields() -> None:
    g = make_graph(
        ["embed:0", "neuron:0:0:4", "error:1:2", "logit:21"],
        [
            ("embed:0", "neuron:0:0:4", 1.0),
            ("neuron:0:0:4", "logit:21", 1.0),
            ("error:1:2", "logit:21", 0.5),
        ],
        targets=[(21, " on", 1.0)],
        n_layers=2,
    )
    node = to_circuit_tracer(g, slug="e")["nodes"][2]
    assert {k: node[k] for k in ("node_id", "feature", "layer", "ctx_idx", "feature_type")} == {
        "node_id": "1_-1_2",
        "feature": -1,
        "layer": "1",
        "ctx_idx": 2,
        "feature_type": "mlp reconstruction error",
    }
    assert node["jsNodeId"] == "1_-1-2"
    assert node["activation"] is None
    assert viewer_node_ids(g) == ["E_11_0", "0_4_0", "1_-1_2", "3_21_3"]


def test_influence_is_circuit_tracers_cumulative_score() -> None:
    g = random_dag(0)
    data = to_circuit_tracer(g, slug="x")
    cum = cumulative_influence(node_influence(g))
    for row, node in enumerate(data["nodes"]):
        assert node["influence"] == (None if node["adag_kind"] == "logit" else cum[row])
    raw = np.linspace(1.0, 2.0, g.n_nodes)
    data = to_circuit_tracer(g, slug="x", influence=raw)
    assert data["nodes"][-4]["influence"] == cumulative_influence(raw)[-4]
    with pytest.raises(AdagError, match="influence"):
        to_circuit_tracer(g, slug="x", influence=raw[:-1])


def test_export_meanings_are_circuit_tracers_on_a_hand_computed_graph() -> None:
    """Issue 14 item 4. The golden graph (hand-checkable dyadic values), pruned so that
    ``neuron:0:1:7`` and its edges go: influence is the unpruned graph's cumulative score (what
    circuit-tracer computes before pruning), not the pruned graph's; a link's weight is the raw
    direct effect, so an edge into the negative-activation ``neuron:0:1:7`` (activation −0.5,
    normalised weight +2.0) is exported as −1.0."""
    g = golden_graph()
    full = to_circuit_tracer(g, slug="x")
    raw = {(x["source"], x["target"]): x["weight"] for x in full["links"]}
    assert raw[("E_12_1", "0_7_1")] == -1.0  # 2.0 x -0.5: the sign the frontend colours
    assert raw[("E_12_1", "0_5_1")] == -3.0  # -1.5 x 2.0
    assert raw[("0_7_1", "1_3_1")] == -0.9375  # -0.75 x 1.25
    # hand-computed influence of the full graph (test_fields_follow_circuit_tracer): raw
    # 0.90234375 (embed:1), 0.625 (neuron:1:1:3), 0.609375 (neuron:0:1:7), 0.390625
    # (neuron:0:1:5), 0.09765625 (embed:0); total 2.625; cumulative fraction in that order
    cum = {n["adag_id"]: n["influence"] for n in full["nodes"]}
    assert cum["neuron:0:1:7"] == 2.13671875 / 2.625
    assert cum["neuron:0:1:5"] == 2.52734375 / 2.625
    keep = [i for i in g.node_ids if i != "neuron:0:1:7"]
    rows = [g.index_of(i) for i in keep]
    edges = [
        e
        for e in range(g.n_edges)
        if g.node_ids[g.edge_source[e]] in keep and g.node_ids[g.edge_target[e]] in keep
    ]
    pruned = Graph(
        **{
            **{k: getattr(g, k) for k in g.__dataclass_fields__},
            "node_ids": keep,
            "node_kinds": [g.node_kinds[r] for r in rows],
            "node_layer": g.node_layer[rows],
            "node_position": g.node_position[rows],
            "node_index": g.node_index[rows],
            "node_activation": g.node_activation[rows],
            "node_attribution": g.node_attribution[rows],
            "node_tokens": [g.node_tokens[r] for r in rows],
            "edge_source": np.array([keep.index(g.node_ids[g.edge_source[e]]) for e in edges]),
            "edge_target": np.array([keep.index(g.node_ids[g.edge_target[e]]) for e in edges]),
            "edge_weight": g.edge_weight[edges],
            "edge_flow": g.edge_flow[edges],
            "input_attr": g.input_attr[rows],
            "output_attr": g.output_attr[rows],
        }
    )
    data = to_circuit_tracer(pruned, slug="x", full_graph=g)
    got = {n["adag_id"]: n["influence"] for n in data["nodes"]}
    assert got == {i: cum[i] for i in keep}
    alone = {n["adag_id"]: n["influence"] for n in to_circuit_tracer(pruned, slug="x")["nodes"]}
    # recomputed on the pruned graph, the same nodes look far less influential (larger fraction)
    assert alone["neuron:1:1:3"] > cum["neuron:1:1:3"]
    with pytest.raises(AdagError, match="not both"):
        to_circuit_tracer(pruned, slug="x", full_graph=g, influence=np.zeros(pruned.n_nodes))
    with pytest.raises(AdagError, match="not in full_graph"):
        to_circuit_tracer(g, slug="x", full_graph=pruned)


def test_supernodes_pinned_ids_labels_and_scan() -> None:
    g = golden_graph()
    data = to_circuit_tracer(
        g,
        slug="s",
        scan=["tc-0", "tc-1"],
        supernodes=[["early", "neuron:0:1:5", "neuron:0:1:7"], ["late", "neuron:1:1:3"]],
        pinned_ids=["embed:0", "logit:22"],
        labels={"neuron:0:1:7": "café neuron", "logit:21": "sat!", "neuron:9:9:9": "gone"},
    )
    assert data["qParams"]["supernodes"] == [["early", "0_5_1", "0_7_1"], ["late", "1_3_1"]]
    assert data["qParams"]["pinnedIds"] == ["E_11_0", "3_22_1"]
    clerps = {n["adag_id"]: n["clerp"] for n in data["nodes"]}
    assert clerps["neuron:0:1:7"] == "café neuron"
    assert clerps["logit:21"] == "sat!"
    assert clerps["neuron:0:1:5"] == ""
    meta = data["metadata"]
    assert meta["transcoder_list"] == ["tc-0", "tc-1"]
    assert meta["scan"].startswith("custom-")
    assert meta["scan"] == to_circuit_tracer(g, slug="s", scan=["tc-0", "tc-1"])["metadata"]["scan"]
    with pytest.raises(AdagError, match="not in this graph"):
        to_circuit_tracer(g, slug="s", supernodes=[["x", "neuron:4:4:4"]])
    with pytest.raises(AdagError, match="name"):
        to_circuit_tracer(g, slug="s", supernodes=[["lonely"]])
    with pytest.raises(AdagError, match="not in this graph"):
        to_circuit_tracer(g, slug="s", pinned_ids=["embed:7"])


def _noisy(g: Graph, seed: int) -> Graph:
    """``g`` with every float field replaced by random, non-dyadic values of the same dtype."""
    rng = np.random.default_rng(seed)
    for name in ("node_activation", "node_attribution", "edge_flow", "input_attr", "output_attr"):
        arr = getattr(g, name)
        setattr(
            g, name, (rng.normal(size=arr.shape) * 10.0 ** rng.integers(-8, 8)).astype(arr.dtype)
        )
    g.edge_weight = (rng.normal(size=g.n_edges) / 3).astype(g.edge_weight.dtype)
    return g


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adag_extras_hold_the_graph_values(dtype: Any) -> None:
    # write-only: no re-import block, but every per-node / per-link value the viewer shows
    noisy = _noisy(random_dag(2, dtype=dtype), 0)
    for g in (golden_graph(dtype), noisy, prune(noisy)):
        data = json.loads(json.dumps(to_circuit_tracer(g, slug="x"), separators=(",", ":")))
        assert list(data["metadata"]) == [*METADATA_FIELDS, "adag_targets"]
        targets = data["metadata"]["adag_targets"]  # the order of every node's output_attr
        assert [t["token"] for t in targets] == g.target_tokens
        assert [t["token_id"] for t in targets] == g.target_ids.tolist()
        for key, arr in (
            ("prob", g.target_probs),
            ("logit", g.target_logits),
            ("coef", g.target_coef),
        ):
            assert np.array_equal(np.array([t[key] for t in targets], dtype=arr.dtype), arr), key
        nodes = data["nodes"]
        assert [n["adag_id"] for n in nodes] == g.node_ids
        assert [n["adag_kind"] for n in nodes] == g.node_kinds
        assert [n["adag_layer"] for n in nodes] == g.node_layer.tolist()
        assert [n["adag_index"] for n in nodes] == g.node_index.tolist()
        assert [n["ctx_idx"] for n in nodes] == g.node_position.tolist()
        assert [n["token"] for n in nodes] == g.node_tokens
        # float32 values are written as their float64 repr: exact after the cast back
        for key, arr in (
            ("adag_activation", g.node_activation),
            ("attribution", g.node_attribution),
            ("input_attr", g.input_attr),
            ("output_attr", g.output_attr),
        ):
            assert np.array_equal(np.array([n[key] for n in nodes], dtype=arr.dtype), arr), key
        assert all("adag_position" not in n for n in nodes)
        links = data["links"]
        assert np.array_equal(np.array([x["flow"] for x in links], dtype=dtype), g.edge_flow)
        assert np.array_equal(
            np.array([x["adag_weight"] for x in links], dtype=dtype), g.edge_weight
        )
        raw = g.adjacency("raw")[g.edge_target, g.edge_source].A1  # Graph's own raw entries
        assert np.array_equal(np.array([x["weight"] for x in links]), raw)
        row = {nid: i for i, nid in enumerate(viewer_node_ids(g))}
        assert [row[x["source"]] for x in links] == g.edge_source.tolist()
        assert [row[x["target"]] for x in links] == g.edge_target.tolist()


def test_write_viewer_writes_only_the_graph_file(tmp_path: Path) -> None:
    g = _noisy(random_dag(4, dtype=np.float32), 1)
    path = write_viewer(g, tmp_path / "viewer", slug="my-graph.v1")
    assert path == tmp_path / "viewer" / "my-graph.v1.json"
    text = path.read_text(encoding="utf-8")
    assert "\n" not in text and ", " not in text.split('"prompt"')[0]
    assert json.loads(text) == json.loads(json.dumps(to_circuit_tracer(g, slug="my-graph.v1")))
    assert sorted(p.name for p in (tmp_path / "viewer").iterdir()) == ["my-graph.v1.json"]
    # an old index is left alone: write_index rebuilds it
    (tmp_path / "viewer" / INDEX_FILE).write_text("{not json", encoding="utf-8")
    write_viewer(g, tmp_path / "viewer", slug="second")
    assert (tmp_path / "viewer" / INDEX_FILE).read_text(encoding="utf-8") == "{not json"


def test_write_index_from_graph_files(tmp_path: Path) -> None:
    g = golden_graph()
    write_viewer(g, tmp_path, slug="second", scan="other-scan")
    write_viewer(g, tmp_path, slug="first")
    # a graph file circuit-tracer wrote is listed like ours
    theirs = {"metadata": {"slug": "theirs", "scan": "gemma-2-2b", "prompt": "hi"}, "nodes": []}
    (tmp_path / "theirs.json").write_text(json.dumps(theirs), encoding="utf-8")
    (tmp_path / INDEX_FILE).write_text("{stale, not even json", encoding="utf-8")
    path = write_index(tmp_path)
    assert path == tmp_path / INDEX_FILE
    index = json.loads(path.read_text(encoding="utf-8"))
    assert [e["slug"] for e in index["graphs"]] == ["first", "second", "theirs"]  # by file name
    assert index["graphs"][1]["scan"] == "other-scan"
    assert index["graphs"][2] == theirs["metadata"]
    first = json.loads((tmp_path / "first.json").read_text(encoding="utf-8"))["metadata"]
    assert index["graphs"][0] == first
    assert list(index["graphs"][0]) == [*METADATA_FIELDS, "adag_targets"]
    assert path.read_text(encoding="utf-8") == json.dumps(index, indent=2, ensure_ascii=False)
    # given slugs: only those, in the given order; a rewritten graph shows its new metadata
    g.prompt = "changed"
    write_viewer(g, tmp_path, slug="first")
    index = json.loads(write_index(tmp_path, ["second", "first", "second"]).read_text("utf-8"))
    assert [e["slug"] for e in index["graphs"]] == ["second", "first"]
    assert [e["prompt"] for e in index["graphs"]] == ["The café\n", "changed"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_write_index_of_an_empty_directory(tmp_path: Path) -> None:
    path = write_index(tmp_path)
    assert json.loads(path.read_text(encoding="utf-8")) == {"graphs": []}
    with pytest.raises(AdagError, match="does not exist"):
        write_index(tmp_path / "missing")


def test_write_index_errors_write_nothing(tmp_path: Path) -> None:
    write_viewer(golden_graph(), tmp_path, slug="ok")
    with pytest.raises(AdagError, match="does not exist"):
        write_index(tmp_path, ["ok", "missing"])
    with pytest.raises(AdagError, match="slug"):
        write_index(tmp_path, ["../ok"])
    (tmp_path / "broken.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(AdagError, match="not valid JSON"):
        write_index(tmp_path)
    (tmp_path / "broken.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(AdagError, match="not a circuit-tracer graph file"):
        write_index(tmp_path)
    assert not (tmp_path / INDEX_FILE).exists()
    index = json.loads(write_index(tmp_path, ["ok"]).read_text(encoding="utf-8"))
    assert [e["slug"] for e in index["graphs"]] == ["ok"]


@pytest.mark.parametrize(
    "spoil",
    [
        lambda g: g.node_activation.__setitem__(2, math.nan),
        lambda g: g.edge_weight.__setitem__(0, math.inf),
        lambda g: g.edge_flow.__setitem__(1, -math.inf),
        lambda g: g.input_attr.__setitem__((0, 1), math.nan),
        lambda g: g.target_logits.__setitem__(0, math.nan),
        lambda g: setattr(g, "metric", math.nan),
        lambda g: g.settings["pruning"].__setitem__("node_threshold", math.nan),
    ],
)
def test_nan_raises_and_writes_nothing(tmp_path: Path, spoil: Any) -> None:
    g = golden_graph()
    spoil(g)
    with pytest.raises(AdagError, match=r"NaN|JSON"):
        write_viewer(g, tmp_path / "out", slug="nan")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    with pytest.raises(AdagError):
        to_circuit_tracer(g, slug="nan")


@pytest.mark.parametrize("slug", ["", "a b", "a/b", "../x", "é", "x\n", "a:b"])
def test_bad_slug_raises(tmp_path: Path, slug: str) -> None:
    with pytest.raises(AdagError, match="slug"):
        write_viewer(golden_graph(), tmp_path, slug=slug)
    with pytest.raises(AdagError, match="slug"):
        to_circuit_tracer(golden_graph(), slug=slug)
    assert not any(tmp_path.iterdir())


def test_slugify() -> None:
    assert slugify("The capital of France is") == "the-capital-of-france-is"
    assert slugify("  IOI: John & Mary!! ") == "ioi-john-mary"
    assert slugify("Éà 東京") == "graph"
    assert slugify("") == "graph"
    assert slugify("---") == "graph"
    long = slugify("word " * 40)
    assert len(long) <= 48 and not long.endswith("-") and long.startswith("word-word")
    assert slugify("abc def", max_len=4) == "abc"
    for text in ("x", "A.B", "a_b", "?"):
        write_ok = slugify(text)
        assert write_ok and all(c.isalnum() or c == "-" for c in write_ok)


def test_colliding_export_ids_raise() -> None:
    g = make_graph(
        ["embed:0", "neuron:0:0:4", "feature:0:0:4", "logit:21"],
        [("embed:0", "neuron:0:0:4", 1.0), ("neuron:0:0:4", "logit:21", 1.0)],
        targets=[(21, " on", 1.0)],
    )
    with pytest.raises(AdagError, match="both export to circuit-tracer id"):
        to_circuit_tracer(g, slug="c")
