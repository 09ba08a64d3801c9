"""ADAG's multi-view similarity between units (Arora et al. 2026, §3.2), accumulated sparsely.

On each prompt, two co-occurring units are compared in two *views*:

* **input**: each unit's input profile ``x`` is divided by its signed sum ``Σ_p x_p`` (unless that
  sum is 0), then L2-normalised; the view's value is the cosine (dot product) of the two;
* **output**: the output profiles are L2-normalised; the value is their cosine.

A unit whose vector in a view is all zero takes no part in that view on that prompt. Each view is
averaged over the prompts where both units take part in it, then clamped at 0; the two views are
combined by the harmonic mean ``2ab / (a + b)`` (0 when ``a + b = 0``); a pair seen in one view only
takes that view's value. ``S`` stores exactly the pairs seen in at least one view (explicit zeros
included, for pairs whose value clamps to 0) and 1 on the diagonal for every unit.

**Scale.** ``Σ_p m_p²`` pair occurrences (``m_p`` units on prompt ``p``) are summed into far fewer
distinct pairs, and nothing ``n × n`` may be dense when ``n`` is large. The sparse path ranks units
by how many prompts they occur in and walks the upper triangle of the rank-ordered pair space in
row *stripes* whose ``rows × columns`` fit a fixed budget of bins; for each stripe it visits only the
prompts that hold one of its rows, computes the prompt's cosine block with one small matrix product
per view, and scatter-adds it into dense per-stripe accumulators (the sums of both views as one
complex number, the two per-view counts packed in one int64). Only the stripe's touched bins are
read out, so memory is one stripe of accumulators plus the output, and the work is linear in the
pair occurrences. Popular units (Zipf-like neuron use) are concentrated in the first, short stripes.

At dataset scale the *output* is the limit: 10,000 prompts of 400 units drawn from 50,000 with
popularity ∝ 1/rank have ~2·10⁸ distinct co-occurring pairs (~60% of them seen once), a 4.7 GB
symmetric CSR (and slow eigenvectors). ``top_m`` (keep each unit's ``top_m`` most similar units
among those with a positive similarity; a pair stays when either unit keeps it) and ``min_count``
(drop pairs seen on fewer prompts) bound it; both are off by default, which is ADAG exactly. See
``bench/bench_clusters.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from adag.clusters.units import PromptUnits, Unit
from adag.errors import AdagError

log = logging.getLogger(__name__)

DENSE_MAX_UNITS = 2000
"""``dense=None`` accumulates densely up to this many units (four n × n float64 arrays)."""
STRIPE_BINS = 1 << 25
"""Bins of one stripe of the sparse path (each 24 bytes: complex128 sums + packed int64 counts)."""
_SHIFT = 32
"""Bit offset of view 1's count in a packed count (view 0 in the low 32 bits)."""


# -- per-prompt views ---------------------------------------------------------------------------


TRIU_CACHE_MAX = 256
"""Largest block side whose upper-triangle indices the striped accumulation caches."""


def normalise_input(x: np.ndarray) -> np.ndarray:
    """(m, T) input profiles -> each row divided by its signed sum (unless 0), then L2-normalised;
    all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    s = x.sum(axis=1, keepdims=True)
    x = x / np.where(s != 0, s, 1.0)
    return _l2(x)


def normalise_output(o: np.ndarray) -> np.ndarray:
    """(m, K) output profiles -> L2-normalised rows; all-zero rows stay zero."""
    return _l2(np.asarray(o, dtype=np.float64))


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.where(norm > 0, norm, 1.0)


def stack_inputs(pu: PromptUnits) -> np.ndarray:
    """(m, T) a prompt's input profiles as one array (a one-line error for ragged ones)."""
    if not len(pu.units):
        return np.zeros((0, 0))
    try:
        return np.stack([np.asarray(v, dtype=np.float64).ravel() for v in pu.inputs])
    except ValueError:
        raise AdagError(
            f"the input profiles of prompt {pu.prompt_id!r} differ in length; each must have "
            "one entry per prompt position"
        ) from None


