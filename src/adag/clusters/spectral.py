"""Spectral clustering of the multi-view similarity (ADAG, Arora et al. 2026, §3.2) and the
baselines of ADAG's ablations (k-means and agglomerative clustering on concatenated profiles, and a
random assignment).

Spectral, as ADAG defines it: ``W = S`` with a unit diagonal; ``N = D^-1/2 W D^-1/2`` (``D`` the
row sums of ``W``) with its diagonal reset to 1; the eigenvectors of the ``n_clusters`` largest
eigenvalues of ``N``, rows L2-normalised; k-means (``n_init=10``, a fixed seed) on those rows.
Small matrices use ``numpy.linalg.eigh``, large sparse ones ARPACK (``scipy.sparse.linalg.eigsh``)
so that nothing ``n × n`` is dense. The two agree up to an orthogonal change of basis of the
eigenvectors (signs, or rotations within a repeated eigenvalue), which k-means does not see: it
depends only on distances between rows. Labels are numbered in order of first appearance (unit 0
is in cluster 0), so equal partitions give equal label arrays.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from adag.clusters.similarity import normalise_input, normalise_output, outputs_2d, stack_inputs
from adag.clusters.units import PromptUnits, Unit
from adag.errors import AdagError

log = logging.getLogger(__name__)

DENSE_EIG_MAX = 2000
"""``dense=None`` uses ``numpy.linalg.eigh`` up to this many units, ARPACK above."""
BASELINES = ("kmeans", "agglomerative", "random")
INPUT_TAIL = 8
"""Baseline features: the last ``INPUT_TAIL`` prompt positions of an input profile are kept one by
one, the earlier ones summed into one bin (see :func:`baseline_features`)."""
SVD_ABOVE = 256
"""Baseline features wider than this are reduced with TruncatedSVD to ``SVD_COMPONENTS``."""
SVD_COMPONENTS = 64
AGGLOMERATIVE_MAX = 20000
"""Ward clustering holds ``n²/2`` distances: refuse above this many units (3.2 GB)."""


def _check_k(n_clusters: int, n: int) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, int | np.integer):
        raise AdagError(f"n_clusters must be a whole number, got {n_clusters!r}")
    if n_clusters < 2:
        raise AdagError(f"n_clusters must be at least 2, got {n_clusters}")
    if n_clusters > n:
        raise AdagError(
            f"n_clusters {n_clusters} is larger than the number of units ({n}); ask for at most {n}"
        )
    return int(n_clusters)


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber labels in order of first appearance (the first unit's cluster is 0)."""
    labels = np.asarray(labels)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.ravel()]


def _kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    for w in caught:  # e.g. fewer distinct points than clusters: say so, do not fail
        log.warning("k-means: %s", w.message)
    return canonical_labels(labels)


def spectral_embedding(
    S: sp.spmatrix | np.ndarray, n_clusters: int, *, seed: int = 42, dense: bool | None = None
) -> np.ndarray:
    """(n, n_clusters) the row-normalised top eigenvectors of ``N`` (see the module docstring);
    each eigenvector's sign is fixed so that its largest-magnitude entry is positive."""
    W = sp.csr_matrix(S, dtype=np.float64)
    n = W.shape[0]
    if W.shape != (n, n):
        raise AdagError(f"the similarity must be square, got shape {W.shape}")
    k = _check_k(n_clusters, n)
    W = (W - sp.diags(W.diagonal()) + sp.eye(n, format="csr")).tocsr()
    deg = np.asarray(W.sum(axis=1)).ravel()
    # with a unit diagonal every degree is >= 1 for S >= 0; a non-positive one (a negative S
    # given by hand) is treated as isolated instead of dividing by it
    dinv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    Dm = sp.diags(dinv)
    N = (Dm @ W @ Dm).tocsr()
    N = (N - sp.diags(N.diagonal()) + sp.eye(n, format="csr")).tocsr()
    use_dense = n <= DENSE_EIG_MAX if dense is None else bool(dense)
    if use_dense or k >= n - 1:  # ARPACK needs k < n - 1 (k < n for eigsh)
        vals, vecs = np.linalg.eigh(N.toarray())
        vecs = vecs[:, np.argsort(vals)[::-1][:k]]
    else:
        from scipy.sparse.linalg import eigsh

        v0 = np.random.default_rng(seed).uniform(0.5, 1.5, n)
        vals, vecs = eigsh(N, k=k, which="LA", v0=v0)
        vecs = vecs[:, np.argsort(vals)[::-1]]
    top = np.argmax(np.abs(vecs), axis=0)
    vecs = vecs * np.where(vecs[top, np.arange(k)] < 0, -1.0, 1.0)[None, :]
    norm = np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs / np.where(norm > 0, norm, 1.0)


def spectral_labels(
    S: sp.spmatrix | np.ndarray, n_clusters: int, *, seed: int = 42, dense: bool | None = None
) -> np.ndarray:
    """(n,) ADAG's spectral clustering of the similarity ``S`` into ``n_clusters`` clusters
    (labels ``0..n_clusters-1``, in order of first appearance). ``dense``: ``numpy.linalg.eigh``
    (True), ARPACK (False) or by size (None). A one-line :class:`AdagError` when ``n_clusters``
    is below 2 or above the number of units."""
    x = spectral_embedding(S, n_clusters, seed=seed, dense=dense)
    return _kmeans(x, int(n_clusters), seed)


