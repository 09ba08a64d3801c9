"""Plots of a clustering (PNG, matplotlib's Agg backend, written atomically): the similarity
matrix ordered by cluster (ADAG's block-diagonal figure) and cluster sizes by layer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adag.errors import AdagError
from adag.io import save_figure

if TYPE_CHECKING:
    from adag.clusters import Clusters
    from adag.clusters.units import Unit

MAX_UNITS = 1500
"""The similarity plot shows at most this many units (a dense 1,500 x 1,500 image is 18 MB and
already finer than the figure's pixels)."""


def _figure(figsize: tuple[float, float]) -> tuple[Any, Any]:
    # the object API with an explicit Agg canvas: no pyplot state, no GUI backend, thread safe
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _subsample(labels: np.ndarray, max_units: int, seed: int) -> np.ndarray:
    """Indices of at most ``max_units`` units, drawn from each cluster in proportion to its size
    (at least one per cluster while there is room), so small clusters stay visible."""
    n = len(labels)
    if n <= max_units:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    quota = np.array([len(g) for g in groups], dtype=np.float64) * max_units / n
    take = np.maximum(np.floor(quota).astype(np.int64), 1)
    while take.sum() > max_units:  # more clusters than room: drop from the largest quotas
        take[np.argmax(take)] -= 1
    for i in np.argsort(-(quota - np.floor(quota))):  # fill what rounding left
        if take.sum() >= max_units:
            break
        if take[i] < len(groups[i]):
            take[i] += 1
    picked = [rng.choice(g, size=int(t), replace=False) for g, t in zip(groups, take, strict=True)]
    return np.sort(np.concatenate(picked))


def plot_similarity(
    S: Any,
    units: Sequence[Unit],
    labels: Sequence[int] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    max_units: int = MAX_UNITS,
    seed: int = 0,
) -> Path:
    """Write the similarity matrix ``S`` (n_units x n_units, dense or scipy sparse, rows in the
    order of ``units``) with its rows and columns ordered by cluster ``labels`` (a label < 0,
    a unit in no cluster, goes last) and white lines between the clusters. Above ``max_units``
    units a random subsample, stratified by cluster, is shown (the title says so). Returns the
    path."""
    import scipy.sparse as sp

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    n = len(units)
    if S.shape != (n, n) or labels.shape != (n,):
        raise AdagError(
            f"similarity has shape {S.shape} and {labels.shape[0]} labels for {n} units; give "
            "one row, column and label per unit"
        )
    if n == 0:
        raise AdagError("no units to plot; cluster some graphs first")
    keep = _subsample(labels, max_units, seed)
    sort_key = np.where(labels[keep] < 0, np.iinfo(np.int64).max, labels[keep])
    order = keep[np.argsort(sort_key, kind="stable")]
    sub = S[order][:, order]
    M = sub.toarray() if sp.issparse(sub) else np.asarray(sub, dtype=np.float64)
    lab = labels[order]

    fig, ax = _figure((7.0, 6.2))
    image = ax.imshow(M, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="similarity")
    bounds = np.flatnonzero(np.diff(lab)) + 0.5
    for b in bounds:
        ax.axhline(b, color="white", linewidth=0.6)
        ax.axvline(b, color="white", linewidth=0.6)
    starts = np.concatenate([[0], np.ceil(bounds).astype(np.int64)])
    ends = np.concatenate([np.ceil(bounds).astype(np.int64), [len(lab)]])
    if len(starts) <= 40:
        centres = (starts + ends - 1) / 2
        names = [f"C{v}" if v >= 0 else "none" for v in lab[starts]]
        ax.set_xticks(centres, names, rotation=90, fontsize=7)
        ax.set_yticks(centres, names, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    shown = f"{len(order)} of {n} units (stratified sample)" if len(order) < n else f"{n} units"
    ax.set_title(f"unit similarity ordered by cluster: {shown}", fontsize=10)
    return save_figure(fig, path, dpi=120)


def plot_sizes_by_layer(
    clusters: Clusters, n_layers: int | None, path: str | os.PathLike[str]
) -> Path:
    """Write stacked bars: for each layer, the number of units of each cluster. ``n_layers``
    (default: the highest unit layer + 1) sets the x axis. Returns the path."""
    layers = np.array([u[0] for u in clusters.units], dtype=np.int64)
    if not len(layers):
        raise AdagError("no units to plot; cluster some graphs first")
    top = int(layers.max()) + 1
    if n_layers is None:
        n_layers = top
    if n_layers < top:
        raise AdagError(f"a unit is in layer {top - 1}, beyond n_layers={n_layers}")
    k = clusters.n_clusters
    counts = np.zeros((k, n_layers), dtype=np.int64)  # (cluster, layer)
    np.add.at(counts, (clusters.labels, layers), 1)

    from matplotlib import colormaps

    cmap = colormaps["tab20" if k > 10 else "tab10"]
    fig, ax = _figure((max(6.0, 0.25 * n_layers + 3.0), 4.2))
    x = np.arange(n_layers)
    bottom = np.zeros(n_layers)
    for c in range(k):
        ax.bar(x, counts[c], bottom=bottom, color=cmap(c % cmap.N), label=f"C{c}", width=0.85)
        bottom += counts[c]
    ax.set_xlabel("layer")
    ax.set_ylabel("units")
    ax.set_xlim(-0.6, n_layers - 0.4)
    if n_layers <= 32:
        ax.set_xticks(x)
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(nbins=16, integer=True))
    ax.set_title(f"cluster sizes by layer ({len(layers)} units, {k} clusters)", fontsize=10)
    if k <= 40:
        ax.legend(fontsize=7, ncol=max(1, k // 12 + 1), loc="upper left", bbox_to_anchor=(1, 1))
    return save_figure(fig, path, dpi=120)


__all__ = ["MAX_UNITS", "plot_similarity", "plot_sizes_by_layer"]
