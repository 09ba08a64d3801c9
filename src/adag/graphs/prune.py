"""Influence pruning of attribution graphs, as in Anthropic's circuit tracing (Ameisen et al., 2025,
"Circuit Tracing", §"Graph pruning") and its open implementation, the ``circuit-tracer`` library
(``circuit_tracer/graph.py``: ``normalize_matrix``, ``compute_influence``,
``compute_node_influence``, ``compute_edge_influence``, ``find_threshold``, ``prune_graph``).

What is followed, step for step, on our sparse edge lists (``scipy.sparse``; never a dense N×N
matrix) instead of circuit-tracer's dense adjacency matrix:

1. **Normalised adjacency** ``Â`` (rows = targets, columns = sources): ``|A|`` with every row
   divided by its sum clamped below at ``1e-10`` (``normalize_matrix``), so rows sum to 1 and rows
   without inputs stay zero. Our ``edge_weight`` is already divided by the target's value; that
   row scale cancels in the normalisation, so ``Â`` is exactly circuit-tracer's.
2. **Node influence** ``w Â + w Â² + …`` with ``w`` the logit weights (``compute_influence``):
   the power series is summed until the vector is exactly zero, which happens after at most the
   DAG depth; a vector still non-zero after ``N`` steps means a cycle (:class:`AdagError`).
   Logit nodes have no outgoing edges, so their own influence is 0, as in circuit-tracer.
3. **Node threshold** (``find_threshold``): sort influences in descending order, take the
   cumulative fraction, find the first rank whose cumulative fraction reaches the threshold
   (``searchsorted``, left side) and keep every node whose influence is ``>=`` the score at that
   rank (ties at the cut-off are all kept). Embeddings (circuit-tracer's token nodes) and logits
   are always kept; error nodes are pruned like features.
4. **Edge influence** (``compute_edge_influence``): zero the rows and columns of pruned nodes,
   re-normalise, recompute the influence ``I`` on that matrix and score each edge
   ``Â'[t, s] · (I[t] + w[t])``; edges are kept by the same cumulative rule.
5. **Clean-up** (end of ``prune_graph`` and ``create_used_nodes_and_edges``): repeatedly drop
   feature and error nodes without a kept outgoing edge and feature nodes (our ``neuron`` and
   ``feature`` kinds) without a kept incoming edge, and the edges touching them, until nothing
   changes; then drop nodes touching no kept edge, except embeddings and logits.

Deviations, each deliberate:

- The logit weights are ``target_probs`` normalised to sum 1 (circuit-tracer uses the raw
  probabilities). This scales every influence and edge score by one constant, which changes no
  threshold decision and no cumulative fraction.
- ``find_threshold`` never picks a zero score: the cumulative fraction is divided by its own last
  value, and the cut-off rank is clamped to the last positive score. In exact arithmetic this is
  circuit-tracer's rule; in floats its ``cumsum``/``sum`` mismatch can push the rank into the
  zeros at threshold 1.0 and keep everything (the regression pinned by circuit-tracer's
  ``tests/test_prune_graph_threshold.py``). At threshold 1.0 the cut-off is the smallest
  positive score, so scores too small to move the rounded cumulative sum are kept too. With no
  positive score at all nothing is kept.
- Everything is computed in float64 whatever the graph's dtype.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from adag.errors import AdagError
from adag.graphs.graph import Graph

_CLAMP = 1e-10  # circuit-tracer's normalize_matrix clamp on the row sums
_ALWAYS_KEPT = ("embed", "logit")  # circuit-tracer keeps all token and logit nodes
_NEED_INPUT = ("neuron", "feature")  # circuit-tracer's feature nodes: need in and out edges


class PruneResult(NamedTuple):
    """What :func:`prune_masks` decides (circuit-tracer's ``PruneResult``).

    ``node_mask`` (N,) bool and ``edge_mask`` (E,) bool select the kept rows of the graph's node
    and edge arrays; ``cumulative_scores`` (N,) float64 is each node's cumulative influence
    fraction (see :func:`cumulative_influence`), computed on the unpruned graph."""

    node_mask: np.ndarray
    edge_mask: np.ndarray
    cumulative_scores: np.ndarray


# -- influence ---------------------------------------------------------------------------------


def logit_weights(graph: Graph) -> np.ndarray:
    """(N,) float64: the weight of each node as an output, ``target_probs`` normalised to sum 1
    placed on the logit rows (``node_kinds == "logit"`` and ``node_index == target_ids[j]``;
    the first target wins if ids repeat), zero on every other row."""
    probs = np.asarray(graph.target_probs, dtype=np.float64)
    total = float(probs.sum()) if probs.size else 0.0
    if not np.all(np.isfinite(probs)) or np.any(probs < 0) or not total > 0:
        raise AdagError(
            "graph target_probs must be finite, non-negative and not all zero to weight the "
            "logits; re-trace the graph"
        )
    by_id: dict[int, float] = {}
    for tid, p in zip(graph.target_ids.tolist(), (probs / total).tolist(), strict=True):
        by_id.setdefault(int(tid), float(p))
    w = np.zeros(graph.n_nodes, dtype=np.float64)
    index = graph.node_index.tolist()
    for row, kind in enumerate(graph.node_kinds):
        if kind == "logit":
            w[row] = by_id.get(int(index[row]), 0.0)
    return w


def _normalized_edge_values(graph: Graph, keep_edge: np.ndarray | None = None) -> np.ndarray:
    """(E,) float64: each edge's entry of ``Â`` (``|weight|`` over its target's row sum clamped at
    1e-10); edges outside ``keep_edge`` are removed before normalising and get 0."""
    weight = np.asarray(graph.edge_weight)
    if weight.size and not np.all(np.isfinite(weight)):
        raise AdagError("graph edge_weight holds NaN or inf; re-trace the graph")
    a = np.abs(weight.astype(np.float64))
    if keep_edge is not None:
        a = np.where(keep_edge, a, 0.0)
    target = np.asarray(graph.edge_target, dtype=np.int64)
    row_sum = np.bincount(target, weights=a, minlength=graph.n_nodes)  # (N,)
    return a / np.maximum(row_sum, _CLAMP)[target]


def normalized_adjacency(graph: Graph) -> sp.csr_matrix:
    """circuit-tracer's ``normalize_matrix`` as a sparse (N, N) float64 matrix: rows are targets,
    columns are sources, entries ``|edge_weight|`` divided by the row sum (clamped below at
    1e-10), so each row with inputs sums to 1 and rows without stay zero."""
    n = graph.n_nodes
    values = _normalized_edge_values(graph)
    return sp.csr_matrix(
        (values, (np.asarray(graph.edge_target), np.asarray(graph.edge_source))), shape=(n, n)
    )


def _influence(graph: Graph, values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``w Â + w Â² + …`` (circuit-tracer's ``compute_influence``) for the matrix whose per-edge
    entries are ``values``. Returns (N,) float64."""
    n = graph.n_nodes
    # Â transposed (rows = sources), so that ``at @ v`` is the row vector product ``v Â``.
    at = sp.csr_matrix(
        (values, (np.asarray(graph.edge_source), np.asarray(graph.edge_target))), shape=(n, n)
    )
    current = at @ weights
    total = current.copy()
    steps = 0
    # Entries are non-negative, so nothing cancels: on a DAG the vector is exactly zero after at
    # most depth steps, and one still alive after N steps can only be circulating in a cycle.
    while current.any():
        if steps >= n:
            raise AdagError(
                f"influence did not vanish after {n} steps, so the graph's edges form a cycle; "
                "attribution graphs must be DAGs (check edge_source / edge_target)"
            )
        current = at @ current
        total += current
        steps += 1
    return np.asarray(total, dtype=np.float64)


