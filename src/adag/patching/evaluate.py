"""Cost-versus-recall evaluation of localisation methods (Kramár, Lieberum, Shah, Nanda 2024,
"AtP*: An efficient and scalable method for localizing LLM behaviour to components", arXiv
2403.00745, §4.2 "Results", the "cost of verified recall" curves).

A method ranks all nodes; one then verifies nodes by activation patching in that order,
``n_pairs`` forward passes each, until the true top-x nodes (by ``|true effect|``, from an
exhaustive sweep) are all verified. The cost to find the top x is the method's own cost plus that
verification: ``cost + n_pairs * (1 + max position of the true top-x in the order)``, or the
method's ``cum_cost`` at that position where its search verifies nodes itself (hierarchical).
Ties in ``|true effect|`` are broken by the smaller node id, everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from adag.errors import AdagError
from adag.io import save_figure, write_parquet
from adag.patching.baselines import MethodResult, rank_by_magnitude

__all__ = [
    "MethodResult",
    "cost_to_find",
    "curves",
    "curves_table",
    "plot_curves",
    "rank_of_true_top",
    "recall_at",
    "write_curves",
]


def _xs(xs: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    out = np.arange(1, n + 1) if xs is None else np.asarray(xs, dtype=np.int64)
    if out.ndim != 1 or (out.size and (out.min() < 1 or out.max() > n)):
        raise AdagError(f"xs must be integers in 1..{n}")
    return out


def _positions(order: np.ndarray) -> np.ndarray:
    """``pos[i]`` = index of node ``i`` in ``order``."""
    pos = np.empty(order.size, dtype=np.int64)
    pos[order] = np.arange(order.size)
    return pos


def _order_of(result_or_scores: MethodResult | np.ndarray, n: int) -> np.ndarray:
    """The ranking of a method (or of raw scores by ``|score|``) over ``n`` nodes."""
    if isinstance(result_or_scores, MethodResult):
        order = result_or_scores.order
    else:
        order = rank_by_magnitude(np.asarray(result_or_scores))
    if order.shape != (n,):
        raise AdagError(f"the method ranks {order.size} nodes but the true effects have {n}")
    return order


def _check_top(top_true: int, n: int) -> None:
    if not 0 <= top_true <= n:
        raise AdagError(f"top_true must be in 0..{n} (the number of nodes), got {top_true}")


def cost_to_find(
    result: MethodResult,
    true_effects: np.ndarray,
    xs: Sequence[int] | np.ndarray | None = None,
    *,
    n_pairs: int,
) -> np.ndarray:
    """Forward passes until the true top-x nodes are all verified, for each x in ``xs`` (default
    1..n_node): ``result.cost + n_pairs * (1 + max position of the true top-x in result.order)``
    (or ``result.cum_cost`` at that position when set). Shape ``(len(xs),)``."""
    true_effects = np.asarray(true_effects, dtype=np.float64)
    n = true_effects.size
    if result.n_nodes != n:
        raise AdagError(f"{result.name}: ranks {result.n_nodes} nodes, true effects have {n}")
    if n_pairs < 1:
        raise AdagError(f"n_pairs must be at least 1, got {n_pairs}")
    xs = _xs(xs, n)
    pos = _positions(result.order)[rank_by_magnitude(true_effects)]  # by true rank
    last = np.maximum.accumulate(pos)[xs - 1]  # position of the last of the true top-x
    if result.cum_cost is not None:
        return result.cum_cost[last]
    return result.cost + n_pairs * (last + 1.0)


def recall_at(
    result_or_scores: MethodResult | np.ndarray,
    true_effects: np.ndarray,
    *,
    top_true: int,
    within: int,
) -> float:
    """Fraction of the true top-``top_true`` nodes (by ``|effect|``) that a method (a
    :class:`MethodResult` or raw scores, ranked by ``|score|``) puts in its top ``within``."""
    true_effects = np.asarray(true_effects)
    order = _order_of(result_or_scores, true_effects.size)
    _check_top(top_true, true_effects.size)
    if within < 0:
        raise AdagError(f"within must be at least 0, got {within}")
    true_top = rank_by_magnitude(true_effects)[:top_true]
    if true_top.size == 0:
        return 1.0
    return float(np.isin(true_top, order[:within]).mean())


def rank_of_true_top(
    scores: MethodResult | np.ndarray, true_effects: np.ndarray, *, top_true: int
) -> np.ndarray:
    """The estimator's rank (0 = first) of each true top-``top_true`` node, listed in true-rank
    order. ``scores`` are ranked by ``|score|`` (or pass a :class:`MethodResult`)."""
    true_effects = np.asarray(true_effects)
    pos = _positions(_order_of(scores, true_effects.size))
    _check_top(top_true, true_effects.size)
    return pos[rank_by_magnitude(true_effects)[:top_true]]


def curves(
    results: Sequence[MethodResult],
    true_effects: np.ndarray,
    *,
    n_pairs: int,
    xs: Sequence[int] | np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """``{method name: cost_to_find(...)}`` over the same ``xs`` (default 1..n_node)."""
    out: dict[str, np.ndarray] = {}
    for r in results:
        if r.name in out:
            raise AdagError(f"duplicate method name {r.name!r}")
        out[r.name] = cost_to_find(r, true_effects, xs, n_pairs=n_pairs)
    return out


def plot_curves(
    curves: Mapping[str, np.ndarray],
    xs: Sequence[int] | np.ndarray,
    path: str | os.PathLike[str],
    *,
    title: str = "Cost to find the true top-x nodes",
) -> Path:
    """Plot cost (log scale) against x, one line per method, to a PNG at ``path`` (written to a
    temporary file and renamed, so a reader never sees a partial file).

    Uses ``matplotlib.figure.Figure`` with the Agg canvas directly instead of ``pyplot`` +
    ``matplotlib.use("Agg")``: it needs no display and leaves the caller's global backend and
    figure registry untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = np.asarray(xs)
    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, ys in curves.items():
        ax.plot(xs, np.asarray(ys), label=name, drawstyle="steps-post")
    ax.set_yscale("log")
    ax.set_xlabel("x (true top-x nodes by |effect|)")
    ax.set_ylabel("forward passes until all found")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def curves_table(curves: Mapping[str, np.ndarray], xs: Sequence[int] | np.ndarray) -> pa.Table:
    """The curves in long format: columns ``method`` (string), ``x`` (int64), ``cost``
    (float64), one row per method and x."""
    xs = np.asarray(xs, dtype=np.int64)
    names, cols_x, cols_c = [], [], []
    for name, ys in curves.items():
        ys = np.asarray(ys, dtype=np.float64)
        if ys.shape != xs.shape:
            raise AdagError(f"curve {name!r} has shape {ys.shape}, xs {xs.shape}")
        names += [name] * xs.size
        cols_x.append(xs)
        cols_c.append(ys)
    return pa.table(
        {
            "method": pa.array(names, type=pa.string()),
            "x": pa.array(np.concatenate(cols_x) if cols_x else [], type=pa.int64()),
            "cost": pa.array(np.concatenate(cols_c) if cols_c else [], type=pa.float64()),
        }
    )


def write_curves(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write a :func:`curves_table` to parquet atomically (temporary file + rename)."""
    return write_parquet(table, path)
