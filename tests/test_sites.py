"""Sites: reading matches by-hand recomputation from the HF weights, writing does what it says,
gradients match finite differences. Tiny random float64 models of every architecture."""

from __future__ import annotations

import pytest
import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.models.ops import norm_apply, norm_eps, norm_scale
from adag.models.sites import Patch

from .conftest import ARCHS, tiny_hf


def _proj(model: Model, path: str, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(in, out) weight and bias of a Linear or GPT-2 Conv1D projection."""
    mod = model.submodule(path, layer)
    w = mod.weight if model.spec.conv1d else mod.weight.T
    return w, getattr(mod, "bias", None)


def _norm(model: Model, path: str, layer: int | None, x: torch.Tensor) -> torch.Tensor:
    mod = model.submodule(path, layer)
    kind = model.spec.norm
    return norm_apply(kind, mod, x, norm_scale(kind, x, norm_eps(mod)))


def attn_out_by_hand(model: Model, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Σ_h z_h · W_O[h] + b, then the post-norm if the architecture has one."""
    w, b = _proj(model, model.spec.attn_o, layer)
    w_h = w.reshape(model.n_heads, model.d_head, model.d_model)
    out = torch.einsum("bhtd,hdm->btm", z, w_h)
    if b is not None:
        out = out + b
    if model.spec.ln1_post:
        out = _norm(model, model.spec.ln1_post, layer, out)
    return out


def mlp_out_by_hand(model: Model, layer: int, post: torch.Tensor) -> torch.Tensor:
    w, b = _proj(model, model.spec.mlp_down, layer)
    out = post @ w
    if b is not None:
        out = out + b
    if model.spec.ln2_post:
        out = _norm(model, model.spec.ln2_post, layer, out)
    return out


def check_sublayer_outputs(m: Model, c: dict, layer: int, tol: float) -> None:
    """attn_out = Σ over heads of z·W_O (+ bias) and mlp_out = hook_post · W_down (+ bias), each
    followed by its post-norm if the architecture has one."""
    p = f"blocks.{layer}."
    z, post = c[p + "attn.hook_z"], c[p + "mlp.hook_post"]
    got = (c[p + "hook_attn_out"], c[p + "hook_mlp_out"])
    want = (attn_out_by_hand(m, layer, z), mlp_out_by_hand(m, layer, post))
    torch.testing.assert_close(want, got, rtol=tol, atol=tol)


def test_forward_bit_identical_to_hf_eager_float32():
    for arch in ARCHS:
        eager = tiny_hf(arch, torch.float32)
        ours = Model(tiny_hf(arch, torch.float32), None)
        toks = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            ref = eager(input_ids=toks, use_cache=False).logits
            got = ours(toks)
            with ours.sites(read=ours.site_names()):
                got_hooked = ours(toks)
        assert torch.equal(ref, got), arch
        assert torch.equal(ref, got_hooked), arch


def test_float64_matches_hf_eager(tiny: Model, tokens):
    eager = tiny_hf(tiny.spec.model_type, torch.float64)
    with torch.no_grad():
        ref = eager(input_ids=tokens, use_cache=False).logits
    # HF eager computes softmax and norms in float32 even in float64; adag keeps float64.
    with torch.no_grad():
        plain = tiny(tokens)
        with tiny.sites(read=["blocks.0.hook_resid_pre"]):
            hooked = tiny(tokens)
    assert torch.equal(plain, hooked)  # float64 runs are exact with or without a session
    torch.testing.assert_close(plain, ref, rtol=1e-5, atol=1e-5)


def test_site_shapes(tiny: Model, tokens):
    _, cache = tiny.run_with_cache(tokens, tiny.site_names())
    assert set(cache) == set(tiny.site_names())
    b, t = tokens.shape
    for layer in range(tiny.n_layers):
        p = f"blocks.{layer}."
        assert cache[p + "hook_resid_pre"].shape == (b, t, tiny.d_model)
        assert cache[p + "attn.hook_q"].shape == (b, tiny.n_heads, t, tiny.d_head)
        assert cache[p + "attn.hook_k"].shape == (b, tiny.n_kv_heads, t, tiny.d_head)
        assert cache[p + "attn.hook_v"].shape == (b, tiny.n_kv_heads, t, tiny.d_head)
        assert cache[p + "attn.hook_pattern"].shape == (b, tiny.n_heads, t, t)
        assert cache[p + "attn.hook_z"].shape == (b, tiny.n_heads, t, tiny.d_head)
        assert cache[p + "mlp.hook_post"].shape == (b, t, tiny.d_mlp)
    assert cache["ln_final.hook_scale"].shape == (b, t, 1)


def test_reading_matches_recomputation(tiny: Model, tokens):
    logits, c = tiny.run_with_cache(tokens, tiny.site_names())
    n_rep = tiny.n_heads // tiny.n_kv_heads
    for layer in range(tiny.n_layers):
        p = f"blocks.{layer}."
        check_sublayer_outputs(tiny, c, layer, tol=1e-12)
        # neurons = act(gate) * up (gated) or act(pre)
        act = tiny.submodule(tiny.spec.mlp, layer)
        act_fn = getattr(act, "act_fn", None) or act.act
        post = act_fn(c[p + "mlp.hook_pre"])
        if tiny.spec.gated:
            post = post * c[p + "mlp.hook_pre_linear"]
        torch.testing.assert_close(post, c[p + "mlp.hook_post"], rtol=1e-12, atol=1e-12)
        # residual stream bookkeeping
        assert torch.equal(
            c[p + "hook_resid_pre"] + c[p + "hook_attn_out"], c[p + "hook_resid_mid"]
        )
        assert torch.equal(
            c[p + "hook_resid_mid"] + c[p + "hook_mlp_out"], c[p + "hook_resid_post"]
        )
        if layer + 1 < tiny.n_layers:
            assert torch.equal(c[p + "hook_resid_post"], c[f"blocks.{layer + 1}.hook_resid_pre"])
        # pattern: causal rows summing to one; z = pattern @ v with query head h reading KV head h // n_rep
        pat = c[p + "attn.hook_pattern"]
        torch.testing.assert_close(pat.sum(-1), torch.ones_like(pat.sum(-1)))
        assert torch.all(pat.triu(1) == 0)
        v = c[p + "attn.hook_v"]
        for h in range(tiny.n_heads):
            z_h = pat[:, h] @ v[:, h // n_rep]
            torch.testing.assert_close(z_h, c[p + "attn.hook_z"][:, h], rtol=1e-12, atol=1e-12)
        # the pre-attention norm's scale, by hand
        if tiny.spec.ln1:
            x = c[p + "hook_resid_pre"]
            if tiny.spec.norm == "layer":
                want = 1 / torch.sqrt(
                    x.var(-1, keepdim=True, unbiased=False)
                    + norm_eps(tiny.submodule(tiny.spec.ln1, layer))
                )
            else:
                want = 1 / torch.sqrt(
                    x.pow(2).mean(-1, keepdim=True) + norm_eps(tiny.submodule(tiny.spec.ln1, layer))
                )
            torch.testing.assert_close(c[p + "ln1.hook_scale"], want, rtol=1e-12, atol=0)
    # logits from the last residual by hand: final norm, unembedding, softcap
    final = _norm(
        tiny, tiny.spec.final_norm, None, c[f"blocks.{tiny.n_layers - 1}.hook_resid_post"]
    )
    z = final @ tiny.submodule(tiny.spec.unembed).weight.T
    if tiny.final_softcap:
        z = torch.tanh(z / tiny.final_softcap) * tiny.final_softcap
    torch.testing.assert_close(z, logits, rtol=1e-12, atol=1e-12)


WRITE_SITES = [
    "blocks.1.hook_resid_pre",
    "blocks.1.attn.hook_q",
    "blocks.1.attn.hook_k",
    "blocks.1.attn.hook_v",
    "blocks.0.attn.hook_attn_scores",
    "blocks.1.attn.hook_pattern",
    "blocks.2.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.1.mlp.hook_in",
    "blocks.1.mlp.hook_pre",
    "blocks.1.mlp.hook_post",
    "blocks.0.hook_mlp_out",
    "blocks.2.hook_resid_post",
    "ln_final.hook_scale",
]


def test_writing_own_value_changes_nothing(tiny: Model, tokens):
    names = [*WRITE_SITES, "blocks.1.hook_resid_mid"]
    if tiny.spec.ln1:
        names.append("blocks.0.ln1.hook_scale")
    logits, cache = tiny.run_with_cache(tokens, names)
    for name in names:
        patched, _ = tiny.run_with_cache(tokens, [], patches=[Patch(name, cache[name])])
        if name.endswith("hook_resid_mid") or name.endswith("hook_scale"):
            # resid_mid is written through attn_out = value - resid_pre; scales re-run the norm formula
            torch.testing.assert_close(patched, logits, rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert torch.equal(patched, logits), name


def test_patch_last_residual_predicts_logits(tiny: Model, tokens):
    last = f"blocks.{tiny.n_layers - 1}.hook_resid_post"
    logits, _ = tiny.run_with_cache(tokens, [])
    v = torch.randn(tiny.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    patched, cache = tiny.run_with_cache(tokens, [last], patches=[Patch(last, v, batch=1, pos=3)])
    assert torch.equal(cache[last][1, 3], v)
    final = _norm(tiny, tiny.spec.final_norm, None, v)
    z = final @ tiny.submodule(tiny.spec.unembed).weight.T
    if tiny.final_softcap:
        z = torch.tanh(z / tiny.final_softcap) * tiny.final_softcap
    torch.testing.assert_close(patched[1, 3], z, rtol=1e-12, atol=1e-12)
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[1, 3] = False
    assert torch.equal(patched[mask], logits[mask])


def test_patch_head_and_neuron_predicted(tiny: Model, tokens):
    layer, head, pos = 1, 2, 4
    p = f"blocks.{layer}."
    _, clean = tiny.run_with_cache(tokens, [p + "attn.hook_z", p + "mlp.hook_post"])
    new_z = torch.randn(
        tiny.d_head, dtype=torch.float64, generator=torch.Generator().manual_seed(6)
    )
    _, c = tiny.run_with_cache(
        tokens,
        [p + "attn.hook_z", p + "hook_attn_out"],
        patches=[Patch(p + "attn.hook_z", new_z, head=head, pos=pos)],
    )
    z = clean[p + "attn.hook_z"].clone()
    z[:, head, pos] = new_z
    assert torch.equal(c[p + "attn.hook_z"], z)
    torch.testing.assert_close(
        c[p + "hook_attn_out"], attn_out_by_hand(tiny, layer, z), rtol=1e-12, atol=1e-12
    )
    # add δ to one neuron: the MLP output moves by δ · W_down[i] (before any post-norm)
    idx, delta = 7, 0.75
    _, c2 = tiny.run_with_cache(
        tokens,
        [p + "mlp.hook_post", p + "hook_mlp_out"],
        patches=[Patch(p + "mlp.hook_post", delta, op="add", pos=pos, index=idx)],
    )
    post = clean[p + "mlp.hook_post"].clone()
    post[:, pos, idx] += delta
    assert torch.equal(c2[p + "mlp.hook_post"], post)
    torch.testing.assert_close(
        c2[p + "hook_mlp_out"], mlp_out_by_hand(tiny, layer, post), rtol=1e-12, atol=1e-12
    )


def test_mlp_hook_in_is_the_mlp_modules_input(tiny: Model, tokens):
    """``mlp.hook_in`` is exactly what the MLP module receives: ln2 of resid_mid, or resid_mid
    itself in post-norm blocks (OLMo-2)."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        tiny.submodule(tiny.spec.mlp, layer).register_forward_pre_hook(
            lambda mod, args, layer=layer: seen.__setitem__(layer, args[0].detach().clone())
        )
        for layer in range(tiny.n_layers)
    ]
    try:
        names = [
            f"blocks.{i}.{s}"
            for i in range(tiny.n_layers)
            for s in ("mlp.hook_in", "hook_resid_mid")
        ]
        _, c = tiny.run_with_cache(tokens, names)
    finally:
        for h in handles:
            h.remove()
    for layer in range(tiny.n_layers):
        p = f"blocks.{layer}."
        assert c[p + "mlp.hook_in"].shape == (*tokens.shape, tiny.d_model)
        assert torch.equal(c[p + "mlp.hook_in"], seen[layer])
        mid = c[p + "hook_resid_mid"]
        want = _norm(tiny, tiny.spec.ln2, layer, mid) if tiny.spec.ln2 else mid
        torch.testing.assert_close(c[p + "mlp.hook_in"], want, rtol=1e-12, atol=1e-12)


def test_patch_mlp_hook_in_changes_the_mlp_output_only(tiny: Model, tokens):
    """A patched MLP input moves that position's MLP output to the MLP of the new input (then the
    post-norm, if any) and the logits after it; the residual stream's own copy (resid_mid) and
    the other positions' MLP outputs of the layer stay as they were."""
    layer, pos = 1, 4
    p = f"blocks.{layer}."
    names = [p + "hook_resid_mid", p + "mlp.hook_in", p + "hook_mlp_out", p + "hook_resid_post"]
    logits, clean = tiny.run_with_cache(tokens, names)
    v = torch.randn(tiny.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    patched, c = tiny.run_with_cache(tokens, names, patches=[Patch(p + "mlp.hook_in", v, pos=pos)])
    assert torch.equal(c[p + "mlp.hook_in"][:, pos], v.expand(tokens.shape[0], -1))
    assert torch.equal(c[p + "hook_resid_mid"], clean[p + "hook_resid_mid"])
    with torch.no_grad():
        want = tiny.submodule(tiny.spec.mlp, layer)(v)
    if tiny.spec.ln2_post:
        want = _norm(tiny, tiny.spec.ln2_post, layer, want)
    out = c[p + "hook_mlp_out"]
    torch.testing.assert_close(out[:, pos], want.expand_as(out[:, pos]), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out[:, pos], clean[p + "hook_mlp_out"][:, pos])
    others = [i for i in range(tokens.shape[1]) if i != pos]
    assert torch.equal(out[:, others], clean[p + "hook_mlp_out"][:, others])
    assert torch.equal(c[p + "hook_resid_post"], c[p + "hook_resid_mid"] + out)
    assert torch.equal(patched[:, :pos], logits[:, :pos])  # causal: earlier positions untouched
    assert not torch.allclose(patched[:, pos], logits[:, pos])


def test_zipped_batched_patches_equal_individual_runs(tiny: Model):
    toks = torch.randint(0, 61, (1, 8), generator=torch.Generator().manual_seed(9)).repeat(3, 1)
    site = "blocks.1.mlp.hook_post"
    pos, idx = [2, 5, 7], [3, 9, 11]
    vals = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64)
    batched, _ = tiny.run_with_cache(
        toks, [], patches=[Patch(site, vals, batch=[0, 1, 2], pos=pos, index=idx)]
    )
    for row in range(3):
        single, _ = tiny.run_with_cache(
            toks[:1], [], patches=[Patch(site, vals[row], pos=pos[row], index=idx[row])]
        )
        # (different batch sizes may take different BLAS paths: equal up to rounding)
        torch.testing.assert_close(batched[row], single[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", ["scale", "add"])
def test_scale_and_add_heads(tiny: Model, tokens, op):
    site = "blocks.0.attn.hook_v"
    _, clean = tiny.run_with_cache(tokens, [site])
    _, c = tiny.run_with_cache(tokens, [site], patches=[Patch(site, 3.0, op=op, head=1)])
    want = clean[site].clone()
    want[:, 1] = want[:, 1] * 3.0 if op == "scale" else want[:, 1] + 3.0
    assert torch.equal(c[site], want)


def test_gradients_match_finite_differences(tiny: Model, tokens):
    """Plain backward: d logit / d site against central differences along a random direction."""
    target = 5

    def metric(logits):
        return logits[:, -1, target].sum()

    gen = torch.Generator().manual_seed(11)
    for site in [
        "blocks.0.hook_resid_pre",
        "blocks.1.hook_resid_mid",
        "blocks.1.mlp.hook_in",
        "blocks.0.mlp.hook_post",
        "blocks.1.attn.hook_v",
        "blocks.2.attn.hook_pattern",
    ]:
        with tiny.sites(grad=[site]) as run:
            g = run.grads(metric(tiny(tokens)))[site]
        _, c = tiny.run_with_cache(tokens, [site])
        d = torch.randn(c[site].shape, dtype=torch.float64, generator=gen)
        eps = 1e-5
        with torch.no_grad():
            up = metric(
                tiny.run_with_cache(tokens, [], patches=[Patch(site, eps * d, op="add")])[0]
            )
            dn = metric(
                tiny.run_with_cache(tokens, [], patches=[Patch(site, -eps * d, op="add")])[0]
            )
        fd = (up - dn) / (2 * eps)
        torch.testing.assert_close((g * d).sum(), fd, rtol=1e-6, atol=1e-8, msg=site)


def test_detach_blocks_gradient(tiny: Model, tokens):
    with tiny.sites(
        grad=["blocks.0.hook_resid_pre"],
        patches=[Patch(f"blocks.{i}.hook_resid_post", op="detach") for i in [0]],
    ) as run:
        g = run.grads(tiny(tokens)[:, -1, 0].sum())["blocks.0.hook_resid_pre"]
    assert torch.all(g == 0)


def test_bad_sites_and_patches(tiny: Model):
    with pytest.raises(AdagError, match="unknown site"):
        tiny.sites(read=["blocks.99.hook_resid_pre"])
    with pytest.raises(AdagError, match="no head axis"):
        Patch("blocks.0.hook_resid_pre", 1.0, head=0)
    with pytest.raises(AdagError, match="op"):
        Patch("blocks.0.hook_resid_pre", 1.0, op="multiply")  # type: ignore[arg-type]
    with pytest.raises(AdagError, match="needs a value"):
        Patch("blocks.0.hook_resid_pre")
