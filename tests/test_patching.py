"""AtP, the QK fix and GradDrop against their definitions: brute-force patching and recomputed
softmax, in float64 on tiny random models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adag.models.model import Model
from adag.models.sites import Patch
from adag.patching import PatchingOracle, atp, atp_star, exhaustive, node_set
from adag.patching.atp import _pair_estimates, qk_fix_keys
from adag.patching.node_sets import Group
from adag.tasks.pairs import PromptPair, TokenizedPair, make_metric

from .conftest import VOCAB, tiny_hf

A_TOK, B_TOK = 3, 11


def logit_diff(logits: torch.Tensor, pair: TokenizedPair) -> torch.Tensor:
    return logits[:, -1, A_TOK] - logits[:, -1, B_TOK]


def random_pairs(n: int, t: int = 7, seed: int = 0) -> list[TokenizedPair]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        c = torch.randint(0, VOCAB, (1, t), generator=gen)
        z = torch.randint(0, VOCAB, (1, t), generator=gen)
        out.append(TokenizedPair(PromptPair("c", "n", "a", "b"), c, z, A_TOK, B_TOK))
    return out


def frozen_final_norm(model: Model, pair: TokenizedPair) -> list[Patch]:
    """Base patches making the model's head linear: the final-norm scale fixed to its clean value."""
    _, c = model.run_with_cache(pair.clean, ["ln_final.hook_scale"])
    return [Patch("ln_final.hook_scale", c["ln_final.hook_scale"])]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gpt2"])
def test_atp_equals_patching_where_the_model_is_linear_in_the_node(arch):
    """Last-layer neurons and MLP output reach the metric linearly once the final-norm scale is
    fixed: AtP is exact there (noising and on every pair). Gemma 2/3 and OLMo-2 are not listed:
    their MLP post-norm or final-logit softcap makes that head nonlinear."""
    from tests.conftest import tiny_model

    tiny = tiny_model(arch)
    pairs = random_pairs(2)
    last = tiny.n_layers - 1
    groups = [
        Group("neuron", last, None, True, (7, tiny.d_mlp)),
        Group("neuron", last, None, False, (tiny.d_mlp,)),
        Group("mlp", last, None, True, (7,)),
    ]
    for tp in pairs:
        base = frozen_final_norm(tiny, tp)
        est = atp(tiny, [tp], nodes=groups, metric=logit_diff, base_patches=base)
        truth = exhaustive(tiny, [tp], nodes=groups, metric=logit_diff, base_patches=base)
        assert est.nodes == truth.nodes
        np.testing.assert_allclose(est.estimate, truth.estimate, rtol=1e-9, atol=1e-10)
        assert np.abs(truth.estimate).max() > 1e-3


def _attention_only_model(scale: float) -> Model:
    hf = tiny_hf("llama", torch.float64, seed=4)
    hf.model.layers = hf.model.layers[:1]
    hf.config.num_hidden_layers = 1
    with torch.no_grad():
        hf.model.layers[0].self_attn.q_proj.weight.mul_(scale)
    return Model(hf, None)


