"""``NodeScores``: the table every localisation method returns."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adag.errors import AdagError
from adag.io import write_parquet
from adag.patching.baselines import rank_by_magnitude


@dataclass
class NodeScores:
    """Scores of nodes aggregated over prompt pairs; one row per node.

    Layout: ``nodes[i]`` is the id of node ``i`` (DESIGN.md ids); ``per_pair[j, i]`` its score on
    pair ``j`` (0 where the node does not exist in that pair, e.g. a position past its end);
    ``estimate[i]`` the mean over pairs (signed, except for GradDrop, whose per-pair terms are
    magnitudes); ``abs_estimate[i]`` the mean over pairs of ``|per_pair|``. ``columns`` holds extra
    per-node columns (e.g. ``atp`` and ``atp_qk`` next to AtP*'s GradDrop estimate). ``cost`` is
    the forward passes spent (a backward counted as ``BACKWARD_COST`` forwards). Nodes are ranked by
    ``|estimate|``. ``meta`` holds free-form run information (e.g. a certificate, stop reasons):
    each entry is written into the arrow/parquet metadata under its key as a JSON string (numpy
    scalars and arrays become numbers and lists); its keys may not be the built-in ones
    (``method``, ``cost``, ``n_pairs``, ``seconds``).
    """

    method: str
    nodes: list[str]
    per_pair: np.ndarray
    cost: float = 0.0
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def estimate(self) -> np.ndarray:
        return self.per_pair.mean(0)

    @property
    def abs_estimate(self) -> np.ndarray:
        return np.abs(self.per_pair).mean(0)

    def __len__(self) -> int:
        return len(self.nodes)

    def order(self) -> np.ndarray:
        """Node indices by decreasing ``|estimate|`` (ties by index)."""
        return rank_by_magnitude(self.estimate)

    def top(self, k: int) -> list[tuple[str, float]]:
        est = self.estimate
        return [(self.nodes[i], float(est[i])) for i in self.order()[:k]]

    def reindex(self, nodes: list[str]) -> NodeScores:
        """The same scores over another node list (missing nodes score 0)."""
        pos = {n: i for i, n in enumerate(self.nodes)}
        idx = np.array([pos.get(n, -1) for n in nodes])
        keep = idx >= 0

        def take(a: np.ndarray) -> np.ndarray:
            out = np.zeros((*a.shape[:-1], len(nodes)), dtype=a.dtype)
            out[..., keep] = a[..., idx[keep]]
            return out

        return NodeScores(
            self.method,
            list(nodes),
            take(self.per_pair),
            self.cost,
            {k: take(v) for k, v in self.columns.items()},
            self.seconds,
            dict(self.meta),
        )

    def to_arrow(self) -> Any:
        import pyarrow as pa

        data: dict[str, Any] = {
            "node": pa.array(self.nodes, pa.string()),
            "estimate": pa.array(self.estimate),
            "abs_estimate": pa.array(self.abs_estimate),
        }
        for k, v in self.columns.items():
            data[k] = pa.array(v)
        meta = {
            "method": self.method,
            "cost": str(self.cost),
            "n_pairs": str(self.per_pair.shape[0]),
            "seconds": str(self.seconds),
        }
        clash = sorted(set(self.meta) & set(meta))
        if clash:
            raise AdagError(f"NodeScores.meta may not use the built-in metadata keys {clash}")
        for k, v in self.meta.items():
            meta[str(k)] = json.dumps(v, default=_json_default)
        return pa.table(data, metadata=meta)

    def to_pandas(self) -> Any:
        return self.to_arrow().to_pandas()

    def save(self, path: str | Path) -> Path:
        """Write a parquet file atomically (temp file + rename)."""
        return write_parquet(self.to_arrow(), path)


def _json_default(x: Any) -> Any:
    """numpy values in ``NodeScores.meta`` as plain JSON numbers and lists."""
    if isinstance(x, np.ndarray | np.generic):
        return x.tolist()
    raise TypeError(f"NodeScores.meta: {type(x).__name__} is not JSON serialisable")


def merge_pairs(
    method: str,
    per_pair: list[tuple[list[str], np.ndarray]],
    cost: float,
    columns: dict[str, list[np.ndarray]] | None = None,
) -> NodeScores:
    """Combine per-pair (ids, scores) lists into one table (nodes in first-seen order)."""
    index: dict[str, int] = {}
    for ids, _ in per_pair:
        for n in ids:
            index.setdefault(n, len(index))
    nodes = list(index)
    mat = np.zeros((len(per_pair), len(nodes)))
    cols_acc = {k: np.zeros(len(nodes)) for k in (columns or {})}
    for j, (ids, s) in enumerate(per_pair):
        where = np.array([index[n] for n in ids])
        mat[j, where] = s
        for k, v in (columns or {}).items():
            cols_acc[k][where] += v[j] / len(per_pair)
    return NodeScores(method, nodes, mat, cost, cols_acc)
