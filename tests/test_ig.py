"""Integrated-gradients attribution (AtP-IG on the inputs, per-site layer IG) against AtP, patching,
the IG integral and hand-computed gradients, in float64 on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.models.sites import Patch
from adag.patching import atp, exhaustive
from adag.patching.ig import EMBED_SITE, alphas, atp_ig, layer_ig
from adag.patching.node_sets import Group
from adag.patching.oracle import BACKWARD_COST
from adag.tasks.pairs import TokenizedPair

from .conftest import ARCHS, tiny_model
from .test_patching import frozen_final_norm, logit_diff, random_pairs

EVERY_NODE_SET = "all,neurons_pos"
"""heads (z), q/k/v heads, neurons summed and per position, attention and MLP sublayers."""


def _metric(m: Model, tp: TokenizedPair, patches: list[Patch]) -> float:
    return float(logit_diff(m.run_with_cache(tp.clean, [], patches=patches)[0], tp)[0])


def _grad_at(m: Model, tp: TokenizedPair, patches: list[Patch], sites: list[str]):
    """Gradients of the metric at ``sites`` in one batch-1 clean run with ``patches``."""
    with m.sites(grad=sites, patches=patches) as run:
        out = logit_diff(m(tp.clean), tp).sum()
    return run.grads(out)


@pytest.mark.parametrize("arch", ARCHS)
def test_one_step_is_atp(arch):
    """α = 0 only: both IG variants take the gradient at the clean point, which is AtP, on every
    node set and on pairs of different lengths (merged like AtP's)."""
    m = tiny_model(arch)
    pairs = random_pairs(1, t=7, seed=0) + random_pairs(1, t=5, seed=1)
    ref = atp(m, pairs, nodes=EVERY_NODE_SET, metric=logit_diff)
    assert np.abs(ref.per_pair).max() > 0.1
    for fn in (atp_ig, layer_ig):
        out = fn(m, pairs, nodes=EVERY_NODE_SET, metric=logit_diff, steps=1)
        assert out.method == fn.__name__
        assert out.nodes == ref.nodes
        np.testing.assert_allclose(out.per_pair, ref.per_pair, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2"])
def test_ig_equals_patching_where_the_model_is_linear_in_the_node(arch):
    """With the final-norm scale frozen, last-layer neurons and MLP output reach the metric
    linearly, so the gradient there is the same at every interpolation point (whatever is
    interpolated) and both IG variants equal patching, as AtP does."""
    m = tiny_model(arch)
    last = m.n_layers - 1
    groups = [
        Group("neuron", last, None, True, (7, m.d_mlp)),
        Group("neuron", last, None, False, (m.d_mlp,)),
        Group("mlp", last, None, True, (7,)),
    ]
    for tp in random_pairs(2):
        base = frozen_final_norm(m, tp)
        truth = exhaustive(m, [tp], nodes=groups, metric=logit_diff, base_patches=base)
        assert np.abs(truth.estimate).max() > 1e-3
        for fn in (atp_ig, layer_ig):
            est = fn(m, [tp], nodes=groups, metric=logit_diff, steps=5, base_patches=base)
            assert est.nodes == truth.nodes
            np.testing.assert_allclose(est.estimate, truth.estimate, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(("arch", "kind", "layer"), [("llama", "attn", 0), ("gpt2", "mlp", 1)])
def test_layer_ig_of_a_whole_site_converges_to_patching_it(arch, kind, layer):
    """Completeness. With g(α) = ∇m(a_c + αΔ) · Δ at one site (Δ = a_noise − a_clean), the sum of
    the site's per-position scores is the left Riemann sum L_N = (1/N) Σ_{k<N} g(k/N), and
    ∫₀¹ g = m(site patched to noise) − m(clean) =: E. Euler–Maclaurin: L_N − E =
    (g(0) − g(1))/(2N) + O(1/N²), so the trapezoid value T_N = L_N + (g(1) − g(0))/(2N) is
    O(1/N²) from E. Checked: L_256 carries the predicted first-order error (up to 10% of it, the
    O(1/N²) rest), T_N is far closer to E than L_N, and its error shrinks ~16x from N=64 to 256
    (asserted: at least 8x)."""
    m = tiny_model(arch)
    tp = random_pairs(1, t=7, seed=3)[0]
    grp = Group(kind, layer, None, True, (7,))  # type: ignore[arg-type]
    site = grp.site
    _, c = m.run_with_cache(tp.clean, [site])
    _, n = m.run_with_cache(tp.noise, [site])
    exact = _metric(m, tp, [Patch(site, n[site])]) - _metric(m, tp, [])
    delta = n[site] - c[site]
    g0 = float((_grad_at(m, tp, [Patch(site, c[site])], [site])[site] * delta).sum())
    g1 = float((_grad_at(m, tp, [Patch(site, n[site])], [site])[site] * delta).sum())
    assert abs(g1 - g0) > 0.1  # the integrand varies: a one-point rule would be wrong

    def riemann(n_steps: int) -> float:
        return float(
            layer_ig(m, [tp], nodes=[grp], metric=logit_diff, steps=n_steps).estimate.sum()
        )

    assert riemann(1) == pytest.approx(g0, rel=1e-12)
    lo, hi = riemann(64), riemann(256)
    first_order = (g0 - g1) / (2 * 256)
    assert hi - exact == pytest.approx(first_order, rel=0.1)
    t_lo, t_hi = lo - (g0 - g1) / (2 * 64), hi - first_order
    assert abs(t_hi - exact) < 0.1 * abs(hi - exact)
    assert abs(t_hi - exact) < abs(t_lo - exact) / 8


def test_atp_ig_rows_are_separate_runs_on_the_left_riemann_grid():
    """atp_ig (steps=3) by hand: one batch-1 run per α in {0, 1/3, 2/3} with the input embeddings
    replaced, the gradients at the node sites averaged, times (noise − clean) from plain runs."""
    m = tiny_model("qwen3")
    tp = random_pairs(1, t=6, seed=4)[0]
    torch.testing.assert_close(alphas(3), torch.tensor([0.0, 1 / 3, 2 / 3], dtype=torch.float64))
    groups = [
        Group("head", 1, "z", True, (m.n_heads, 6)),
        Group("neuron", 0, None, False, (m.d_mlp,)),
    ]
    sites = [g.site for g in groups]
    _, c = m.run_with_cache(tp.clean, [EMBED_SITE, *sites])
    _, n = m.run_with_cache(tp.noise, [EMBED_SITE, *sites])
    e_c, e_n = c[EMBED_SITE], n[EMBED_SITE]
    grads = [
        _grad_at(m, tp, [Patch(EMBED_SITE, e_c + k / 3 * (e_n - e_c))], sites) for k in range(3)
    ]
    hand = []
    for g in groups:
        mean = sum(gr[g.site] for gr in grads) / 3
        hand.append(g.reduce((n[g.site] - c[g.site]) * mean).reshape(-1))
    expected = torch.cat(hand).numpy()
    out = atp_ig(m, [tp], nodes=groups, metric=logit_diff, steps=3)
    np.testing.assert_allclose(out.estimate, expected, rtol=1e-11, atol=1e-12)
    # and the rows differ: the average is not the clean gradient alone
    assert (
        np.abs(out.estimate - atp(m, [tp], nodes=groups, metric=logit_diff).estimate).max() > 1e-3
    )


def test_layer_ig_gradient_is_taken_at_the_interpolated_site():
    """layer_ig (steps=2) at one site by hand: the mean of the gradients at α = 0 and 1/2, each from
    a run with the site replaced (SiteRun's gradient leaf sits after the patch, so the replacement
    does not cut it). Independently of that leaf, a finite difference of the metric along each
    node's slice of Δ at the two interpolation points gives the same scores."""
    m = tiny_model("gemma2")
    t = 6
    tp = random_pairs(1, t=t, seed=6)[0]
    grp = Group("head", 1, "z", True, (m.n_heads, t))
    site = grp.site
    _, c = m.run_with_cache(tp.clean, [site])
    _, n = m.run_with_cache(tp.noise, [site])
    a_c, delta = c[site], n[site] - c[site]
    grads = [_grad_at(m, tp, [Patch(site, a_c + a * delta)], [site])[site] for a in (0.0, 0.5)]
    assert all(float(g.abs().max()) > 1e-3 for g in grads)
    hand = grp.reduce(delta * (grads[0] + grads[1]) / 2).reshape(-1).numpy()
    out = layer_ig(m, [tp], nodes=[grp], metric=logit_diff, steps=2)
    np.testing.assert_allclose(out.estimate, hand, rtol=1e-11, atol=1e-12)

    eps = 1e-5
    for h, p in [(0, 5), (3, 2), (2, 5)]:
        step = torch.zeros_like(delta)
        step[0, h, p] = delta[0, h, p]
        fd = 0.0
        for a in (0.0, 0.5):
            base = a_c + a * delta
            up = _metric(m, tp, [Patch(site, base + eps * step)])
            down = _metric(m, tp, [Patch(site, base - eps * step)])
            fd += (up - down) / (2 * eps) / 2
        i = out.nodes.index(f"head:1:{p}:{h}:z")
        assert abs(out.estimate[i]) > 1e-4
        assert out.estimate[i] == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_cost_chunking_and_progress():
    """Cost in forward units: atp_ig 2 + steps + steps·BACKWARD_COST per pair; layer_ig 2 + per
    distinct site (steps + steps·BACKWARD_COST). Running the rows in chunks changes nothing."""
    m = tiny_model("llama")
    pairs = random_pairs(3, seed=10)
    steps = 4
    nodes = "heads,neurons,neurons_pos"  # sites: L hook_z + L mlp.hook_post (shared by neurons)
    seen: list[tuple[int, int]] = []
    a = atp_ig(
        m, pairs, nodes=nodes, metric=logit_diff, steps=steps, progress=lambda *x: seen.append(x)
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert BACKWARD_COST == 2.0
    assert a.cost == 3 * (2 + 4 + 4 * 2) == 3 * (2 + steps + steps * BACKWARD_COST)
    assert a.seconds > 0
    sites = 2 * m.n_layers
    b = layer_ig(m, pairs, nodes=nodes, metric=logit_diff, steps=steps)
    assert b.cost == 3 * (2 + 6 * (4 + 4 * 2)) == 3 * (2 + sites * (steps + steps * BACKWARD_COST))
    assert b.seconds > 0
    for fn, ref in ((atp_ig, a), (layer_ig, b)):
        chunked = fn(m, pairs, nodes=nodes, metric=logit_diff, steps=steps, batch_size=3)
        np.testing.assert_allclose(chunked.per_pair, ref.per_pair, rtol=1e-12, atol=1e-13)
        assert chunked.cost == ref.cost
    with pytest.raises(AdagError, match="steps"):
        atp_ig(m, pairs, steps=0)
