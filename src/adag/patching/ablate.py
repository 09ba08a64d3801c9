"""Ablations and faithfulness (issue 13 item 6).

Besides a pair's noise run, a node may be patched ("ablated") to

* ``zero`` — 0 at the node;
* ``mean`` — its mean activation over a prompt set (by default the pairs' clean prompts). For a
  base prompt of ``T`` tokens the mean is taken over the prompts of the set that have ``T`` tokens
  (the same template); when the set has none, at each position ``p`` over the prompts that reach
  ``p`` (a causal model's activation at ``p`` depends on tokens ``0..p`` only), and it is an
  error when no prompt reaches some position. A node summed over positions takes the mean at every
  position.
* ``resample`` — its value on another prompt of the set with ``T`` tokens (not token-equal to the
  base), drawn uniformly with replacement from ``numpy.random.default_rng([seed, pair index])``;
  ``n_resamples`` draws per pair, one prompt per draw for all nodes, and effects are averaged over
  the draws (the drawn prompt indices are kept in the results).
* ``noise`` — the pair's noise run (ordinary activation patching).

Zero and mean are not runs on a prompt sharing the base's tokens, so nothing is skipped for
positions before the pair's first differing token (that shortcut of
:class:`~adag.patching.patch.PairPatcher` holds only for runs that share the prefix); a resampled
prompt is such a run, and its own first differing token with the base is used.

:func:`ablate` gives every node's single-node ablation effect (a :class:`NodeScores` like
:func:`~adag.patching.patch.exhaustive`); :func:`faithfulness` the curve of a ranking: for each
``n`` of a grid, the metric with every node outside the top ``n`` ablated together (the top ``n``
keep their clean values), normalised as ``(m(circuit) - m(all ablated)) / (m(clean) - m(all
ablated))`` from the means over pairs (as in Conmy et al. 2023 and the MIB benchmark). The
complement of a circuit is patched from boolean masks, one masked replacement per site
(:meth:`PairPatcher.mask_effects`).

Cost, in forward passes of one prompt (as in the rest of :mod:`adag.patching`): one per pair for
the clean run (two with ``noise``: its noise run), one per patched forward row per pair and draw,
one per prompt of the set for the means (once), one per resample draw for its run. ``base_patches``
apply to every run, the set's and the resampled prompts' included (as to a pair's noise run), so
they must fit those prompts.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from adag.errors import AdagError
from adag.io import write_parquet
from adag.models.sites import Patch, site_axes
from adag.patching.baselines import rank_by_magnitude
from adag.patching.node_sets import Group, NodeSet, node_set
from adag.patching.patch import PairPatcher, first_difference, tokenized
from adag.patching.scores import NodeScores, align_ids, merge_pairs

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.tasks.pairs import Metric, TokenizedPair

AblationKind = Literal["zero", "mean", "resample", "noise"]
KINDS: tuple[str, ...] = ("zero", "mean", "resample", "noise")

__all__ = [
    "KINDS",
    "AblationSource",
    "AblationValues",
    "Faithfulness",
    "ablate",
    "default_grid",
    "faithfulness",
]


@dataclass(frozen=True, eq=False)
class AblationSource:
    """The values patched in for one base prompt (one draw, for ``resample``)."""

    values: dict[str, Tensor]
    """Per node site, ``1 ...`` in the site's layout for the base prompt's length."""
    first_diff: int
    """The first position where they may differ from the base run (0 but for a resample)."""
    prompt: int | None = None
    """The index in the prompt set of the resampled prompt (None for zero and mean)."""


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise AdagError(f"unknown ablation {kind!r}; choose from {', '.join(KINDS)}")


def _prompt_tokens(model: Model, prompts: Sequence[Tensor | str]) -> list[Tensor]:
    out = []
    for p in prompts:
        t = model.to_tokens(p) if isinstance(p, str) else model.check_tokens(torch.as_tensor(p))
        if t.shape[0] != 1:
            raise AdagError(f"each prompt of the set must be one row, got shape {tuple(t.shape)}")
        out.append(t)
    if not out:
        raise AdagError("the prompt set for mean or resample ablation is empty")
    return out


class AblationValues:
    """The ablated values of one kind (``zero``, ``mean`` or ``resample``) at ``sites`` for base
    prompts of any length; see the module docstring. ``prompts``: the set (token rows ``1 pos``
    or strings). ``cost``: forward passes spent so far (the set's runs for the means, once; one
    per resample draw)."""

    def __init__(
        self,
        model: Model,
        kind: str,
        sites: Sequence[str],
        *,
        prompts: Sequence[Tensor | str] = (),
        n_resamples: int = 1,
        seed: int = 0,
        base_patches: Sequence[Patch] = (),
        batch_size: int = 32,
    ) -> None:
        _check_kind(kind)
        if kind == "noise":
            raise AdagError("noise ablation patches the pair's noise run: use PairPatcher")
        if n_resamples < 1:
            raise AdagError(f"n_resamples must be at least 1, got {n_resamples}")
        self.model, self.kind, self.sites = model, kind, list(dict.fromkeys(sites))
        self.prompts = _prompt_tokens(model, prompts) if kind != "zero" else []
        self.n_resamples, self.seed = n_resamples, seed
        self.base_patches = list(base_patches)
        self.batch_size = batch_size
        self.cost = 0.0
        self._sums: dict[int, dict[str, Tensor]] | None = None
        self._counts: dict[int, int] = {}
        self._means: dict[int, dict[str, Tensor]] = {}

    def for_base(self, base: Tensor, pair_index: int = 0) -> list[AblationSource]:
        """The values for the base prompt ``base`` (``1 T``): one source, or ``n_resamples`` for
        ``resample`` (drawn with ``default_rng([seed, pair_index])``)."""
        t = int(base.shape[1])
        if self.kind == "zero":
            return [AblationSource({s: self._zeros(s, t) for s in self.sites}, 0)]
        if self.kind == "mean":
            return [AblationSource(self._mean(t), 0)]
        cand = [
            i
            for i, p in enumerate(self.prompts)
            if p.shape[1] == t and not torch.equal(p.to(base.device), base)
        ]
        if not cand:
            raise AdagError(
                f"resample ablation: the prompt set has no other prompt of {t} tokens to draw "
                f"from; give prompts of that length"
            )
        rng = np.random.default_rng([self.seed, pair_index])
        out = []
        for k in rng.integers(0, len(cand), size=self.n_resamples):
            i = cand[int(k)]
            toks = self.prompts[i]
            _, values = self.model.run_with_cache(toks, self.sites, patches=self.base_patches)
            self.cost += 1
            out.append(AblationSource(values, first_difference(toks, base), i))
        return out

    def _zeros(self, site: str, t: int) -> Tensor:
        m = self.model
        sizes = {"batch": 1, "pos": t, "d_model": m.d_model, "d_mlp": m.d_mlp, "d_head": m.d_head}
        sizes["head"] = m.n_kv_heads if site.endswith(("hook_k", "hook_v")) else m.n_heads
        shape = [sizes[a] for a in site_axes(site)]
        return torch.zeros((), dtype=m.dtype, device=m.device).expand(shape)

    def _run_set(self) -> None:
        """Sum the set's activations at the sites, per prompt length (float64)."""
        sums: dict[int, dict[str, Tensor]] = {}
        by_len: dict[int, list[Tensor]] = {}
        for p in self.prompts:
            by_len.setdefault(int(p.shape[1]), []).append(p)
        # base patches may select batch rows: run the set one prompt at a time then
        step = 1 if self.base_patches else self.batch_size
        for length, rows in by_len.items():
            acc: dict[str, Tensor] = {}
            for i in range(0, len(rows), step):
                toks = torch.cat(rows[i : i + step])
                _, cache = self.model.run_with_cache(toks, self.sites, patches=self.base_patches)
                for s in self.sites:
                    v = cache[s].double().sum(0, keepdim=True)
                    acc[s] = acc[s] + v if s in acc else v
                self.cost += len(toks)
            sums[length] = acc
            self._counts[length] = len(rows)
        self._sums = sums

    def _mean(self, t: int) -> dict[str, Tensor]:
        if t in self._means:
            return self._means[t]
        if self._sums is None:
            self._run_set()
        assert self._sums is not None
        dtype = self.model.dtype
        if t in self._sums:
            out = {s: (v / self._counts[t]).to(dtype) for s, v in self._sums[t].items()}
        else:
            longest = max(self._sums)
            if longest < t:
                raise AdagError(
                    f"mean ablation: no prompt of the set reaches position {longest} of a "
                    f"{t}-token prompt (the longest has {longest} tokens); give longer prompts"
                )
            out = {}
            for s in self.sites:
                ax = site_axes(s).index("pos")
                total: Tensor | None = None
                count = torch.zeros(t, dtype=torch.float64)
                for length, sums in self._sums.items():
                    k = min(length, t)
                    part = sums[s].narrow(ax, 0, k)
                    if k < t:
                        pad = list(part.shape)
                        pad[ax] = t - k
                        part = torch.cat([part, part.new_zeros(pad)], dim=ax)
                    total = part if total is None else total + part
                    count[:k] += self._counts[length]
                assert total is not None
                shape = [1] * total.dim()
                shape[ax] = t
                out[s] = (total / count.to(total.device).reshape(shape)).to(dtype)
        self._means[t] = out
        return out


