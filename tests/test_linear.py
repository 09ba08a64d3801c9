"""The linearised backward: forward unchanged, completeness, and gradients equal finite differences
of an independent reference forward built from site patches (frozen scales, frozen patterns,
frozen activation ratios). Tiny random float64 models of every architecture."""

from __future__ import annotations

import pytest
import torch

from adag.errors import AdagError
from adag.models.linear import linearize
from adag.models.model import Model
from adag.models.sites import Patch

from .reference import reference_logits, reference_patches

RULES = ["relp", "frozen_gate", "stop"]
TARGET = 7


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


def test_forward_exact_where_the_final_softcap_saturates(tokens):
    """float32 Gemma 2 with a small final softcap: tanh saturates (1 - tanh² rounds to 0); the
    linearised forward must still equal the plain one (it was NaN) and gradients stay finite."""
    from .conftest import tiny_model

    m = tiny_model("gemma2", dtype=torch.float32)
    m.final_softcap = 0.05
    m.hf.config.final_logit_softcapping = 0.05
    with torch.no_grad():
        plain = m(tokens)
    assert ((plain / 0.05).abs() == 1).any()  # tanh rounded to ±1 somewhere
    with linearize(m), m.sites(grad=["blocks.0.hook_resid_pre"]) as run:
        lin = m(tokens)
        g = run.grads(lin[:, -1].sum())["blocks.0.hook_resid_pre"]
    assert torch.equal(plain, lin.detach()) and torch.isfinite(g).all()


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


def _reference_metric(m: Model, cache: dict, clean: dict) -> torch.Tensor:
    return reference_logits(m, cache, clean, TARGET)[0]


@pytest.mark.parametrize("rule", RULES)
def test_gradients_equal_reference_finite_differences(tiny: Model, tokens, rule):
    gen = torch.Generator().manual_seed(13)
    for site in ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.mlp.hook_post"]:
        with linearize(tiny, mlp=rule), tiny.sites(grad=[site]) as run:
            g = run.grads(tiny(tokens)[0, -1, TARGET])[site]
        patches, reads, clean = reference_patches(tiny, tokens, rule)
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


@pytest.mark.parametrize("rule", ["relp", "frozen_gate"])
def test_linear_replica_is_the_linearised_map(tiny: Model, tokens, rule):
    """The replica run on δ, minus its run on 0, is the Jacobian–vector product of the linearised
    model: it equals <∇, δ> from the linearised backward for a random readout of a late site."""
    from adag.models.linear import linear_replica, replica_sites

    emb, site = "blocks.0.hook_resid_pre", f"blocks.{tiny.n_layers - 1}.mlp.hook_post"
    toks = tokens[:1]
    _, clean = tiny.run_with_cache(toks, [emb, *replica_sites(tiny)])
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(clean[emb].shape, dtype=torch.float64, generator=gen)
    readout = torch.randn((toks.shape[1], tiny.d_mlp), dtype=torch.float64, generator=gen)
    with linearize(tiny, mlp=rule), tiny.sites(read=[site], grad=[emb]) as run:
        tiny(toks)
        g = run.grads((run.value(site)[0] * readout).sum())[emb]
    x = torch.cat([torch.zeros_like(delta), delta])
    with torch.no_grad(), linear_replica(tiny, clean, mlp=rule):
        _, c = tiny.run_with_cache(toks.expand(2, -1), [site], patches=[Patch(emb, x)])
    jvp = ((c[site][1] - c[site][0]) * readout).sum()
    torch.testing.assert_close(jvp, (g * delta).sum(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule", RULES)
def test_rule_gradient_is_exactly_post_partials(tiny: Model, tokens, rule):
    """Seeding the linearised backward at a layer's neurons with ones gives, at its gate and up
    pre-activations, exactly (bit for bit) the closed-form partials of ``post_partials``: the
    rule is written once."""
    from adag.models.linear import post_partials

    layer = 1
    p = f"blocks.{layer}.mlp."
    inputs = [p + "hook_pre", *([p + "hook_pre_linear"] if tiny.spec.gated else [])]
    with linearize(tiny, mlp=rule), tiny.sites(read=[*inputs, p + "hook_post"], grad=inputs) as run:
        tiny(tokens)
        post = run.value(p + "hook_post")
        grads = run.vjp([post], [torch.ones_like(post)])
    pg, pu = post_partials(
        rule, tiny.act, tiny.spec.gated, run.cache[p + "hook_pre"], run.cache.get(inputs[-1])
    )
    assert torch.equal(grads[p + "hook_pre"], pg)
    if tiny.spec.gated:
        assert pu is not None
        assert torch.equal(grads[p + "hook_pre_linear"], pu)
