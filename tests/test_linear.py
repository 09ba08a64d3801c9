"""The linearised backward: forward unchanged, completeness, and gradients equal finite differences
of an independent reference forward built from site patches (frozen scales, frozen patterns,
frozen activation ratios). Tiny random float64 models of every architecture."""

from __future__ import annotations

import pytest
import torch

from adag.errors import AdagError
from adag.models.linear import linearize
from adag.models.model import Model
from adag.models.ops import norm_apply
from adag.models.sites import Patch

RULES = ["relp", "frozen_gate", "stop"]
TARGET = 7


def _norm_points(m: Model) -> list[str]:
    pts = []
    for layer in range(m.n_layers):
        for point in ("ln1", "ln2", "ln1_post", "ln2_post"):
            if getattr(m.spec, point):
                pts.append(f"blocks.{layer}.{point}.hook_scale")
    return [*pts, "ln_final.hook_scale"]


@pytest.mark.parametrize("rule", RULES)
def test_forward_bit_identical(tiny: Model, tokens, rule):
    with torch.no_grad():
        plain = tiny(tokens)
        with linearize(tiny, mlp=rule):
            lin = tiny(tokens)
    assert torch.equal(plain, lin)
    with linearize(tiny, mlp=rule), tiny.sites(grad=["blocks.0.hook_resid_pre"]):
        lin_grad = tiny(tokens)
    assert torch.equal(plain, lin_grad.detach())


@pytest.mark.parametrize("rule", ["relp", "frozen_gate"])
def test_completeness(tiny: Model, tokens, rule):
    """logit = Σ_pos embedding · gradient + Σ bias · gradient (Euler: the linearised model is
    homogeneous of degree one in its inputs and biases; the half rule makes gated MLPs so)."""
    pre0 = "blocks.0.hook_resid_pre"
    biases = [p for n, p in tiny.hf.named_parameters() if n.endswith("bias")]
    for b in biases:
        b.requires_grad_(True)
    try:
        with linearize(tiny, mlp=rule), tiny.sites(read=[pre0], grad=[pre0]) as run:
            metric = tiny(tokens)[0, -1, TARGET]
            gs = torch.autograd.grad(metric, [run.leaves[pre0], *biases], allow_unused=True)
    finally:
        for b in biases:
            b.requires_grad_(False)
    total = (run.cache[pre0] * gs[0]).sum()
    for b, g in zip(biases, gs[1:], strict=True):
        if g is not None:
            total = total + (b * g).sum()
    assert abs(total.item() - metric.item()) <= 1e-8 * abs(metric.item())


def _reference_patches(
    m: Model, tokens: torch.Tensor, rule: str
) -> tuple[list[Patch], list[str], dict]:
    """Patches that turn the model into the frozen reference: every scale and pattern replaced by
    its clean value, every MLP's neurons by the rule's frozen formula."""
    pats = [f"blocks.{i}.attn.hook_pattern" for i in range(m.n_layers)]
    pre = [f"blocks.{i}.mlp.hook_pre" for i in range(m.n_layers)]
    lin = [f"blocks.{i}.mlp.hook_pre_linear" for i in range(m.n_layers)] if m.spec.gated else []
    post = [f"blocks.{i}.mlp.hook_post" for i in range(m.n_layers)]
    last = f"blocks.{m.n_layers - 1}.hook_resid_post"
    _, c = m.run_with_cache(tokens, [*pats, *pre, *lin, *post, *_norm_points(m), last])
    patches = [Patch(n, c[n]) for n in [*pats, *_norm_points(m)]]
    for layer in range(m.n_layers):
        mlp = m.submodule(m.spec.mlp, layer)
        act = getattr(mlp, "act_fn", None) or mlp.act
        g_c = c[pre[layer]]
        r_c = act(g_c) / g_c  # the frozen ratio, from the HF activation itself
        u_c = c[lin[layer]] if lin else None
        if rule == "stop":
            fn = lambda x, live, v=c[post[layer]]: v  # noqa: E731
        elif u_c is None:
            fn = lambda x, live, r=r_c, n=pre[layer]: r * live[n]  # noqa: E731
        elif rule == "frozen_gate":
            fn = lambda x, live, a=act(g_c), n=lin[layer]: a * live[n]  # noqa: E731
        else:
            fn = lambda x, live, r=r_c, g0=g_c, u0=u_c, ng=pre[layer], nu=lin[layer]: (  # noqa: E731
                0.5 * r * live[ng] * u0 + 0.5 * r * g0 * live[nu]
            )
        patches.append(Patch(post[layer], fn, op="fn"))
    return patches, [*pre, *lin, last], c