def node_influence(graph: Graph) -> np.ndarray:
    """(N,) float64: every node's total influence on the logits, ``w Â + w Â² + …`` with ``w`` from
    :func:`logit_weights` and ``Â`` from :func:`normalized_adjacency` (circuit-tracer's
    ``compute_node_influence``). Logit nodes get 0; nodes with no path to a weighted logit get 0.
    Raises :class:`AdagError` if influence flows around a cycle (a cycle of non-zero edges with
    a path to a weighted logit; cycles elsewhere carry no influence and go unnoticed)."""
    return _influence(graph, _normalized_edge_values(graph), logit_weights(graph))


def edge_influence(graph: Graph, node_mask: np.ndarray | None = None) -> np.ndarray:
    """(E,) float64: circuit-tracer's ``compute_edge_influence``. The nodes outside ``node_mask``
    (N,) bool (default: keep all) are cut out with their edges, the remaining adjacency is
    re-normalised to ``Â'``, the influence ``I`` is recomputed on it, and edge ``s → t`` scores
    ``Â'[t, s] · (I[t] + w[t])``. Edges touching a removed node score 0."""
    keep_edge = None
    if node_mask is not None:
        mask = np.asarray(node_mask, dtype=bool)
        if mask.shape != (graph.n_nodes,):
            raise AdagError(f"node_mask has shape {mask.shape}, expected ({graph.n_nodes},)")
        keep_edge = mask[graph.edge_source] & mask[graph.edge_target]
    values = _normalized_edge_values(graph, keep_edge)
    w = logit_weights(graph)
    reach = _influence(graph, values, w) + w
    return values * reach[np.asarray(graph.edge_target, dtype=np.int64)]


