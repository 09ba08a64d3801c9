"""Influence pruning (``adag.graphs.prune``) against its definition: the influence is checked
against the dense sum over all paths ``w ((I - Â)^-1 - I)``, and the pruning decisions against a
dense, line-by-line transcription of circuit-tracer's ``prune_graph``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.graphs.prune import (
    cumulative_influence,
    edge_influence,
    logit_weights,
    node_influence,
    normalized_adjacency,
    prune,
    prune_masks,
)

PROMPT_IDS = (11, 12, 13, 14)
PROMPT_TOKENS = ("The", " cat", " sat\n", " é")
TARGETS = ((21, " on", 0.5), (22, " down", 0.25), (23, " up", 0.125))


def make_graph(
    nodes: Sequence[str],
    edges: Sequence[tuple[str, str, float]],
    *,
    prompt_ids: Sequence[int] = PROMPT_IDS,
    prompt_tokens: Sequence[str] = PROMPT_TOKENS,
    targets: Sequence[tuple[int, str, float]] = TARGETS,
    n_layers: int = 3,
    dtype: Any = np.float64,
    settings: dict[str, Any] | None = None,
) -> Graph:
    """A valid Graph from DESIGN.md node ids and ``(source id, target id, weight)`` edges.

    Layer / position / index come from the ids (embeddings: layer -1, index = the prompt token
    id; logits ``logit:T``: layer ``n_layers``, the last position, index T; errors index -1).
    Activations, attributions, flows and the attr matrices are simple exact values derived
    from the row and edge numbers, so that every field is distinct and non-trivial."""
    t, k = len(prompt_ids), len(targets)
    target_token = {tid: tok for tid, tok, _ in targets}
    kinds, layer, pos, index, tokens = [], [], [], [], []
    for nid in nodes:
        kind, *rest = nid.split(":")
        if kind == "embed":
            L, P, idx = -1, int(rest[0]), prompt_ids[int(rest[0])]
        elif kind in ("neuron", "feature"):
            L, P, idx = int(rest[0]), int(rest[1]), int(rest[2])
        elif kind == "error":
            L, P, idx = int(rest[0]), int(rest[1]), -1
        else:
            L, P, idx = n_layers, t - 1, int(rest[0])
        kinds.append(kind)
        layer.append(L)
        pos.append(P)
        index.append(idx)
        tokens.append(target_token[idx] if kind == "logit" else prompt_tokens[P])
    row = {nid: i for i, nid in enumerate(nodes)}
    n, e = len(nodes), len(edges)
    i_n = np.arange(n, dtype=np.float64)
    i_e = np.arange(e, dtype=np.float64)
    return Graph(
        node_ids=list(nodes),
        node_kinds=kinds,
        node_layer=np.array(layer, dtype=np.int64),
        node_position=np.array(pos, dtype=np.int64),
        node_index=np.array(index, dtype=np.int64),
        node_activation=(0.5 + 0.25 * i_n).astype(dtype),
        node_attribution=(0.125 * i_n - 1.0).astype(dtype),
        node_tokens=tokens,
        edge_source=np.array([row[s] for s, _, _ in edges], dtype=np.int64).reshape(e),
        edge_target=np.array([row[d] for _, d, _ in edges], dtype=np.int64).reshape(e),
        edge_weight=np.array([w for _, _, w in edges], dtype=np.float64).reshape(e).astype(dtype),
        edge_flow=(0.0625 * i_e - 0.5).astype(dtype),
        input_attr=(np.add.outer(0.5 * i_n, -0.25 * np.arange(t))).astype(dtype),
        output_attr=(np.add.outer(-0.5 * i_n, 0.75 * np.arange(k))).astype(dtype),
        target_ids=np.array([tid for tid, _, _ in targets], dtype=np.int64),
        target_tokens=[tok for _, tok, _ in targets],
        target_coef=np.array([1.0] + [-1.0 / max(k - 1, 1)] * (k - 1), dtype=dtype),
        target_logits=np.array([3.5 - 0.5 * j for j in range(k)], dtype=dtype),
        target_probs=np.array([p for _, _, p in targets], dtype=dtype),
        prompt_ids=np.array(prompt_ids, dtype=np.int64),
        prompt_tokens=list(prompt_tokens),
        prompt="".join(prompt_tokens),
        metric=1.25,
        settings=dict(settings) if settings is not None else {"model": "tiny", "n_layers": 3},
    )


def random_dag(
    seed: int, per_layer: int = 10, density: float = 0.3, dtype: Any = np.float64
) -> Graph:
    """~40 nodes: 4 embeddings, ``per_layer`` neurons in each of 3 layers, an error node per
    layer, 3 logits. Edges go from earlier layers to later ones with random signed weights;
    every neuron and error node gets at least one outgoing edge and every neuron at least one
    incoming edge, so every node lies on a path from an embedding to a logit."""
    rng = np.random.default_rng(seed)
    n_layers = 3
    embeds = [f"embed:{p}" for p in range(len(PROMPT_IDS))]
    layers: list[list[str]] = []
    for L in range(n_layers):
        neurons = {
            f"neuron:{L}:{int(rng.integers(4))}:{int(i)}"
            for i in rng.choice(100, per_layer, replace=False)
        }
        layers.append([*sorted(neurons), f"error:{L}:3"])
    logits = [f"logit:{tid}" for tid, _, _ in TARGETS]
    nodes = embeds + [x for layer in layers for x in layer] + logits
    stage = {x: 0 for x in embeds} | {x: 1 + L for L, ly in enumerate(layers) for x in ly}
    stage |= {x: n_layers + 1 for x in logits}

    def weight() -> float:
        return float(rng.choice([-1, 1]) * rng.uniform(0.1, 2.0))

    edges: dict[tuple[str, str], float] = {}
    for s in nodes:
        later = [d for d in nodes if stage[d] > stage[s] and not d.startswith("error")]
        if not later:
            continue
        for d in later:
            if rng.random() < density:
                edges[(s, d)] = weight()
        if not s.startswith("embed") and not any(a == s for a, _ in edges):
            edges[(s, later[int(rng.integers(len(later)))])] = weight()
    for d in nodes:
        if d.startswith("neuron") and not any(b == d for _, b in edges):
            earlier = [s for s in nodes if stage[s] < stage[d]]
            edges[(earlier[int(rng.integers(len(earlier)))], d)] = weight()
    edge_list = [(s, d, w) for (s, d), w in edges.items()]
    return make_graph(nodes, edge_list, n_layers=n_layers, dtype=dtype)


# -- dense references ---------------------------------------------------------------------------


def dense_adjacency(g: Graph) -> np.ndarray:
    a = np.zeros((g.n_nodes, g.n_nodes))
    a[g.edge_target, g.edge_source] = g.edge_weight
    return a


def dense_normalize(m: np.ndarray) -> np.ndarray:
    """circuit-tracer's ``normalize_matrix``."""
    a = np.abs(m)
    return a / np.maximum(a.sum(axis=1, keepdims=True), 1e-10)