@pytest.mark.parametrize("scale", [1.0, 6.0])
def test_qk_fix_equals_patching_in_attention_only_model(scale):
    """1 layer, attention only (MLP output patched to 0), final-norm scale fixed: the metric is
    linear in the pattern, so the QK fix is exact for every q and k node; plain AtP is not once
    the heads saturate."""
    m = _attention_only_model(scale)
    tp = random_pairs(1, t=8, seed=2)[0]
    base = [*frozen_final_norm(m, tp), Patch("blocks.0.hook_mlp_out", 0.0)]
    truth = exhaustive(m, [tp], nodes="qkv", metric=logit_diff, base_patches=base)
    est = atp(m, [tp], nodes="qkv", metric=logit_diff, qk_fix=True, base_patches=base)
    np.testing.assert_allclose(est.estimate, truth.estimate, rtol=1e-10, atol=1e-10)
    plain = est.columns["atp"]
    qk = np.array([(":q" in n) or (":k" in n) for n in est.nodes])
    # v nodes are linear: plain AtP is exact there too
    np.testing.assert_allclose(plain[~qk], truth.estimate[~qk], rtol=1e-10, atol=1e-10)
    _, c = m.run_with_cache(tp.clean, ["blocks.0.attn.hook_pattern"])
    if scale > 1:
        assert c["blocks.0.attn.hook_pattern"].max() > 0.999  # saturated
        err = np.abs(plain[qk] - truth.estimate[qk]).max()
        assert err > 1e-2 * np.abs(truth.estimate[qk]).max()
    # summed-over-positions q and k nodes too
    summed = [
        Group("head", 0, x, False, ((m.n_heads if x == "q" else m.n_kv_heads),)) for x in "qk"
    ]
    t2 = exhaustive(m, [tp], nodes=summed, metric=logit_diff, base_patches=base)
    e2 = atp(m, [tp], nodes=summed, metric=logit_diff, qk_fix=True, base_patches=base)
    np.testing.assert_allclose(e2.estimate, t2.estimate, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("logit_scale", [1.0, 10.0, 80.0])
def test_key_fix_is_exact_recomputation(logit_scale):
    """The O(T²) key fix equals recomputing each softmax row with one entry changed (O(T³))."""
    gen = torch.Generator().manual_seed(int(logit_scale))
    h, t = 3, 9
    masked = torch.ones(t, t, dtype=torch.bool).triu(1).expand(h, t, t)
    s = (torch.randn(h, t, t, generator=gen, dtype=torch.float64) * logit_scale).masked_fill(
        masked, -math.inf
    )
    s_new = torch.randn(h, t, t, generator=gen, dtype=torch.float64) * logit_scale
    g = torch.randn(h, t, t, generator=gen, dtype=torch.float64)
    fast = qk_fix_keys(s, s_new, g, masked)
    slow = torch.zeros(h, t, dtype=torch.float64)
    a = torch.softmax(s, -1)
    for hh in range(h):
        for p in range(t):
            for row in range(p, t):
                s2 = s[hh, row].clone()
                s2[p] = s_new[hh, row, p]
                slow[hh, p] += ((torch.softmax(s2, -1) - a[hh, row]) * g[hh, row]).sum()
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_graddrop_identities(tiny: Model):
    """A node whose only path is direct gets GradDrop = |AtP|; for any node, the terms of layers
    before its own equal |AtP| and its own layer's term is 0."""
    tp = random_pairs(1, seed=5)[0]
    ns = node_set(tiny, "heads,neurons,sublayers", tp.clean.shape[1])
    est = _pair_estimates(
        tiny, tp, ns, make_metric(logit_diff), qk_fix=False, grad_drop=True, base_patches=()
    )
    terms, plain = est["graddrop_terms"], est["atp"]
    L = tiny.n_layers
    assert terms.shape == (L, len(ns))
    for gi, grp in enumerate(ns.groups):
        sl = slice(ns.offsets[gi], ns.offsets[gi + 1])
        for layer in range(grp.layer):
            np.testing.assert_allclose(terms[layer, sl], np.abs(plain[sl]), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(terms[grp.layer, sl], 0.0, atol=1e-14)
        if grp.layer == L - 1 and grp.kind in ("neuron", "mlp"):  # direct path only
            np.testing.assert_allclose(
                est["graddrop"][sl], np.abs(plain[sl]), rtol=1e-12, atol=1e-14
            )


def test_batched_ground_truth_equals_one_at_a_time(tiny: Model):
    pairs = random_pairs(1, seed=7)  # batching is per pair; one pair keeps make test-fast < 1 min
    nodes = "heads,qkv,sublayers"
    batched = exhaustive(tiny, pairs, nodes=nodes, metric=logit_diff, batch_size=64)
    single = exhaustive(tiny, pairs, nodes=nodes, metric=logit_diff, batch_size=1)
    np.testing.assert_allclose(batched.per_pair, single.per_pair, rtol=1e-10, atol=1e-12)
    # and one node by hand
    tp = pairs[0]
    _, noise = tiny.run_with_cache(tp.noise, ["blocks.1.attn.hook_z"])
    clean = logit_diff(tiny.run_with_cache(tp.clean, [])[0], tp)
    patched = tiny.run_with_cache(
        tp.clean,
        [],
        patches=[
            Patch("blocks.1.attn.hook_z", noise["blocks.1.attn.hook_z"][0, 2, 4], head=2, pos=4)
        ],
    )[0]
    i = batched.nodes.index("head:1:4:2:z")
    assert batched.per_pair[0, i] == pytest.approx(
        float(logit_diff(patched, tp) - clean), abs=1e-12
    )


def test_denoising_direction(tiny: Model):
    tp = random_pairs(1, seed=8)[0]
    g = [Group("attn", 1, None, True, (7,))]
    out = exhaustive(tiny, [tp], nodes=g, metric=logit_diff, direction="denoising")
    _, clean = tiny.run_with_cache(tp.clean, ["blocks.1.hook_attn_out"])
    noise_m = logit_diff(tiny.run_with_cache(tp.noise, [])[0], tp)
    v = clean["blocks.1.hook_attn_out"][0, 3]
    pm = logit_diff(
        tiny.run_with_cache(tp.noise, [], patches=[Patch("blocks.1.hook_attn_out", v, pos=3)])[0],
        tp,
    )
    assert out.estimate[3] == pytest.approx(float(pm - noise_m), abs=1e-12)


def test_oracle_joint_matches_single_and_counts_cost(tiny: Model):
    pairs = random_pairs(2, seed=9)
    oracle = PatchingOracle(tiny, pairs, nodes="heads", metric=logit_diff)
    truth = exhaustive(tiny, pairs, nodes="heads", metric=logit_diff)
    assert oracle.ids == truth.nodes
    idx = np.array([0, 5, 17])
    np.testing.assert_allclose(oracle.single(idx), truth.estimate[idx], rtol=1e-10, atol=1e-12)
    assert oracle.cost == 3 * 2
    both = oracle.joint([np.array([0, 5]), np.array([], dtype=np.int64)])
    assert both[1] == 0 and oracle.cost == 3 * 2 + 2
    # patching two nodes together, by hand
    tp = pairs[0]
    ns = node_set(tiny, "heads", 7)
    _, noise = tiny.run_with_cache(tp.noise, ns.sites)
    logits = tiny.run_with_cache(tp.clean, [], patches=ns.patches([np.array([0, 5])], noise))[0]
    z = noise["blocks.0.attn.hook_z"][0]
    by_hand = tiny.run_with_cache(
        tp.clean,
        [],
        patches=[
            Patch("blocks.0.attn.hook_z", z[0, 0], head=0, pos=0),
            Patch("blocks.0.attn.hook_z", z[0, 5], head=0, pos=5),
        ],
    )[0]
    torch.testing.assert_close(logits, by_hand)


def test_atp_star_columns_cost_and_table(tiny: Model, tmp_path):
    pairs = random_pairs(3, seed=10)
    out = atp_star(tiny, pairs, nodes="heads,neurons", metric=logit_diff)
    assert out.method == "atp_star"
    assert set(out.columns) == {"atp", "atp_qk"}
    assert np.all(out.estimate >= 0)
    assert out.cost == 3 * (2 + 2 * (1 + tiny.n_layers))
    path = out.save(tmp_path / "atp_star.parquet")
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    assert t.column_names[:3] == ["node", "estimate", "abs_estimate"]
    assert t.num_rows == len(out.nodes) == tiny.n_layers * (tiny.n_heads * 7 + tiny.d_mlp)
    df = out.to_pandas()
    assert (
        df["node"].iloc[0] == "head:0:0:0:z"
        and df["node"].iloc[-1] == f"neuron:{tiny.n_layers - 1}:*:{tiny.d_mlp - 1}"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["atp_star.parquet"]


def test_evaluate_writes_every_artifact(tmp_path):
    import pyarrow.parquet as pq

    from adag.patching.bound import false_negative_bound
    from adag.pipeline.patch import evaluate
    from tests.conftest import tiny_model

    m = tiny_model("llama")
    pairs = random_pairs(2, seed=12)
    summary = evaluate(
        m, pairs, tmp_path, nodes="heads", metric=logit_diff, bound_ks=(0, 5), bound_subsets=40
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        [
            "exhaustive.parquet",
            "atp.parquet",
            "atp_qk.parquet",
            "atp_star.parquet",
            "atp_ig.parquet",
            "atp_dqk.parquet",
            "localize.parquet",
            "curves.parquet",
            "curves.png",
            "bound.parquet",
            "evaluation.json",
        ]
    )
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["n_nodes"] == m.n_layers * m.n_heads * 7
    # the recall from its definition, on the written tables: the share of the true top 20 (by
    # |exhaustive effect|) that AtP* puts in its top 40 (by |estimate|)
    truth = pq.read_table(tmp_path / "exhaustive.parquet").to_pydict()
    star = pq.read_table(tmp_path / "atp_star.parquet").to_pydict()
    assert star["node"] == truth["node"]
    effects, est = np.array(truth["estimate"]), np.abs(star["estimate"])
    true_top20 = set(np.argsort(-np.abs(effects), kind="stable")[:20].tolist())
    star_order = np.argsort(-est, kind="stable")
    expected = len(true_top20 & set(star_order[:40].tolist())) / 20
    assert summary["atp_star"]["recall_top20_in_top40"] == expected
    curves = pq.read_table(tmp_path / "curves.parquet").to_pandas()
    assert set(curves["method"]) == {
        "atp",
        "atp_qk",
        "atp_star",
        "atp_ig",
        "atp_dqk",
        "localize",
        "iterative",
        "subsampling",
        "blocks",
        "hierarchical",
    }
    # localize: exact where checked; its curve follows its check order, from the estimators' cost
    loc = pq.read_table(tmp_path / "localize.parquet").to_pydict()
    assert loc["node"] == truth["node"]
    checked = np.array(loc["checked"]) == 1.0
    assert checked.sum() > 0
    np.testing.assert_allclose(np.array(loc["exact"])[checked], effects[checked], atol=1e-10)
    assert np.isnan(np.array(loc["exact"])[~checked]).all()
    est_cost = sum(summary[e]["cost"] for e in ("atp_star", "atp_ig", "atp_dqk"))
    first_found = curves[(curves["method"] == "localize") & (curves["x"] == 1)]["cost"].item()
    assert first_found > est_cost
    bound = pq.read_table(tmp_path / "bound.parquet").to_pylist()
    assert [b["k"] for b in bound] == [0, 5]
    # each row is the bound with AtP*'s top K verified (its statistics are tested in test_bound.py)
    # next to the largest true effect left unverified
    oracle = PatchingOracle(m, pairs, nodes="heads", metric=logit_diff)
    for row in bound:
        verified = star_order[: row["k"]]
        again = false_negative_bound(oracle, verified, n_subsets=40, seed=0)
        assert row["theta"] == pytest.approx(again.theta, rel=1e-9)
        assert (row["alpha"], row["cost"]) == (again.alpha, again.cost)
        assert row["true_max_unverified"] == np.abs(np.delete(effects, verified)).max()


def test_atp_is_exact_where_linear_on_the_real_model(smollm2: Model):
    """float32, SmolLM2: the last MLP's output per position and a few last-layer neurons reach the
    metric linearly once the final-norm scale is fixed, so AtP equals patching there."""
    from adag.tasks import ioi, tokenize_pairs

    tp = tokenize_pairs(smollm2, ioi(smollm2, 1))[0]
    t = tp.clean.shape[1]
    last = smollm2.n_layers - 1
    groups = [Group("mlp", last, None, True, (t,)), Group("attn", last, None, True, (t,))]
    base = frozen_final_norm(smollm2, tp)
    est = atp(smollm2, [tp], nodes=groups[:1], base_patches=base)
    truth = exhaustive(smollm2, [tp], nodes=groups[:1], base_patches=base)
    np.testing.assert_allclose(est.estimate, truth.estimate, rtol=1e-3, atol=1e-3)
    assert np.abs(truth.estimate).max() > 0.1
    # the last attention output feeds the last MLP: there AtP is only an approximation
    est_a = atp(smollm2, [tp], nodes=groups[1:], base_patches=base)
    truth_a = exhaustive(smollm2, [tp], nodes=groups[1:], base_patches=base)
    assert np.corrcoef(est_a.estimate, truth_a.estimate)[0, 1] > 0.9


def test_model_attention_scores_equal_the_site(tiny: Model, tokens):
    """``Model.attention_scores`` (the QK fix's recomputation) is the forward's own formula: it
    equals the ``hook_attn_scores`` site wherever that is unmasked, per row and batched."""
    for layer in range(tiny.n_layers):
        p = f"blocks.{layer}.attn."
        _, c = tiny.run_with_cache(tokens, [p + "hook_q", p + "hook_k", p + "hook_attn_scores"])
        site = c[p + "hook_attn_scores"]
        masked = site <= torch.finfo(site.dtype).min / 2
        assert masked.any() and not masked.all()
        s = tiny.attention_scores(layer, c[p + "hook_q"], c[p + "hook_k"], masked)
        assert s.dtype == site.dtype and s.shape == site.shape
        assert torch.equal(s[~masked], site[~masked])
        assert torch.all(s[masked] == -math.inf)
        for b in range(tokens.shape[0]):
            row = tiny.attention_scores(layer, c[p + "hook_q"][b], c[p + "hook_k"][b], masked[b])
            torch.testing.assert_close(row, s[b], rtol=1e-13, atol=1e-13)


def test_attention_scores_follow_the_forward_when_a_config_names_an_unused_softcap(tokens):
    """Gemma 3 configs carry ``attn_logit_softcapping`` but its attention never applies it: the
    recomputed scores must follow what the forward does, not the config field."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config("gemma3_text")
    cfg.attn_logit_softcapping = 0.5
    torch.manual_seed(0)
    m = Model(AutoModelForCausalLM.from_config(cfg).double().eval())
    p = "blocks.1.attn."
    _, c = m.run_with_cache(tokens, [p + "hook_q", p + "hook_k", p + "hook_attn_scores"])
    site = c[p + "hook_attn_scores"]
    masked = site <= torch.finfo(site.dtype).min / 2
    assert site[~masked].abs().max() > 0.5  # a 0.5 softcap would have bounded them
    s = m.attention_scores(1, c[p + "hook_q"], c[p + "hook_k"], masked)
    assert torch.equal(s[~masked], site[~masked])


def test_qk_fix_softmax_runs_in_float32_for_bfloat16(monkeypatch):
    """A bf16 model's QK fix works in float32, like the model's own softmax: its scores are the
    model's bf16 scores upcast, and every softmax it takes runs in float32."""
    from tests.conftest import tiny_model

    m = tiny_model("llama", torch.bfloat16)
    tp = random_pairs(1, t=7, seed=5)[0]
    _, c = m.run_with_cache(
        tp.clean, ["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_attn_scores"]
    )
    site = c["blocks.1.attn.hook_attn_scores"][0]
    masked = site <= torch.finfo(site.dtype).min / 2
    s = m.attention_scores(1, c["blocks.1.attn.hook_q"][0], c["blocks.1.attn.hook_k"][0], masked)
    assert s.dtype == torch.float32
    assert torch.equal(s[~masked], site[~masked].float())

    compute_dtypes: list[torch.dtype] = []
    softmax = torch.softmax

    def recording_softmax(x, dim, dtype=None, **kwargs):
        compute_dtypes.append(dtype or x.dtype)
        return softmax(x, dim, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "softmax", recording_softmax)
    ns = node_set(m, "qkv", tp.clean.shape[1])
    est = _pair_estimates(
        m, tp, ns, make_metric(logit_diff), qk_fix=True, grad_drop=False, base_patches=()
    )
    # 2 forwards x n_layers attention softmaxes, then the fix's own (query and summed-key nodes)
    assert len(compute_dtypes) > 2 * m.n_layers
    assert set(compute_dtypes) == {torch.float32}
    assert np.isfinite(est["atp_qk"]).all()
