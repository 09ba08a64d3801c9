"""Steering (ADAG §4.3): scale patches equal hand-built ones bit for bit, the table equals a direct
recomputation, steered generation holds the intervention on every token, and the summary's
intervals are the textbook ones. Tiny float64 llama for exactness; SmolLM2 for text and HF
``generate``."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from adag.errors import AdagError
from adag.models.sites import Patch
from adag.steer import generate, generate_ids, steer, steering_patches, summarise, wilson
from adag.steer.plots import plot_steering
from adag.tasks.prompts import PromptSpec

from .conftest import VOCAB, tiny_model

UNITS = [(0, 3), (0, 7, 1), (1, 5, -1), (2, 40, 1), (2, 40, -1)]
"""A cluster: both signs of neuron 40 of layer 2 (scaled once)."""
BY_LAYER = {0: [3, 7], 1: [5], 2: [40]}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (4, 9), generator=gen)


def hand(value: float, op: str = "scale") -> list[Patch]:
    return [
        Patch(f"blocks.{layer}.mlp.hook_post", value, op, index=idx)  # type: ignore[arg-type]
        for layer, idx in BY_LAYER.items()
    ]


def last_logits(model, tokens: torch.Tensor, patches=()) -> torch.Tensor:
    with torch.no_grad(), model.sites(patches=patches):
        return model(tokens, last_only=True)[:, -1]


# -- patches -------------------------------------------------------------------------------------


def test_tuples_and_node_ids_give_the_same_patches(llama):
    ids = ["neuron:0:*:3", "neuron:0:*:7", "neuron:1:*:5", "neuron:2:*:40"]
    assert steering_patches(llama, UNITS, 0.5) == steering_patches(llama, ids, 0.5) == hand(0.5)
    assert steering_patches(llama, (1, 5), 2.0) == [
        Patch("blocks.1.mlp.hook_post", 2.0, "scale", index=[5])
    ]
    # a given Patch is a selection: its value becomes the factor
    p = Patch("blocks.1.hook_resid_mid", 1.0, "scale", pos=[2], index=[4])
    assert steering_patches(llama, [p, "neuron:1:3:9"], 0.0) == [
        Patch("blocks.1.mlp.hook_post", 0.0, "scale", pos=[3], index=[9]),
        Patch("blocks.1.hook_resid_mid", 0.0, "scale", pos=[2], index=[4]),
    ]


def test_factor_one_changes_nothing_bit_for_bit(llama, toks):
    base = last_logits(llama, toks)
    assert torch.equal(last_logits(llama, toks, steering_patches(llama, UNITS, 1.0)), base)
    t = steer(llama, toks, UNITS, scale=1.0).to_pydict()
    assert all(v == 0.0 for col in ("target_dprob", "target_dlogit") for r in t[col] for v in r)
    assert t["kl"] == [0.0] * len(toks)
    assert t["steered_top_ids"] == t["top_ids_base"]
    want = base.gather(1, torch.tensor(t["top_ids_base"])).tolist()
    assert t["target_logit_base"] == want


def test_factor_zero_equals_zeroing_by_hand(llama, toks):
    site = "blocks.2.mlp.hook_post"
    got, cache = llama.run_with_cache(toks, [site], patches=steering_patches(llama, UNITS, 0.0))
    want, by_hand = llama.run_with_cache(toks, [site], patches=hand(0.0, "replace"))
    assert torch.equal(got, want)
    assert torch.equal(cache[site], by_hand[site]) and not cache[site][..., 40].any()
    assert not torch.equal(got, llama.run_with_cache(toks, [])[0])
    # and steer's last-position forward agrees with it
    assert torch.equal(
        last_logits(llama, toks, steering_patches(llama, UNITS, 0.0)),
        last_logits(llama, toks, hand(0.0, "replace")),
    )


def test_factor_two_equals_a_hand_scale_patch(llama, toks):
    site = "blocks.0.mlp.hook_post"  # the first steered layer: nothing upstream changed
    logits, cache = llama.run_with_cache(toks, [site], patches=steering_patches(llama, UNITS, 2.0))
    want, _ = llama.run_with_cache(toks, [site], patches=hand(2.0))
    assert torch.equal(logits, want)
    _, plain = llama.run_with_cache(toks, [site])
    a, b = cache[site], plain[site]
    assert (b[..., 3] > 0).any() and (b[..., 3] < 0).any()
    assert torch.equal(a[..., [3, 7]], 2 * b[..., [3, 7]])  # every position, whatever the sign
    assert torch.equal(a[..., :3], b[..., :3])


# -- the table ---------------------------------------------------------------------------------


def test_table_equals_a_direct_recomputation(llama, toks):
    targets = [[1, 2], [7], [0, 60, 3], [9]]
    t = steer(llama, toks, UNITS, scale=(0.0, 2.0), targets=targets, k=4, label="C1")
    assert t.num_rows == 8
    d = t.to_pydict()
    assert d["prompt"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert d["factor"] == [0.0, 2.0] * 4
    assert set(d["label"]) == {"C1"}
    base = last_logits(llama, toks).double()
    for row in range(t.num_rows):
        i, f = d["prompt"][row], d["factor"][row]
        st = last_logits(llama, toks, hand(f)).double()
        p, q = base[i].softmax(-1), st[i].softmax(-1)
        tg = torch.tensor(targets[i])
        assert d["target_ids"][row] == targets[i]
        np.testing.assert_allclose(d["target_prob_base"][row], p[tg], rtol=1e-12)
        np.testing.assert_allclose(d["target_dprob"][row], q[tg] - p[tg], rtol=1e-9, atol=1e-15)
        np.testing.assert_array_equal(d["target_dlogit"][row], st[i, tg] - base[i, tg])
        top = p.topk(4).indices
        assert d["top_ids_base"][row] == top.tolist()
        np.testing.assert_allclose(d["top_dprob"][row], q[top] - p[top], rtol=1e-9, atol=1e-15)
        assert d["steered_top_ids"][row] == q.topk(4).indices.tolist()
        kl = float((p * (p / q).log()).sum())
        assert d["kl"][row] == pytest.approx(kl, rel=1e-9, abs=1e-15)
        assert d["kl"][row] > 0
        mean = float(q[tg].mean() - p[tg].mean())
        assert d["target_mean_dprob"][row] == pytest.approx(mean, rel=1e-9, abs=1e-15)


def test_prompts_of_different_lengths_and_positions(llama, toks):
    prompts = [toks[0], toks[1, :5].tolist(), toks[2].numpy(), toks[3, :5]]
    units = ["neuron:1:4:5", (0, 3)]
    t = steer(llama, prompts, units, scale=(0.5,)).to_pydict()
    assert t["n_tokens"] == [9, 5, 9, 5]
    for i, p in enumerate(prompts):
        one = steer(llama, p, units, scale=(0.5,)).to_pydict()  # a lone prompt
        np.testing.assert_allclose(one["target_dlogit"][0], t["target_dlogit"][i], atol=1e-12)
    with pytest.raises(AdagError, match=r"position 7 .* prompt 1 has 5 tokens"):
        steer(llama, prompts, ["neuron:1:7:5"])


def test_callable_package(llama, toks):
    import adag.steer

    assert adag.steer(llama, toks[:1], UNITS, scale=1.0).num_rows == 1


# -- summary and plot ----------------------------------------------------------------------------


def test_summarise_intervals(llama, toks, tmp_path):
    a = steer(llama, toks, UNITS, scale=(0.0, 2.0), label="A")
    b = steer(llama, toks[:3], [(1, 9)], scale=(0.0,), label="B")
    s = summarise(pa.concat_tables([a, b]), n_boot=500, seed=1).to_pydict()
    assert list(zip(s["label"], s["factor"], s["n"], strict=True)) == [
        ("A", 0.0, 4),
        ("A", 2.0, 4),
        ("B", 0.0, 3),
    ]
    d = a.to_pydict()
    for j in range(2):
        rows = [r for r in range(a.num_rows) if d["factor"][r] == s["factor"][j]]
        delta = [d["target_mean_dprob"][r] for r in rows]
        assert s["dprob"][j] == pytest.approx(np.mean(delta), abs=1e-15)
        assert s["dprob_lo"][j] <= s["dprob"][j] <= s["dprob_hi"][j]
        assert s["kl"][j] == pytest.approx(np.mean([d["kl"][r] for r in rows]))
        down = sum(d["target_dprob"][r][0] < 0 for r in rows)
        assert s["n_down"][j] == down and s["share_down"][j] == down / 4
        lo, hi = _wilson_by_hand(down, 4)
        assert (s["down_lo"][j], s["down_hi"][j]) == pytest.approx((lo, hi), abs=1e-12)
    assert summarise(a, seed=1) == summarise(a, seed=1)
    png = plot_steering(summarise(pa.concat_tables([a, b])), tmp_path / "steer.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _wilson_by_hand(x: int, n: int) -> tuple[float, float]:
    """The roots in p of (p̂ − p)² = z² p (1 − p) / n."""
    z, ph = 1.959963984540054, x / n
    a, b, c = 1 + z * z / n, -(2 * ph + z * z / n), ph * ph
    r = math.sqrt(b * b - 4 * a * c)
    return (-b - r) / (2 * a), (-b + r) / (2 * a)


@pytest.mark.parametrize("x,n", [(0, 5), (3, 10), (7, 7), (1, 1)])
def test_wilson_is_the_score_interval(x, n):
    assert wilson(x, n) == pytest.approx(_wilson_by_hand(x, n), abs=1e-12)


# -- generation ----------------------------------------------------------------------------------


def greedy_by_hand(model, ids: list[int], n: int, patches=()) -> list[int]:
    ids, eos, new = list(ids), model.hf.generation_config.eos_token_id, []
    for _ in range(n):
        logits, _ = model.run_with_cache(torch.tensor([ids]), [], patches=patches)
        nxt = int(logits[0, -1].argmax())
        if nxt == eos:
            break
        ids.append(nxt)
        new.append(nxt)
    return new


def test_generation_holds_the_intervention(llama, toks):
    ids = toks[0].tolist()
    plain = greedy_by_hand(llama, ids, 8)
    assert generate_ids(llama, ids, max_new_tokens=8) == plain
    assert generate_ids(llama, ids, steer=(UNITS, 1.0), max_new_tokens=8) == plain
    # the whole-site zeroing of layer 1's neurons, held on the generated tokens too
    zero = [Patch("blocks.1.mlp.hook_post", 0.0, "scale")]
    want = greedy_by_hand(llama, ids, 8, zero)
    assert generate_ids(llama, ids, steer=zero, max_new_tokens=8) == want
    assert want != plain
    assert generate_ids(llama, ids, max_new_tokens=0) == []
    s1 = generate_ids(llama, ids, max_new_tokens=8, temperature=1.5, seed=1)
    assert s1 == generate_ids(llama, ids, max_new_tokens=8, temperature=1.5, seed=1)
    assert s1 != generate_ids(llama, ids, max_new_tokens=8, temperature=1.5, seed=2)


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m, t: steering_patches(m, [(3, 0)], 0.0), "layer 3 is out of range"),
        (lambda m, t: steering_patches(m, [(0, 48)], 0.0), "neuron 48 is out of range"),
        (lambda m, t: steering_patches(m, ["neuron:5:*:1"], 0.0), "layer 5 is out of range"),
        (lambda m, t: steering_patches(m, ["head:0:*:4:k"], 0.0), "head 4 is out of range"),
        (lambda m, t: steering_patches(m, ["neuron:x"], 0.0), "bad node id"),
        (lambda m, t: steering_patches(m, [(-1, 2)], 0.0), "non-negative"),
        (lambda m, t: steering_patches(m, [(0, 2.5)], 0.0), "must be an integer"),
        (lambda m, t: steering_patches(m, [], 0.0), "no units"),
        (lambda m, t: steering_patches(m, [1.5], 0.0), "bad unit"),
        (lambda m, t: steering_patches(m, [(0, 1)], math.nan), "finite number"),
        (
            lambda m, t: steering_patches(m, [Patch("blocks.0.mlp.hook_post", 0.0)], 0.0),
            "op 'scale'",
        ),
        (
            lambda m, t: steering_patches(
                m, [Patch("blocks.0.mlp.hook_post", 1.0, "scale", batch=[0])], 0.0
            ),
            "drop batch=",
        ),
        (lambda m, t: steer(m, t, UNITS, scale=[]), "no steering factors"),
        (lambda m, t: steer(m, [], UNITS), "no prompts"),
        (lambda m, t: steer(m, t, UNITS, k=0), "k must be"),
        (lambda m, t: steer(m, t, UNITS, targets=[[1]]), "1 target lists for 4 prompts"),
        (lambda m, t: steer(m, t, UNITS, targets=[[1], [], [2], [3]]), "target list is empty"),
        (lambda m, t: steer(m, t, UNITS, targets=[[1], [99], [2], [3]]), "outside the vocab"),
        (lambda m, t: steer(m, [[1, 99]], UNITS), "outside the vocabulary"),
        (lambda m, t: steer(m, ["hello"], UNITS), "has no tokenizer"),
        (lambda m, t: steer(m, t, UNITS, batch_size=0), "batch_size"),
        (lambda m, t: generate_ids(m, t[0], max_new_tokens=-1), "max_new_tokens"),
        (lambda m, t: generate_ids(m, t[0], temperature=-1.0), "temperature"),
        (lambda m, t: generate_ids(m, t[0], steer=[1, 2]), "steer= takes"),
        (lambda m, t: generate(m, t[0]), "has no tokenizer"),
        (lambda m, t: summarise(pa.table({"x": [1]})), "not a steering table"),
        (lambda m, t: summarise(steer(m, t, UNITS), n_boot=0), "n_boot"),
        (lambda m, t: plot_steering(pa.table({"x": [1]}), "x.png"), "not a steering summary"),
    ],
)
def test_bad_inputs_are_one_line_errors(llama, toks, call, match):
    with pytest.raises(AdagError, match=match) as e:
        call(llama, toks)
    assert "\n" not in str(e.value)


# -- SmolLM2 -------------------------------------------------------------------------------------

PROMPT = "The capital of France is"


def test_smollm2_generation_matches_hf_greedy(smollm2):
    ids = smollm2.to_tokens(PROMPT)
    with torch.no_grad():
        hf = smollm2.hf.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
    plain = generate_ids(smollm2, PROMPT, max_new_tokens=8)
    assert plain == hf.tolist() == greedy_by_hand(smollm2, ids[0].tolist(), 8)
    text = generate(smollm2, PROMPT, steer=([(5, 10), (7, 100, -1)], 1.0), max_new_tokens=8)
    assert text == smollm2.tokenizer.decode(plain)
    assert text.startswith(" Paris")
    zeroed = [Patch(f"blocks.{layer}.mlp.hook_post", 1.0, "scale") for layer in range(3)]
    assert generate(smollm2, PROMPT, steer=(zeroed, 0.0), max_new_tokens=8) != text


def test_smollm2_steer_texts(smollm2):
    prompts = [PROMPT, PromptSpec("The capital of Italy is"), PromptSpec("Capital of Spain?", "A:")]
    t = steer(smollm2, prompts, [(5, 10), "neuron:6:*:20"], scale=(0.0, 1.0), k=3).to_pydict()
    assert t["text"][::2] == [PROMPT, "The capital of Italy is", "Capital of Spain? A:"]
    assert t["top_tokens_base"][0][0] == " Paris" and t["top_tokens_base"][2][0] == " Rome"
    assert t["kl"][1::2] == [0.0] * 3 and all(v > 0 for v in t["kl"][::2])
