"""Activation patching, the ground truth (Kramár et al. 2024, §2.1).

Noising (default): run the clean prompt with one node set to its value on the noise prompt; the
node's effect is the metric change. Denoising: run the noise prompt with one node set to its clean
value; the effect is the change from the noise metric. Batched: each forward carries many
single-node patches in different batch rows (zipped site selectors), so the cost is one forward
pass per node per pair, run ``batch_size`` at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.sites import Patch
from adag.patching.node_sets import Group, NodeSet, node_set
from adag.patching.scores import NodeScores, merge_pairs

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.tasks.pairs import Metric, TokenizedPair

Direction = Literal["noising", "denoising"]


class PairPatcher:
    """Patching runs for one tokenized prompt pair: caches both runs' activations at the node
    sites, then evaluates the metric with any node sets patched, many per forward."""

    def __init__(
        self,
        model: Model,
        pair: TokenizedPair,
        nodes: NodeSet,
        metric: Metric,
        *,
        direction: Direction = "noising",
        base_patches: Sequence[Patch] = (),
    ) -> None:
        if direction not in ("noising", "denoising"):
            raise AdagError(f"unknown patching direction {direction!r}; use noising or denoising")
        self.model, self.pair, self.nodes, self.metric = model, pair, nodes, metric
        self.base_patches = list(base_patches)
        with torch.no_grad():
            clean_logits, clean = model.run_with_cache(
                pair.clean, nodes.sites, patches=self.base_patches
            )
            noise_logits, noise = model.run_with_cache(
                pair.noise, nodes.sites, patches=self.base_patches
            )
        self.clean_metric = float(metric(clean_logits, pair)[0])
        self.noise_metric = float(metric(noise_logits, pair)[0])
        if direction == "noising":
            self.base, self.source, self.base_metric = pair.clean, noise, self.clean_metric
        else:
            self.base, self.source, self.base_metric = pair.noise, clean, self.noise_metric
        self.cost = 2.0

    def effects(self, rows_of: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        """Metric change for each node set in ``rows_of`` (one forward each)."""
        out = np.zeros(len(rows_of))
        for start in range(0, len(rows_of), batch_size):
            chunk = rows_of[start : start + batch_size]
            nonempty = [i for i, r in enumerate(chunk) if len(r)]
            if not nonempty:
                continue
            chunk = [chunk[i] for i in nonempty]
            patches = self.nodes.patches(chunk, self.source)
            toks = self.base.expand(len(chunk), -1)
            with torch.no_grad():
                logits, _ = self.model.run_with_cache(
                    toks, [], patches=[*self.base_patches, *patches]
                )
                m = self.metric(logits, self.pair).double().cpu().numpy()
            out[start + np.array(nonempty)] = m - self.base_metric
            self.cost += len(chunk)
        return out


def tokenized(model: Model, pairs: Sequence[object]) -> list[TokenizedPair]:
    """Accept PromptPair or TokenizedPair objects."""
    from adag.tasks.pairs import PromptPair, TokenizedPair, tokenize_pairs

    if not pairs:
        raise AdagError("no prompt pairs given")
    if all(isinstance(p, TokenizedPair) for p in pairs):
        return list(pairs)  # type: ignore[arg-type]
    if all(isinstance(p, PromptPair) for p in pairs):
        return tokenize_pairs(model, pairs)  # type: ignore[arg-type]
    raise AdagError("pairs must all be PromptPair (or all TokenizedPair) objects")


def pair_patchers(
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group],
    metric: str | Callable[..., Tensor] | None,
    direction: Direction,
    base_patches: Sequence[Patch],
) -> Iterator[tuple[PairPatcher, int]]:
    """One :class:`PairPatcher` per pair (built lazily, so only one pair's caches need be alive),
    with the number of pairs. The pairs and the metric are checked before the first is built."""
    from adag.tasks.pairs import make_metric

    toks = tokenized(model, pairs)
    met = make_metric(metric)
    for tp in toks:
        ns = node_set(model, nodes, tp.clean.shape[1])
        yield (
            PairPatcher(model, tp, ns, met, direction=direction, base_patches=base_patches),
            len(toks),
        )


def exhaustive(
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group] = "heads",
    metric: str | Callable[..., Tensor] | None = None,
    direction: Direction = "noising",
    batch_size: int = 32,
    base_patches: Sequence[Patch] = (),
    progress: Callable[[int, int], None] | None = None,
) -> NodeScores:
    """Ground truth: patch every node alone, for every pair. Cost: one forward per node per pair
    (plus two per pair for the clean and noise runs)."""
    t0 = time.perf_counter()
    per_pair = []
    cost = 0.0
    patchers = pair_patchers(
        model, pairs, nodes=nodes, metric=metric, direction=direction, base_patches=base_patches
    )
    for j, (pp, n_pairs) in enumerate(patchers):
        eff = pp.effects([np.array([i]) for i in range(len(pp.nodes))], batch_size=batch_size)
        per_pair.append((pp.nodes.ids(), eff))
        cost += pp.cost
        if progress:
            progress(j + 1, n_pairs)
    out = merge_pairs(f"exhaustive_{direction}", per_pair, cost)
    out.seconds = time.perf_counter() - t0
    return out


class PatchingOracle:
    """The real-model :class:`~adag.patching.oracle.Oracle`: node ``i`` is ``ids[i]``; a subset's
    effect is the mean over pairs of the metric change with all its nodes patched together."""

    def __init__(
        self,
        model: Model,
        pairs: Sequence[object],
        *,
        nodes: str | Sequence[Group] = "heads",
        metric: str | Callable[..., Tensor] | None = None,
        direction: Direction = "noising",
        batch_size: int = 32,
        base_patches: Sequence[Patch] = (),
    ) -> None:
        self.patchers = [
            pp
            for pp, _ in pair_patchers(
                model,
                pairs,
                nodes=nodes,
                metric=metric,
                direction=direction,
                base_patches=base_patches,
            )
        ]
        index: dict[str, int] = {}
        for pp in self.patchers:
            for n in pp.nodes.ids():
                index.setdefault(n, len(index))
        self._local: list[
            np.ndarray
        ] = []  # per pair: global node index -> local index (-1: absent)
        self.ids = list(index)
        for pp in self.patchers:
            m = np.full(len(self.ids), -1, dtype=np.int64)
            m[[index[n] for n in pp.nodes.ids()]] = np.arange(len(pp.nodes))
            self._local.append(m)
        self.batch_size = batch_size
        self._cost = 0.0

    @property
    def n_nodes(self) -> int:
        return len(self.ids)

    @property
    def n_pairs(self) -> int:
        return len(self.patchers)

    @property
    def cost(self) -> float:
        return self._cost

    def joint(self, subsets: Sequence[np.ndarray]) -> np.ndarray:
        total = np.zeros(len(subsets))
        for pp, local in zip(self.patchers, self._local, strict=True):
            rows = []
            for s in subsets:
                loc = local[np.asarray(s, dtype=np.int64)]
                rows.append(loc[loc >= 0])
            total += pp.effects(rows, batch_size=self.batch_size)
            self._cost += sum(1 for s in subsets if len(s))
        return total / self.n_pairs

    def single(self, nodes: np.ndarray) -> np.ndarray:
        return self.joint([np.array([i]) for i in np.asarray(nodes)])
