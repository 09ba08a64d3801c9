"""Diagnostics of a clustering of units (the quantities of ADAG's clustering ablations, Arora et al.
2026): how well separated the clusters are on the multi-view similarity, how balanced their sizes
are, and how often two units of one cluster push the targets in opposite directions.

Every value is a float (``nan`` where undefined, e.g. a silhouette with one cluster):

==========================  =====================================================================
``silhouette``              sklearn's silhouette on the distance ``1 - S`` (``metric=
                            "precomputed"``; pairs not stored in ``S`` are at distance 1); on a
                            random sample of ``SILHOUETTE_SAMPLE`` units (seed 0) when larger
``size_entropy``            entropy of the cluster sizes / log(number of clusters): 1 = equal
``size_min_max``            smallest cluster size / largest
``intra_mean``              mean ``S`` over the stored off-diagonal pairs within a cluster
``inter_mean``              mean ``S`` over the stored off-diagonal pairs across clusters
``intra_inter_ratio``       ``intra_mean / inter_mean`` (inf when only ``inter_mean`` is 0)
``conflict_share``          share of same-cluster pairs whose output effects conflict in sign (below)
``conflict_pairs``          the number of same-cluster pairs that share was taken over
==========================  =====================================================================

**Sign conflicts.** For two units of the same cluster, their output cosine (the output view of
the similarity: L2-normalised output profiles) is averaged over the prompts where both occur with
a non-zero output profile — the averaging ADAG applies to the similarity, before the clamp at 0.
The pair *conflicts* when that average is negative (below ``-1e-12``, so that exactly
orthogonal outputs do not count): on the prompts they share, the two push the
target logits in opposite directions more than in the same one. ``conflict_share`` is the number
of conflicting pairs over the number of same-cluster pairs with at least one such prompt (each
pair counted once, whatever its number of prompts); ``nan`` when there is none.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from adag.clusters.similarity import (
    DENSE_MAX_UNITS,
    _dense_pairs,
    _index_units,
    _prepare,
    _stripe_pairs,
    one_blas_thread,
)
from adag.clusters.units import PromptUnits, Unit
from adag.errors import AdagError

SILHOUETTE_SAMPLE = 2000


def diagnostics(
    S: sp.spmatrix | np.ndarray,
    labels: np.ndarray,
    units: list[Unit],
    prompts: Sequence[PromptUnits],
) -> dict[str, float]:
    """The diagnostics of the module docstring for ``labels[i]`` = the cluster of ``units[i]``,
    ``S`` the similarity over ``units`` (rows in their order) and ``prompts`` the data."""
    S = sp.csr_matrix(S, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    n = len(units)
    if S.shape != (n, n) or len(labels) != n:
        raise AdagError(
            f"diagnostics need an {n} x {n} similarity and {n} labels for {n} units, got "
            f"{S.shape} and {len(labels)}"
        )
    out: dict[str, float] = {}
    out["silhouette"] = _silhouette(S, labels)
    sizes = np.unique(labels, return_counts=True)[1] if n else np.zeros(0, dtype=np.int64)
    k = len(sizes)
    if k > 1:
        q = sizes / sizes.sum()
        out["size_entropy"] = float(-(q * np.log(q)).sum() / np.log(k))
    else:
        out["size_entropy"] = 1.0 if k == 1 else float("nan")
    out["size_min_max"] = float(sizes.min() / sizes.max()) if k else float("nan")
    coo = sp.triu(S, k=1).tocoo()
    same = labels[coo.row] == labels[coo.col]
    intra = float(coo.data[same].mean()) if same.any() else float("nan")
    inter = float(coo.data[~same].mean()) if (~same).any() else float("nan")
    out["intra_mean"], out["inter_mean"] = intra, inter
    if inter > 0:
        out["intra_inter_ratio"] = intra / inter
    elif inter == 0 and intra > 0:
        out["intra_inter_ratio"] = float("inf")
    else:
        out["intra_inter_ratio"] = float("nan")
    conflicts, pairs = _conflicts(labels, units, prompts)
    out["conflict_share"] = conflicts / pairs if pairs else float("nan")
    out["conflict_pairs"] = float(pairs)
    return out


def _silhouette(S: sp.csr_matrix, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    n = len(labels)
    pick = np.arange(n)
    if n > SILHOUETTE_SAMPLE:
        pick = np.sort(np.random.default_rng(0).choice(n, SILHOUETTE_SAMPLE, replace=False))
    lab = labels[pick]
    if not 2 <= len(np.unique(lab)) <= len(pick) - 1:
        return float("nan")
    sub = S[pick][:, pick].toarray()
    D = np.clip(1.0 - sub, 0.0, None)
    np.fill_diagonal(D, 0.0)
    return float(silhouette_score(D, lab, metric="precomputed"))


def _conflicts(
    labels: np.ndarray, units: list[Unit], prompts: Sequence[PromptUnits]
) -> tuple[int, int]:
    """(conflicting same-cluster pairs, same-cluster pairs with a shared non-zero output)."""
    prompts = list(prompts)
    if not prompts:
        return 0, 0
    all_units, rows = _index_units(prompts)
    index = {u: i for i, u in enumerate(units)}
    lab = np.array([labels[index[u]] if u in index else -1 for u in all_units], dtype=np.int64)
    n = len(all_units)
    if n <= DENSE_MAX_UNITS:
        key_of = np.arange(n, dtype=np.int64)
        preps = _prepare(prompts, rows, key_of, sides=("output",), labels=lab)
        batches = iter([_dense_pairs(preps, n, 1)])
    else:
        occ = np.bincount(np.concatenate(rows), minlength=n)
        order = np.lexsort((np.arange(n), -occ))
        key_of = np.empty(n, dtype=np.int64)
        key_of[order] = np.arange(n)
        preps = _prepare(prompts, rows, key_of, sides=("output",), labels=lab)
        batches = _stripe_pairs(preps, n, 1)
    conflicts = pairs = 0
    with one_blas_thread():
        for _, _, (sums,), (counts,) in batches:
            seen = counts > 0
            pairs += int(seen.sum())
            # below a rounding margin: pairs at an exact 0 (orthogonal outputs) do not conflict
            conflicts += int((sums[seen] < -1e-12 * counts[seen]).sum())
    return conflicts, pairs


__all__ = ["SILHOUETTE_SAMPLE", "diagnostics"]
