"""The false-negative bound: how large can the effect of a node we did not verify still be?
(Kramár, Lieberum, Shah, Nanda 2024, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components", arXiv 2403.00745, §3.3 "Diagnostics".)

After the top-K nodes of an estimator (AtP*) have been verified by activation patching, the rest
``U`` are bounded by subset sampling on ``U`` alone:

1. Draw ``n_subsets`` random subsets of ``U`` (each node in with probability ``p``), patch each
   subset together (``n_pairs`` forwards per non-empty subset) and, per node ``n``, take
   ``d(n)`` = mean effect of subsets containing ``n`` − mean of those not containing it, its Welch
   standard error ``s(n)`` and Welch–Satterthwaite degrees of freedom ``ν(n)``
   (:func:`adag.patching.baselines.subset_sample`).
2. Per node, test the compound null ``H₀(n): |c(n)| ≥ θ`` against ``|c(n)| < θ`` with a one-sided
   Welch t-test at its least favourable point ``c(n) = sign(d(n))·θ``:
   ``t(n) = (θ − |d(n)|) / s(n)``, ``p(n) = P(T_ν(n) > t(n))``.
3. The null "some node of ``U`` has ``|c| ≥ θ``" is the union of the ``H₀(n)``; it is rejected only
   if every ``H₀(n)`` is (an intersection–union test), so its p-value is ``maxₙ p(n)`` and no
   Bonferroni correction is needed: if node ``n*`` has ``|c(n*)| ≥ θ``, rejecting the union
   requires rejecting ``H₀(n*)``, which happens with probability ≤ α.
4. Inverting: ``p(n) ≤ α`` iff ``θ ≥ |d(n)| + t_{1−α, ν(n)} s(n)``, so the bound is

       θ̂ = maxₙ∈U ( |d(n)| + t_{1−α, ν(n)} · s(n) ),

   and P(maxₙ∈U |c(n)| ≥ θ̂) ≤ α (approximately — see the assumptions).

Assumptions (the paper's):

- **Additivity within subsets.** The effect of patching a subset is the sum of its nodes' single
  effects plus zero-mean noise. Then ``d(n)`` is unbiased for ``c(n)`` because every other node
  enters both means with the same expected contribution. Without additivity ``d(n)`` estimates
  the node's average marginal effect in a random ``p``-context of other patched nodes, and the
  bound is a bound on that quantity. A small ``p`` keeps the contexts small, i.e. closer to the
  single-node effect the bound is about.
- **Approximate normality** of the two means (CLT over subsets), so that the Welch statistic is
  close to Student-t. The statistic of the node with the largest effect is the only one whose
  calibration matters (the max over the others only makes θ̂ larger); its noise is the sum of
  many other nodes' contributions, which is close to normal unless another single unverified node
  dominates it. Use enough subsets that each node is in (and out of) dozens of them.
- The subsets are drawn independently of the effects (fixed ``seed``), and the verified nodes are
  never patched, so the bound is about single-node effects in the clean context.

The variance of ``d(n)`` is about (Σ_{j∈U} c(j)² + noise) / n_subsets, nearly independent of
``p``: the bound is informative once the big nodes are verified (removed from ``U``), and it
shrinks as K grows — see :func:`bound_curve`.

Student-t quantiles come from scipy (exact for fractional Welch degrees of freedom). With each
node in and out of dozens of subsets ν is in the tens to hundreds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from adag.errors import AdagError
from adag.patching.baselines import subset_sample
from adag.patching.oracle import Oracle

__all__ = ["BoundResult", "bound_curve", "false_negative_bound", "t_quantile"]


@dataclass(frozen=True)
class BoundResult:
    """One false-negative bound.

    ``k`` nodes were verified by patching; ``theta`` is the smallest θ such that, at confidence
    ``1 - alpha``, no unverified node has ``|effect| >= θ`` (0 when every node is verified, ``inf``
    when some unverified node was never, or always, in a subset — too few subsets to say).
    ``n_subsets`` subsets drawn at inclusion probability ``subset_prob`` cost ``cost`` forward
    passes. ``worst_node`` is the unverified node whose upper confidence limit sets ``theta`` (-1
    if none).
    """

    k: int
    theta: float
    alpha: float
    n_subsets: int
    cost: float
    subset_prob: float = float("nan")
    worst_node: int = -1


def t_quantile(q: float, df: np.ndarray | float) -> np.ndarray:
    """Student-t quantile ``t_{q, df}`` for ``0.5 <= q < 1`` (vectorised over ``df``; ``inf`` →
    normal quantile; NaN or ``df < 1`` → ``inf``, i.e. no bound). Fractional ``df`` (Welch) is
    used as is."""
    from scipy.stats import t as student_t

    if not 0.5 <= q < 1.0:
        raise AdagError(f"the quantile q must be in [0.5, 1), got {q}")
    nu = np.asarray(df, dtype=np.float64)
    bad = np.isnan(nu) | (nu < 1)
    out = student_t.ppf(q, np.where(bad, 1.0, nu))
    return np.where(bad, np.inf, out)


def false_negative_bound(
    oracle: Oracle,
    verified: np.ndarray,
    *,
    alpha: float = 0.05,
    n_subsets: int = 1000,
    subset_prob: float = 0.1,
    seed: int = 0,
) -> BoundResult:
    """Upper confidence bound on the largest ``|effect|`` among the nodes not in ``verified``.

    Spends about ``n_subsets * n_pairs`` forward passes (empty subsets are free). See the module
    docstring for the procedure and its assumptions."""
    if not 0.0 < alpha < 0.5:
        raise AdagError(f"alpha must be in (0, 0.5), got {alpha}")
    n = oracle.n_nodes
    verified = np.unique(np.asarray(verified, dtype=np.int64))
    if verified.size and (verified[0] < 0 or verified[-1] >= n):
        raise AdagError(f"verified node ids must be in 0..{n - 1}")
    rest = np.setdiff1d(np.arange(n), verified, assume_unique=True)
    if rest.size == 0:
        return BoundResult(int(verified.size), 0.0, alpha, 0, 0.0, subset_prob)
    stats = subset_sample(
        oracle, rest, n_subsets=n_subsets, prob=subset_prob, rng=np.random.default_rng(seed)
    )
    upper = np.abs(stats.diff) + t_quantile(1.0 - alpha, stats.df) * stats.se
    upper = np.where(np.isnan(upper), np.inf, upper)
    worst = int(np.argmax(upper))
    return BoundResult(
        k=int(verified.size),
        theta=float(upper[worst]),
        alpha=alpha,
        n_subsets=n_subsets,
        cost=stats.cost,
        subset_prob=subset_prob,
        worst_node=int(rest[worst]),
    )


def bound_curve(
    oracle: Oracle, ranking: np.ndarray, ks: Sequence[int], **kw: Any
) -> list[BoundResult]:
    """θ against K: one :func:`false_negative_bound` per ``K`` in ``ks`` with ``verified =
    ranking[:K]`` (``ranking`` = an estimator's order, most important first). Keyword arguments
    go to :func:`false_negative_bound`; every K uses the same ``seed``. Each bound is a separate
    1 − α statement (no simultaneous coverage over K is claimed)."""
    ranking = np.asarray(ranking, dtype=np.int64)
    bad = [k for k in ks if not 0 <= int(k) <= ranking.size]
    if bad:
        raise AdagError(f"K must be in 0..{ranking.size} (the ranking's length), got {bad[0]}")
    return [false_negative_bound(oracle, ranking[: int(k)], **kw) for k in ks]