def outputs_2d(pu: PromptUnits) -> np.ndarray:
    """(m, K) a prompt's output profiles as float64."""
    o = np.asarray(pu.outputs, dtype=np.float64)
    m = len(pu.units)
    return o.reshape(m, -1) if m else o.reshape(0, o.shape[-1] if o.ndim == 2 else 0)


@dataclass
class _Prep:
    """One prompt ready for pair accumulation: rows ordered by ``key`` (ascending)."""

    key: np.ndarray
    """(m,) int64 unit index (dense path) or popularity rank (sparse path), ascending"""
    views: list[np.ndarray]
    """V arrays (m, d_v): the normalised vectors of each view"""
    code: np.ndarray
    """(m,) int64 bit v set when the unit's view-v vector is non-zero"""
    label: np.ndarray | None = None
    """(m,) cluster label (pairs are kept only within a label) or None"""


def _index_units(prompts: Sequence[PromptUnits]) -> tuple[list[Unit], list[np.ndarray]]:
    """The sorted union of the prompts' units and, per prompt, each row's index into it."""
    seen: set[Unit] = set()
    for pu in prompts:
        seen.update(pu.units)
    units = sorted(seen)
    index = {u: i for i, u in enumerate(units)}
    rows = []
    for pu in prompts:
        idx = np.fromiter((index[u] for u in pu.units), dtype=np.int64, count=len(pu.units))
        if len(np.unique(idx)) != len(idx):
            raise AdagError(
                f"prompt {pu.prompt_id!r} lists a unit twice; a prompt's units are unique "
                "(sum a unit's profiles over its positions, as prompt_units does)"
            )
        rows.append(idx)
    return units, rows


def _prepare(
    prompts: Sequence[PromptUnits],
    rows: list[np.ndarray],
    key_of: np.ndarray,
    sides: tuple[str, ...] = ("input", "output"),
    labels: np.ndarray | None = None,
) -> list[_Prep]:
    """Per prompt: rows sorted by ``key_of[unit index]``, normalised views and non-zero codes;
    ``labels`` (per unit index) keeps only labelled units (label >= 0)."""
    out = []
    for pu, idx in zip(prompts, rows, strict=True):
        vs = []
        for side in sides:
            if side == "input":
                vs.append(normalise_input(stack_inputs(pu)))
            else:
                vs.append(normalise_output(outputs_2d(pu)))
        key = key_of[idx]
        lab = labels[idx] if labels is not None else None
        keep = np.argsort(key, kind="stable")
        if lab is not None:
            keep = keep[lab[keep] >= 0]
        code = np.zeros(len(keep), dtype=np.int64)
        for v, x in enumerate(vs):
            code |= (np.abs(x[keep]).sum(axis=1) > 0).astype(np.int64) << v
        out.append(
            _Prep(
                key=key[keep],
                views=[np.ascontiguousarray(x[keep]) for x in vs],
                code=code,
                label=lab[keep] if lab is not None else None,
            )
        )
    return out


# -- pair accumulation ---------------------------------------------------------------------------

_PAIR_COUNT = np.array([0, 1, 1 << _SHIFT, (1 << _SHIFT) + 1], dtype=np.int64)
"""packed per-view counts of a pair from ``code_i & code_j`` (bit 0: view 0, bit 1: view 1)"""


def _unpack(packed: np.ndarray, n_views: int) -> list[np.ndarray]:
    low = packed & ((1 << _SHIFT) - 1)
    return [low, packed >> _SHIFT][:n_views]