def _values(
    model: Model,
    kind: str,
    toks: Sequence[TokenizedPair],
    sites: Sequence[str],
    prompts: Sequence[Tensor | str] | None,
    n_resamples: int,
    seed: int,
    base_patches: Sequence[Patch],
    batch_size: int,
) -> AblationValues | None:
    _check_kind(kind)
    if kind == "noise":
        return None
    return AblationValues(
        model,
        kind,
        sites,
        prompts=[tp.clean for tp in toks] if prompts is None else prompts,
        n_resamples=n_resamples,
        seed=seed,
        base_patches=base_patches,
        batch_size=batch_size,
    )


def _patcher(
    model: Model,
    tp: TokenizedPair,
    ns: NodeSet,
    met: Metric,
    values: AblationValues | None,
    j: int,
    base_patches: Sequence[Patch],
) -> tuple[PairPatcher, list[AblationSource | None]]:
    """The pair's patcher (base: the clean run) and the sources to patch, one per draw."""
    if values is None:
        return PairPatcher(model, tp, ns, met, base_patches=base_patches), [None]
    sources: list[AblationSource | None] = list(values.for_base(tp.clean, j))
    first = sources[0]
    assert first is not None
    pp = PairPatcher(
        model,
        tp,
        ns,
        met,
        base_patches=base_patches,
        source=first.values,
        first_diff=first.first_diff,
    )
    return pp, sources


