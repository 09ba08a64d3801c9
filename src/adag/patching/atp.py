"""AtP and AtP* (Kramár, Lieberum, Shah, Nanda 2024, "AtP*: An efficient and scalable method for
localizing LLM behaviour to components").

* **AtP** (§2.2): ĉ(n) = (n(x_noise) − n(x_clean)) · ∂L/∂n, the gradient taken on the clean run:
  two forwards and one backward per prompt pair for every node at once.
* **QK fix** (§3.1.1): a query or key node acts on the metric through an attention softmax, where
  the linear approximation fails when the softmax saturates. For each query (one row of scores) and
  each key (one column) we recompute the softmax exactly with that node patched and take
  (A′ − A) · ∂L/∂A, with ∂L/∂A from the clean backward. Keys cost O(T²) per head: changing one
  entry of a softmax row has a closed form given leave-one-out sums, which exclusive prefix and
  suffix sums give for every entry at once (no O(T³) recomputation, no cancellation).
* **GradDrop** (§3.1.2): for each layer l, the gradient with layer l's write into the residual
  stream (its attention and MLP outputs) blocked in the backward only; the estimate is
  (1/(L−1)) Σ_l |ĉ_{−l}(n)|. The node's own layer contributes 0 (all its paths are cut), layers
  before it contribute |AtP|. One forward, L+1 backward passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from adag.models.sites import Patch
from adag.patching.node_sets import Group, NodeSet, node_set
from adag.patching.oracle import BACKWARD_COST
from adag.patching.patch import tokenized
from adag.patching.scores import NodeScores, merge_pairs

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.tasks.pairs import Metric, TokenizedPair


# ----------------------------------------------------------------------------------------------
# The QK fix.


def _excl_prefix(x: Tensor) -> Tensor:
    """Σ_{j<p} x_j along the last axis (no subtraction, so no cancellation)."""
    c = torch.cumsum(x, -1)
    return torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], -1)


def _excl_suffix(x: Tensor) -> Tensor:
    """Σ_{j>p} x_j along the last axis."""
    return _excl_prefix(x.flip(-1)).flip(-1)


def qk_fix_queries(s: Tensor, s_new_rows: Tensor, grad_a: Tensor) -> Tensor:
    """Exact effect on ``A · grad_a`` of replacing each score row by its new value: ``(head, q_pos)``.
    ``s``: clean scores, ``s_new_rows``: scores with every row computed from the patched query."""
    a = torch.softmax(s, -1)
    a_new = torch.softmax(s_new_rows, -1)
    return ((a_new - a) * grad_a).sum(-1)


def qk_fix_keys(s: Tensor, s_new_cols: Tensor, grad_a: Tensor, masked: Tensor) -> Tensor:
    """Exact effect on ``A · grad_a``, summed over query rows, of replacing score column p alone by
    its new value, for every p: ``(head, k_pos)``. O(T²) per head.

    Changing entry p of row t: with E = exp(s − m), R = Σ_{j≠p} E_j, G = Σ_{j≠p} E_j g_j and
    e′ = exp(s′_p − m), the new row sum Σ_j A′_j g_j = (G + e′ g_p) / (R + e′). Everything is
    rescaled by m′ = max(m, s′_p) so that neither exp overflows."""
    m = s.max(-1, keepdim=True).values  # (H, T, 1)
    e = torch.exp(s - m)
    eg = e * grad_a
    r = _excl_prefix(e) + _excl_suffix(e)
    g = _excl_prefix(eg) + _excl_suffix(eg)
    s_new = torch.where(masked, torch.full_like(s_new_cols, float("-inf")), s_new_cols)
    m2 = torch.maximum(m, s_new)
    scale = torch.exp(m - m2)
    e_new = torch.exp(s_new - m2)
    new = (g * scale + e_new * grad_a) / (r * scale + e_new)
    old = eg.sum(-1, keepdim=True) / e.sum(-1, keepdim=True)
    delta = torch.where(masked, torch.zeros_like(new), new - old)  # (H, T, S)
    return delta.sum(-2)


def _sum_kv(x: Tensor, n_kv: int) -> Tensor:
    """Sum query-head rows into their KV heads: (n_heads, ...) -> (n_kv_heads, ...)."""
    return x.reshape(n_kv, x.shape[0] // n_kv, *x.shape[1:]).sum(1)


# ----------------------------------------------------------------------------------------------
# GradDrop gates.


class _DropState:
    layer = -1


class _Gate(torch.autograd.Function):
    """Identity forward; zero gradient when ``state.layer`` is this gate's layer."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, state: _DropState, layer: int) -> Tensor:
        ctx.state, ctx.layer = state, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None]:
        return (torch.zeros_like(g) if ctx.state.layer == ctx.layer else g), None, None