def _dense_pairs(
    preps: Sequence[_Prep], n: int, n_views: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Dense accumulation (n × n arrays): every (i < j) pair seen in a view, in index order:
    ``(i, j, sums per view, counts per view)``."""
    sums = [np.zeros((n, n)) for _ in range(n_views)]
    counts = [np.zeros((n, n), dtype=np.int64) for _ in range(n_views)]
    for pr in preps:
        if len(pr.key) < 2:
            continue
        ix = np.ix_(pr.key, pr.key)
        same = pr.label[:, None] == pr.label[None, :] if pr.label is not None else True
        for v, x in enumerate(pr.views):
            on = (pr.code >> v) & 1
            sums[v][ix] += (x @ x.T) * same
            counts[v][ix] += (on[:, None] & on[None, :]) * same
    seen = np.zeros((n, n), dtype=bool)
    for c in counts:
        seen |= c > 0
    i, j = np.nonzero(np.triu(seen, k=1))
    return i, j, [s[i, j] for s in sums], [c[i, j] for c in counts]


def _stripe_pairs(
    preps: Sequence[_Prep],
    n: int,
    n_views: int,
    *,
    bins: int | None = None,
    chunk: int = 1 << 22,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[np.ndarray], list[np.ndarray]]]:
    """Sparse accumulation over stripes of the upper triangle of the key space (``key`` = rank):
    yields ``(i, j, sums per view, counts per view)`` for the key pairs ``i < j`` seen in a view,
    stripe by stripe, at most ``chunk`` pairs at a time (see the module docstring)."""
    if n_views not in (1, 2):
        raise ValueError("1 or 2 views")
    # rank -> prompts holding it (to visit only those)
    if preps:
        all_keys = np.concatenate([p.key for p in preps])
        all_prompts = np.repeat(np.arange(len(preps)), [len(p.key) for p in preps])
        order = np.argsort(all_keys, kind="stable")
        inc_keys, inc_prompts = all_keys[order], all_prompts[order]
        del all_keys, all_prompts, order
    else:
        inc_keys = inc_prompts = np.zeros(0, dtype=np.int64)
    cap = max(min(bins or STRIPE_BINS, n * n), n, 1)  # at least one full row
    acc = np.zeros(cap, dtype=np.complex128 if n_views == 2 else np.float64)
    cnt = np.zeros(cap, dtype=np.int64)
    full = (1 << n_views) - 1
    triu: dict[int, np.ndarray] = {}
    r0 = 0
    while r0 < n:
        width = n - r0  # columns r0..n-1 (a pair's column rank exceeds its row rank >= r0)
        r1 = min(n, r0 + max(1, cap // width))
        a, b = np.searchsorted(inc_keys, [r0, r1])
        for p in np.unique(inc_prompts[a:b]).tolist():
            pr = preps[p]
            r = pr.key
            lo, hi = np.searchsorted(r, [r0, r1]).tolist()
            h, s = hi - lo, len(r) - lo
            if s < 2:
                continue
            if pr.label is None:
                # the strict upper triangle of the (h, s) block, row-major, is a prefix of that
                # of the (s, s) block: cached per s, for small s only (the cache of every s up
                # to M would take ~4 M³/3 bytes)
                if s <= TRIU_CACHE_MAX:
                    if s not in triu:
                        triu[s] = np.flatnonzero(np.triu(np.ones((s, s), dtype=bool), k=1))
                    flat = triu[s][: h * (s - 1) - h * (h - 1) // 2]
                else:
                    flat = np.flatnonzero(np.arange(s)[None, :] > np.arange(h)[:, None])
            else:
                mask = np.arange(s)[None, :] > np.arange(h)[:, None]  # (h, s) strict upper
                mask &= pr.label[lo:hi, None] == pr.label[None, lo:]
                flat = np.flatnonzero(mask)
            if not len(flat):
                continue
            rk = r[lo:] - r0
            keys = ((rk[:h] * width)[:, None] + rk[None, :]).ravel().take(flat)
            x = pr.views[0][lo:]
            if n_views == 2:
                y = pr.views[1][lo:]
                blk = np.empty((h, s), dtype=np.complex128)
                blk.real = x[:h] @ x.T
                blk.imag = y[:h] @ y.T
            else:
                blk = x[:h] @ x.T
            # a pair occurs once per prompt: no repeated keys, so plain fancy-index += is exact
            # (and ~10x faster than np.add.at)
            acc[keys] += blk.ravel().take(flat)
            c = pr.code[lo:]
            if (c == full).all():  # every unit in every view: one constant count
                cnt[keys] += _PAIR_COUNT[full]
            else:
                cnt[keys] += _PAIR_COUNT[c[:h, None] & c[None, :]].ravel().take(flat)
        hit_all = np.flatnonzero(cnt[: (r1 - r0) * width])
        for start in range(0, len(hit_all), chunk):
            hit = hit_all[start : start + chunk]
            sums_c, packed = acc[hit], cnt[hit]
            acc[hit] = 0
            cnt[hit] = 0
            i, j = r0 + hit // width, r0 + hit % width
            sums = [sums_c.real.copy(), sums_c.imag.copy()] if n_views == 2 else [sums_c]
            yield i, j, sums, _unpack(packed, n_views)
        r0 = r1


# -- values and filters -------------------------------------------------------------------------


def _combine(sums: list[np.ndarray], counts: list[np.ndarray]) -> np.ndarray:
    """ADAG's value of pairs from per-view sums and counts: per view mean clamped at 0, then the
    harmonic mean of the views seen (a view with count 0 is left out)."""
    means = []
    for s, c in zip(sums, counts, strict=True):
        m = np.divide(s, c, out=np.zeros(len(s)), where=c > 0)
        means.append(np.maximum(m, 0.0))
    a, b = means
    ca, cb = counts[0] > 0, counts[1] > 0
    hm = np.divide(2 * a * b, a + b, out=np.zeros(len(a)), where=(a + b) > 0)
    return np.where(ca & cb, hm, np.where(ca, a, b))


class _TopM:
    """Each unit's ``m`` most similar units with a positive similarity (value descending, then
    unit index ascending), fed the pairs in any number of batches (each pair once).

    Exact, in bounded memory: candidates are kept as they arrive unless they fall below their
    unit's *floor*, a histogram bin (``BINS`` bins over [0, 1]) at or above which the unit already
    has ``m`` kept candidates, so a value below it can never make the unit's top ``m``. When the
    kept candidates pile up they are recounted, the floors raised and the candidates re-filtered;
    the exact selection at the end sorts only what is left."""

    BINS = 128
    COMPACT_AT = 1 << 22
    """recount once this many candidates arrived since the last recount (and at least as many as
    it kept)"""

    def __init__(self, n: int, m: int) -> None:
        self.n, self.m = n, m
        self.floor = np.zeros(n, dtype=np.int64)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.size = 0
        self.compacted = 0

    def _bin(self, v: np.ndarray) -> np.ndarray:
        return np.minimum((v * self.BINS).astype(np.int64), self.BINS - 1)

    def add(self, i: np.ndarray, j: np.ndarray, v: np.ndarray) -> None:
        pos = v > 0
        i, j, v = i[pos], j[pos], v[pos]
        u, w, x = np.concatenate([i, j]), np.concatenate([j, i]), np.concatenate([v, v])
        keep = self._bin(x) >= self.floor[u]
        if keep.any():
            self.parts.append((u[keep], w[keep], x[keep]))
            self.size += int(keep.sum())
        if self.size > 2 * self.compacted + self.COMPACT_AT:
            self._compact()

    def _compact(self) -> None:
        if not self.parts:
            return
        u, w, x = (np.concatenate(c) for c in zip(*self.parts, strict=True))
        self.parts = []
        b = self._bin(x)
        hist = np.bincount(u * self.BINS + b, minlength=self.n * self.BINS)
        above = np.cumsum(hist.reshape(self.n, self.BINS)[:, ::-1], axis=1)  # bins >= B-1-c
        del hist
        enough = above >= self.m
        floor = np.where(enough.any(axis=1), self.BINS - 1 - np.argmax(enough, axis=1), 0)
        self.floor = np.maximum(self.floor, floor)
        keep = b >= self.floor[u]
        self.parts = [(u[keep], w[keep], x[keep])]
        self.size = self.compacted = int(keep.sum())

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept pairs ``(i < j, value)``: a pair stays when either unit keeps it."""
        if not self.parts:
            z = np.zeros(0, dtype=np.int64)
            return z, z, np.zeros(0)
        self._compact()
        u, w, x = self.parts[0]
        order = np.lexsort((w, -x, u))
        u, w, x = u[order], w[order], x[order]
        rank = np.arange(len(u)) - np.searchsorted(u, u, side="left")
        sel = rank < self.m
        u, w, x = u[sel], w[sel], x[sel]
        lo, hi = np.minimum(u, w), np.maximum(u, w)
        _, first = np.unique(lo * self.n + hi, return_index=True)
        return lo[first], hi[first], x[first]