def cumulative_influence(scores: np.ndarray) -> np.ndarray:
    """(N,) float64: for each node, the fraction of the total score held by it and every node
    ranked above it (descending order, stable for ties). This is the value circuit-tracer writes
    as each node's ``influence`` in the viewer JSON (``prune_graph``'s ``cumulative_scores``):
    small = among the most influential. All ones when the scores sum to zero."""
    s = np.asarray(scores, dtype=np.float64)
    out = np.ones(s.shape, dtype=np.float64)
    if s.size == 0:
        return out
    order = np.argsort(-s, kind="stable")
    cum = np.cumsum(s[order])
    if cum[-1] > 0:
        out[order] = cum / cum[-1]
    return out


# -- pruning -------------------------------------------------------------------------------------


def _find_threshold(scores: np.ndarray, threshold: float) -> float:
    """circuit-tracer's ``find_threshold``: the score at the first rank (descending) whose
    cumulative fraction reaches ``threshold``; never a zero score (see the module docstring);
    ``inf`` (keep nothing) when no score is positive."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    positive = int(np.count_nonzero(s > 0))
    if positive == 0:
        return math.inf
    if threshold >= 1.0:  # all of the influence: every positive score, whatever the rounding
        return float(s[positive - 1])
    cum = np.cumsum(s)
    cum /= cum[-1]
    rank = min(int(np.searchsorted(cum, threshold, side="left")), positive - 1)
    return float(s[rank])


def _check_threshold(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AdagError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:  # also rejects NaN
        raise AdagError(f"{name} must be in [0, 1], got {value!r}")
    return v


def prune_masks(
    graph: Graph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> PruneResult:
    """circuit-tracer's ``prune_graph`` on our graph: which nodes and edges to keep (see the module
    docstring for the steps). Thresholds are fractions of the total influence in ``[0, 1]``."""
    node_threshold = _check_threshold("node_threshold", node_threshold)
    edge_threshold = _check_threshold("edge_threshold", edge_threshold)
    n = graph.n_nodes
    src = np.asarray(graph.edge_source, dtype=np.int64)
    tgt = np.asarray(graph.edge_target, dtype=np.int64)
    kinds = np.array(graph.node_kinds, dtype=object)
    always = np.isin(kinds, _ALWAYS_KEPT)
    need_input = np.isin(kinds, _NEED_INPUT)

    influence = node_influence(graph)
    node_mask = influence >= _find_threshold(influence, node_threshold)
    node_mask |= always

    scores = edge_influence(graph, node_mask)
    edge_mask = scores >= _find_threshold(scores, edge_threshold)

    # Each drop can strand further nodes; a DAG settles within its depth.
    while True:
        before = node_mask.copy()
        edge_mask &= node_mask[src] & node_mask[tgt]
        has_out = np.bincount(src[edge_mask], minlength=n) > 0
        has_in = np.bincount(tgt[edge_mask], minlength=n) > 0
        node_mask &= always | has_out
        node_mask &= ~need_input | has_in
        if np.array_equal(node_mask, before):
            break
    edge_mask &= node_mask[src] & node_mask[tgt]
    # create_used_nodes_and_edges: only nodes on a kept edge, plus every embedding and logit.
    touched = np.zeros(n, dtype=bool)
    touched[src[edge_mask]] = True
    touched[tgt[edge_mask]] = True
    node_mask &= touched | always
    return PruneResult(node_mask, edge_mask, cumulative_influence(influence))


def subgraph(graph: Graph, node_mask: np.ndarray, edge_mask: np.ndarray) -> Graph:
    """A new :class:`Graph` with the selected node rows (original order) and edges (original
    order, endpoints re-indexed); every per-node array, ``input_attr`` and ``output_attr`` rows
    included, is subset consistently. Edges whose endpoints are not both kept are dropped.
    ``settings`` is deep-copied."""
    nm = np.asarray(node_mask, dtype=bool)
    em = np.asarray(edge_mask, dtype=bool)
    if nm.shape != (graph.n_nodes,) or em.shape != (graph.n_edges,):
        raise AdagError(
            f"masks have shapes {nm.shape} and {em.shape}, expected ({graph.n_nodes},) and "
            f"({graph.n_edges},)"
        )
    rows = np.flatnonzero(nm)
    em = em & nm[graph.edge_source] & nm[graph.edge_target]
    edges = np.flatnonzero(em)
    new_row = np.full(graph.n_nodes, -1, dtype=np.int64)
    new_row[rows] = np.arange(rows.size, dtype=np.int64)
    keep = rows.tolist()
    return Graph(
        node_ids=[graph.node_ids[i] for i in keep],
        node_kinds=[graph.node_kinds[i] for i in keep],
        node_layer=graph.node_layer[rows],
        node_position=graph.node_position[rows],
        node_index=graph.node_index[rows],
        node_activation=graph.node_activation[rows],
        node_attribution=graph.node_attribution[rows],
        node_tokens=[graph.node_tokens[i] for i in keep],
        edge_source=new_row[graph.edge_source[edges]].astype(graph.edge_source.dtype),
        edge_target=new_row[graph.edge_target[edges]].astype(graph.edge_target.dtype),
        edge_weight=graph.edge_weight[edges],
        edge_flow=graph.edge_flow[edges],
        input_attr=graph.input_attr[rows],
        output_attr=graph.output_attr[rows],
        target_ids=graph.target_ids.copy(),
        target_tokens=list(graph.target_tokens),
        target_coef=graph.target_coef.copy(),
        target_logits=graph.target_logits.copy(),
        target_probs=graph.target_probs.copy(),
        prompt_ids=graph.prompt_ids.copy(),
        prompt_tokens=list(graph.prompt_tokens),
        prompt=graph.prompt,
        metric=graph.metric,
        settings=copy.deepcopy(graph.settings),
        logit_mean_effect=(
            None if graph.logit_mean_effect is None else graph.logit_mean_effect[rows]
        ),
    )


def prune(graph: Graph, *, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Graph:
    """Prune ``graph`` by influence exactly as circuit-tracer's ``prune_graph`` +
    ``create_used_nodes_and_edges`` do (see the module docstring) and return a NEW graph with
    the kept nodes and edges (see :func:`subgraph`); ``settings["pruning"]`` records
    ``{"node_threshold": ..., "edge_threshold": ...}``. The input graph is not modified."""
    result = prune_masks(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    out = subgraph(graph, result.node_mask, result.edge_mask)
    out.settings["pruning"] = {
        "node_threshold": float(node_threshold),
        "edge_threshold": float(edge_threshold),
    }
    return out


__all__ = [
    "PruneResult",
    "cumulative_influence",
    "edge_influence",
    "logit_weights",
    "node_influence",
    "normalized_adjacency",
    "prune",
    "prune_masks",
    "subgraph",
]