def dense_influence(a_hat: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Sum over all paths of length >= 1: ``w ((I - Â)^-1 - I)``."""
    eye = np.eye(len(w))
    return w @ (np.linalg.inv(eye - a_hat) - eye)


def dense_prune_graph(
    g: Graph, node_threshold: float, edge_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """circuit-tracer's ``prune_graph`` + ``create_used_nodes_and_edges``, transcribed onto dense
    numpy (node kinds by mask instead of by position in the matrix)."""
    kinds = np.array(g.node_kinds)
    always = (kinds == "embed") | (kinds == "logit")
    features = (kinds == "neuron") | (kinds == "feature")
    interior = ~always
    adj = dense_adjacency(g)
    w = logit_weights(g)

    def find_threshold(scores: np.ndarray, threshold: float) -> float:
        s = np.sort(scores)[::-1]
        cum = np.cumsum(s) / np.sum(s)
        i = min(int(np.searchsorted(cum, threshold)), len(cum) - 1)
        return float(s[i])

    ni = dense_influence(dense_normalize(adj), w)
    node_mask = ni >= find_threshold(ni, node_threshold)
    node_mask[always] = True
    pruned = adj.copy()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    p_hat = dense_normalize(pruned)
    scores = p_hat * (dense_influence(p_hat, w) + w)[:, None]
    edge_mask = scores >= find_threshold(scores.flatten(), edge_threshold)
    old = node_mask.copy()
    node_mask[interior] &= edge_mask[:, interior].any(0)
    node_mask[features] &= edge_mask[features].any(1)
    while not np.array_equal(node_mask, old):
        old[:] = node_mask
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[interior] &= edge_mask[:, interior].any(0)
        node_mask[features] &= edge_mask[features].any(1)
    edge_mask &= node_mask[:, None] & node_mask[None, :]
    connected = edge_mask.any(0) | edge_mask.any(1)
    return node_mask & (connected | always), edge_mask


# -- influence ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_node_influence_equals_sum_over_all_paths(seed: int) -> None:
    g = random_dag(seed)
    assert 35 <= g.n_nodes <= 45
    a_hat = dense_normalize(dense_adjacency(g))
    np.testing.assert_allclose(normalized_adjacency(g).toarray(), a_hat, rtol=0, atol=1e-15)
    w = logit_weights(g)
    assert w.sum() == pytest.approx(1.0)
    assert np.count_nonzero(w) == len(TARGETS)
    np.testing.assert_allclose(node_influence(g), dense_influence(a_hat, w), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("seed", [0, 3])
def test_edge_influence_equals_dense_definition(seed: int) -> None:
    g = random_dag(seed)
    rng = np.random.default_rng(seed)
    mask = rng.random(g.n_nodes) < 0.7
    pruned = dense_adjacency(g)
    pruned[~mask] = 0
    pruned[:, ~mask] = 0
    p_hat = dense_normalize(pruned)
    w = logit_weights(g)
    dense = p_hat * (dense_influence(p_hat, w) + w)[:, None]
    got = edge_influence(g, mask)
    np.testing.assert_allclose(got, dense[g.edge_target, g.edge_source], rtol=1e-12, atol=1e-15)
    touches_removed = ~(mask[g.edge_source] & mask[g.edge_target])
    assert np.all(got[touches_removed] == 0)


def test_normalisation_ignores_the_target_scale_and_keeps_empty_rows_zero() -> None:
    nodes = ["embed:0", "embed:1", "neuron:0:1:5", "logit:21"]
    edges = [("embed:0", "neuron:0:1:5", -3.0), ("embed:1", "neuron:0:1:5", 1.0)]
    edges += [("neuron:0:1:5", "logit:21", 0.5)]
    g = make_graph(nodes, edges, targets=[(21, " on", 0.5)])
    a = normalized_adjacency(g).toarray()
    assert a[2, 0] == 0.75 and a[2, 1] == 0.25 and a[3, 2] == 1.0
    assert not a[0].any() and not a[1].any()
    # logit weight 1 (normalised); influence: neuron 1, embeddings 0.75 / 0.25, logit 0
    assert node_influence(g).tolist() == [0.75, 0.25, 1.0, 0.0]


def test_cumulative_influence_matches_circuit_tracer_definition() -> None:
    scores = np.array([0.5, 2.0, 0.0, 1.5])
    # descending: 2.0, 1.5, 0.5, 0.0 -> cumulative 0.5, 0.875, 1.0, 1.0
    assert cumulative_influence(scores).tolist() == [1.0, 0.5, 1.0, 0.875]
    assert cumulative_influence(np.zeros(3)).tolist() == [1.0, 1.0, 1.0]


def test_cycle_raises() -> None:
    nodes = ["embed:0", "neuron:0:0:1", "neuron:1:0:2", "logit:21"]
    edges = [
        ("embed:0", "neuron:0:0:1", 1.0),
        ("neuron:0:0:1", "neuron:1:0:2", 1.0),
        ("neuron:1:0:2", "neuron:0:0:1", 0.5),
        ("neuron:1:0:2", "logit:21", 1.0),
    ]
    g = make_graph(nodes, edges, targets=[(21, " on", 1.0)])
    with pytest.raises(AdagError, match="cycle"):
        node_influence(g)
    with pytest.raises(AdagError, match="cycle"):
        prune(g)


def test_self_loop_raises() -> None:
    nodes = ["embed:0", "neuron:0:0:1", "logit:21"]
    edges = [("embed:0", "neuron:0:0:1", 1.0), ("neuron:0:0:1", "neuron:0:0:1", 0.5)]
    edges += [("neuron:0:0:1", "logit:21", 1.0)]
    with pytest.raises(AdagError, match="cycle"):
        node_influence(make_graph(nodes, edges, targets=[(21, " on", 1.0)]))


# -- pruning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize(("nt", "et"), [(0.8, 0.98), (0.5, 0.9), (0.95, 0.7), (0.0, 0.0)])
def test_prune_masks_match_circuit_tracer(seed: int, nt: float, et: float) -> None:
    g = random_dag(seed)
    node_mask, edge_mask, cumulative = prune_masks(g, node_threshold=nt, edge_threshold=et)
    dense_nodes, dense_edges = dense_prune_graph(g, nt, et)
    assert node_mask.tolist() == dense_nodes.tolist()
    assert edge_mask.tolist() == dense_edges[g.edge_target, g.edge_source].tolist()
    np.testing.assert_allclose(cumulative, cumulative_influence(node_influence(g)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_thresholds_one_keep_everything_reachable(seed: int) -> None:
    g = random_dag(seed)
    assert np.all(node_influence(g)[~g.mask("logit")] > 0)
    p = prune(g, node_threshold=1.0, edge_threshold=1.0)
    assert p.node_ids == g.node_ids
    assert p.edge_dict() == g.edge_dict()
    assert p.settings["pruning"] == {"node_threshold": 1.0, "edge_threshold": 1.0}


def dead_end_graph() -> Graph:
    """embed:0 -> neuron:0:0:1 -> logit:21 and error:0:1 -> logit:21 carry the output;
    neuron:0:0:2 feeds only neuron:1:0:3, which feeds nothing; error:1:2 feeds only that dead
    end; embed:2 has no edges at all."""
    nodes = [
        "embed:0",
        "embed:1",
        "embed:2",
        "neuron:0:0:1",
        "neuron:0:0:2",
        "error:0:1",
        "neuron:1:0:3",
        "error:1:2",
        "logit:21",
    ]
    edges = [
        ("embed:0", "neuron:0:0:1", 1.0),
        ("embed:1", "neuron:0:0:1", -0.5),
        ("embed:0", "neuron:0:0:2", 2.0),
        ("neuron:0:0:2", "neuron:1:0:3", 1.5),
        ("error:1:2", "neuron:1:0:3", 0.25),
        ("neuron:0:0:1", "logit:21", 0.75),
        ("error:0:1", "logit:21", 0.25),
    ]
    return make_graph(nodes, edges, targets=[(21, " on", 0.5)])


def test_dead_end_gets_zero_influence_and_is_pruned() -> None:
    g = dead_end_graph()
    infl = dict(zip(g.node_ids, node_influence(g).tolist(), strict=True))
    for dead in ("neuron:0:0:2", "neuron:1:0:3", "error:1:2", "embed:2"):
        assert infl[dead] == 0.0
    assert infl["neuron:0:0:1"] > 0 and infl["error:0:1"] > 0 and infl["embed:1"] > 0
    p = prune(g, node_threshold=1.0, edge_threshold=1.0)
    # embeddings and logits are always kept (circuit-tracer), even embed:2 with no edges
    assert p.node_ids == ["embed:0", "embed:1", "embed:2", "neuron:0:0:1", "error:0:1", "logit:21"]
    assert set(p.edge_dict()) == {
        ("embed:0", "neuron:0:0:1"),
        ("embed:1", "neuron:0:0:1"),
        ("neuron:0:0:1", "logit:21"),
        ("error:0:1", "logit:21"),
    }


def test_neuron_without_kept_input_is_dropped() -> None:
    """A neuron whose only input edge is cut by the edge threshold loses its last incoming edge
    and is dropped (circuit-tracer: features need an incoming edge; errors do not)."""
    nodes = ["embed:0", "neuron:0:0:1", "neuron:1:0:2", "logit:21"]
    edges = [
        ("embed:0", "neuron:0:0:1", 1.0),
        ("embed:0", "neuron:1:0:2", 0.001),
        ("neuron:0:0:1", "neuron:1:0:2", 1000.0),
        ("neuron:1:0:2", "logit:21", 1.0),
        ("neuron:0:0:1", "logit:21", 1.0),
    ]
    g = make_graph(nodes, edges, targets=[(21, " on", 1.0)])
    p = prune(g, node_threshold=1.0, edge_threshold=0.5)
    node_mask, edge_mask, _ = prune_masks(g, node_threshold=1.0, edge_threshold=0.5)
    dense_nodes, dense_edges = dense_prune_graph(g, 1.0, 0.5)
    assert node_mask.tolist() == dense_nodes.tolist()
    assert edge_mask.tolist() == dense_edges[g.edge_target, g.edge_source].tolist()
    assert p.n_nodes == int(node_mask.sum())


def test_pruned_graph_is_consistent_and_round_trips(tmp_path: Any) -> None:
    g = random_dag(5)
    g.settings["keep"] = {"nested": [1, 2]}
    p = prune(g)
    assert 0 < p.n_nodes < g.n_nodes and 0 < p.n_edges < g.n_edges
    # every kept row carries the same values as before
    rows = [g.index_of(i) for i in p.node_ids]
    assert rows == sorted(rows)
    for name in ("node_layer", "node_position", "node_index", "node_activation"):
        assert np.array_equal(getattr(p, name), getattr(g, name)[rows])
    assert np.array_equal(p.input_attr, g.input_attr[rows])
    assert np.array_equal(p.output_attr, g.output_attr[rows])
    assert p.node_tokens == [g.node_tokens[r] for r in rows]
    assert p.node_kinds == [g.node_kinds[r] for r in rows]
    # edges: same endpoints by id, same weight and flow, original order
    full = g.edge_dict()
    flows = {
        (g.node_ids[s], g.node_ids[t]): f
        for s, t, f in zip(g.edge_source, g.edge_target, g.edge_flow, strict=True)
    }
    kept = list(p.edge_dict().items())
    assert all(full[key] == w for key, w in kept)
    for s, t, f in zip(p.edge_source, p.edge_target, p.edge_flow, strict=True):
        assert flows[(p.node_ids[s], p.node_ids[t])] == f
    order = [list(full).index(key) for key, _ in kept]
    assert order == sorted(order)
    assert p.edge_source.dtype == g.edge_source.dtype == np.int32
    # always-kept kinds, and no stranded interior node
    assert set(g.node_ids) - set(p.node_ids) <= {
        i for i, k in zip(g.node_ids, g.node_kinds, strict=True) if k in ("neuron", "error")
    }
    for row, kind in enumerate(p.node_kinds):
        if kind in ("neuron", "error"):
            assert row in p.edge_source
        if kind == "neuron":
            assert row in p.edge_target
    # settings: copied, recorded, original untouched
    assert p.settings["pruning"] == {"node_threshold": 0.8, "edge_threshold": 0.98}
    assert "pruning" not in g.settings
    p.settings["keep"]["nested"].append(3)
    assert g.settings["keep"] == {"nested": [1, 2]}
    p.settings["keep"]["nested"].pop()
    # the arrays are new
    p.node_activation[0] = 99.0
    assert g.node_activation[g.index_of(p.node_ids[0])] != 99.0
    p.node_activation[0] = g.node_activation[g.index_of(p.node_ids[0])]
    # Graph.save / Graph.load
    path = p.save(tmp_path / "pruned")
    assert Graph.load(path) == p


def test_prune_keeps_float32() -> None:
    g32 = random_dag(1, dtype=np.float32)
    p = prune(g32)
    assert p.node_activation.dtype == p.edge_weight.dtype == p.input_attr.dtype == np.float32
    assert p.target_probs.dtype == np.float32
    assert p.node_ids == prune(random_dag(1)).node_ids


@pytest.mark.parametrize("bad", [-0.1, 1.5, math.nan, "x", None])
def test_bad_thresholds_raise(bad: Any) -> None:
    g = dead_end_graph()
    with pytest.raises(AdagError, match="node_threshold"):
        prune(g, node_threshold=bad)
    with pytest.raises(AdagError, match="edge_threshold"):
        prune(g, edge_threshold=bad)


def test_bad_target_probs_raise() -> None:
    g = dead_end_graph()
    g.target_probs[:] = 0.0
    with pytest.raises(AdagError, match="target_probs"):
        node_influence(g)


def test_large_sparse_graph_runs() -> None:
    """~10^4 nodes and ~3·10^5 edges go through the sparse path quickly (a dense float64 N×N
    matrix would need 800 MB)."""
    rng = np.random.default_rng(0)
    n_layers, per_layer, t = 20, 500, 4
    prompt_ids = tuple(range(100, 100 + t))
    nodes = [f"embed:{p}" for p in range(t)]
    nodes += [f"neuron:{L}:{i % t}:{i}" for L in range(n_layers) for i in range(per_layer)]
    nodes += [f"logit:{tid}" for tid, _, _ in TARGETS]
    n = len(nodes)
    layer_of = np.array(
        [-1] * t + [L for L in range(n_layers) for _ in range(per_layer)] + [99] * 3
    )
    e = 300_000
    src = rng.integers(0, n - 3, size=e)
    tgt = rng.integers(t, n, size=e)
    ok = layer_of[src] < layer_of[tgt]
    pairs = np.unique(np.stack([src[ok], tgt[ok]], axis=1), axis=0)
    g = make_graph(
        nodes,
        [
            (nodes[s], nodes[d], float(w))
            for (s, d), w in zip(pairs.tolist(), rng.normal(size=len(pairs)).tolist(), strict=True)
        ],
        prompt_ids=prompt_ids,
        n_layers=n_layers,
    )
    assert g.n_nodes > 10_000 and g.n_edges > 100_000
    p = prune(g)
    assert 0 < p.n_nodes < g.n_nodes
    assert 0 < p.n_edges < g.n_edges
