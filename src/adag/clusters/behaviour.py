"""Behaviour correlation: which clusters (and units) carry more attribution on the prompts where
a behaviour is stronger (ADAG, Arora et al. 2026, the jailbreak sensitivity study).

Each prompt carries a numeric score measured elsewhere (e.g. how often a jailbreak variant
succeeds). A cluster's attribution on a prompt is the summed ``node_attribution`` of its neuron
nodes in the prompt's graph (:meth:`adag.clusters.Clusters.attribution`; 0 when none of its
units is a node there); its Pearson correlation with the scores across prompts, with the
two-sided p-value of :func:`scipy.stats.pearsonr`, says how the cluster's use tracks the
behaviour.

Per unit the correlation is taken over the prompts where the unit is a graph node (``absent=
"exclude"``, the default): a unit missing from a graph was pruned, and counting those prompts as
0 would mostly measure how often the unit survives pruning rather than how its attribution moves
with the score. ``absent="zero"`` counts them as 0 instead, the convention of the cluster sums.
Only units present in at least ``min_prompts`` prompts are reported.

A correlation with a constant side (a cluster with the same attribution on every prompt) is
undefined: its ``r`` and ``p`` are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from adag.clusters import Clusters, node_units
from adag.clusters.units import Unit, unit_name
from adag.errors import AdagError
from adag.graphs.graph import Graph

ABSENT = ("exclude", "zero")


def _pearson(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """scipy's Pearson r and two-sided p-value; NaN for fewer than 3 points or a constant side
    (where scipy would warn and return NaN anyway)."""
    from scipy.stats import pearsonr

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    res = pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)


def correlate(
    clusters: Clusters,
    graphs: Sequence[Graph],
    scores: Sequence[float] | np.ndarray,
    *,
    min_prompts: int = 10,
    absent: str = "exclude",
) -> tuple[Any, Any]:
    """Correlate attribution with per-prompt ``scores`` (one per graph, same order).

    Returns two pyarrow tables:

    - per cluster: ``cluster``, ``size`` (units), ``n`` (prompts), ``present`` (prompts where
      the cluster has a node), ``mean_attribution``, ``r``, ``p``;
    - per unit present in at least ``min_prompts`` prompts: ``unit``, ``layer``, ``neuron``,
      ``sign``, ``cluster`` (name, or null for a unit not clustered), ``n`` (prompts the
      correlation is taken over), ``present``, ``mean_attribution`` (over those ``n``), ``r``,
      ``p``; sorted by ``p``. ``absent`` says how prompts without the unit count (module
      docstring).

    Raises a one-line :class:`AdagError` when the number of scores differs from the number of
    graphs, for fewer than 3 prompts, non-finite scores or constant scores.
    """
    import pyarrow as pa

    gs = list(graphs)
    y = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(y) != len(gs):
        raise AdagError(f"got {len(y)} scores for {len(gs)} graphs; give one score per prompt")
    if len(gs) < 3:
        raise AdagError(f"a correlation needs at least 3 prompts with scores, got {len(gs)}")
    if not np.all(np.isfinite(y)):
        raise AdagError("the scores hold NaN or inf; give every prompt a finite score")
    if np.ptp(y) == 0:
        raise AdagError(
            f"every prompt has the same score ({y[0]:g}); a correlation needs scores that vary"
        )
    if absent not in ABSENT:
        raise AdagError(f"unknown absent={absent!r}; choose one of {', '.join(ABSENT)}")
    if isinstance(min_prompts, bool) or not isinstance(min_prompts, int) or min_prompts < 1:
        raise AdagError(f"min_prompts must be a positive whole number, got {min_prompts!r}")

    # per cluster
    attr = clusters.attribution(gs)  # (n_prompts, n_clusters)
    present = np.zeros_like(attr, dtype=bool)
    for i, g in enumerate(gs):
        labs = clusters.node_clusters(g)
        present[i, labs[labs >= 0]] = True
    rs, ps = zip(*(_pearson(attr[:, c], y) for c in range(clusters.n_clusters)), strict=True)
    by_cluster = pa.table(
        {
            "cluster": pa.array(clusters.names, pa.string()),
            "size": pa.array(clusters.sizes, pa.int64()),
            "n": pa.array(np.full(clusters.n_clusters, len(gs)), pa.int64()),
            "present": pa.array(present.sum(0), pa.int64()),
            "mean_attribution": pa.array(attr.mean(0), pa.float64()),
            "r": pa.array(np.array(rs, dtype=np.float64), pa.float64()),
            "p": pa.array(np.array(ps, dtype=np.float64), pa.float64()),
        }
    )

    # per unit: summed attribution of the unit's nodes on each prompt where it occurs
    seen: dict[Unit, dict[int, float]] = {}
    for i, g in enumerate(gs):
        rows, units = node_units(g)
        att = g.node_attribution[rows].astype(np.float64).tolist()
        for u, a in zip(units, att, strict=True):
            per = seen.setdefault(u, {})
            per[i] = per.get(i, 0.0) + a
    rows_out: list[tuple[Unit, int, int, float, float, float]] = []
    for u, per in seen.items():
        if len(per) < min_prompts:
            continue
        idx = np.fromiter(per.keys(), dtype=np.int64, count=len(per))
        val = np.fromiter(per.values(), dtype=np.float64, count=len(per))
        if absent == "zero":
            x = np.zeros(len(gs))
            x[idx] = val
            xs, ys = x, y
        else:
            xs, ys = val, y[idx]
        r, p = _pearson(xs, ys)
        rows_out.append((u, len(xs), len(per), float(xs.mean()), r, p))
    rows_out.sort(key=lambda t: (np.inf if np.isnan(t[5]) else t[5], t[0]))
    units_sorted = [t[0] for t in rows_out]
    arr = np.array(units_sorted, dtype=np.int64).reshape(-1, 3)
    by_unit = pa.table(
        {
            "unit": pa.array([unit_name(u) for u in units_sorted], pa.string()),
            "layer": pa.array(arr[:, 0], pa.int64()),
            "neuron": pa.array(arr[:, 1], pa.int64()),
            "sign": pa.array(arr[:, 2], pa.int8()),
            "cluster": pa.array([clusters.cluster_of(u) for u in units_sorted], pa.string()),
            "n": pa.array([t[1] for t in rows_out], pa.int64()),
            "present": pa.array([t[2] for t in rows_out], pa.int64()),
            "mean_attribution": pa.array([t[3] for t in rows_out], pa.float64()),
            "r": pa.array([t[4] for t in rows_out], pa.float64()),
            "p": pa.array([t[5] for t in rows_out], pa.float64()),
        }
    )
    return by_cluster, by_unit


__all__ = ["correlate"]