def _reference_metric(m: Model, cache: dict, clean: dict) -> torch.Tensor:
    """The target logit from the last residual with the frozen final-norm scale and softcap ratio."""
    last = cache[f"blocks.{m.n_layers - 1}.hook_resid_post"][0, -1]
    s = clean["ln_final.hook_scale"][0, -1]
    z = (
        norm_apply(m.spec.norm, m.submodule(m.spec.final_norm), last, s)
        @ m.submodule(m.spec.unembed).weight.T
    )
    zt = z[TARGET]
    if m.final_softcap:
        zc = torch.tensor(0.0, dtype=z.dtype)
        last_c = clean[f"blocks.{m.n_layers - 1}.hook_resid_post"][0, -1]
        zc = (
            norm_apply(m.spec.norm, m.submodule(m.spec.final_norm), last_c, s)
            @ m.submodule(m.spec.unembed).weight.T
        )[TARGET]
        zt = zt * (m.final_softcap * torch.tanh(zc / m.final_softcap) / zc)
    return zt


@pytest.mark.parametrize("rule", RULES)
def test_gradients_equal_reference_finite_differences(tiny: Model, tokens, rule):
    gen = torch.Generator().manual_seed(13)
    for site in ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.mlp.hook_post"]:
        with linearize(tiny, mlp=rule), tiny.sites(grad=[site]) as run:
            g = run.grads(tiny(tokens)[0, -1, TARGET])[site]
        patches, reads, clean = _reference_patches(tiny, tokens, rule)
        d = torch.randn(g.shape, dtype=torch.float64, generator=gen)
        eps = 1e-3
        vals = []
        for sign in (1, -1):
            _, c = tiny.run_with_cache(
                tokens, reads, patches=[*patches, Patch(site, sign * eps * d, op="add")]
            )
            vals.append(_reference_metric(tiny, c, clean))
        _, c0 = tiny.run_with_cache(tokens, reads, patches=patches)
        # the reference reproduces the clean logit
        torch.testing.assert_close(
            _reference_metric(tiny, c0, clean), tiny(tokens)[0, -1, TARGET], rtol=1e-10, atol=1e-10
        )
        fd = (vals[0] - vals[1]) / (2 * eps)
        torch.testing.assert_close((g * d).sum(), fd, rtol=1e-7, atol=1e-9, msg=f"{site} {rule}")


def test_per_layer_rules(tiny: Model, tokens):
    sites = ["blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post", "blocks.0.mlp.hook_pre"]
    with linearize(tiny, mlp={1: "stop"}), tiny.sites(grad=sites) as run:
        g = run.grads(tiny(tokens)[0, -1, TARGET])
    assert torch.all(g["blocks.1.mlp.hook_pre"] == 0)
    assert g["blocks.1.mlp.hook_post"].abs().sum() > 0
    assert g["blocks.0.mlp.hook_pre"].abs().sum() > 0
    with (
        linearize(tiny, mlp=["stop"] * tiny.n_layers),
        tiny.sites(grad=["blocks.0.mlp.hook_pre"]) as run,
    ):
        g0 = run.grads(tiny(tokens)[0, -1, TARGET])["blocks.0.mlp.hook_pre"]
    assert torch.all(g0 == 0)


def test_frozen_attention_blocks_query_gradient(tiny: Model, tokens):
    with linearize(tiny), tiny.sites(grad=["blocks.1.attn.hook_q", "blocks.1.attn.hook_v"]) as run:
        g = run.grads(tiny(tokens)[0, -1, TARGET])
    assert torch.all(g["blocks.1.attn.hook_q"] == 0)
    assert g["blocks.1.attn.hook_v"].abs().sum() > 0


def test_bad_rules(tiny: Model):
    with pytest.raises(AdagError, match="unknown MLP rule"), linearize(tiny, mlp="half"):
        pass
    with pytest.raises(AdagError, match="layers are"), linearize(tiny, mlp={99: "stop"}):
        pass
    with pytest.raises(AdagError, match="MLP rules for a model"), linearize(tiny, mlp=["relp"]):
        pass


def test_plain_backward_is_not_complete(tiny: Model, tokens):
    """The completeness check can fail: without linearisation, input × gradient misses the logit."""
    pre0 = "blocks.0.hook_resid_pre"
    with tiny.sites(read=[pre0], grad=[pre0]) as run:
        metric = tiny(tokens)[0, -1, TARGET]
        g = run.grads(metric)[pre0]
    total = (run.cache[pre0] * g).sum()
    assert abs(total.item() - metric.item()) > 1e-4 * abs(metric.item())
