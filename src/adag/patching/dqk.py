"""The downstream QK fix: AtP for nodes whose effect runs through *later* attention patterns.

AtP (Kramár et al. 2024 §2.2) estimates a node's effect as ``Δn · ∂m/∂n``. Its worst misses on
SmolLM2 IOI are early heads whose effect runs through the attention *patterns* of later heads:
the change they write into the residual stream moves later queries and keys, and a saturated
softmax answers that change very non-linearly. AtP*'s QK fix (§3.1.1) corrects only a q or k
node's own softmax, so it leaves those heads as they are. This module corrects them, one hop.

Derivation. Let node ``n`` write ``Δr`` into the residual stream at position ``p`` of layer
``L`` (for a z head: the change of ``hook_attn_out`` at ``p`` when the head's z there takes its
noise value, computed by the model itself, post-norm included). For every later layer ``L' > L``
take the *direct* path of ``Δr`` into that layer's attention, with the layer's input-norm scale
frozen at its clean value (the path through intermediate layers is left to AtP's gradient):

* ``Δq = q_{L'}(x_p + Δr) − q_{L'}(x_p)`` and ``Δk`` likewise, at position ``p`` only (queries and
  keys are per-position maps; computed by the model's own layer, rotary and q/k-norms
  included);
* the scores change in row ``p`` (the new query against every key, the new key at ``(p, p)``)
  and in column ``p`` for the rows ``t > p`` (every later query against the new key); every other
  entry is unchanged. Those rows' softmax is recomputed exactly: ``ΔA = A' − A``.

AtP's first-order term through this path is ``⟨∂m/∂q_{L'}[p], Δq⟩ + ⟨∂m/∂k_{L'}[p], Δk⟩`` (q and k
act on the metric only through the pattern). It is replaced by the exact pattern change pushed
through the pattern's gradient, ``⟨∂m/∂A_{L'}, ΔA⟩``:

    ĉ(n) = AtP(n) + Σ_{L' > L} ( ⟨∂m/∂A_{L'}, ΔA_{L'}⟩ − ⟨∂m/∂q_{L'}[p], Δq⟩ − ⟨∂m/∂k_{L'}[p], Δk⟩ ).

It is exact where the metric is linear in the later patterns and the node acts on them only
directly (e.g. a 2-layer attention-only model whose layer 0 reaches the metric only through
layer 1's queries and keys, norm scales frozen), and the correction is zero where a later layer's
attention does not depend on its queries and keys. The input-norm scale is frozen in ``Δq`` and
``Δk`` while AtP's gradient also flows through that scale: the difference is the scale's own
first-order effect, which the fix leaves as AtP has it (or, with ``freeze_norm=False``, the
norm is live in both the exact change and the first-order term that it replaces).

Measured on SmolLM2 IOI (BENCHMARKS.md) the one-hop fix does not rescue the heads AtP misses:
for the head with the largest miss, the metric's change through later patterns is −1.36 while
the clean pattern gradient applied to the *actual* pattern changes gives +2.06 — downstream of
those patterns the model is far from linear, which no correction of ``ΔA`` alone can fix.

Nodes: z heads and attention / MLP outputs per position get the fix; q and k nodes get AtP*'s
own QK fix; every other node (neurons, nodes summed over positions) keeps its AtP estimate.

Cost per pair, in forward passes: the AtP run (2 forwards + 1 backward), one more clean forward
and backward for the pattern, query and key gradients, and the one-position partial forwards
(for each fixed node's layer and position, one row for ``Δr``; for each later layer, one row per
fixed node at that position for ``Δq, Δk``), each counted as its share of a full forward:
``positions / T × layers / n_layers``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from adag.models.sites import Patch
from adag.patching.atp import _pair_estimates
from adag.patching.node_sets import Group, NodeSet, node_set
from adag.patching.oracle import BACKWARD_COST
from adag.patching.patch import first_difference, tokenized
from adag.patching.scores import NodeScores, merge_pairs

if TYPE_CHECKING:
    from adag.models.model import Model, RunState
    from adag.tasks.pairs import Metric, TokenizedPair


def _fixed(grp: Group) -> bool:
    return grp.per_pos and ((grp.kind == "head" and grp.sub == "z") or grp.kind in ("attn", "mlp"))


class _Layerwise:
    """Per-pair clean quantities of every layer's attention: queries, keys, scores (with the
    mask), the metric's gradients at ``hook_q``, ``hook_k`` and ``hook_pattern``, and the input
    norm scale."""

    def __init__(
        self,
        model: Model,
        tp: TokenizedPair,
        metric: Metric,
        base_patches: Sequence[Patch],
        state: RunState,
    ) -> None:
        n = model.n_layers
        self.model = model
        pre = [f"blocks.{i}.attn." for i in range(n)]
        grad = [p + s for p in pre for s in ("hook_q", "hook_k", "hook_pattern")]
        read = [p + s for p in pre for s in ("hook_q", "hook_k", "hook_attn_scores")]
        with model.sites(read=read, grad=grad, patches=base_patches) as run:
            logits = model(tp.clean)
            m = metric(logits, tp)[0]
        g = run.grads(m)
        c = run.cache
        self.q = [c[p + "hook_q"][0] for p in pre]  # (H, T, dh)
        self.k = [c[p + "hook_k"][0] for p in pre]  # (KV, T, dh)
        self.g_q = [g[p + "hook_q"][0] for p in pre]
        self.g_k = [g[p + "hook_k"][0] for p in pre]
        self.g_a = [g[p + "hook_pattern"][0] for p in pre]  # (H, T, T)
        self.masked = []
        self.s = []
        for i, p in enumerate(pre):
            sc = c[p + "hook_attn_scores"][0]
            masked = sc <= torch.finfo(sc.dtype).min / 2
            self.masked.append(masked)
            self.s.append(model.attention_scores(i, self.q[i], self.k[i], masked))
        self.scale = [
            state.cache.get(f"blocks.{i}.ln1.hook_scale") if model.spec.ln1 else None
            for i in range(n)
        ]

    def correction(
        self, layer: int, p: int, dq: Tensor, dk: Tensor, lq: Tensor, lk: Tensor
    ) -> Tensor:
        """``⟨∂m/∂A, ΔA⟩ − ⟨∂m/∂q_p, lq⟩ − ⟨∂m/∂k_p, lk⟩`` at ``layer`` for N changes of the
        query ``dq (N, H, d_head)`` and key ``dk (N, KV, d_head)`` at position ``p`` whose
        first-order parts are ``lq`` and ``lk``: ``(N,)``."""
        model = self.model
        q, k, s, masked, g_a = (
            self.q[layer],
            self.k[layer],
            self.s[layer],
            self.masked[layer],
            self.g_a[layer],
        )
        n = dq.shape[0]
        t = q.shape[1]
        q_new = q[:, p][None] + dq.to(q.dtype)  # (N, H, dh)
        k_new = k[:, p][None] + dk.to(k.dtype)  # (N, KV, dh)
        keys = k[None].expand(n, -1, -1, -1).clone()
        keys[:, :, p] = k_new
        row = model.attention_scores(layer, q_new[:, :, None], keys, masked[:, p : p + 1])
        s_new = s[None, :, p:].expand(n, -1, -1, -1).clone()  # (N, H, T-p, T)
        s_new[:, :, 0] = row[:, :, 0]
        if p + 1 < t:
            col = model.attention_scores(
                layer,
                q[None, :, p + 1 :].expand(n, -1, -1, -1),
                k_new[:, :, None],
                masked[:, p + 1 :, p : p + 1],
            )  # (N, H, T-p-1, 1)
            s_new[:, :, 1:, p] = col[..., 0]
        a = torch.softmax(s[:, p:], -1)
        a_new = torch.softmax(s_new, -1)
        ga = g_a[:, p:].to(a.dtype)
        exact = ((a_new - a[None]) * ga[None]).sum((1, 2, 3))
        linear = (lq * self.g_q[layer][:, p][None].to(lq.dtype)).sum((1, 2)) + (
            lk * self.g_k[layer][:, p][None].to(lk.dtype)
        ).sum((1, 2))
        return exact.double() - linear.double()


def _writes(
    model: Model,
    state: RunState,
    grp: Group,
    p: int,
    clean: dict[str, Tensor],
    noise: dict[str, Tensor],
) -> tuple[Tensor, float]:
    """What each node of ``grp`` at position ``p`` adds to the residual stream there, ``(N, d)``,
    and the cost of finding out (in forward passes)."""
    if grp.kind in ("attn", "mlp"):
        return (noise[grp.site][0, p] - clean[grp.site][0, p])[None], 0.0
    h = model.n_heads
    rows = list(range(h))
    patch = Patch(grp.site, noise[grp.site][0, :, p], batch=rows, head=rows, pos=0)
    out = f"blocks.{grp.layer}.hook_attn_out"
    _, c = model.forward_from(
        state,
        layer=grp.layer,
        start=p,
        end=p + 1,
        rows=h + 1,  # the last row unpatched: the same rounding as the patched ones
        patches=[patch],
        read=[out],
        stop_at=out,
    )
    a = c[out][:, 0]
    return a[:h] - a[h:], (h + 1) / (state.n_pos * model.n_layers)


FD_STEP = 1e-2
"""Relative step of the central difference giving the first-order change of the queries and
keys when the input norm is live (``freeze_norm=False``)."""


def _query_key_changes(
    model: Model,
    state: RunState,
    scale: Tensor | None,
    layer: int,
    p: int,
    dr: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """``Δq (N, H, d_head)`` and ``Δk (N, KV, d_head)`` of ``layer`` at position ``p`` when its
    input there changes by ``dr (N, d)``, and their first-order parts (the Jacobian applied to
    ``dr``); the cost. With ``scale`` (the clean input-norm scale) the norm is frozen, the map is
    affine and the first-order parts are the changes themselves; without it the first-order
    parts are central differences with step :data:`FD_STEP`."""
    n = dr.shape[0]
    pre = f"blocks.{layer}."
    zero = torch.zeros_like(dr[:1])
    h = FD_STEP
    parts = [dr, zero] if scale is not None else [dr, h * dr, -h * dr, zero]
    delta = torch.cat(parts)[:, None]  # (rows, 1, d); the last row clean
    patches = [Patch(pre + "hook_resid_pre", delta, op="add")]
    if scale is not None:
        patches.append(Patch(pre + "ln1.hook_scale", scale[:, p : p + 1]))
    q_site, k_site = pre + "attn.hook_q", pre + "attn.hook_k"
    rows = delta.shape[0]
    _, c = model.forward_from(
        state,
        layer=layer,
        start=p,
        end=p + 1,
        rows=rows,
        patches=patches,
        read=[q_site, k_site],
        stop_at=pre + "attn.hook_v",
    )
    q, k = c[q_site][:, :, 0], c[k_site][:, :, 0]
    dq, dk = q[:n] - q[-1:], k[:n] - k[-1:]
    if scale is not None:
        lq, lk = dq, dk
    else:
        lq = (q[n : 2 * n] - q[2 * n : 3 * n]) / (2 * h)
        lk = (k[n : 2 * n] - k[2 * n : 3 * n]) / (2 * h)
    return dq, dk, lq, lk, rows / (state.n_pos * model.n_layers)


def _pair_dqk(
    model: Model,
    tp: TokenizedPair,
    ns: NodeSet,
    metric: Metric,
    base_patches: Sequence[Patch],
    freeze_norm: bool,
) -> tuple[dict[str, np.ndarray], float]:
    """Per-node estimates for one pair (``atp``, ``atp_qk``, ``atp_dqk``) and the cost."""
    est = _pair_estimates(
        model, tp, ns, metric, qk_fix=True, grad_drop=False, base_patches=base_patches
    )
    cost = 2 + BACKWARD_COST
    fixed = [gi for gi, g in enumerate(ns.groups) if _fixed(g)]
    out = {"atp": est["atp"], "atp_qk": est["atp_qk"], "atp_dqk": est["atp_qk"].copy()}
    if not fixed:
        return out, cost
    n_layers = model.n_layers
    sites = list(dict.fromkeys(ns.groups[gi].site for gi in fixed))
    scales = [f"blocks.{i}.ln1.hook_scale" for i in range(n_layers)] if model.spec.ln1 else []
    with torch.no_grad():
        state = model.capture(tp.clean, read=[*sites, *scales])
        _, noise = model.run_with_cache(tp.noise, sites, patches=base_patches)
    lw = _Layerwise(model, tp, metric, base_patches, state)
    cost += 3 + BACKWARD_COST  # capture, noise run, the gradient run (forward and backward)
    first = first_difference(tp.clean, tp.noise)
    clean = state.cache
    # every fixed node's residual write, by position: [(group index, local indices, writes)]
    writes: dict[int, list[tuple[int, np.ndarray, Tensor]]] = {}
    for gi in fixed:
        grp = ns.groups[gi]
        for p in range(first, tp.n_pos):
            with torch.no_grad():
                dr, c = _writes(model, state, grp, p, clean, noise)
            cost += c
            # (head, pos) row-major for heads; one node per position for sublayers
            heads = grp.kind == "head"
            local = np.arange(model.n_heads) * tp.n_pos + p if heads else np.array([p])
            writes.setdefault(p, []).append((gi, local, dr))
    corr = np.zeros(len(ns))
    for p, items in writes.items():
        for later in range(1, n_layers):
            below = [(gi, local, dr) for gi, local, dr in items if ns.groups[gi].layer < later]
            if not below:
                continue
            dr = torch.cat([d for _, _, d in below])
            with torch.no_grad():
                scale = lw.scale[later] if freeze_norm else None
                dq, dk, lq, lk, c = _query_key_changes(model, state, scale, later, p, dr)
                delta = lw.correction(later, p, dq, dk, lq, lk).cpu().numpy()
            cost += c
            i = 0
            for gi, local, d in below:
                corr[ns.offsets[gi] + local] += delta[i : i + len(d)]
                i += len(d)
    out["atp_dqk"] = out["atp_dqk"] + corr
    return out, cost


def atp_dqk(
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group] = "heads",
    metric: str | Callable[..., Tensor] | None = None,
    base_patches: Sequence[Patch] = (),
    progress: Callable[[int, int], None] | None = None,
    freeze_norm: bool = True,
) -> NodeScores:
    """AtP with AtP*'s QK fix on q/k nodes and the downstream QK fix on z heads and attention /
    MLP outputs per position (see the module docstring). ``columns`` hold ``atp`` and ``atp_qk``
    of the same runs. ``base_patches`` apply to the gradient runs; the partial forwards that find
    ``Δr``, ``Δq`` and ``Δk`` run without them, which is exact for base patches that leave the
    clean run's values as they are (e.g. norm scales frozen at their clean values).

    ``freeze_norm`` (default, as derived above): each later layer's input-norm scale is frozen
    in ``Δq`` and ``Δk``. Without it the norm is live and the first-order term is taken by a
    central difference (step :data:`FD_STEP` of ``Δr``): two more rows per node and later
    layer. Models with no input norm (OLMo-2) and models with q/k norms always take the
    difference for the part that is not affine."""
    from adag.tasks.pairs import make_metric

    t0 = time.perf_counter()
    toks = tokenized(model, pairs)
    met = make_metric(metric)
    per_pair: list[tuple[list[str], np.ndarray]] = []
    cols: dict[str, list[np.ndarray]] = {}
    cost = 0.0
    for j, tp in enumerate(toks):
        ns = node_set(model, nodes, tp.n_pos)
        est, c = _pair_dqk(model, tp, ns, met, base_patches, freeze_norm)
        cost += c
        per_pair.append((ns.ids(), est["atp_dqk"]))
        for k in ("atp", "atp_qk"):
            cols.setdefault(k, []).append(est[k])
        if progress:
            progress(j + 1, len(toks))
    out = merge_pairs("atp_dqk", per_pair, cost, cols, pairs=toks)
    out.seconds = time.perf_counter() - t0
    return out
