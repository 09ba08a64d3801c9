"""The steering plot: per label (cluster), the effect of each factor on the mean target probability,
with the bootstrap 95% CI of :func:`adag.steer.summarise` as error bars."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from adag.errors import AdagError
from adag.io import save_figure

if TYPE_CHECKING:
    import pyarrow as pa


def plot_steering(
    summary: pa.Table, path: str | os.PathLike[str], *, title: str = "Steering effects"
) -> Path:
    """Plot a :func:`adag.steer.summarise` table to a PNG at ``path`` (written atomically): x the
    factor, y the mean change in the mean target probability, one line per label with its
    bootstrap 95% CI as error bars, and a dashed zero line.

    Uses ``matplotlib.figure.Figure`` with the Agg canvas (no ``pyplot``): no display needed and
    the caller's global backend is left alone."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    need = {"label", "factor", "dprob", "dprob_lo", "dprob_hi"}
    missing = sorted(need - set(summary.column_names))
    if missing:
        raise AdagError(
            f"not a steering summary (missing columns {missing}); pass what summarise returns"
        )
    if summary.num_rows == 0:
        raise AdagError("the steering summary is empty; nothing to plot")
    d = summary.to_pydict()
    labels = list(dict.fromkeys(d["label"]))
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab20" if len(labels) > 10 else "tab10"]
    for i, label in enumerate(labels):
        rows = sorted(
            (r for r, lab in enumerate(d["label"]) if lab == label), key=lambda r: d["factor"][r]
        )
        x = np.array([d["factor"][r] for r in rows])
        y = np.array([d["dprob"][r] for r in rows])
        lo = np.array([d["dprob_lo"][r] for r in rows])
        hi = np.array([d["dprob_hi"][r] for r in rows])
        yerr = np.vstack([np.maximum(y - lo, 0.0), np.maximum(hi - y, 0.0)])
        ax.errorbar(
            x,
            y,
            yerr=yerr,
            marker="o",
            capsize=4,
            label=label or "(no label)",
            color=colours(i % colours.N),
        )
    ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("steering factor")
    ax.set_ylabel("Δ mean target probability")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(labels) > 1 or labels[0]:
        # beside the axes: with many clusters a legend inside hides the lines
        ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["plot_steering"]
