"""Agreement of two attribution graphs of the same prompt and targets, e.g. a half-precision
graph against its float32 reference (issue 15, item 4; ``bench/bench_precision.py`` reports these
on SmolLM2, ``tests/test_precision.py`` bounds them on tiny models).

:func:`compare_graphs` returns:

- ``metric_err``: ``|m − m_ref| / |m_ref|``;
- ``completeness_err`` / ``completeness_err_ref``: ``|1 − Σ embedding attributions / m|`` of each
  graph (0 in exact arithmetic for models without biases);
- ``node_jaccard``: the Jaccard index of the two sets of kept neurons / features;
- ``node_spearman``: Spearman's rank correlation of the attributions of the units kept in both
  (NaN with fewer than two);
- ``top_overlap``: the share of the reference's ``top`` most attributed units among the other's;
- ``edge_rel_err``: ``‖w − w_ref‖ / ‖w_ref‖`` over the edges kept in both, and
  ``edge_median_rel_err`` the median of ``|w − w_ref| / |w_ref|``;
- ``edges_common_share``: the share of the reference's edges that the other graph kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from adag.graphs.graph import Graph

UNIT_KINDS = ("neuron", "feature")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def completeness_err(g: Graph) -> float:
    """``|1 − Σ embedding attributions / m|``."""
    return abs(1.0 - float(g.summary()["embed_attribution_fraction"]))


def compare_graphs(ref: Graph, g: Graph, *, top: int = 20) -> dict[str, float]:
    """How far ``g`` is from ``ref`` (module docstring)."""
    ra = dict(zip(ref.node_ids, ref.node_attribution.astype(np.float64), strict=True))
    ga = dict(zip(g.node_ids, g.node_attribution.astype(np.float64), strict=True))
    units = {i for i, k in zip(ref.node_ids, ref.node_kinds, strict=True) if k in UNIT_KINDS}
    units_g = {i for i, k in zip(g.node_ids, g.node_kinds, strict=True) if k in UNIT_KINDS}
    both = sorted(units & units_g)
    jac = len(both) / len(units | units_g) if units | units_g else 1.0
    rho = _spearman(np.array([ra[i] for i in both]), np.array([ga[i] for i in both]))

    def top_ids(d: dict[str, float], keep: set[str]) -> set[str]:
        return set(sorted(keep, key=lambda i: (-abs(d[i]), i))[:top])

    n_top = min(top, len(units))
    overlap = len(top_ids(ra, units) & top_ids(ga, units_g)) / n_top if n_top else 1.0

    def edges(x: Graph) -> dict[tuple[str, str], float]:
        ids = x.node_ids
        return {
            (ids[s], ids[t]): float(w)
            for s, t, w in zip(x.edge_source, x.edge_target, x.edge_weight, strict=True)
        }

    er, eg = edges(ref), edges(g)
    common = sorted(set(er) & set(eg))
    w_ref = np.array([er[e] for e in common], dtype=np.float64)
    w = np.array([eg[e] for e in common], dtype=np.float64)
    rel = float(np.linalg.norm(w - w_ref) / max(float(np.linalg.norm(w_ref)), 1e-300))
    med = float(np.median(np.abs(w - w_ref) / np.maximum(np.abs(w_ref), 1e-300))) if common else 0.0
    out: dict[str, Any] = {
        "metric_err": abs(g.metric - ref.metric) / abs(ref.metric),
        "completeness_err": completeness_err(g),
        "completeness_err_ref": completeness_err(ref),
        "node_jaccard": jac,
        "node_spearman": rho,
        "top_overlap": overlap,
        "edge_rel_err": rel,
        "edge_median_rel_err": med,
        "edges_common_share": len(common) / len(er) if er else 1.0,
    }
    return out


__all__ = ["compare_graphs", "completeness_err"]
