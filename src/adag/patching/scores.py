"""``NodeScores``: the table every localisation method returns, and :func:`merge_pairs`, which
builds it from per-pair scores (aligning pairs of different lengths by role, :func:`align_ids`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from adag.errors import AdagError
from adag.io import write_parquet
from adag.nodes import align, position_labels
from adag.patching.baselines import rank_by_magnitude

if TYPE_CHECKING:
    from adag.tasks.pairs import TokenizedPair


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


def align_ids(
    ids_per_pair: Sequence[Sequence[str]], pairs: Sequence[TokenizedPair] | None
) -> list[Sequence[str]]:
    """The node ids of each pair as a table over ``pairs`` names them.

    Pairs all of one length (or ``pairs`` None) keep their absolute ids. Pairs of different
    lengths name a position by what it is in its pair (the aligned ids of :mod:`adag.nodes`): a
    position that the pair names as a role (``TokenizedPair.roles``) becomes ``@ROLE``
    (``head:23:17:3:z`` -> ``head:23:@IO:3:z``), any other counts from the end (``-1``: the last
    token, ``head:23:-1:3:z``); ``*`` positions stay. So ``@IO`` is the indirect object in every
    pair that names one, whatever its absolute position. Each pair is aligned by its own roles:
    a pair without roles has only ``-K`` positions (its last token is ``-1``, where a pair with
    an ``END`` role says ``@END``), so give all pairs the same roles. ``ids_per_pair[j]`` are
    pair ``j``'s ids (``j`` in ``pairs`` order), with positions below ``pairs[j].n_pos``."""
    if pairs is None:
        return list(ids_per_pair)
    if len(pairs) != len(ids_per_pair):
        raise AdagError(
            f"align_ids got the ids of {len(ids_per_pair)} pairs but {len(pairs)} pairs; pass the "
            "pairs the ids were computed on, in the same order"
        )
    if len({tp.n_pos for tp in pairs}) <= 1:
        return list(ids_per_pair)
    return [
        align(ids, position_labels(tp.n_pos, tp.roles))
        for ids, tp in zip(ids_per_pair, pairs, strict=True)
    ]


def merge_pairs(
    method: str,
    per_pair: list[tuple[list[str], np.ndarray]],
    cost: float,
    columns: dict[str, list[np.ndarray]] | None = None,
    *,
    pairs: Sequence[TokenizedPair] | None = None,
) -> NodeScores:
    """Combine per-pair (ids, scores) lists into one table (nodes in first-seen order); a node
    absent from a pair scores 0 there.

    With ``pairs`` (the TokenizedPairs the scores were computed on, in the same order) of
    different lengths, ids are first aligned by :func:`align_ids`: ``head:23:@IO:3:z`` is the
    node at each pair's own IO position (0 in a pair that names no IO), ``head:23:-1:3:z`` the
    node at each pair's last token where the pair gives that token no role (``@END`` where it
    does).
    Without ``pairs``, or when all pairs have one length, ids stay absolute (positions mix
    roles when lengths differ)."""
    aligned = align_ids([ids for ids, _ in per_pair], pairs)
    index: dict[str, int] = {}
    for ids in aligned:
        for n in ids:
            index.setdefault(n, len(index))
    nodes = list(index)
    mat = np.zeros((len(per_pair), len(nodes)))
    cols_acc = {k: np.zeros(len(nodes)) for k in (columns or {})}
    for j, ((_, s), ids) in enumerate(zip(per_pair, aligned, strict=True)):
        where = np.array([index[n] for n in ids])
        mat[j, where] = s
        for k, v in (columns or {}).items():
            cols_acc[k][where] += v[j] / len(per_pair)
    return NodeScores(method, nodes, mat, cost, cols_acc)
