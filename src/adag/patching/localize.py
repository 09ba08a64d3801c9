"""Localisation by adaptive verification: several cheap estimators (AtP, AtP*, …) propose node
rankings, and activation patching checks their best candidates, round-robin across the lists, until
every list has stopped turning up large effects.

The estimators only decide *where to look*; every node reported as found has its exact
single-node effect (:class:`~adag.patching.oracle.Oracle` ``joint([[i]])``). A list that misses a
node another list ranks high loses nothing: the other list finds it. What no list ranks high can
still be bounded with the false-negative certificate of :mod:`adag.patching.bound`.

* :func:`verify` — the adaptive core, on any oracle (tested on synthetic ones).
* :func:`localize` — the estimators and a :class:`~adag.patching.patch.PatchingOracle` on a real
  model, returning a :class:`~adag.patching.scores.NodeScores`.
* :func:`atp_linear` — AtP under the linearised backward (frozen norms and attention, RelP MLPs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.sites import Patch
from adag.patching.baselines import MethodResult, rank_by_magnitude
from adag.patching.node_sets import Group, NodeSet, node_set
from adag.patching.oracle import BACKWARD_COST, Oracle
from adag.patching.patch import Direction, tokenized
from adag.patching.scores import NodeScores, merge_pairs

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.tasks.pairs import Metric, TokenizedPair

__all__ = [
    "ESTIMATORS",
    "ListPicks",
    "Verification",
    "atp_linear",
    "localize",
    "verify",
]


# ----------------------------------------------------------------------------------------------
# The adaptive verification core.


@dataclass(frozen=True, eq=False)
class ListPicks:
    """What one ranking contributed to a :func:`verify` run: ``nodes`` it had checked, in order;
    their exact ``effects``; ``costs[i]`` = verification forward passes spent once ``nodes[i]``
    was checked (counted from the start of :func:`verify`, see there); why the list ``stopped``
    (``"window"``, ``"exhausted"`` or ``"budget"``)."""

    nodes: np.ndarray
    effects: np.ndarray
    costs: np.ndarray
    stopped: str


@dataclass(frozen=True, eq=False)
class Verification:
    """The result of :func:`verify` over ``n`` nodes.

    ``checked[i]``: node ``i`` was patched alone; ``exact[i]`` its effect (NaN where unchecked).
    ``order``: the final ranking, a permutation of ``0..n-1`` — checked nodes by ``|exact|``
    (descending, ties by smaller index), then unchecked nodes by ``|estimates|`` if given, else by
    their best (smallest) position in any ranking (nodes in no ranking last; ties by index).
    ``cost``: verification forward passes spent (the oracle's cost increase). ``stopped``: per
    ranking, why it stopped. ``picks``: per ranking, its :class:`ListPicks`. ``sequence``: every
    checked node in check order, ``cum_cost`` the cost once each was checked. ``tau``: the final
    τ (k-th largest ``|exact|``, 0 if fewer than ``k`` nodes were checked). ``n_pairs``: the
    oracle's, i.e. the cost of one check.
    """

    checked: np.ndarray
    exact: np.ndarray
    order: np.ndarray
    cost: float
    stopped: dict[str, str]
    picks: dict[str, ListPicks]
    sequence: np.ndarray
    cum_cost: np.ndarray
    tau: float
    k: int
    window: int
    n_pairs: int

    @property
    def n_checked(self) -> int:
        return int(self.checked.sum())

    def method_result(self, name: str = "localize", cost: float = 0.0) -> MethodResult:
        """A :class:`~adag.patching.baselines.MethodResult` for the cost-to-find curves of
        :mod:`adag.patching.evaluate`: nodes in check order, then the unchecked ones in
        :attr:`order`; ``cost`` is what was spent before verification (the estimators), so
        ``cum_cost`` = ``cost`` + verification spent once each node is checked, the unchecked
        nodes costing ``n_pairs`` each after the last check."""
        rest = self.order[~self.checked[self.order]]
        tail = self.cost + self.n_pairs * np.arange(1, rest.size + 1, dtype=np.float64)
        return MethodResult(
            name,
            np.concatenate([self.sequence, rest]).astype(np.int64),
            float(cost),
            np.where(self.checked, self.exact, 0.0),
            float(cost) + np.concatenate([self.cum_cost, tail]),
        )


def _ranking(name: str, r: np.ndarray, n: int) -> np.ndarray:
    """A ranking as int64 node ids in 0..n-1, repeats dropped (first occurrence kept)."""
    a = np.asarray(r)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise AdagError(f"ranking {name!r} must be a 1-d array of node indices")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= n):
        raise AdagError(f"ranking {name!r} has node indices outside 0..{n - 1}")
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]


def verify(
    oracle: Oracle,
    rankings: Mapping[str, np.ndarray],
    *,
    k: int = 20,
    window: int = 50,
    budget: float | None = None,
    batch: int = 32,
    estimates: np.ndarray | None = None,
) -> Verification:
    """Check the best candidates of several rankings by exact single-node patching, adaptively.

    ``rankings[name]`` is an estimator's node order (best first, node indices of ``oracle``; it
    may leave nodes out; repeats are dropped).

    **Rounds.** Each round gathers up to ``batch`` picks and patches them in one
    ``oracle.joint([[i], [j], …])`` call. Picks are taken round-robin over the *active* rankings,
    in the order of ``rankings``, the turn carrying over from round to round: on its turn a
    ranking contributes its best node that is neither checked already nor picked earlier in this
    round (such nodes are skipped, never patched twice, and do not count as that ranking's
    picks). A ranking with no such node left sits out the rest of the round. Each check is
    credited to the ranking that picked it.

    **Threshold.** After each round, τ = the k-th largest ``|exact effect|`` over all nodes
    checked so far (by any ranking), or 0 while fewer than ``k`` nodes are checked.

    **Stopping.** After each round (and before the first), each active ranking is tested in
    order: it stops with reason ``"window"`` if it has at least ``window`` picks and its last
    ``window`` picks all have ``|effect| < τ / 2`` (strictly; with τ = 0 nothing stops this
    way), else with reason ``"exhausted"`` if every node of it is checked. A stopped ranking
    contributes no more picks (τ never decreases and its picks no longer change, so it would stay
    stopped). The run ends when no ranking is active.

    **Budget.** Cost is forward passes, read from ``oracle.cost`` (one check costs
    ``oracle.n_pairs``). With ``budget``, before each round the number of checks still
    affordable is ``floor((budget − spent) / n_pairs)``; the round is trimmed to that many
    picks, and if it is 0 every active ranking stops with reason ``"budget"``. So ``spent`` never
    exceeds ``budget``. ``costs``/``cum_cost`` of the i-th check of a round = spent before the
    round + (i + 1) × (the round's cost / its number of checks): the cost once that node is
    checked, as if checked one at a time.

    The final ranking and the other fields are described in :class:`Verification`; unchecked
    nodes are ordered by ``|estimates|`` (shape ``(n_nodes,)``) when given.
    """
    n = int(oracle.n_nodes)
    unit = int(oracle.n_pairs)
    if k < 1 or window < 1 or batch < 1:
        raise AdagError(f"k, window and batch must be at least 1, got {k}, {window}, {batch}")
    if unit < 1:
        raise AdagError(f"the oracle must average over at least one pair, got {unit}")
    if budget is not None and not budget >= 0:
        raise AdagError(f"budget must be a non-negative number of forward passes, got {budget}")
    if not rankings:
        raise AdagError("verify needs at least one ranking")
    if estimates is not None:
        estimates = np.asarray(estimates, dtype=np.float64)
        if estimates.shape != (n,):
            raise AdagError(f"estimates must have shape ({n},), got {estimates.shape}")
    names = [str(x) for x in rankings]
    lists = {name: _ranking(name, rankings[name], n) for name in names}

    checked = np.zeros(n, dtype=bool)
    exact = np.full(n, np.nan)
    ptr = dict.fromkeys(names, 0)
    p_nodes: dict[str, list[int]] = {name: [] for name in names}
    p_eff: dict[str, list[float]] = {name: [] for name in names}
    p_cost: dict[str, list[float]] = {name: [] for name in names}
    stopped: dict[str, str] = {}
    seq: list[int] = []
    cum: list[float] = []
    spent = 0.0
    tau = 0.0
    turn = 0
    cost0 = float(oracle.cost)

    def best_unchecked(name: str, taken: set[int]) -> int | None:
        r, p = lists[name], ptr[name]
        while p < r.size and checked[r[p]]:  # checked nodes are skipped for good
            p += 1
        ptr[name] = p
        while p < r.size and (checked[r[p]] or int(r[p]) in taken):
            p += 1
        return int(r[p]) if p < r.size else None

    def update_stops() -> None:
        for name in names:
            if name in stopped:
                continue
            last = p_eff[name][-window:]
            if len(last) == window and all(abs(e) < tau / 2 for e in last):
                stopped[name] = "window"
            elif best_unchecked(name, set()) is None:
                stopped[name] = "exhausted"

    update_stops()
    while len(stopped) < len(names):
        cap = batch
        if budget is not None:
            afford = int((budget - spent) // unit)
            if afford <= 0:
                for name in names:
                    stopped.setdefault(name, "budget")
                break
            cap = min(cap, afford)
        picks: list[int] = []
        owners: list[str] = []
        taken: set[int] = set()
        dry: set[str] = set()
        while len(picks) < cap:
            found = False
            for _ in range(len(names)):
                name = names[turn % len(names)]
                turn += 1
                if name in stopped or name in dry:
                    continue
                node = best_unchecked(name, taken)
                if node is None:
                    dry.add(name)
                    continue
                picks.append(node)
                owners.append(name)
                taken.add(node)
                found = True
                break
            if not found:
                break
        if not picks:  # cannot happen: an active ranking has an unchecked node
            raise AssertionError("verify: no ranking could contribute a pick")
        before = float(oracle.cost)
        eff = np.asarray(oracle.joint([np.array([i], dtype=np.int64) for i in picks]), float)
        round_cost = float(oracle.cost) - before
        per = round_cost / len(picks)
        for j, (node, name) in enumerate(zip(picks, owners, strict=True)):
            checked[node] = True
            exact[node] = eff[j]
            c = spent + (j + 1) * per
            p_nodes[name].append(node)
            p_eff[name].append(float(eff[j]))
            p_cost[name].append(c)
            seq.append(node)
            cum.append(c)
        spent += round_cost
        mags = np.sort(np.abs(exact[checked]))[::-1]
        tau = float(mags[k - 1]) if mags.size >= k else 0.0
        update_stops()

    # The final ranking.
    mag = np.where(checked, np.abs(np.nan_to_num(exact, nan=0.0)), -1.0)
    done = np.argsort(-mag, kind="stable")[: int(checked.sum())]
    rest = np.flatnonzero(~checked)
    if estimates is not None:
        rest = rest[rank_by_magnitude(estimates[rest])]
    else:
        best = np.full(n, np.inf)
        for r in lists.values():
            np.minimum.at(best, r, np.arange(r.size, dtype=np.float64))
        rest = rest[np.argsort(best[rest], kind="stable")]
    order = np.concatenate([done, rest]).astype(np.int64)

    return Verification(
        checked=checked,
        exact=exact,
        order=order,
        cost=float(oracle.cost) - cost0,
        stopped={name: stopped[name] for name in names},
        picks={
            name: ListPicks(
                np.asarray(p_nodes[name], dtype=np.int64),
                np.asarray(p_eff[name], dtype=np.float64),
                np.asarray(p_cost[name], dtype=np.float64),
                stopped[name],
            )
            for name in names
        },
        sequence=np.asarray(seq, dtype=np.int64),
        cum_cost=np.asarray(cum, dtype=np.float64),
        tau=tau,
        k=k,
        window=window,
        n_pairs=unit,
    )


# ----------------------------------------------------------------------------------------------
# AtP under the linearised backward.


def _linear_pair_estimates(
    model: Model,
    tp: TokenizedPair,
    ns: NodeSet,
    metric: Metric,
    *,
    base_patches: Sequence[Patch],
) -> np.ndarray:
    """``(a_noise − a_clean) · ∂m/∂a`` per node of ``ns`` for one pair, the gradient taken on the
    clean run inside ``model.linearize(mlp="relp")``."""
    sites = ns.sites
    with torch.no_grad():
        _, noise = model.run_with_cache(tp.noise, sites, patches=base_patches)
    with (
        model.linearize(mlp="relp"),
        model.sites(read=sites, grad=sites, patches=base_patches) as run,
    ):
        logits = model(tp.clean)
        m = metric(logits, tp)[0]
        grads = run.grads(m)
    clean = run.cache
    parts = [
        grp.reduce((noise[grp.site] - clean[grp.site]) * grads[grp.site]).reshape(-1)
        for grp in ns.groups
    ]
    return torch.cat(parts).double().cpu().numpy()


def atp_linear(
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group] = "heads",
    metric: str | Callable[..., Tensor] | None = None,
    base_patches: Sequence[Patch] = (),
    progress: Callable[[int, int], None] | None = None,
) -> NodeScores:
    """AtP under the linearised backward (:func:`adag.models.linear.linearize` with
    ``mlp="relp"``: frozen norm scales, frozen attention patterns, RelP MLP rule):
    ĉ(n) = (n(x_noise) − n(x_clean)) · ∂m/∂n, the gradient of the metric on the clean run taken
    through the linearised model. The forward is unchanged; only the gradient differs from
    :func:`adag.patching.atp.atp`. Meant for neuron nodes (the rule makes the linearised model
    complete); computed for any node set — query and key nodes get 0, since a frozen pattern
    passes no gradient to them. Cost: 2 forwards + 1 backward per pair (method ``atp_linear``)."""
    from adag.tasks.pairs import make_metric

    t0 = time.perf_counter()
    toks = tokenized(model, pairs)
    met = make_metric(metric)
    per_pair: list[tuple[list[str], np.ndarray]] = []
    for j, tp in enumerate(toks):
        ns = node_set(model, nodes, tp.clean.shape[1])
        per_pair.append(
            (ns.ids(), _linear_pair_estimates(model, tp, ns, met, base_patches=base_patches))
        )
        if progress:
            progress(j + 1, len(toks))
    out = merge_pairs("atp_linear", per_pair, (2 + BACKWARD_COST) * len(toks), pairs=toks)
    out.seconds = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------------------------
# The estimator registry.

Estimator = Callable[..., NodeScores]


def _lazy(module: str, fn: str, **fixed: Any) -> Estimator:
    """``module.fn(model, pairs, **fixed, **kwargs)``, imported on the first call (the estimator
    modules import torch-heavy code, and some are optional)."""

    def run(model: Model, pairs: Sequence[object], **kwargs: Any) -> NodeScores:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            raise AdagError(f"estimator {fn}: module {module} is not available") from e
        out: NodeScores = getattr(mod, fn)(model, pairs, **fixed, **kwargs)
        return out

    return run


ESTIMATORS: dict[str, Estimator] = {
    "atp": _lazy("adag.patching.atp", "atp"),
    "atp_qk": _lazy("adag.patching.atp", "atp", qk_fix=True),
    "atp_star": _lazy("adag.patching.atp", "atp_star"),
    "atp_ig": _lazy("adag.patching.ig", "atp_ig"),
    "atp_dqk": _lazy("adag.patching.dqk", "atp_dqk"),
    "atp_linear": atp_linear,
}
"""Estimator name → ``f(model, pairs, *, nodes, metric, progress) -> NodeScores``."""


def _swapped(tp: TokenizedPair) -> TokenizedPair:
    return dataclasses.replace(tp, clean=tp.noise, noise=tp.clean)


# ----------------------------------------------------------------------------------------------
# Localisation on a model.


def localize(
    model: Model,
    pairs: Sequence[object],
    nodes: str | Sequence[Group] = "heads",
    *,
    metric: str | Callable[..., Tensor] | None = None,
    k: int = 20,
    window: int = 50,
    budget: float | None = None,
    estimators: Sequence[str] = ("atp_star", "atp_ig", "atp_dqk", "atp_linear"),
    certify: bool = False,
    alpha: float = 0.05,
    batch_size: int = 32,
    direction: Direction = "noising",
    progress: Callable[[int, int], None] | None = None,
    certify_subsets: int = 1000,
    results: Mapping[str, NodeScores] | None = None,
) -> NodeScores:
    """Localise a behaviour (``pairs``, ``metric``) to ``nodes``: run each estimator of
    :data:`ESTIMATORS` named in ``estimators``, then check their rankings (by ``|estimate|``)
    with :func:`verify` on a :class:`~adag.patching.patch.PatchingOracle` over the same nodes,
    pairs, metric and ``direction`` (``k``, ``window``, ``budget`` and ``batch = batch_size`` as
    there; ``budget`` limits the verification forward passes only). For ``"denoising"`` the
    estimators run on the pairs with clean and noise swapped, which is what their noising
    estimate of a denoising effect is.

    With ``certify``, the nodes left unchecked are bounded by
    :func:`adag.patching.bound.false_negative_bound` (``alpha``, ``certify_subsets`` random
    subsets, about ``certify_subsets · n_pairs`` forward passes).

    Returns a :class:`NodeScores` (method ``"localize"``) over the oracle's nodes whose
    ``per_pair`` has **one row** (shape ``(1, n_nodes)``), the final score: the exact effect
    (mean over pairs) where the node was checked, the first estimator's estimate elsewhere (so
    ``estimate`` mixes the two, and ``order()`` ranks by it). ``columns``: ``exact`` (NaN where
    unchecked), ``checked`` (1.0 / 0.0), and one column per estimator (its mean estimate, named
    by the estimator). ``cost`` = the estimators' costs + the oracle's clean and noise runs (2 per
    pair) + verification + the certificate, itemised in ``meta["cost_parts"]``. ``meta`` also holds
    ``stopped`` (per estimator, why its list stopped), ``certificate`` (``bound``, ``alpha``,
    ``n_subsets``, ``cost``, ``worst_node``; None without ``certify``), ``tau``, ``k``, ``window``,
    ``budget``, ``n_checked``, ``n_prompt_pairs``, ``direction`` and ``estimators``, and the check
    order: ``sequence`` (node indices) with ``cum_cost`` (verification spent once each was
    checked).

    ``progress(done, total)`` is called after each stage (each estimator, the verification, the
    certificate). ``results`` may hold estimators already run on the same pairs, nodes and
    metric (by name): they are used as they are, their cost counted.
    """
    from adag.patching.patch import PatchingOracle

    t0 = time.perf_counter()
    names = list(estimators)
    if not names:
        raise AdagError(f"localize needs at least one estimator; known: {', '.join(ESTIMATORS)}")
    unknown = [e for e in names if e not in ESTIMATORS]
    if unknown:
        raise AdagError(f"unknown estimator {unknown[0]!r}; choose from {', '.join(ESTIMATORS)}")
    if len(set(names)) != len(names):
        raise AdagError(f"estimators are named twice: {', '.join(names)}")
    if direction not in ("noising", "denoising"):
        raise AdagError(f"unknown patching direction {direction!r}; use noising or denoising")
    if certify and not 0.0 < alpha < 0.5:
        raise AdagError(f"alpha must be in (0, 0.5), got {alpha}")
    toks = tokenized(model, pairs)
    est_pairs = toks if direction == "noising" else [_swapped(tp) for tp in toks]
    total = len(names) + 1 + int(certify)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    given = results
    results = {}
    for name in names:
        if given is not None and name in given:
            results[name] = given[name]
        else:
            results[name] = ESTIMATORS[name](model, est_pairs, nodes=nodes, metric=metric)
        step()

    oracle = PatchingOracle(
        model, toks, nodes=nodes, metric=metric, direction=direction, batch_size=batch_size
    )
    setup_cost = float(sum(pp.cost for pp in oracle.patchers))
    ids = oracle.ids
    est = {name: r.reindex(ids).estimate for name, r in results.items()}
    ver = verify(
        oracle,
        {name: rank_by_magnitude(e) for name, e in est.items()},
        k=k,
        window=window,
        budget=budget,
        batch=batch_size,
        estimates=est[names[0]],
    )
    step()

    certificate: dict[str, Any] | None = None
    cert_cost = 0.0
    if certify:
        from adag.patching.bound import false_negative_bound

        b = false_negative_bound(
            oracle, np.flatnonzero(ver.checked), alpha=alpha, n_subsets=certify_subsets
        )
        cert_cost = b.cost
        certificate = {
            "bound": b.theta,
            "alpha": b.alpha,
            "n_subsets": b.n_subsets,
            "cost": b.cost,
            "worst_node": ids[b.worst_node] if b.worst_node >= 0 else None,
        }
        step()

    est_costs = {name: float(r.cost) for name, r in results.items()}
    final = np.where(ver.checked, ver.exact, est[names[0]])
    columns: dict[str, np.ndarray] = {
        "exact": ver.exact.copy(),
        "checked": ver.checked.astype(np.float64),
        **{name: e for name, e in est.items()},
    }
    cost_parts = {
        "estimators": est_costs,
        "oracle_setup": setup_cost,
        "verification": ver.cost,
        "certificate": cert_cost,
    }
    meta: dict[str, Any] = {
        "stopped": ver.stopped,
        "certificate": certificate,
        "cost_parts": cost_parts,
        "tau": ver.tau,
        "k": k,
        "window": window,
        "budget": budget,
        "n_checked": ver.n_checked,
        "sequence": ver.sequence.tolist(),
        "cum_cost": ver.cum_cost.tolist(),
        "n_prompt_pairs": len(toks),
        "direction": direction,
        "estimators": names,
    }
    return NodeScores(
        "localize",
        list(ids),
        final[None, :],
        sum(est_costs.values()) + setup_cost + ver.cost + cert_cost,
        columns,
        time.perf_counter() - t0,
        meta,
    )
