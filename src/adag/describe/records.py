"""Activation records: what the explainer is shown and the simulator predicts (ADAG §3.3).

A cluster's profile on one prompt (:meth:`adag.clusters.Clusters.profile`) gives two records:

- the **input record**: the prompt tokens (by position) and the cluster's summed input profile over
  them, "how much of the group's activation comes from each token";
- the **output record**: the graph's target tokens (in the graph's target order) and the cluster's
  summed output profile over them, "how much of each target's logit the group writes".

Highlights (input side). The explainer sees the *shown* records with the tokens above a
threshold marked. The threshold comes from a **quantile walk** (:func:`highlight_threshold`):
let ``P`` be the strictly positive values of all tokens of the shown records (after the sign flip
for a negative explanation); walk ``q`` through :data:`QUANTILES` (99.9, 99.5, 99, 98, 95, 90, 80)
and take ``t = numpy.percentile(P, q)`` (linear interpolation); a token is highlighted when its
value is ``>= t``. The walk stops at the first ``q`` whose highlights form at least
``min_highlights`` spans over the shown records, where a *span* is a maximal run of consecutive
highlighted tokens within one record (:func:`count_spans`). When no ``q`` gets there, the
threshold is the :data:`FALLBACK` (50th) percentile of ``P``. With no positive value there is
nothing to highlight (threshold ``inf``).

Negative explanations describe the sign-flipped record (:func:`flip`): the tokens whose
attribution to the group is most negative. On the output side the values are rescaled to integers
−10..10 by the cluster's max ``|value|`` over all its output records (:func:`rescale`).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adag.errors import AdagError

QUANTILES = (99.9, 99.5, 99.0, 98.0, 95.0, 90.0, 80.0)
"""percentiles of the positive values tried as highlight thresholds, most extreme first"""
FALLBACK = 50.0
"""the percentile used when no quantile of :data:`QUANTILES` gives ``min_highlights`` spans"""
SIDES = ("input", "output")
SCALE = 10
"""output records are rescaled to integers ``-SCALE..SCALE``"""

_NEEDED = ("cluster", "prompt_id", "side", "position", "token", "value")


@dataclass(frozen=True, eq=False)
class Record:
    """One activation record: ``tokens[i]`` has ``values[i]``.

    Input side: the prompt tokens in position order and the cluster's summed input profile.
    Output side: the target tokens in the graph's order and the output profile (or its integers
    −10..10 after :func:`rescale`)."""

    prompt_id: str
    tokens: tuple[str, ...]
    values: np.ndarray
    """(T,) float64"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", np.asarray(self.values, dtype=np.float64))
        if self.values.shape != (len(self.tokens),):
            raise AdagError(
                f"record {self.prompt_id!r} has {len(self.tokens)} tokens and "
                f"{self.values.size} values; give one value per token"
            )

    def with_values(self, values: Any) -> Record:
        return Record(self.prompt_id, self.tokens, np.asarray(values, dtype=np.float64))