# -- baselines -----------------------------------------------------------------------------------


def baseline_features(prompts: Sequence[PromptUnits], units: list[Unit]) -> sp.csr_matrix:
    """(n_units, n_prompts · F) the concatenated profiles the baselines cluster.

    Prompts differ in length ``T`` and in their targets, so each prompt contributes a fixed-size
    block of ``F = INPUT_TAIL + 1 + K_max`` columns per unit (``K_max``: the most targets of any
    prompt), zeros where the unit does not occur:

    * input: the unit's input profile normalised as the similarity does (divided by its signed
      sum unless 0, L2-normalised), right-aligned: its last ``INPUT_TAIL`` positions one by one
      (the traced position last; zero-padded on the left for shorter prompts) and the sum of the
      earlier positions in one bin; that block is L2-normalised again;
    * output: the L2-normalised output profile, target ``j`` of the prompt (in the graph's
      target order, the top prediction first) in slot ``j``, zero-padded to ``K_max``.

    Each present view thus has norm 1 on each prompt, as in the similarity, and the dot product of
    two units' output blocks on a prompt is their output cosine there. Units of the prompts that
    are not in ``units`` are ignored.
    """
    index = {u: i for i, u in enumerate(units)}
    k_max = max((outputs_2d(pu).shape[1] for pu in prompts), default=0)
    F = INPUT_TAIL + 1 + k_max
    rows, cols, vals = [], [], []
    for p, pu in enumerate(prompts):
        m = len(pu.units)
        if m == 0:
            continue
        idx = np.array([index.get(u, -1) for u in pu.units], dtype=np.int64)
        x = normalise_input(stack_inputs(pu))
        T = x.shape[1]
        block = np.zeros((m, F))
        tail = min(T, INPUT_TAIL)
        if tail:
            block[:, INPUT_TAIL - tail : INPUT_TAIL] = x[:, T - tail :]
        block[:, INPUT_TAIL] = x[:, : T - tail].sum(axis=1)
        norm = np.linalg.norm(block[:, : INPUT_TAIL + 1], axis=1, keepdims=True)
        block[:, : INPUT_TAIL + 1] /= np.where(norm > 0, norm, 1.0)
        o = normalise_output(outputs_2d(pu))
        block[:, INPUT_TAIL + 1 : INPUT_TAIL + 1 + o.shape[1]] = o
        r, c = np.nonzero(block * (idx >= 0)[:, None])
        rows.append(idx[r])
        cols.append(p * F + c)
        vals.append(block[r, c])
    if not rows:
        return sp.csr_matrix((len(units), len(prompts) * F))
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(units), len(prompts) * F),
    )


def baseline_labels(
    method: str,
    prompts: Sequence[PromptUnits],
    units: list[Unit],
    n_clusters: int,
    *,
    seed: int = 42,
) -> np.ndarray:
    """(n_units,) a baseline clustering of ``units`` (labels in order of first appearance):

    * ``kmeans``: k-means (``n_init=10``, ``random_state=seed``) on :func:`baseline_features`;
    * ``agglomerative``: Ward clustering of the same features (at most ``AGGLOMERATIVE_MAX``
      units: it holds all pairwise distances);
    * ``random``: a random assignment with every cluster non-empty and sizes as equal as possible.

    Features wider than ``SVD_ABOVE`` columns are reduced to ``SVD_COMPONENTS`` with
    TruncatedSVD (``random_state=seed``) first."""
    if method not in BASELINES:
        raise AdagError(f"unknown baseline {method!r}; baselines are {', '.join(BASELINES)}")
    n = len(units)
    k = _check_k(n_clusters, n)
    if method == "random":
        rng = np.random.default_rng(seed)
        return canonical_labels(rng.permutation(np.arange(n) % k))
    if method == "agglomerative" and n > AGGLOMERATIVE_MAX:
        raise AdagError(
            f"agglomerative clustering of {n} units needs {n * (n - 1) // 2 * 8 / 1e9:.0f} GB of "
            f"distances; use at most {AGGLOMERATIVE_MAX} units or --method kmeans"
        )
    X = baseline_features(prompts, units)
    feats: np.ndarray
    if X.shape[1] > SVD_ABOVE:
        from sklearn.decomposition import TruncatedSVD

        c = min(SVD_COMPONENTS, X.shape[1] - 1, max(n - 1, 1))
        feats = TruncatedSVD(n_components=c, random_state=seed).fit_transform(X)
    else:
        feats = X.toarray()
    if method == "kmeans":
        return _kmeans(feats, k, seed)
    from sklearn.cluster import AgglomerativeClustering

    return canonical_labels(
        AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(feats)
    )


__all__ = [
    "BASELINES",
    "baseline_features",
    "baseline_labels",
    "canonical_labels",
    "spectral_embedding",
    "spectral_labels",
]
