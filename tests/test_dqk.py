"""The downstream QK fix against brute-force patching (float64 tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adag.models.model import Model
from adag.models.sites import Patch
from adag.patching import atp, exhaustive
from adag.patching.dqk import atp_dqk

from .conftest import ARCHS, tiny_hf, tiny_model
from .test_patching import logit_diff, random_pairs


def _two_layer(q_scale: float, *, uniform: bool = False) -> Model:
    """2 attention-only layers (MLPs zeroed) where layer 0 reaches the metric only through layer
    1's queries and keys: layer 0 writes residual dimensions 0..7 only, which layer 1's values
    and the unembedding do not read (with norm scales frozen, the norms keep dimensions
    apart)."""
    hf = tiny_hf("llama")
    hf.model.layers = hf.model.layers[:2]
    hf.config.num_hidden_layers = 2
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.down_proj.weight.zero_()
        l0, l1 = hf.model.layers
        l0.self_attn.o_proj.weight[8:] = 0
        l1.self_attn.v_proj.weight[:, :8] = 0
        hf.lm_head.weight[:, :8] = 0
        l1.self_attn.q_proj.weight.mul_(0.0 if uniform else q_scale)
    return Model(hf, None)


def frozen_norms(m: Model, tokens: torch.Tensor) -> list[Patch]:
    names = [f"blocks.{i}.{n}.hook_scale" for i in range(m.n_layers) for n in ("ln1", "ln2")] + [
        "ln_final.hook_scale"
    ]
    _, c = m.run_with_cache(tokens, names)
    return [Patch(n, c[n]) for n in names]


@pytest.mark.parametrize("q_scale", [1.0, 8.0])
def test_downstream_fix_equals_patching_where_layer_0_acts_through_layer_1_patterns(q_scale):
    m = _two_layer(q_scale)
    tp = random_pairs(1, t=8, seed=5)[0]
    tp.noise[0, :2] = tp.clean[0, :2]  # a shared prefix: its nodes have no effect
    base = frozen_norms(m, tp.clean)
    truth = exhaustive(m, [tp], nodes="heads", metric=logit_diff, base_patches=base)
    est = atp_dqk(m, [tp], nodes="heads", metric=logit_diff, base_patches=base)
    assert est.nodes == truth.nodes
    layer0 = np.array([n.startswith("head:0:") for n in est.nodes])
    np.testing.assert_allclose(est.estimate[layer0], truth.estimate[layer0], atol=1e-10, rtol=1e-9)
    assert np.abs(truth.estimate[layer0]).max() > 1e-2
    plain = est.columns["atp"]
    # layer 1's heads reach the metric linearly: AtP is already exact there, the fix adds 0
    np.testing.assert_allclose(est.estimate[~layer0], plain[~layer0], atol=1e-12)
    np.testing.assert_allclose(plain[~layer0], truth.estimate[~layer0], atol=1e-10, rtol=1e-9)
    _, c = m.run_with_cache(tp.clean, ["blocks.1.attn.hook_pattern"])
    if q_scale > 1:  # saturated: plain AtP is far off on layer 0
        assert c["blocks.1.attn.hook_pattern"].max() > 0.99
        err = np.abs(plain[layer0] - truth.estimate[layer0]).max()
        assert err > 0.1 * np.abs(truth.estimate[layer0]).max()


def test_no_correction_when_later_attention_is_uniform():
    m = _two_layer(1.0, uniform=True)
    tp = random_pairs(1, t=8, seed=6)[0]
    base = frozen_norms(m, tp.clean)
    est = atp_dqk(m, [tp], nodes="heads,sublayers", metric=logit_diff, base_patches=base)
    np.testing.assert_array_equal(est.estimate, est.columns["atp"])


@pytest.mark.parametrize("arch", ARCHS)
def test_downstream_fix_runs_on_every_architecture_and_leaves_other_nodes(arch):
    m = tiny_model(arch)
    pairs = random_pairs(2, t=6, seed=1)
    est = atp_dqk(m, pairs, nodes="all", metric=logit_diff)
    ref = atp(m, pairs, nodes="all", metric=logit_diff, qk_fix=True)
    assert est.nodes == ref.nodes
    fixed = np.array(
        [
            (n.startswith("head:") and n.endswith(":z") and ":*:" not in n)
            or ((n.startswith("attn:") or n.startswith("mlp:")) and not n.endswith("*"))
            for n in est.nodes
        ]
    )
    np.testing.assert_allclose(est.estimate[~fixed], ref.estimate[~fixed], atol=1e-12)
    assert np.isfinite(est.estimate).all()
    last = np.array([n.split(":")[1] == str(m.n_layers - 1) for n in est.nodes])
    # the last layer has no later attention: no correction
    np.testing.assert_allclose(est.estimate[last], ref.estimate[last], atol=1e-12)
    assert np.abs(est.estimate[fixed & ~last] - ref.estimate[fixed & ~last]).max() > 1e-6
    assert est.cost > ref.cost