def _over_draws(
    pp: PairPatcher, sources: list[AblationSource | None], run: Callable[[], np.ndarray]
) -> np.ndarray:
    """The mean of ``run()`` over the draws, with each draw's values set in ``pp``."""
    total: np.ndarray | None = None
    for src in sources:
        if src is not None:
            pp.set_source(src.values, first_diff=src.first_diff)
        out = run()
        total = out if total is None else total + out
    assert total is not None
    return total / len(sources)


def _sites(model: Model, nodes: str | Sequence[Group], toks: Sequence[TokenizedPair]) -> list[str]:
    sites: dict[str, None] = {}
    for t in sorted({tp.n_pos for tp in toks}):
        sites.update(dict.fromkeys(node_set(model, nodes, t).sites))
    return list(sites)


def ablate(
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group] = "heads",
    metric: str | Callable[..., Tensor] | None = None,
    kind: str = "zero",
    prompts: Sequence[Tensor | str] | None = None,
    n_resamples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    base_patches: Sequence[Patch] = (),
    progress: Callable[[int, int], None] | None = None,
) -> NodeScores:
    """Each node's single-node ablation effect on every pair: the metric change when the node
    alone takes its ``kind`` value (``zero``, ``mean``, ``resample``, ``noise``; see the module
    docstring) in the clean run. ``prompts``: the set for ``mean`` and ``resample`` (default:
    the pairs' clean prompts). Method name ``ablate_<kind>``; ``meta`` holds the kind, the set's
    size, ``n_resamples``, ``seed`` and, for ``resample``, the drawn prompt indices per pair.
    Cost: see the module docstring."""
    from adag.tasks.pairs import make_metric

    t0 = time.perf_counter()
    toks = tokenized(model, pairs)
    met = make_metric(metric)
    values = _values(
        model,
        kind,
        toks,
        _sites(model, nodes, toks),
        prompts,
        n_resamples,
        seed,
        base_patches,
        batch_size,
    )
    per_pair, draws = [], []
    cost = 0.0
    for j, tp in enumerate(toks):
        ns = node_set(model, nodes, tp.n_pos)
        pp, sources = _patcher(model, tp, ns, met, values, j, base_patches)
        singles = [np.array([i]) for i in range(len(ns))]
        eff = _over_draws(pp, sources, partial(pp.effects, singles, batch_size=batch_size))
        per_pair.append((ns.ids(), eff))
        draws.append([s.prompt for s in sources if s is not None and s.prompt is not None])
        cost += pp.cost
        if progress:
            progress(j + 1, len(toks))
    out = merge_pairs(
        f"ablate_{kind}", per_pair, cost + (values.cost if values else 0.0), pairs=toks
    )
    out.meta = _meta(kind, values, n_resamples, seed, draws)
    out.seconds = time.perf_counter() - t0
    return out