def _symmetric(n: int, i: np.ndarray, j: np.ndarray, v: np.ndarray) -> sp.csr_matrix:
    """The symmetric CSR with the (i, j, v) pairs (i != j, each once) and 1 on the diagonal."""
    idx = np.int32 if n < 2**31 else np.int64
    i, j, d = i.astype(idx, copy=False), j.astype(idx, copy=False), np.arange(n, dtype=idx)
    rows = np.concatenate([i, j, d])
    cols = np.concatenate([j, i, d])
    vals = np.concatenate([v, v, np.ones(n)])
    del i, j, v
    # COO -> CSR is a counting sort by row, then a sort within each row; explicit zeros stay
    S = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    S.sort_indices()
    return S


def one_blas_thread() -> Any:
    """The per-prompt products are tiny (hundreds x ~10): threaded BLAS only adds contention
    (on a busy 2-core machine it made the accumulation twice as slow)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


# -- the similarity ------------------------------------------------------------------------------


def similarity(
    prompts: Sequence[PromptUnits],
    *,
    dense: bool | None = None,
    top_m: int | None = None,
    min_count: int = 1,
) -> tuple[list[Unit], sp.csr_matrix]:
    """ADAG's multi-view similarity of every unit of ``prompts`` (see the module docstring).

    Returns the sorted list of all units and ``S`` (``n × n`` symmetric ``scipy.sparse.csr_matrix``,
    rows and columns in the order of the units): a stored entry for every pair seen together in at
    least one view (explicit zeros where the value clamps to 0), 1 on the diagonal, nothing for
    pairs never seen together.

    ``dense``: accumulate in ``n × n`` arrays (True), prompt-by-prompt sparse stripes (False), or
    pick by size (None: dense up to ``DENSE_MAX_UNITS`` units); both give the same matrix.
    ``min_count`` (> 1 departs from ADAG): keep only pairs averaged over at least that many prompts
    in one of their views. ``top_m`` (departs from ADAG): keep each unit's ``top_m`` most similar
    units among those with a positive similarity (ties by unit order); a pair stays when either
    unit keeps it. They bound ``S`` at dataset scale, where the exact pair count runs into the
    hundreds of millions.
    """
    units, S, _ = similarity_with_stats(prompts, dense=dense, top_m=top_m, min_count=min_count)
    return units, S


def similarity_with_stats(
    prompts: Sequence[PromptUnits],
    *,
    dense: bool | None = None,
    top_m: int | None = None,
    min_count: int = 1,
) -> tuple[list[Unit], sp.csr_matrix, dict[str, Any]]:
    """:func:`similarity` and a few counts: ``n_units``, ``n_prompts``, ``pair_occurrences``
    (Σ over prompts of the unit pairs on it), ``distinct_pairs`` (pairs seen in a view, before
    ``min_count`` / ``top_m``), ``stored_pairs`` (off-diagonal pairs in ``S``), ``path``
    (``dense`` | ``sparse``), ``seconds``."""
    if top_m is not None and (isinstance(top_m, bool) or int(top_m) < 1):
        raise AdagError(f"top_m must be a positive whole number or None, got {top_m!r}")
    if isinstance(min_count, bool) or int(min_count) < 1:
        raise AdagError(f"min_count must be a whole number >= 1, got {min_count!r}")
    t0 = time.perf_counter()
    prompts = list(prompts)
    units, rows = _index_units(prompts)
    n = len(units)
    use_dense = n <= DENSE_MAX_UNITS if dense is None else bool(dense)
    occurrences = int(sum(len(r) * (len(r) - 1) // 2 for r in rows))
    if use_dense:
        key_of = np.arange(n, dtype=np.int64)
        preps = _prepare(prompts, rows, key_of)
        batches: Iterator[Any] = iter([_dense_pairs(preps, n, 2)])
        unit_of = key_of
    else:
        occ = np.bincount(np.concatenate(rows), minlength=n) if rows else np.zeros(n, np.int64)
        unit_of = np.lexsort((np.arange(n), -occ))  # rank -> unit index: most frequent first
        key_of = np.empty(n, dtype=np.int64)
        key_of[unit_of] = np.arange(n)
        preps = _prepare(prompts, rows, key_of)
        batches = _stripe_pairs(preps, n, 2)
    topm = _TopM(n, int(top_m)) if top_m is not None else None
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    distinct = 0
    with one_blas_thread():
        for i, j, sums, counts in batches:
            distinct += len(i)
            if min_count > 1:
                ok = np.maximum(counts[0], counts[1]) >= min_count
                i, j = i[ok], j[ok]
                sums, counts = [s[ok] for s in sums], [c[ok] for c in counts]
            v = _combine(sums, counts)
            ui, uj = unit_of[i], unit_of[j]
            if topm is not None:
                topm.add(ui, uj, v)
            else:
                kept.append((ui.astype(np.int32), uj.astype(np.int32), v))
    if topm is not None:
        i, j, v = topm.pairs()
    elif kept:
        i, j, v = (np.concatenate(c) for c in zip(*kept, strict=True))
    else:
        i = j = np.zeros(0, dtype=np.int64)
        v = np.zeros(0)
    kept.clear()
    S = _symmetric(n, i, j, v)
    stats = {
        "n_units": n,
        "n_prompts": len(prompts),
        "pair_occurrences": occurrences,
        "distinct_pairs": distinct,
        "stored_pairs": int((S.nnz - n) // 2),
        "path": "dense" if use_dense else "sparse",
        "seconds": time.perf_counter() - t0,
    }
    log.info("similarity: %s", stats)
    return units, S, stats


def similarity_reference(prompts: Sequence[PromptUnits]) -> tuple[list[Unit], sp.csr_matrix]:
    """The definition, written as a direct double loop over unit pairs and prompts (slow; for
    tests): per pair, the per-view cosines on the prompts where both units occur with non-zero
    vectors, averaged, clamped at 0, combined by the harmonic mean (or the one view seen)."""
    units = sorted({u for pu in prompts for u in pu.units})
    n = len(units)
    per_prompt = []
    for pu in prompts:
        vin: dict[Unit, np.ndarray] = {}
        vout: dict[Unit, np.ndarray] = {}
        for row, u in enumerate(pu.units):
            xi = np.asarray(pu.inputs[row], dtype=np.float64)
            total = xi.sum()
            if total != 0:
                xi = xi / total
            if np.linalg.norm(xi) > 0:
                vin[u] = xi / np.linalg.norm(xi)
            o = np.asarray(pu.outputs[row], dtype=np.float64)
            if np.linalg.norm(o) > 0:
                vout[u] = o / np.linalg.norm(o)
        per_prompt.append((set(pu.units), vin, vout))
    dense = np.zeros((n, n))
    stored = np.eye(n, dtype=bool)
    for a in range(n):
        dense[a, a] = 1.0
        for b in range(a + 1, n):
            ua, ub = units[a], units[b]
            cin: list[float] = []
            cout: list[float] = []
            for present, pin, pout in per_prompt:
                if ua in present and ub in present:
                    if ua in pin and ub in pin:
                        cin.append(float(pin[ua] @ pin[ub]))
                    if ua in pout and ub in pout:
                        cout.append(float(pout[ua] @ pout[ub]))
            if not cin and not cout:
                continue
            if cin and cout:
                x, y = max(float(np.mean(cin)), 0.0), max(float(np.mean(cout)), 0.0)
                value = 2 * x * y / (x + y) if x + y > 0 else 0.0
            else:
                value = max(float(np.mean(cin or cout)), 0.0)
            dense[a, b] = dense[b, a] = value
            stored[a, b] = stored[b, a] = True
    r, c = np.nonzero(stored)
    return units, sp.csr_matrix((dense[r, c], (r, c)), shape=(n, n))


__all__ = [
    "normalise_input",
    "normalise_output",
    "outputs_2d",
    "similarity",
    "similarity_reference",
    "similarity_with_stats",
    "stack_inputs",
]
