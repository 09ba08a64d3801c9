"""Baselines for localising a behaviour to nodes, with the AtP* paper's forward-pass accounting
(Kramár, Lieberum, Shah, Nanda 2024, "AtP*: An efficient and scalable method for localizing LLM
behaviour to components", arXiv 2403.00745, §4.1 "Methods" / "Baselines" and Appendix on
subsampling and blocks).

Every method sees the model only through the :class:`~adag.patching.oracle.Oracle` and returns a
:class:`MethodResult`: a ranking of *all* nodes (most important first) plus the forward passes it
spent before verification. Verification — patching the ranked nodes one by one, ``n_pairs``
forward passes each — is counted by :mod:`adag.patching.evaluate`, never here.

- :func:`iterative` — activation patching in a random order (cost 0 before verification).
- :func:`subsampling` — patch random subsets (each node in with probability ``p``); estimate each
  node by the difference of the mean subset effect with and without it (the paper's Algorithm 1,
  a difference of means, not a least-squares fit). The same statistics drive the false-negative
  bound (:mod:`adag.patching.bound`), so they live in :func:`subset_sample`.
- :func:`blocks` — patch contiguous blocks together, rank blocks by ``|effect|``, verify nodes
  block by block.
- :func:`hierarchical` — best-first search down a tree of contiguous groups; single nodes are
  patched by the search itself, so the result carries a per-position ``cum_cost``.
- :func:`estimator` — wraps AtP / AtP* (or any) scores.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from adag.errors import AdagError
from adag.patching.oracle import Oracle

__all__ = [
    "MethodResult",
    "SubsetStats",
    "blocks",
    "estimator",
    "hierarchical",
    "iterative",
    "rank_by_magnitude",
    "subsampling",
    "subset_sample",
]


@dataclass(frozen=True, eq=False)
class MethodResult:
    """What a localisation method hands to the evaluation.

    ``order`` is a permutation of ``0..n_node-1``, most important node first: the order in which
    the nodes would be verified by activation patching. ``cost`` is the forward passes (one prompt
    pair through the model = 1; a backward = ``BACKWARD_COST``) the method spent before
    verification starts. ``scores`` (``n_node``), where the method has them, are its per-node
    estimates indexed by node id (not by rank).

    ``cum_cost`` (``n_node``), when given, replaces the default accounting ``cost + n_pairs * (i +
    1)`` for "total forward passes spent once ``order[i]`` is verified". Only methods whose search
    already patches single nodes (:func:`hierarchical`) set it: their verification is interleaved
    with the search and must not be paid twice.
    """

    name: str
    order: np.ndarray
    cost: float
    scores: np.ndarray | None = None
    cum_cost: np.ndarray | None = None

    def __post_init__(self) -> None:
        order = np.asarray(self.order)
        if order.ndim != 1 or not np.array_equal(np.sort(order), np.arange(order.size)):
            raise AdagError(f"{self.name}: order must be a permutation of 0..n_node-1")
        object.__setattr__(self, "order", order.astype(np.int64, copy=False))
        if self.scores is not None and np.shape(self.scores) != order.shape:
            raise AdagError(f"{self.name}: scores must have shape {order.shape}")
        if self.cum_cost is not None:
            cum = np.asarray(self.cum_cost, dtype=np.float64)
            if cum.shape != order.shape or np.any(np.diff(cum) < 0):
                raise AdagError(
                    f"{self.name}: cum_cost must be non-decreasing, shape {order.shape}"
                )
            object.__setattr__(self, "cum_cost", cum)

    @property
    def n_nodes(self) -> int:
        return int(self.order.size)


def rank_by_magnitude(scores: np.ndarray) -> np.ndarray:
    """Node ids ordered by ``|scores|`` descending, ties broken by the smaller id, NaN last."""
    mag = np.abs(np.asarray(scores, dtype=np.float64))
    mag = np.where(np.isnan(mag), -1.0, mag)
    return np.argsort(-mag, kind="stable")


def estimator(name: str, scores: np.ndarray, cost: float) -> MethodResult:
    """Wrap an estimator's per-node scores (AtP, AtP*, …; signed or magnitudes) that cost ``cost``
    forward passes into a :class:`MethodResult` ranked by ``|scores|``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise AdagError(f"{name}: scores must be one value per node, got shape {scores.shape}")
    return MethodResult(name, rank_by_magnitude(scores), float(cost), scores)


def iterative(oracle: Oracle, *, seed: int = 0) -> MethodResult:
    """Plain activation patching in a uniformly random order: no prior information, cost 0."""
    order = np.random.default_rng(seed).permutation(oracle.n_nodes)
    return MethodResult("iterative", order, 0.0)


