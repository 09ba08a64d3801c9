"""An independent reference for linearised models, built only from site patches: every norm scale
and attention pattern replaced by its clean value, every MLP's neurons by its rule's frozen formula
(``relp`` half rule, ``frozen_gate``) or by their clean value (``stop``). The reference model is
*linear* in any perturbation added on top, so finite differences of it are exact derivatives of
the linearised model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from adag.models.model import Model
from adag.models.ops import norm_apply
from adag.models.sites import Patch


def norm_points(m: Model) -> list[str]:
    pts = []
    for layer in range(m.n_layers):
        for point in ("ln1", "ln2", "ln1_post", "ln2_post"):
            if getattr(m.spec, point):
                pts.append(f"blocks.{layer}.{point}.hook_scale")
    return [*pts, "ln_final.hook_scale"]


def reference_patches(
    m: Model, tokens: torch.Tensor, rule: str | Sequence[str]
) -> tuple[list[Patch], list[str], dict]:
    """Patches that turn the model into the frozen reference (one rule, or one per layer);
    returns (patches, sites to read, clean cache of a batch-1 forward)."""
    rules = [rule] * m.n_layers if isinstance(rule, str) else list(rule)
    pats = [f"blocks.{i}.attn.hook_pattern" for i in range(m.n_layers)]
    pre = [f"blocks.{i}.mlp.hook_pre" for i in range(m.n_layers)]
    lin = [f"blocks.{i}.mlp.hook_pre_linear" for i in range(m.n_layers)] if m.spec.gated else []
    post = [f"blocks.{i}.mlp.hook_post" for i in range(m.n_layers)]
    last = f"blocks.{m.n_layers - 1}.hook_resid_post"
    _, c = m.run_with_cache(
        tokens, [*pats, *pre, *lin, *post, *norm_points(m), last, "blocks.0.hook_resid_pre"]
    )
    patches = [Patch(n, c[n]) for n in [*pats, *norm_points(m)]]
    for layer in range(m.n_layers):
        mlp = m.submodule(m.spec.mlp, layer)
        act = getattr(mlp, "act_fn", None) or mlp.act
        g_c = c[pre[layer]]
        r_c = act(g_c) / g_c  # the frozen ratio, from the HF activation itself
        u_c = c[lin[layer]] if lin else None
        if rules[layer] == "stop":
            fn = lambda x, live, v=c[post[layer]]: v.expand_as(x).contiguous()  # noqa: E731
        elif u_c is None:
            fn = lambda x, live, r=r_c, n=pre[layer]: r * live[n]  # noqa: E731
        elif rules[layer] == "frozen_gate":
            fn = lambda x, live, a=act(g_c), n=lin[layer]: a * live[n]  # noqa: E731
        else:
            fn = lambda x, live, r=r_c, g0=g_c, u0=u_c, ng=pre[layer], nu=lin[layer]: (  # noqa: E731
                0.5 * r * live[ng] * u0 + 0.5 * r * g0 * live[nu]
            )
        patches.append(Patch(post[layer], fn, op="fn"))
    return patches, [*pre, *lin, *post, last], c


def reference_logits(m: Model, cache: dict, clean: dict, target: int) -> torch.Tensor:
    """The target logit of every row ``(batch,)`` from the last residual with the frozen
    final-norm scale and softcap ratio."""
    last = cache[f"blocks.{m.n_layers - 1}.hook_resid_post"][:, -1]
    s = clean["ln_final.hook_scale"][0, -1]
    w_u = m.submodule(m.spec.unembed).weight
    z = norm_apply(m.spec.norm, m.submodule(m.spec.final_norm), last, s) @ w_u.T
    zt = z[:, target]
    if m.final_softcap:
        last_c = clean[f"blocks.{m.n_layers - 1}.hook_resid_post"][0, -1]
        zc = (norm_apply(m.spec.norm, m.submodule(m.spec.final_norm), last_c, s) @ w_u.T)[target]
        zt = zt * (m.final_softcap * torch.tanh(zc / m.final_softcap) / zc)
    return zt
