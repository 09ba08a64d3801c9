"""Scoring a simulation against the truth (ADAG §3.3, after Bills et al. 2023).

The simulator reads an explanation and predicts a value for every token of every held-out record;
its prediction for a token is the **expected value** of its distribution over the candidate
strings (``Σ int(c)·p(c)``; a parsed answer is a one-hot distribution, so that is the integer).
The score is the **Pearson correlation** between predictions and true values over all tokens of
all held-out records, flattened into one vector — so a record's scale matters, as it should: the
simulator must say where the group fires more, across prompts too. A negative explanation
describes the sign-flipped record, so its score is the correlation negated. A correlation that
does not exist (a constant side, fewer than two values) is ``None`` with the reason, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def expected_value(distribution: Mapping[str, float] | None) -> float | None:
    """``Σ int(c)·p(c) / Σ p(c)`` over the candidates ``c`` of ``distribution`` (strings of
    integers); the integer itself for a one-hot distribution; None for None (an unreadable line)
    or a distribution without mass."""
    if distribution is None:
        return None
    total = 0.0
    mass = 0.0
    for c, p in distribution.items():
        p = float(p)
        if not math.isfinite(p) or p < 0:
            return None
        total += int(c) * p
        mass += p
    return total / mass if mass > 0 else None


def pearson(
    predicted: Sequence[float | None], true: Sequence[float] | np.ndarray
) -> tuple[float | None, str | None]:
    """Pearson's r of ``predicted`` against ``true`` (equal lengths; positions where the
    prediction is None are left out): ``(r, None)``, or ``(None, reason)`` when it does not exist
    — fewer than two values, or a side that is constant (exactly: its range is 0)."""
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} predictions for {len(true)} values")
    keep = [i for i, p in enumerate(predicted) if p is not None]
    if len(keep) < 2:
        return None, "fewer than two tokens to correlate"
    x = np.array([predicted[i] for i in keep], dtype=np.float64)
    y = np.asarray(true, dtype=np.float64)[keep]
    if np.ptp(x) == 0:
        return None, f"the simulation is constant (every token {x[0]:g})"
    if np.ptp(y) == 0:
        return None, "the true values are constant over the held-out tokens"
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0.0 or not math.isfinite(denom):
        return None, "the values are too small or too large to correlate"
    return max(-1.0, min(1.0, float(dx @ dy) / denom)), None


def score(
    predicted: Sequence[Sequence[float | None]],
    true: Sequence[Sequence[float] | np.ndarray],
    *,
    sign: str | None = "positive",
) -> tuple[float | None, str | None]:
    """The score of one explanation: :func:`pearson` over all tokens of all records
    (``predicted[i][t]`` against ``true[i][t]``, flattened), negated when ``sign`` is
    ``"negative"``. ``true`` holds the real (not sign-flipped) values."""
    if len(predicted) != len(true):
        raise ValueError(f"{len(predicted)} simulated records for {len(true)} records")
    p = [v for rec in predicted for v in rec]
    t = [float(v) for rec in true for v in rec]
    r, why = pearson(p, t)
    if r is None:
        return None, why
    return (0.0 - r if sign == "negative" else r), None


__all__ = ["expected_value", "pearson", "score"]
