"""``Model.capture`` / ``Model.forward_from``: a forward resumed at a layer and a position equals
the full forward with the same patches, on every architecture (float64 tiny models)."""

from __future__ import annotations

import pytest
import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.models.sites import Patch

from .conftest import VOCAB


def _tokens(t: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("layer", "start"), [(0, 0), (0, 4), (1, 3), (2, 8), (2, 0)])
def test_resumed_forward_equals_full_forward_with_patches(tiny: Model, layer: int, start: int):
    toks = _tokens()
    state = tiny.capture(toks)
    with torch.no_grad():
        full = tiny(toks)
    assert torch.allclose(state.logits[:, -1], full[:, -1], atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(1)
    dz = torch.randn(3, tiny.d_head, generator=g, dtype=torch.float64)
    dn = torch.randn(3, generator=g, dtype=torch.float64)
    p = [start, min(start + 2, 8), 8]
    site_z, site_n = f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.mlp.hook_post"
    patches = [
        Patch(site_z, dz, op="add", batch=[0, 1, 2], head=[0, 1, 3], pos=p),
        Patch(site_n, dn, op="add", batch=[0, 1, 2], pos=p, index=[5, 6, 7]),
    ]
    with torch.no_grad():
        ref, _ = tiny.run_with_cache(toks.expand(3, -1), [], patches=patches)
    shifted = [
        Patch(site_z, dz, op="add", batch=[0, 1, 2], head=[0, 1, 3], pos=[x - start for x in p]),
        Patch(site_n, dn, op="add", batch=[0, 1, 2], pos=[x - start for x in p], index=[5, 6, 7]),
    ]
    got, _ = tiny.forward_from(state, layer=layer, start=start, rows=3, patches=shifted)
    assert got is not None and got.shape == (3, 1, tiny.d_vocab)
    assert torch.allclose(got[:, 0], ref[:, -1], atol=1e-10, rtol=0)


def test_resumed_sites_count_positions_from_start(tiny: Model):
    toks = _tokens()
    start = 5
    sites = ["blocks.1.attn.hook_k", "blocks.1.attn.hook_pattern", "blocks.2.hook_resid_pre"]
    state = tiny.capture(toks, read=sites)
    _, c = tiny.forward_from(state, layer=1, start=start, rows=2, read=sites)
    for name in sites:
        full = state.cache[name]
        got = c[name]
        assert got.shape[0] == 2
        if name.endswith("pattern"):
            assert torch.allclose(got[0], full[0, :, start:], atol=1e-12)
        elif name.endswith("hook_k"):
            assert torch.allclose(got[1], full[0, :, start:], atol=1e-12)
        else:
            assert torch.allclose(got[0], full[0, start:], atol=1e-12)


def test_stop_at_ends_the_forward_early(tiny: Model):
    toks = _tokens()
    state = tiny.capture(toks, read=["blocks.1.attn.hook_q"])
    logits, c = tiny.forward_from(
        state,
        layer=1,
        start=3,
        rows=1,
        read=["blocks.1.attn.hook_q", "blocks.2.attn.hook_q"],
        stop_at="blocks.1.attn.hook_k",
    )
    assert logits is None
    assert "blocks.2.attn.hook_q" not in c
    assert torch.allclose(
        c["blocks.1.attn.hook_q"][0], state.cache["blocks.1.attn.hook_q"][0, :, 3:]
    )
    # the model runs normally afterwards (blocks and attention put back)
    with torch.no_grad():
        assert torch.allclose(tiny(toks)[:, -1], state.logits[:, -1], atol=1e-12)


def test_forward_from_checks_its_arguments(tiny: Model):
    state = tiny.capture(_tokens())
    with pytest.raises(AdagError, match="start position"):
        tiny.forward_from(state, layer=0, start=9, rows=1)
    with pytest.raises(AdagError, match="layer"):
        tiny.forward_from(state, layer=tiny.n_layers, start=0, rows=1)
    with pytest.raises(AdagError, match="batch 1"):
        tiny.capture(_tokens().expand(2, -1))


def test_resumed_patching_equals_full_forwards(tiny: Model):
    """PairPatcher's resumed forwards (first layer and position of each row, the shared prefix
    skipped) give the numbers of full patched forwards, for single nodes and mixed subsets of
    every node kind, in both directions, when clean and noise share a prefix."""
    import numpy as np

    from adag.patching.node_sets import node_set
    from adag.patching.patch import PairPatcher
    from adag.tasks.pairs import PromptPair, TokenizedPair, make_metric

    clean = _tokens(8, seed=3)
    noise = clean.clone()
    noise[0, 3:] = _tokens(5, seed=4)[0]  # positions 0..2 shared
    tp = TokenizedPair(PromptPair("c", "n", "a", "b"), clean, noise, 3, 11)
    ns = node_set(tiny, "all,neurons_pos", 8)
    met = make_metric("logit_diff")
    rng = np.random.default_rng(0)
    n = len(ns)
    rows = [np.array([i]) for i in rng.choice(n, 300, replace=False)]
    rows += [rng.choice(n, k, replace=False) for k in (2, 3, 5, 40) for _ in range(5)]
    for direction in ("noising", "denoising"):
        pp = PairPatcher(tiny, tp, ns, met, direction=direction)  # type: ignore[arg-type]
        assert pp.first_diff == 3 and pp.state is not None
        fast = pp.effects(rows, batch_size=16)
        full = pp._full_effects(rows, batch_size=16)
        assert np.abs(fast - full).max() < 1e-10, direction
        assert np.abs(full).max() > 1e-3
    # nodes before the first differing position are exactly unchanged: no forward at all
    _, pos = ns.layer_pos(np.arange(n))
    early = [np.array([i]) for i in np.nonzero((pos >= 0) & (pos < 3))[0][:20]]
    before = pp.cost
    assert np.all(pp.effects(early) == 0.0) and pp.cost == before