def cluster_records(
    table: Any, *, prompt_ids: Sequence[Any] | None = None
) -> dict[tuple[str, str], list[Record]]:
    """The records of a cluster-profile table (columns of
    :data:`adag.clusters.PROFILE_COLUMNS`): ``{(cluster, side): [Record, ...]}``, prompts in
    ``prompt_ids`` order (default: order of first appearance in the table; prompts without rows
    are skipped), input tokens sorted by position, output tokens in table order (the graph's
    target order). Non-finite values read as 0, as the profiles' zero-denominator ratios do."""
    import pyarrow as pa

    missing = [c for c in _NEEDED if c not in table.column_names]
    if missing:
        raise AdagError(
            f"the cluster-profile table lacks the columns {missing}; make it with "
            "Clusters.profile (RUN_DIR/cluster-profiles.parquet)"
        )
    n = table.num_rows
    if n == 0:
        return {}

    def codes(name: str) -> tuple[np.ndarray, list[str]]:
        enc = table[name].cast(pa.string()).combine_chunks().dictionary_encode()
        return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), [
            str(x) for x in enc.dictionary.to_pylist()
        ]

    c_code, c_names = codes("cluster")
    p_code, p_names = codes("prompt_id")
    s_code, s_names = codes("side")
    bad_sides = sorted(set(s_names) - set(SIDES))
    if bad_sides:
        raise AdagError(f"the cluster-profile table has sides {bad_sides}; sides are {SIDES}")
    if prompt_ids is None:
        first = np.unique(p_code, return_index=True)[1]
        order = [p_names[p_code[i]] for i in np.sort(first).tolist()]
    else:
        order = [str(p) for p in prompt_ids]
    rank_of = {p: i for i, p in enumerate(order)}
    p_rank = np.array([rank_of.get(p, -1) for p in p_names], dtype=np.int64)[p_code]
    is_input = np.array([s == "input" for s in s_names], dtype=bool)[s_code]
    position = table["position"].to_numpy().astype(np.int64)
    # within a record: input tokens by position, output tokens in table order
    within = np.where(is_input, position, np.arange(n, dtype=np.int64))
    keep = np.flatnonzero(p_rank >= 0)
    sort = keep[np.lexsort((within[keep], p_rank[keep], s_code[keep], c_code[keep]))]
    value = table["value"].to_numpy().astype(np.float64)
    value = np.where(np.isfinite(value), value, 0.0)
    token = table["token"].to_numpy(zero_copy_only=False)
    group = np.stack([c_code[sort], s_code[sort], p_rank[sort]], axis=1)  # (rows, 3)
    starts = np.flatnonzero(np.r_[True, np.any(group[1:] != group[:-1], axis=1)])
    ends = np.r_[starts[1:], len(sort)]
    out: dict[tuple[str, str], list[Record]] = {}
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        rows = sort[a:b]
        key = (c_names[c_code[rows[0]]], s_names[s_code[rows[0]]])
        rec = Record(order[p_rank[rows[0]]], tuple(str(t) for t in token[rows]), value[rows].copy())
        out.setdefault(key, []).append(rec)
    return out


# -- display -------------------------------------------------------------------------------------

_ESCAPES = {"\r\n": "↵", "\n": "↵", "\r": "↵", "\t": "⇥"}


def display(token: str) -> str:
    """``token`` on one line: a line break shows as ``↵``, a tab as ``⇥``, any other control
    character as ``\\xNN`` (so a simulator line is always one token and one tab-separated
    value)."""
    for a, b in _ESCAPES.items():
        token = token.replace(a, b)
    if all(unicodedata.category(ch) != "Cc" for ch in token):
        return token
    return "".join(f"\\x{ord(ch):02x}" if unicodedata.category(ch) == "Cc" else ch for ch in token)


