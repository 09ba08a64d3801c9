"""Activation patching, the ground truth (Kramár et al. 2024, §2.1).

Noising (default): run the clean prompt with one node set to its value on the noise prompt; the
node's effect is the metric change. Denoising: run the noise prompt with one node set to its clean
value; the effect is the change from the noise metric. Batched: each forward carries many
single-node patches in different batch rows (zipped site selectors), so the cost is one forward
pass per node per pair, run ``batch_size`` at a time.

Exact savings (the numbers are those of full forwards):

* A node at a position before the first token where the clean and noise prompts differ has the
  same value in both runs: patching it changes nothing, and no forward is run for it.
* A patched forward is resumed (:meth:`adag.models.model.Model.forward_from`) at the first layer
  its nodes touch, from the base run's block input, and computes only the positions from its
  first patched one on (the earlier positions' keys and values come from the base run), with
  the unembedding at the last position only (the metric reads it alone: see
  :class:`adag.tasks.pairs.Metric`). Rows are grouped by (layer, position) so one forward
  carries many patches that start at the same place.
* With ``base_patches`` (which may act anywhere) every patched forward is a full one.

Other patched values (:mod:`adag.patching.ablate`): ``source`` gives the values at the node sites
directly (zero, a mean, another prompt's run) instead of the noise run. Then nothing is known to
equal the base run before the first differing token of the pair, so ``first_diff`` is 0 unless
the caller gives it (a run on a prompt sharing the base's first tokens may). Rows of many nodes
(e.g. everything outside a circuit) are patched from boolean masks with :meth:`mask_effects`:
one masked replacement per site instead of a list of node indices.
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
from adag.patching.scores import NodeScores, align_ids, merge_pairs

if TYPE_CHECKING:
    from adag.models.model import Model, RunState
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
        source: dict[str, Tensor] | None = None,
        first_diff: int | None = None,
    ) -> None:
        """``source``: the patched values at the node sites (``1 ...`` site layout, this pair's
        length) instead of the other prompt's run; then the other prompt is not run, its metric
        is NaN, the cost starts at 1 (the base run) and ``first_diff`` defaults to 0 (every
        position may differ). ``first_diff``: the first position where the source can differ
        from the base run (nodes before it are not patched; only for sources that are runs on a
        prompt sharing the base's tokens up to there)."""
        if direction not in ("noising", "denoising"):
            raise AdagError(f"unknown patching direction {direction!r}; use noising or denoising")
        self.model, self.pair, self.nodes, self.metric = model, pair, nodes, metric
        self.base_patches = list(base_patches)
        self.state: RunState | None = None
        base_toks, source_toks = (
            (pair.clean, pair.noise) if direction == "noising" else (pair.noise, pair.clean)
        )
        with torch.no_grad():
            source_metric = float("nan")
            if source is None:
                source_logits, source = model.run_with_cache(
                    source_toks, nodes.sites, patches=self.base_patches
                )
                source_metric = float(metric(source_logits, pair)[0])
                if first_diff is None:
                    first_diff = first_difference(pair.clean, pair.noise)
                self.cost = 2.0
            else:
                missing = [s for s in nodes.sites if s not in source]
                if missing:
                    raise AdagError(f"the patched values lack the node sites {missing}")
                self.cost = 1.0
            if self.base_patches:
                base_logits, _ = model.run_with_cache(base_toks, [], patches=self.base_patches)
            else:
                self.state = model.capture(base_toks)
                base_logits = self.state.logits
        base_metric = float(metric(base_logits, pair)[0])
        if direction == "noising":
            self.clean_metric, self.noise_metric = base_metric, source_metric
        else:
            self.clean_metric, self.noise_metric = source_metric, base_metric
        self.base, self.source, self.base_metric = base_toks, source, base_metric
        self.first_diff = 0 if first_diff is None else int(first_diff)
        """Nodes at earlier positions have the same value in the base and the source."""
        self._layer_pos: tuple[np.ndarray, np.ndarray] | None = None

    def set_source(self, source: dict[str, Tensor], *, first_diff: int = 0) -> None:
        """Patch other values from now on (the base run is kept): ``source`` at the node sites,
        equal to the base run before ``first_diff`` (0: nothing is known to be equal)."""
        missing = [s for s in self.nodes.sites if s not in source]
        if missing:
            raise AdagError(f"the patched values lack the node sites {missing}")
        self.source, self.first_diff = source, int(first_diff)

    def _start(self, layers: np.ndarray, pos: np.ndarray) -> tuple[int, int] | None:
        """Where a forward patching nodes at ``layers``/``pos`` may resume: (layer, position),
        or None when none of them can change anything (all before ``first_diff``)."""
        # summed nodes (pos -1) change from the first differing position on
        live = (pos < 0) | (pos >= self.first_diff)
        if not live.any():
            return None
        start = max(self.first_diff, int(pos[live].min()) if (pos[live] >= 0).all() else 0)
        return int(layers[live].min()), min(start, self.pair.n_pos - 1)

    def effects(self, rows_of: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        """Metric change for each node set in ``rows_of`` (one forward each; none for a set
        whose nodes all lie before the first differing position)."""
        rows_of = [np.asarray(r, dtype=np.int64) for r in rows_of]

        def patches(chunk: list[int], start: int) -> list[Patch]:
            return self.nodes.patches([rows_of[r] for r in chunk], self.source, start=start)

        if self.state is None:
            return self._full(
                [r for r, n in enumerate(rows_of) if len(n)], patches, batch_size, len(rows_of)
            )
        groups: dict[tuple[int, int], list[int]] = {}
        for r, nodes in enumerate(rows_of):
            at = self._start(*self.nodes.layer_pos(nodes)) if len(nodes) else None
            if at is not None:
                groups.setdefault(at, []).append(r)
        return self._resumed(groups, patches, batch_size, len(rows_of))

    def _full_effects(self, rows_of: Sequence[np.ndarray], *, batch_size: int) -> np.ndarray:
        """:meth:`effects` by full forwards (what the resumed ones must equal)."""
        rows_of = [np.asarray(r, dtype=np.int64) for r in rows_of]

        def patches(chunk: list[int], start: int) -> list[Patch]:
            return self.nodes.patches([rows_of[r] for r in chunk], self.source)

        rows = [r for r, n in enumerate(rows_of) if len(n)]
        return self._full(rows, patches, batch_size, len(rows_of))

    def _change(self, logits: Tensor) -> np.ndarray:
        with torch.no_grad():
            m = self.metric(logits, self.pair).double().cpu().numpy()
        return m - self.base_metric

    def _full(
        self,
        rows: list[int],
        patches: Callable[[list[int], int], list[Patch]],
        batch_size: int,
        n_rows: int,
    ) -> np.ndarray:
        """Metric changes of ``rows`` (the others 0), each by one full patched forward of the base
        prompt (with the base patches), ``batch_size`` rows a forward."""
        out = np.zeros(n_rows)
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            toks = self.base.expand(len(chunk), -1)
            with torch.no_grad():
                logits, _ = self.model.run_with_cache(
                    toks, [], patches=[*self.base_patches, *patches(chunk, 0)]
                )
            out[chunk] = self._change(logits)
            self.cost += len(chunk)
        return out

    def _resumed(
        self,
        groups: dict[tuple[int, int], list[int]],
        patches: Callable[[list[int], int], list[Patch]],
        batch_size: int,
        n_rows: int,
    ) -> np.ndarray:
        """Metric changes of the rows in ``groups`` (by where they may resume: (layer, position);
        the others 0), by resumed forwards (:func:`_batches`)."""
        out = np.zeros(n_rows)
        assert self.state is not None
        for layer, start, chunk in _batches(groups, batch_size, self.pair.n_pos):
            logits, _ = self.model.forward_from(
                self.state, layer=layer, start=start, rows=len(chunk), patches=patches(chunk, start)
            )
            assert logits is not None
            out[chunk] = self._change(logits)
            self.cost += len(chunk)
        return out

    def mask_effects(self, masks: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
        """Metric change for each row of ``masks`` (bool, ``rows × len(nodes)``): row ``r``
        patches every node where ``masks[r]`` is True, as ``effects([flatnonzero(m) for m in
        masks])`` does, but with one masked replacement per site and batch row (cheap for rows of
        tens of thousands of nodes, e.g. everything outside a circuit). One forward per row that
        patches a node at or after ``first_diff``; none for the others."""
        masks = np.asarray(masks, dtype=bool)
        if masks.ndim != 2 or masks.shape[1] != len(self.nodes):
            raise AdagError(
                f"masks must have shape (rows, {len(self.nodes)}), got {tuple(masks.shape)}"
            )
        n = len(masks)

        def patches(chunk: list[int], start: int) -> list[Patch]:
            return mask_patches(self.nodes, masks[chunk], self.source, start=start)

        if self.state is None:
            return self._full([r for r in range(n) if masks[r].any()], patches, batch_size, n)
        if self._layer_pos is None:
            self._layer_pos = self.nodes.layer_pos(np.arange(len(self.nodes)))
        layers, pos = self._layer_pos
        masks = masks & ((pos < 0) | (pos >= self.first_diff))[None]
        groups: dict[tuple[int, int], list[int]] = {}
        for r, row in enumerate(masks):
            if row.any():
                at = self._start(layers[row], pos[row])
                assert at is not None
                groups.setdefault(at, []).append(r)
        return self._resumed(groups, patches, batch_size, n)


def first_difference(a: Tensor, b: Tensor) -> int:
    """The first position where two ``1 pos`` token rows differ (``pos`` if none): every
    activation before it is the same in both runs."""
    differ = (a.to(b.device) != b)[0].nonzero()
    return int(differ[0]) if len(differ) else int(a.shape[1])


def mask_patches(
    nodes: NodeSet, masks: np.ndarray, source: dict[str, Tensor], *, start: int = 0
) -> list[Patch]:
    """Patches setting, in batch row ``r``, every node where ``masks[r]`` (bool, ``rows ×
    len(nodes)``) is True to its ``source`` value: per group, one ``torch.where`` over the whole
    site. ``start``: for a forward of positions ``start..`` only (nodes at earlier positions are
    left out; summed nodes are patched from ``start`` on), as :meth:`Group.patch`."""
    out = []
    for g, grp in enumerate(nodes.groups):
        sub = masks[:, nodes.offsets[g] : nodes.offsets[g + 1]]
        if sub.any():
            p = _mask_patch(grp, sub, source[grp.site], start)
            if p is not None:
                out.append(p)
    return out


def _mask_patch(grp: Group, mask: np.ndarray, source: Tensor, start: int) -> Patch | None:
    rows = mask.shape[0]
    m = mask.reshape(rows, *grp.shape)
    # to the site's layout (batch, ...), broadcasting over the axes the nodes do not split
    if grp.kind == "head":  # batch head pos d_head
        m, pos_axis = (m[:, :, :, None] if grp.per_pos else m[:, :, None, None]), 2
    elif grp.kind == "neuron":  # batch pos d_mlp
        m, pos_axis = (m if grp.per_pos else m[:, None, :]), 1
    else:  # batch pos d_model
        m, pos_axis = m[:, :, None], 1
    src = source
    if start:
        src = src.narrow(pos_axis, start, src.shape[pos_axis] - start)
        if grp.per_pos:
            m = m[(slice(None),) * pos_axis + (slice(start, None),)]
    if not m.any():
        return None
    mt = torch.as_tensor(np.ascontiguousarray(m), device=src.device)

    def put(x: Tensor, cache: object, _m: Tensor = mt, _s: Tensor = src) -> Tensor:
        return torch.where(_m, _s.to(x.dtype), x)

    return Patch(grp.site, put, op="fn")


MERGE_ROWS = 24
"""Row-positions a forward costs beyond its rows' own work (call overhead, and small matrix
products running below the machine's rate); see :func:`_batches`."""


def _batches(
    groups: dict[tuple[int, int], list[int]], batch_size: int, n_pos: int
) -> Iterator[tuple[int, int, list[int]]]:
    """Forwards for rows grouped by (first layer, first position): ``(layer, start, rows)``.

    Rows of one layer that start at neighbouring positions may share a forward from the earliest
    of them: exact (the later rows recompute a few unchanged positions) and cheaper when the
    recomputed row-positions cost less than another forward. Going from the latest position
    back, a group joins the forward being filled when ``rows × (positions moved back)`` is at
    most :data:`MERGE_ROWS` and the forward keeps at most ``batch_size`` rows."""
    by_layer: dict[int, list[tuple[int, list[int]]]] = {}
    for (layer, start), members in sorted(groups.items()):
        by_layer.setdefault(layer, []).append((start, members))
    for layer, starts in by_layer.items():
        chunk: list[int] = []
        first = n_pos
        for start, members in reversed(starts):
            if chunk and len(chunk) * (first - start) > MERGE_ROWS:
                yield layer, first, chunk
                chunk = []
            for r in members:
                if len(chunk) == batch_size:
                    yield layer, first, chunk
                    chunk = []
                chunk.append(r)
                first = start
        if chunk:
            yield layer, first, chunk


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
    toks = tokenized(model, pairs)
    patchers = pair_patchers(
        model, toks, nodes=nodes, metric=metric, direction=direction, base_patches=base_patches
    )
    for j, (pp, n_pairs) in enumerate(patchers):
        eff = pp.effects([np.array([i]) for i in range(len(pp.nodes))], batch_size=batch_size)
        per_pair.append((pp.nodes.ids(), eff))
        cost += pp.cost
        if progress:
            progress(j + 1, n_pairs)
    out = merge_pairs(f"exhaustive_{direction}", per_pair, cost, pairs=toks)
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
        # pairs of different lengths: positions by role / from the end, as merge_pairs names them
        aligned = align_ids(
            [pp.nodes.ids() for pp in self.patchers], [pp.pair for pp in self.patchers]
        )
        index: dict[str, int] = {}
        for ids in aligned:
            for n in ids:
                index.setdefault(n, len(index))
        self._local: list[
            np.ndarray
        ] = []  # per pair: global node index -> local index (-1: absent)
        self.ids = list(index)
        for pp, ids in zip(self.patchers, aligned, strict=True):
            m = np.full(len(self.ids), -1, dtype=np.int64)
            m[[index[n] for n in ids]] = np.arange(len(pp.nodes))
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
