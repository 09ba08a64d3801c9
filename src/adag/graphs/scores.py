"""circuit-tracer's graph scores (``compute_graph_scores`` in ``circuit_tracer/graph.py``; Ameisen et
al. 2025, "Circuit Tracing", §"Evaluating graphs"): how much of a transcoder graph's computation
runs through features rather than error nodes.

With ``Â`` the normalised adjacency (rows = targets, columns = sources; ``|A|`` with each row
divided by its sum clamped below at 1e-10, :func:`adag.graphs.prune.normalized_adjacency`; our
per-target normalisation of ``edge_weight`` cancels in it), ``w`` the logit weights (the target
probabilities on the logit rows, :func:`adag.graphs.prune.logit_weights`) and
``I = w Â + w Â² + …`` each node's influence on the logits (:func:`adag.graphs.prune.node_influence`):

- **replacement score** ``= Σ_{embeddings} I / (Σ_{embeddings} I + Σ_{errors} I)``: the fraction
  of the end-to-end influence of the input tokens on the logits that reaches them through
  features rather than through error nodes;
- **completeness score** ``= Σ_i (1 − Σ_{j error} Â[i, j]) (I_i + w_i) / Σ_i (I_i + w_i)``: the
  fraction of every node's (normalised) input that comes from non-error nodes, weighted by the
  node's influence plus its own logit weight. Rows without inputs (embeddings, errors) count as
  fully explained, as in circuit-tracer.

Both are 1.0 when every error is zero. ``w`` is normalised to sum 1 here (circuit-tracer uses the
raw probabilities); both scores are ratios homogeneous in ``w``, so the values are identical.

**A pruned subgraph** (:func:`adag.graphs.prune.prune`) is scored by the same formulas on its own
nodes and edges: removed nodes and edges count as absent (zero rows and columns of ``A``), and the
kept rows are re-normalised, as circuit-tracer's functions do when handed a pruned matrix.

Computed sparsely: one sparse matrix–vector product per DAG level, ``O(edges · depth)``, never a
dense ``N × N`` matrix. The scores use the edges the graph holds: trace with a small
``edge_threshold`` (circuit-tracer keeps every edge) for values comparable to circuit-tracer's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from adag.errors import AdagError
from adag.graphs.graph import Graph
from adag.graphs.prune import logit_weights, node_influence, normalized_adjacency


class GraphScores(NamedTuple):
    """circuit-tracer's two scores of a graph (see the module docstring)."""

    replacement: float
    completeness: float


def graph_scores(graph: Graph) -> GraphScores:
    """The replacement and completeness scores of ``graph`` (a full or a pruned graph); see the
    module docstring for the definitions. Raises :class:`AdagError` for a graph without error
    nodes that was not traced with them (a neuron graph: nothing to score) or one whose embeddings and errors carry no
    influence."""
    error = graph.mask("error")
    # a pruned transcoder graph may have lost every error node (scores 1); a neuron graph has none
    if not error.any() and "error" not in graph.settings.get("families", ()):
        raise AdagError(
            "graph has no error nodes; replacement and completeness scores are defined for "
            "transcoder graphs (trace with transcoders=...)"
        )
    w = logit_weights(graph)
    infl = node_influence(graph)
    token = float(infl[graph.mask("embed")].sum())
    err = float(infl[error].sum())
    if not token + err > 0:
        raise AdagError(
            "no influence reaches the logits from embeddings or errors; the graph has no path "
            "from its inputs to its targets (pruned too far?)"
        )
    a = normalized_adjacency(graph)  # (N, N) csr, rows = targets
    error_share = np.asarray(a[:, np.flatnonzero(error)].sum(axis=1)).ravel()  # (N,)
    out = infl + w
    completeness = float(((1.0 - error_share) * out).sum() / out.sum())
    return GraphScores(replacement=token / (token + err), completeness=completeness)


__all__ = ["GraphScores", "graph_scores"]