def _gate_patches(model: Model, state: _DropState) -> list[Patch]:
    def gate(layer: int) -> Callable[[Tensor, Any], Tensor]:
        def fn(x: Tensor, live: Any) -> Tensor:
            out: Tensor = _Gate.apply(x, state, layer)
            return out

        return fn

    return [
        Patch(f"blocks.{layer}.{site}", gate(layer), op="fn")
        for layer in range(model.n_layers)
        for site in ("hook_attn_out", "hook_mlp_out")
    ]


# ----------------------------------------------------------------------------------------------
# Per-pair estimates.


def _pair_estimates(
    model: Model,
    tp: TokenizedPair,
    ns: NodeSet,
    metric: Metric,
    *,
    qk_fix: bool,
    grad_drop: bool,
    base_patches: Sequence[Patch],
) -> dict[str, np.ndarray]:
    """Flat per-node estimates for one pair: ``atp`` always, ``atp_qk`` with the QK fix, and
    ``graddrop`` (of the QK-fixed estimates when ``qk_fix``)."""
    qk_layers = (
        sorted({g.layer for g in ns.groups if g.kind == "head" and g.sub in ("q", "k")})
        if qk_fix
        else []
    )
    qk_sites = [f"blocks.{i}.attn.hook_{x}" for i in qk_layers for x in ("q", "k", "attn_scores")]
    pat_sites = [f"blocks.{i}.attn.hook_pattern" for i in qk_layers]
    sites = ns.sites
    read = [*sites, *qk_sites]
    with torch.no_grad():
        _, noise = model.run_with_cache(tp.noise, read, patches=base_patches)
    state = _DropState()
    gates = _gate_patches(model, state) if grad_drop else []
    with model.sites(
        read=read,
        grad=[*sites, *pat_sites],
        patches=[*base_patches, *gates],
    ) as run:
        logits = model(tp.clean)
        m = metric(logits, tp)[0]
    clean = run.cache

    # QK-fix precomputation (independent of which gradient is used). The scores come back in the
    # work dtype (float32 for half models), so every softmax of the fix runs there, as the model's.
    qk_pre: dict[int, dict[str, Tensor]] = {}
    for layer in qk_layers:
        p = f"blocks.{layer}.attn."
        scores = clean[p + "hook_attn_scores"][0]
        masked = scores <= torch.finfo(scores.dtype).min / 2
        q_c, k_c = clean[p + "hook_q"][0], clean[p + "hook_k"][0]
        q_n, k_n = noise[p + "hook_q"][0], noise[p + "hook_k"][0]
        qk_pre[layer] = {
            "masked": masked,
            "s": model.attention_scores(layer, q_c, k_c, masked),
            "s_q": model.attention_scores(layer, q_n, k_c, masked),
            "s_k": model.attention_scores(layer, q_c, k_n, masked),
        }

    def estimate(grads: dict[str, Tensor], fix: bool) -> np.ndarray:
        parts = []
        for grp in ns.groups:
            site = grp.site
            if fix and grp.kind == "head" and grp.sub in ("q", "k"):
                parts.append(
                    _qk_group(
                        model,
                        grp,
                        qk_pre[grp.layer],
                        grads[f"blocks.{grp.layer}.attn.hook_pattern"][0],
                    )
                )
            else:
                delta = noise[site] - clean[site]
                parts.append(grp.reduce(delta * grads[site]).reshape(-1))
        return torch.cat(parts).double().cpu().numpy()

    retain = grad_drop
    g_full = run.grads(m, retain_graph=retain)
    out = {"atp": estimate(g_full, False)}
    if qk_fix:
        out["atp_qk"] = estimate(g_full, True)
    if grad_drop:
        acc = np.zeros(len(ns))
        terms = []
        for layer in range(model.n_layers):
            state.layer = layer
            g_l = run.grads(m, retain_graph=layer < model.n_layers - 1)
            est = np.abs(estimate(g_l, qk_fix))
            for gi, grp in enumerate(ns.groups):
                if grp.kind in ("attn", "mlp") and grp.layer == layer:  # its own write is cut
                    est[ns.offsets[gi] : ns.offsets[gi + 1]] = 0.0
            acc += est
            terms.append(est)
        out["graddrop"] = acc / max(model.n_layers - 1, 1)
        out["graddrop_terms"] = np.stack(terms)
    return out