def window(record: Record, width: int) -> Record:
    """At most ``width`` consecutive tokens of ``record``: the whole record when it is short,
    else a window holding its largest value with three quarters of the window before it (the
    context that leads up to it)."""
    n = len(record.tokens)
    if n <= width:
        return record
    peak = int(np.argmax(record.values))
    start = min(max(peak - (width - width // 4), 0), n - width)
    return Record(
        record.prompt_id,
        record.tokens[start : start + width],
        record.values[start : start + width],
    )


def tail(record: Record, width: int) -> Record:
    """The last ``width`` tokens of ``record`` (all of it when shorter)."""
    if len(record.tokens) <= width:
        return record
    return Record(record.prompt_id, record.tokens[-width:], record.values[-width:])


# -- highlights ----------------------------------------------------------------------------------


def flip(record: Record) -> Record:
    """The sign-flipped record (what a negative explanation describes)."""
    return record.with_values(-record.values)


def count_spans(masks: Iterable[np.ndarray]) -> int:
    """The number of highlighted spans: maximal runs of consecutive True within each mask."""
    total = 0
    for m in masks:
        m = np.asarray(m, dtype=bool)
        if m.size:
            total += int(m[0]) + int(np.count_nonzero(m[1:] & ~m[:-1]))
    return total


def highlight_threshold(values: Sequence[np.ndarray], min_highlights: int = 1) -> float:
    """The quantile walk of the module docstring over the records' ``values`` (already
    sign-flipped for a negative explanation): the first threshold of :data:`QUANTILES` whose
    highlights (``value >= threshold``) form at least ``min_highlights`` spans, else the
    :data:`FALLBACK` percentile; ``inf`` when no value is positive."""
    flat = np.concatenate([np.asarray(v, dtype=np.float64) for v in values]) if values else None
    if flat is None or not np.any(flat > 0):
        return math.inf
    positive = flat[flat > 0]
    for q in QUANTILES:
        t = float(np.percentile(positive, q))
        if count_spans(np.asarray(v) >= t for v in values) >= min_highlights:
            return t
    return float(np.percentile(positive, FALLBACK))


def highlights(values: Sequence[np.ndarray], min_highlights: int = 1) -> list[np.ndarray]:
    """(T,) bool per record: its tokens at or above :func:`highlight_threshold`."""
    t = highlight_threshold(values, min_highlights)
    return [np.asarray(v, dtype=np.float64) >= t for v in values]


# -- the output side -----------------------------------------------------------------------------


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, halves away from zero (2.5 → 3, -2.5 → -3)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def rescale(records: Sequence[Record]) -> list[Record]:
    """The output records with values rescaled to integers −10..10:
    ``round_half_away(10 · value / m)`` with ``m`` the max ``|value|`` over all of ``records``
    (all the cluster's output records); all zeros when ``m = 0``."""
    m = max((float(np.max(np.abs(r.values))) for r in records if r.values.size), default=0.0)
    if m == 0.0:
        return [r.with_values(np.zeros_like(r.values)) for r in records]
    # the clip guards 10·m/m against rounding above 10
    return [
        r.with_values(np.clip(round_half_away(SCALE * r.values / m), -SCALE, SCALE))
        for r in records
    ]


# -- choosing what the explainer sees ------------------------------------------------------------

TOP_POOL = 20
"""the explainer's records are drawn from this many top training records"""
TOP_SHOWN = (10, 20)
"""how many of the top records one explainer prompt shows (drawn uniformly, inclusive)"""
RANDOM_SHOWN = 3
"""how many further random training records it shows"""


def select(records: Sequence[Record], peak: Sequence[float], rng: np.random.Generator) -> list[int]:
    """Indices of the records one explainer prompt shows: a random ``k`` (uniform in
    :data:`TOP_SHOWN`, at most the pool) of the :data:`TOP_POOL` records with the largest
    ``peak`` (ties by index), in that order, then :data:`RANDOM_SHOWN` random others (bounded
    by what exists), in index order."""
    n = len(records)
    order = sorted(range(n), key=lambda i: (-peak[i], i))
    pool = order[:TOP_POOL]
    k = min(len(pool), int(rng.integers(TOP_SHOWN[0], TOP_SHOWN[1] + 1)))
    chosen = set(rng.choice(len(pool), size=k, replace=False).tolist())
    top = [pool[i] for i in range(len(pool)) if i in chosen]
    rest = [i for i in range(n) if i not in set(top)]
    r = min(len(rest), RANDOM_SHOWN)
    picked = sorted(rng.choice(len(rest), size=r, replace=False).tolist()) if r else []
    return top + [rest[i] for i in picked]


# -- the no-LLM baseline -------------------------------------------------------------------------

TOP_TOKENS = 5
"""tokens named by the input side's top-tokens explanation (and 3 + 3 on the output side)"""


def top_tokens_text(records: Sequence[Record], side: str) -> str:
    """The "top tokens" explanation, made without an LLM from the training records.

    Input side: the :data:`TOP_TOKENS` tokens (shown stripped of surrounding spaces) with the
    largest sum of positive values over all their occurrences: ``fires on the tokens "France",
    "Italy"``. Output side (integer records): the 3 targets with the largest positive and the 3
    with the most negative summed values: ``promotes "Paris", "Rome"; suppresses "London"``.
    Ties go to the token that sorts first."""
    weight: dict[str, float] = {}
    for r in records:
        for tok, v in zip(r.tokens, r.values.tolist(), strict=True):
            key = display(tok).strip()
            if key:
                weight[key] = weight.get(key, 0.0) + (max(v, 0.0) if side == "input" else v)

    def quoted(items: list[tuple[str, float]]) -> str:
        return ", ".join(f'"{t}"' for t, _ in items)

    if side == "input":
        top = sorted(((t, w) for t, w in weight.items() if w > 0), key=lambda x: (-x[1], x[0]))
        return f"fires on the tokens {quoted(top[:TOP_TOKENS])}" if top else "fires on no token"
    up = sorted(((t, w) for t, w in weight.items() if w > 0), key=lambda x: (-x[1], x[0]))[:3]
    down = sorted(((t, w) for t, w in weight.items() if w < 0), key=lambda x: (x[1], x[0]))[:3]
    parts = ([f"promotes {quoted(up)}"] if up else []) + (
        [f"suppresses {quoted(down)}"] if down else []
    )
    return "; ".join(parts) if parts else "no effect on any token"


__all__ = [
    "FALLBACK",
    "QUANTILES",
    "Record",
    "cluster_records",
    "count_spans",
    "display",
    "flip",
    "highlight_threshold",
    "highlights",
    "rescale",
    "round_half_away",
    "select",
    "top_tokens_text",
    "window",
]