def _meta(
    kind: str, values: AblationValues | None, n_resamples: int, seed: int, draws: list[list[int]]
) -> dict[str, Any]:
    meta: dict[str, Any] = {"kind": kind}
    if values is not None and kind != "zero":
        meta["n_prompts"] = len(values.prompts)
    if kind == "resample":
        meta.update(n_resamples=n_resamples, seed=seed, resample_prompts=draws)
    return meta


# -- faithfulness ----------------------------------------------------------------------------------


@dataclass
class Faithfulness:
    """The faithfulness curve of a ranking: for each ``ns[k]``, the metric with every node outside
    the ranking's top ``ns[k]`` ablated (``kind``). ``per_pair[j, k]`` is that metric on pair
    ``j``; ``clean[j]`` the clean metric, ``ablated[j]`` the metric with every node ablated.
    ``order`` lists the node ids, most important first (the top ``n`` are ``order[:n]``)."""

    kind: str
    ns: np.ndarray
    per_pair: np.ndarray
    clean: np.ndarray
    ablated: np.ndarray
    order: list[str]
    cost: float = 0.0
    seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_nodes(self) -> int:
        return len(self.order)

    @property
    def metric(self) -> np.ndarray:
        """The mean over pairs of the metric, per ``n``."""
        return self.per_pair.mean(0)

    @property
    def normalised(self) -> np.ndarray:
        """``(metric - mean ablated) / (mean clean - mean ablated)`` (means over pairs): 0 with
        everything ablated, 1 at the clean metric; NaN when clean and ablated agree."""
        lo, hi = float(self.ablated.mean()), float(self.clean.mean())
        with np.errstate(divide="ignore", invalid="ignore"):
            return (self.metric - lo) / (hi - lo) if hi != lo else np.full(len(self.ns), np.nan)

    def to_arrow(self) -> Any:
        import json

        import pyarrow as pa

        meta = {
            "kind": self.kind,
            "n_nodes": str(self.n_nodes),
            "n_pairs": str(len(self.clean)),
            "clean": str(float(self.clean.mean())),
            "ablated": str(float(self.ablated.mean())),
            "cost": str(self.cost),
            "seconds": str(self.seconds),
        }
        for k, v in self.meta.items():
            meta.setdefault(str(k), json.dumps(v))
        return pa.table(
            {
                "n": pa.array(np.asarray(self.ns, dtype=np.int64)),
                "metric": pa.array(self.metric),
                "normalised": pa.array(self.normalised),
            },
            metadata=meta,
        )

    def save(self, path: str | Path) -> Path:
        """Write a parquet file atomically."""
        return write_parquet(self.to_arrow(), path)


def default_grid(n_nodes: int, points: int = 20) -> np.ndarray:
    """0, then about ``points`` geometrically spaced sizes from 1 to ``n_nodes`` (both included)."""
    if n_nodes < 1:
        return np.zeros(1, dtype=np.int64)
    geo = np.rint(np.geomspace(1, n_nodes, min(points, n_nodes))).astype(np.int64)
    return np.unique(np.concatenate([[0], geo, [n_nodes]]))