def _qk_group(model: Model, grp: Group, pre: dict[str, Tensor], grad_a: Tensor) -> Tensor:
    s, masked = pre["s"], pre["masked"]
    if grp.sub == "q":
        per_pos = qk_fix_queries(s, pre["s_q"], grad_a)  # (H, T)
        return (per_pos if grp.per_pos else per_pos.sum(-1)).reshape(-1)
    if grp.per_pos:
        per_head = qk_fix_keys(s, pre["s_k"], grad_a, masked)  # (H, T)
        return _sum_kv(per_head, model.n_kv_heads).reshape(-1)
    a, a_new = torch.softmax(s, -1), torch.softmax(pre["s_k"], -1)
    per_head = ((a_new - a) * grad_a).sum((-1, -2))
    return _sum_kv(per_head, model.n_kv_heads).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Public API.


def atp(
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group] = "heads",
    metric: str | Callable[..., Tensor] | None = None,
    qk_fix: bool = False,
    grad_drop: bool = False,
    base_patches: Sequence[Patch] = (),
    progress: Callable[[int, int], None] | None = None,
) -> NodeScores:
    """Attribution patching over ``pairs`` (PromptPair or TokenizedPair objects).

    Returns a :class:`NodeScores` whose ``estimate`` is the requested estimator (AtP, AtP with the
    QK fix, or GradDrop of either) and whose ``columns`` hold the others that were computed
    (``atp``, ``atp_qk`` as mean signed estimates). ``cost`` counts 2 forwards + 1 backward per
    pair, plus L backwards per pair for GradDrop (a backward = ``BACKWARD_COST`` forwards).
    """
    from adag.tasks.pairs import make_metric

    t0 = time.perf_counter()
    toks = tokenized(model, pairs)
    met = make_metric(metric)
    name = "atp" + ("_qk" if qk_fix else "") + ("_graddrop" if grad_drop else "")
    if qk_fix and grad_drop:
        name = "atp_star"
    key = "graddrop" if grad_drop else ("atp_qk" if qk_fix else "atp")
    per_pair: list[tuple[list[str], np.ndarray]] = []
    cols: dict[str, list[np.ndarray]] = {}
    for j, tp in enumerate(toks):
        ns = node_set(model, nodes, tp.clean.shape[1])
        est = _pair_estimates(
            model, tp, ns, met, qk_fix=qk_fix, grad_drop=grad_drop, base_patches=base_patches
        )
        per_pair.append((ns.ids(), est[key]))
        for k, v in est.items():
            if k not in (key, "graddrop_terms"):
                cols.setdefault(k, []).append(v)
        if progress:
            progress(j + 1, len(toks))
    per_pair_cost = 2 + BACKWARD_COST * (1 + (model.n_layers if grad_drop else 0))
    out = merge_pairs(name, per_pair, per_pair_cost * len(toks), cols, pairs=toks)
    out.seconds = time.perf_counter() - t0
    return out


def atp_star(model: Model, pairs: Sequence[object], **kwargs: Any) -> NodeScores:
    """AtP*: AtP with the QK fix and GradDrop (see :func:`atp`)."""
    return atp(model, pairs, qk_fix=True, grad_drop=True, **kwargs)