@dataclass(frozen=True, eq=False)
class SubsetStats:
    """Per-node summary of a subset-sampling run over ``nodes`` (all arrays of shape ``(m,)``,
    aligned with ``nodes``): ``diff`` = mean effect of the subsets containing the node − mean of
    those not containing it; ``se`` its Welch standard error and ``df`` the Welch–Satterthwaite
    degrees of freedom (NaN where a side has fewer than 2 subsets); ``n_in`` how many subsets
    contained the node. ``n_subsets`` subsets were drawn at inclusion probability ``prob`` for
    ``cost`` forward passes (empty subsets are free)."""

    nodes: np.ndarray
    diff: np.ndarray
    se: np.ndarray
    df: np.ndarray
    n_in: np.ndarray
    n_subsets: int
    prob: float
    cost: float


_CHUNK_ELEMENTS = 1 << 22  # mask entries generated at once: bounds memory for large node sets


def subset_sample(
    oracle: Oracle, nodes: np.ndarray, *, n_subsets: int, prob: float, rng: np.random.Generator
) -> SubsetStats:
    """Draw ``n_subsets`` random subsets of ``nodes`` (each node in independently with probability
    ``prob``), patch each subset together, and summarise per node (the AtP* paper's Algorithm 1
    with its ``ī±, s±, count±`` statistics).

    Under an additive model, effect(S) = Σ_{i∈S} c(i) + noise, ``diff`` is an unbiased estimate of
    c(n): the other nodes enter both means with the same expected contribution. Otherwise it
    estimates the average marginal effect of ``n`` in a random ``prob``-context. Its variance is
    about (Σ_{j≠n} c(j)² + noise) / n_subsets, nearly independent of ``prob``; smaller ``prob`` keeps
    patched subsets small (closer to single-node effects in a real model) but leaves fewer samples
    per node.
    """
    nodes = np.asarray(nodes, dtype=np.int64)
    if n_subsets < 1:
        raise AdagError(f"n_subsets must be at least 1, got {n_subsets}")
    if not 0.0 < prob < 1.0:
        raise AdagError(f"the subset probability must be in (0, 1), got {prob}")
    m = nodes.size
    cost0 = oracle.cost
    sum_in = np.zeros(m)
    sq_in = np.zeros(m)
    n_in = np.zeros(m, dtype=np.int64)
    tot = tot_sq = 0.0
    shift: float | None = None  # centre effects on the first chunk's mean: stable sums of squares
    rows = max(1, min(n_subsets, _CHUNK_ELEMENTS // max(m, 1)))
    for start in range(0, n_subsets, rows):
        mask = rng.random((min(rows, n_subsets - start), m)) < prob  # (r, m)
        y = np.asarray(oracle.joint([nodes[row] for row in mask]), dtype=np.float64)  # (r,)
        if shift is None:
            shift = float(y.mean())
        y = y - shift
        maskf = mask.astype(np.float64)
        sum_in += y @ maskf
        sq_in += (y * y) @ maskf
        n_in += mask.sum(0)
        tot += float(y.sum())
        tot_sq += float((y * y).sum())
    n_out = n_subsets - n_in
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_in = sum_in / n_in
        mean_out = (tot - sum_in) / n_out
        var_in = np.maximum(sq_in - n_in * mean_in**2, 0.0) / (n_in - 1)
        var_out = np.maximum((tot_sq - sq_in) - n_out * mean_out**2, 0.0) / (n_out - 1)
        a, b = var_in / n_in, var_out / n_out
        se2 = a + b
        denom = a**2 / (n_in - 1) + b**2 / (n_out - 1)
        df = np.where(denom > 0, se2**2 / denom, np.inf)
    ok = (n_in >= 2) & (n_out >= 2)
    return SubsetStats(
        nodes=nodes,
        diff=np.where((n_in > 0) & (n_out > 0), mean_in - mean_out, np.nan),
        se=np.where(ok, np.sqrt(se2), np.nan),
        df=np.where(ok, df, np.nan),
        n_in=n_in,
        n_subsets=n_subsets,
        prob=prob,
        cost=oracle.cost - cost0,
    )


def subsampling(
    oracle: Oracle, *, n_samples: int = 1000, prob: float = 0.1, seed: int = 0
) -> MethodResult:
    """Subset-sampling baseline: ``n_samples`` random subsets of all nodes (each node in with
    probability ``prob``), one patch each; ``scores`` = difference-of-means estimates (see
    :func:`subset_sample`; 0 for a node never or always sampled), ranked by ``|score|``."""
    stats = subset_sample(
        oracle,
        np.arange(oracle.n_nodes),
        n_subsets=n_samples,
        prob=prob,
        rng=np.random.default_rng(seed),
    )
    scores = np.nan_to_num(stats.diff, nan=0.0)
    return MethodResult("subsampling", rank_by_magnitude(scores), stats.cost, scores)


def _sequence(n: int, order: np.ndarray | None, seed: int | None) -> np.ndarray:
    """The node sequence groups are cut from: ``order`` if given, else a random permutation if
    ``seed`` is given, else index order (node ids are laid out site by site, so neighbouring ids
    are related components, e.g. heads of one layer)."""
    if order is not None:
        seq = np.asarray(order, dtype=np.int64)
        if not np.array_equal(np.sort(seq), np.arange(n)):
            raise AdagError(f"order must be a permutation of 0..{n - 1}")
        return seq
    if seed is not None:
        return np.random.default_rng(seed).permutation(n)
    return np.arange(n)


def blocks(
    oracle: Oracle,
    *,
    block_size: int = 16,
    order: np.ndarray | None = None,
    seed: int | None = None,
) -> MethodResult:
    """Blocks baseline: cut the node sequence (see ``order``/``seed`` in :func:`_sequence`) into
    contiguous blocks of ``block_size``, patch each block together (``n_pairs`` forwards per
    block), rank blocks by ``|block effect|`` and order nodes block by block (in sequence order
    inside a block). ``scores[i]`` is the effect of node ``i``'s block. Blocks whose members cancel
    out rank low: the method's known false-negative mode."""
    if block_size < 1:
        raise AdagError(f"block_size must be at least 1, got {block_size}")
    seq = _sequence(oracle.n_nodes, order, seed)
    groups = [seq[i : i + block_size] for i in range(0, seq.size, block_size)]
    cost0 = oracle.cost
    effects = np.asarray(oracle.joint(groups), dtype=np.float64)
    cost = oracle.cost - cost0
    ranked = rank_by_magnitude(effects)
    out = np.concatenate([groups[g] for g in ranked]) if groups else seq
    scores = np.empty(seq.size)
    for g, eff in zip(groups, effects, strict=True):
        scores[g] = eff
    return MethodResult("blocks", out, cost, scores)


def hierarchical(
    oracle: Oracle,
    *,
    branching: int = 4,
    order: np.ndarray | None = None,
    seed: int | None = None,
    max_cost: float | None = None,
) -> MethodResult:
    """Hierarchical baseline: best-first search down a tree of contiguous groups.

    The node sequence (``order``/``seed``, see :func:`_sequence`) is split into ``branching``
    contiguous children, recursively, down to single nodes. The root's children are patched
    first; then, repeatedly, the frontier group with the largest ``|effect|`` is taken: a single
    node is emitted into the ranking (it has just been patched alone, i.e. verified), a larger
    group is expanded by patching its children (one patch per child). Ties go to the group found
    first.

    Since single nodes are verified by the search itself, the result carries ``cum_cost[i]`` = all
    forward passes spent when ``order[i]`` is emitted, and ``cost`` = everything the search spent.
    With ``max_cost`` the search stops before an expansion would exceed it; the remaining frontier
    is then emitted by ``|effect|`` (nodes of a group in sequence order), single nodes at no extra
    cost and members of larger groups at ``n_pairs`` each (their verification). ``scores[i]`` is
    the effect of the smallest group containing ``i`` that was patched.
    """
    if branching < 2:
        raise AdagError(f"branching must be at least 2, got {branching}")
    n = oracle.n_nodes
    seq = _sequence(n, order, seed)
    cost0 = oracle.cost
    scores = np.zeros(n)
    # frontier entries: (-|effect|, tie-break counter, start, stop) over seq[start:stop]
    frontier: list[tuple[float, int, int, int]] = []
    counter = 0

    def spent() -> float:
        return oracle.cost - cost0

    def children(start: int, stop: int) -> list[tuple[int, int]]:
        cuts = np.unique(np.linspace(start, stop, min(branching, stop - start) + 1).astype(int))
        return list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))

    def expand(start: int, stop: int) -> None:
        nonlocal counter
        kids = children(start, stop)
        effects = oracle.joint([seq[a:b] for a, b in kids])
        for (a, b), eff in zip(kids, effects, strict=True):
            scores[seq[a:b]] = eff
            heapq.heappush(frontier, (-abs(float(eff)), counter, a, b))
            counter += 1

    out: list[int] = []
    cum: list[float] = []
    if n:
        expand(0, n)
    n_pairs = oracle.n_pairs
    while frontier:
        _, _, a, b = frontier[0]
        if b - a == 1:
            heapq.heappop(frontier)
            out.append(int(seq[a]))
            cum.append(spent())
            continue
        if max_cost is not None and spent() + len(children(a, b)) * n_pairs > max_cost:
            break
        heapq.heappop(frontier)
        expand(a, b)
    cost = spent()
    extra = 0.0
    while frontier:  # budget exhausted: verify the rest group by group
        _, _, a, b = heapq.heappop(frontier)
        for i in seq[a:b]:
            if b - a > 1:
                extra += n_pairs
            out.append(int(i))
            cum.append(cost + extra)
    return MethodResult(
        "hierarchical", np.asarray(out, dtype=np.int64), cost, scores, np.asarray(cum)
    )