def _order(ranking: NodeScores | Sequence[str] | np.ndarray, ids: list[str]) -> np.ndarray:
    """Indices into ``ids``, most important first."""
    if isinstance(ranking, NodeScores):
        return ranking.reindex(ids).order()
    if isinstance(ranking, np.ndarray) and ranking.dtype.kind in "fiu":
        if ranking.shape != (len(ids),):
            raise AdagError(
                f"scores must be one value per node ({len(ids)}), got shape {ranking.shape}"
            )
        return rank_by_magnitude(ranking)
    names = [str(r) for r in ranking]
    index = {n: i for i, n in enumerate(ids)}
    unknown = [n for n in names if n not in index]
    if unknown:
        raise AdagError(f"the ranking names nodes not in the node set: {unknown[:5]}")
    if len(set(names)) != len(names):
        raise AdagError("the ranking names a node twice")
    listed = [index[n] for n in names]
    rest = sorted(set(range(len(ids))) - set(listed))
    return np.array(listed + rest, dtype=np.int64)


def faithfulness(
    model: Model,
    pairs: Sequence[object],
    ranking: NodeScores | Sequence[str] | np.ndarray,
    *,
    nodes: str | Sequence[Group] = "heads",
    metric: str | Callable[..., Tensor] | None = None,
    kind: str = "mean",
    ns: Sequence[int] | np.ndarray | None = None,
    prompts: Sequence[Tensor | str] | None = None,
    n_resamples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    base_patches: Sequence[Patch] = (),
    progress: Callable[[int, int], None] | None = None,
) -> Faithfulness:
    """The faithfulness curve of ``ranking`` (a :class:`NodeScores`, ranked by ``|estimate|``
    with nodes it lacks scoring 0; node ids in order, the unlisted ones after them; or scores
    over the nodes, ranked by ``|score|``). The nodes are those of ``nodes`` on every pair (the
    union of their ids, in first-seen order). For each ``n`` in ``ns`` (default
    :func:`default_grid`), every node outside the top ``n`` is ablated together (``kind``: see the
    module docstring), one forward row per ``n`` per pair (and draw), none for ``n`` = all
    nodes. Cost: see the module docstring."""
    from adag.tasks.pairs import make_metric

    t0 = time.perf_counter()
    toks = tokenized(model, pairs)
    met = make_metric(metric)
    sets = [node_set(model, nodes, tp.n_pos) for tp in toks]
    aligned = align_ids([s.ids() for s in sets], toks)  # positions by role across lengths
    index: dict[str, int] = {}
    for s_ids in aligned:
        for n in s_ids:
            index.setdefault(n, len(index))
    ids = list(index)
    order = _order(ranking, ids)
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids))
    grid = default_grid(len(ids)) if ns is None else np.asarray(ns, dtype=np.int64).reshape(-1)
    if grid.size and (grid.min() < 0 or grid.max() > len(ids)):
        raise AdagError(f"ns must be in 0..{len(ids)} (the number of nodes)")
    rows = np.unique(np.concatenate([[0], grid]))  # n = 0: everything ablated
    sites = _sites(model, nodes, toks)
    values = _values(model, kind, toks, sites, prompts, n_resamples, seed, base_patches, batch_size)
    per_pair = np.zeros((len(toks), len(grid)))
    clean, ablated = np.zeros(len(toks)), np.zeros(len(toks))
    cost = 0.0
    draws = []
    for j, (tp, s) in enumerate(zip(toks, sets, strict=True)):
        local_rank = rank[[index[n] for n in aligned[j]]]
        masks = local_rank[None, :] >= rows[:, None]  # ablate what is outside the top n
        pp, sources = _patcher(model, tp, s, met, values, j, base_patches)
        eff = _over_draws(pp, sources, partial(pp.mask_effects, masks, batch_size=batch_size))
        m = pp.base_metric + eff
        clean[j], ablated[j] = pp.base_metric, m[0]
        per_pair[j] = m[np.searchsorted(rows, grid)]
        draws.append([x.prompt for x in sources if x is not None and x.prompt is not None])
        cost += pp.cost
        if progress:
            progress(j + 1, len(toks))
    return Faithfulness(
        kind,
        grid,
        per_pair,
        clean,
        ablated,
        [ids[i] for i in order],
        cost + (values.cost if values else 0.0),
        time.perf_counter() - t0,
        _meta(kind, values, n_resamples, seed, draws),
    )
