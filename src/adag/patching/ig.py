"""Integrated-gradients attribution of nodes: AtP with the gradient averaged along a path from the
clean to the noise prompt instead of taken at the clean point alone.

* **AtP-IG on the inputs** (:func:`atp_ig`; EAP-IG "inputs", Hanna, Pezzelle, Belinkov 2024, "Have
  Faith in Faithfulness"; the MIB benchmark's default of 5 steps): the input embeddings
  (``blocks.0.hook_resid_pre``, GPT-2's position embeddings included — they are the same in both
  runs) are moved from clean to noise, e_k = e_clean + α_k (e_noise − e_clean), and every node's
  gradient is averaged over the steps: ĉ(n) = (n(x_noise) − n(x_clean)) · (1/N) Σ_k ∂m/∂n (e_k).
* **Layer IG** (:func:`layer_ig`; Marks et al. 2024, "Sparse Feature Circuits"): for each node
  site alone, that site's activation (all of it) is moved from clean to noise, a_k = a_clean +
  α_k (a_noise − a_clean), and the gradient at that site is averaged over the steps: ĉ(n) =
  (n(x_noise) − n(x_clean)) · (1/N) Σ_k ∂m/∂n (a_k). Summed over all entries of a site this is a
  Riemann sum of ∫₀¹ d/dα m(a_clean + α Δa) dα = m(site patched to noise) − m(clean).

Both use the left Riemann grid α_k = k/N, k = 0..N−1, so ``steps=1`` is exactly AtP (the gradient
at the clean point); the error of the sum against the integral is O(1/N). The N interpolated
points run as the rows of one batch (in chunks of ``batch_size`` rows): the metric is summed over
the rows, and since rows are independent each row's gradient is its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from adag.errors import AdagError
from adag.models.ops import work_dtype
from adag.models.sites import Patch
from adag.patching.node_sets import Group, NodeSet, node_set
from adag.patching.oracle import BACKWARD_COST
from adag.patching.patch import tokenized
from adag.patching.scores import NodeScores, merge_pairs

if TYPE_CHECKING:
    from adag.models.model import Model
    from adag.tasks.pairs import Metric, TokenizedPair

EMBED_SITE = "blocks.0.hook_resid_pre"
"""The input embeddings interpolated by :func:`atp_ig` (every architecture)."""


def alphas(steps: int) -> Tensor:
    """The interpolation points α_k = k/steps, k = 0..steps−1 (float64)."""
    return torch.arange(steps, dtype=torch.float64) / steps


def _check(steps: int, batch_size: int) -> None:
    if steps < 1:
        raise AdagError(f"steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise AdagError(f"batch_size must be at least 1, got {batch_size}")


def _mean_grads(
    model: Model,
    tp: TokenizedPair,
    metric: Metric,
    site: str,
    clean: Tensor,
    noise: Tensor,
    grad: Sequence[str],
    *,
    steps: int,
    base_patches: Sequence[Patch],
    batch_size: int,
) -> dict[str, Tensor]:
    """The mean over k of the gradients of the metric at the ``grad`` sites, in forwards of the
    clean tokens with ``site`` replaced by ``clean + α_k (noise − clean)`` (both batch 1). The
    gradients are with respect to each site's value after the patches (the replaced value at
    ``site``); the result has batch 1, in the work dtype."""
    a = alphas(steps).to(device=clean.device, dtype=clean.dtype)
    delta = noise - clean
    acc: dict[str, Tensor] = {}
    for start in range(0, steps, batch_size):
        al = a[start : start + batch_size]
        value = clean + al.reshape(-1, *([1] * (clean.dim() - 1))) * delta
        with model.sites(grad=grad, patches=[*base_patches, Patch(site, value)]) as run:
            logits = model(tp.clean.expand(len(al), -1))
            m = metric(logits, tp).sum()
        for name, g in run.grads(m).items():
            part = g.to(work_dtype(g.dtype)).sum(0, keepdim=True)
            acc[name] = acc[name] + part if name in acc else part
    return {name: g / steps for name, g in acc.items()}


def _scores(
    groups: Sequence[Group],
    clean: dict[str, Tensor],
    noise: dict[str, Tensor],
    grads: dict[str, Tensor],
) -> list[Tensor]:
    """(noise − clean) · gradient, reduced per node, for each group (flat)."""
    out = []
    for grp in groups:
        s = grp.site
        g = grads[s]
        delta = noise[s].to(g.dtype) - clean[s].to(g.dtype)
        out.append(grp.reduce(delta * g).reshape(-1))
    return out


def _caches(
    model: Model, tp: TokenizedPair, sites: Sequence[str], base_patches: Sequence[Patch]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    with torch.no_grad():
        _, clean = model.run_with_cache(tp.clean, sites, patches=base_patches)
        _, noise = model.run_with_cache(tp.noise, sites, patches=base_patches)
    return clean, noise


def _atp_ig_pair(
    model: Model,
    tp: TokenizedPair,
    ns: NodeSet,
    metric: Metric,
    *,
    steps: int,
    base_patches: Sequence[Patch],
    batch_size: int,
) -> np.ndarray:
    sites = ns.sites
    clean, noise = _caches(model, tp, [EMBED_SITE, *sites], base_patches)
    grads = _mean_grads(
        model,
        tp,
        metric,
        EMBED_SITE,
        clean[EMBED_SITE],
        noise[EMBED_SITE],
        sites,
        steps=steps,
        base_patches=base_patches,
        batch_size=batch_size,
    )
    return torch.cat(_scores(ns.groups, clean, noise, grads)).double().cpu().numpy()


def _layer_ig_pair(
    model: Model,
    tp: TokenizedPair,
    ns: NodeSet,
    metric: Metric,
    *,
    steps: int,
    base_patches: Sequence[Patch],
    batch_size: int,
) -> np.ndarray:
    clean, noise = _caches(model, tp, ns.sites, base_patches)
    parts: list[Tensor | None] = [None] * len(ns.groups)
    for site in ns.sites:
        grads = _mean_grads(
            model,
            tp,
            metric,
            site,
            clean[site],
            noise[site],
            [site],
            steps=steps,
            base_patches=base_patches,
            batch_size=batch_size,
        )
        idx = [i for i, g in enumerate(ns.groups) if g.site == site]
        for i, s in zip(
            idx, _scores([ns.groups[i] for i in idx], clean, noise, grads), strict=True
        ):
            parts[i] = s
    return torch.cat([p for p in parts if p is not None]).double().cpu().numpy()


def _run(
    name: str,
    pair_fn: Callable[..., np.ndarray],
    cost_fn: Callable[[NodeSet], float],
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group],
    metric: str | Callable[..., Tensor] | None,
    steps: int,
    base_patches: Sequence[Patch],
    progress: Callable[[int, int], None] | None,
    batch_size: int,
) -> NodeScores:
    from adag.tasks.pairs import make_metric

    _check(steps, batch_size)
    t0 = time.perf_counter()
    toks = tokenized(model, pairs)
    met = make_metric(metric)
    per_pair: list[tuple[list[str], np.ndarray]] = []
    cost = 0.0
    for j, tp in enumerate(toks):
        ns = node_set(model, nodes, tp.clean.shape[1])
        est = pair_fn(
            model, tp, ns, met, steps=steps, base_patches=base_patches, batch_size=batch_size
        )
        per_pair.append((ns.ids(), est))
        cost += cost_fn(ns)
        if progress:
            progress(j + 1, len(toks))
    out = merge_pairs(name, per_pair, cost, pairs=toks)
    out.seconds = time.perf_counter() - t0
    return out


def atp_ig(
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group] = "heads",
    metric: str | Callable[..., Tensor] | None = None,
    steps: int = 5,
    base_patches: Sequence[Patch] = (),
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 32,
) -> NodeScores:
    """AtP with integrated gradients on the inputs (EAP-IG "inputs"), over ``pairs`` (PromptPair or
    TokenizedPair objects); method ``atp_ig``.

    For each pair: the clean tokens run as ``steps`` batch rows, row k with the input embeddings
    (``blocks.0.hook_resid_pre``) replaced by e_clean + (k/steps)(e_noise − e_clean); node n
    scores (n(noise) − n(clean)) · (mean over rows of ∂metric/∂n), with n(clean) and n(noise) from
    plain runs. ``steps=1`` is AtP. ``base_patches`` apply in every run. ``batch_size`` rows run
    per forward (memory only; the result does not depend on it).

    Cost per pair: 2 (clean and noise runs) + ``steps`` (the interpolated rows) + ``steps`` ×
    ``BACKWARD_COST`` (their backward), in forward-pass units.
    """
    per_pair_cost = 2 + steps + steps * BACKWARD_COST
    return _run(
        "atp_ig",
        _atp_ig_pair,
        lambda ns: per_pair_cost,
        model,
        pairs,
        nodes=nodes,
        metric=metric,
        steps=steps,
        base_patches=base_patches,
        progress=progress,
        batch_size=batch_size,
    )


def layer_ig(
    model: Model,
    pairs: Sequence[object],
    *,
    nodes: str | Sequence[Group] = "heads",
    metric: str | Callable[..., Tensor] | None = None,
    steps: int = 5,
    base_patches: Sequence[Patch] = (),
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = 32,
) -> NodeScores:
    """Per-site integrated gradients on activations (Sparse Feature Circuits), over ``pairs``;
    method ``layer_ig``.

    For each pair and each distinct node site (e.g. ``blocks.3.attn.hook_z``): the clean tokens run
    as ``steps`` batch rows, row k with that site alone (every entry of it) replaced by a_clean +
    (k/steps)(a_noise − a_clean); the site's nodes score (a_noise − a_clean) · (mean over rows of
    ∂metric/∂a), the gradient taken with respect to the replaced value at that site only.
    ``steps=1`` is AtP. Summed over all of a site's nodes, the score tends (error O(1/steps)) to the
    effect of patching the whole site to its noise value.

    Cost per pair: 2 (clean and noise runs) + per distinct site ``steps`` + ``steps`` ×
    ``BACKWARD_COST``, in forward-pass units.
    """
    return _run(
        "layer_ig",
        _layer_ig_pair,
        lambda ns: 2 + len(ns.sites) * (steps + steps * BACKWARD_COST),
        model,
        pairs,
        nodes=nodes,
        metric=metric,
        steps=steps,
        base_patches=base_patches,
        progress=progress,
        batch_size=batch_size,
    )
