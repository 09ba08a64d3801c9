"""Adaptive verification (``adag.patching.localize``): the stopping rule and cost accounting
checked by hand on tiny synthetic oracles, recall of planted top nodes on additive, sparse and
cancelling oracles, the budget, and ``localize`` end to end on tiny float64 models against
exhaustive patching."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.patching import exhaustive, node_set
from adag.patching.atp import atp, atp_star
from adag.patching.baselines import blocks, rank_by_magnitude
from adag.patching.localize import ESTIMATORS, atp_linear, localize, verify
from adag.patching.oracle import AdditiveOracle, CancellationOracle, sparse_effects
from adag.tasks.pairs import TokenizedPair

from .conftest import tiny_model
from .test_patching import logit_diff, random_pairs


def top(effects: np.ndarray, k: int) -> set[int]:
    return {int(i) for i in rank_by_magnitude(effects)[:k]}


# ----------------------------------------------------------------------------------------------
# The stopping rule and cost accounting, by hand.

# 12 nodes; node 11 (effect 1.0) is ranked last by both lists, 10 next to last.
HAND = np.array([5.0, 0.1, 4.0, 0.2, 0.3, 3.0, 0.1, 0.05, 2.5, 0.01, 0.02, 1.0])
LIST_A = np.array([0, 1, 3, 4, 6, 7, 9, 2, 5, 8, 10, 11])
LIST_B = np.array([2, 0, 5, 8, 7, 9, 6, 1, 3, 4, 10, 11])


def test_stopping_rule_by_hand_one_check_per_round():
    """k=2, window=3, batch=1, 2 forwards per check. Round by round (τ = 2nd largest |effect|):
    A:0 (5; τ=0) · B:2 (4; τ=4) · A:1 · B skips 0 (checked by A), takes 5 · A:3 · B:8 · A:4 —
    A's last three picks 1, 3, 4 (0.1, 0.2, 0.3) are all < τ/2 = 2: A stops ("window") · B:7 ·
    B:9 · B:6 — B's last three 7, 9, 6 are < 2: B stops. 10 checks, 20 forwards."""
    oracle = AdditiveOracle(HAND, n_pairs=2)
    v = verify(oracle, {"A": LIST_A, "B": LIST_B}, k=2, window=3, batch=1)
    assert v.sequence.tolist() == [0, 2, 1, 5, 3, 8, 4, 7, 9, 6]
    assert v.picks["A"].nodes.tolist() == [0, 1, 3, 4]
    assert v.picks["B"].nodes.tolist() == [2, 5, 8, 7, 9, 6]
    assert v.stopped == {"A": "window", "B": "window"}
    assert v.picks["A"].stopped == "window"
    np.testing.assert_array_equal(v.picks["A"].effects, HAND[[0, 1, 3, 4]])
    assert v.picks["A"].costs.tolist() == [2.0, 6.0, 10.0, 14.0]
    assert v.picks["B"].costs.tolist() == [4.0, 8.0, 12.0, 16.0, 18.0, 20.0]
    assert v.cum_cost.tolist() == [2.0 * i for i in range(1, 11)]
    assert v.cost == oracle.cost == 20.0
    assert v.tau == 4.0 and v.n_checked == 10
    assert v.checked.tolist() == [True] * 10 + [False, False]
    np.testing.assert_array_equal(v.exact[:10], HAND[:10])
    assert np.isnan(v.exact[10:]).all()
    # checked by |exact| (0.1 tie: smaller index first), then unchecked by best rank (10 before 11)
    assert v.order.tolist() == [0, 2, 5, 8, 4, 3, 1, 6, 7, 9, 10, 11]
    # with estimates, the unchecked ones are ordered by |estimate| instead
    est = np.zeros(12)
    est[11] = 0.5
    v2 = verify(
        AdditiveOracle(HAND, n_pairs=2),
        {"A": LIST_A, "B": LIST_B},
        k=2,
        window=3,
        batch=1,
        estimates=est,
    )
    assert v2.order.tolist()[-2:] == [11, 10]
    # as a MethodResult for the cost curves: check order, then the rest at 2 forwards each
    mr = v.method_result(cost=100.0)
    assert mr.order.tolist() == [*v.sequence.tolist(), 10, 11]
    assert mr.cum_cost is not None
    assert mr.cum_cost.tolist() == [100.0 + 2.0 * i for i in range(1, 13)]


def test_stopping_rule_by_hand_batched():
    """batch=3: the round-robin turn carries over between rounds and stops are only tested at the
    end of a round. Rounds: [A:0, B:2, A:1] · [B:5, A:3, B:8] · [A:4, B:7, A:6] → A stops
    (3, 4, 6 < τ/2 = 2) · [B:9, B:10, B:11] → B stops (0.01, 0.02, 1.0 < 2)."""
    oracle = AdditiveOracle(HAND, n_pairs=2)
    v = verify(oracle, {"A": LIST_A, "B": LIST_B}, k=2, window=3, batch=3)
    assert v.sequence.tolist() == [0, 2, 1, 5, 3, 8, 4, 7, 6, 9, 10, 11]
    assert v.picks["A"].nodes.tolist() == [0, 1, 3, 4, 6]
    assert v.picks["B"].nodes.tolist() == [2, 5, 8, 7, 9, 10, 11]
    assert v.stopped == {"A": "window", "B": "window"}
    assert v.cum_cost.tolist() == [2.0 * i for i in range(1, 13)]
    assert v.cost == oracle.cost == 24.0
    assert v.checked.all()


def test_exhausted_list_and_partial_rankings():
    """A list whose nodes are all checked (here by the other list) counts as stopped."""
    oracle = AdditiveOracle(HAND)
    v = verify(oracle, {"short": np.array([2, 0]), "long": LIST_A}, k=2, window=3, batch=1)
    assert v.stopped == {"short": "exhausted", "long": "window"}
    assert v.picks["short"].nodes.tolist() == [2]  # 0 was taken by "long" first
    assert v.sequence.tolist()[:3] == [2, 0, 1]
    # τ is 0 until k nodes are checked: nothing stops by the window before that
    v = verify(AdditiveOracle(np.zeros(6)), {"a": np.arange(6)}, k=2, window=1, batch=1)
    assert v.stopped == {"a": "exhausted"} and v.n_checked == 6


def test_budget_is_never_exceeded_and_the_last_round_is_trimmed():
    """3 forwards per check, batch 4, budget 29 (9 checks): rounds [A:0, B:2, A:1, B:5] and
    [A:3, B:8, A:4, B:7] (A stops: 1, 3, 4 < τ/2 = 2), then a round trimmed to 1 check (B:9),
    then nothing is affordable: B stops for the budget."""
    oracle = AdditiveOracle(HAND, n_pairs=3)
    v = verify(oracle, {"A": LIST_A, "B": LIST_B}, k=2, window=3, batch=4, budget=29)
    assert v.sequence.tolist() == [0, 2, 1, 5, 3, 8, 4, 7, 9]
    assert v.cost == oracle.cost == 27.0
    assert v.stopped == {"A": "window", "B": "budget"}
    for batch in (1, 4, 32):
        full = verify(
            AdditiveOracle(HAND, n_pairs=3), {"A": LIST_A, "B": LIST_B}, k=2, window=3, batch=batch
        )
        for budget in [0.0, 2.9, 3.0, 5.0, 17.5, 30.0, 1e9]:
            o = AdditiveOracle(HAND, n_pairs=3)
            v = verify(o, {"A": LIST_A, "B": LIST_B}, k=2, window=3, batch=batch, budget=budget)
            assert o.cost == v.cost <= budget
            assert v.cost == min(3.0 * (budget // 3), full.cost)
            assert np.all(v.cum_cost <= budget)
            if "budget" in v.stopped.values():  # only when another check was unaffordable
                assert budget - v.cost < 3
    with pytest.raises(AdagError, match="budget"):
        verify(AdditiveOracle(HAND), {"A": LIST_A}, budget=-1)
    with pytest.raises(AdagError, match="outside"):
        verify(AdditiveOracle(HAND), {"A": np.array([0, 12])})


# ----------------------------------------------------------------------------------------------
# Recall of planted top nodes.


def test_finds_top_k_on_additive_oracle_with_noisy_and_adversarial_lists():
    rng = np.random.default_rng(0)
    n, k = 500, 20
    eff = rng.laplace(scale=0.05, size=n)
    big = rng.choice(n, k, replace=False)
    eff[big] = rng.choice([-1.0, 1.0], k) * rng.uniform(1.0, 5.0, k)
    truth = top(eff, k)
    noisy = eff + rng.normal(scale=0.3, size=n)
    # the adversarial list knows the truth but puts the 3 largest nodes last
    hidden = rank_by_magnitude(eff)[:3]
    adv = np.concatenate([np.setdiff1d(rank_by_magnitude(eff), hidden, True), hidden])
    budget = 400.0
    oracle = AdditiveOracle(eff, noise_scale=0.0)
    v = verify(
        oracle,
        {"adversarial": adv, "noisy": rank_by_magnitude(noisy)},
        k=k,
        window=50,
        budget=budget,
    )
    assert truth <= set(np.flatnonzero(v.checked).tolist())
    assert set(v.order[:k].tolist()) == truth
    assert v.cost < budget and v.cost == v.n_checked
    assert set(v.stopped.values()) == {"window"}
    # the adversarial list alone stops before reaching its hidden nodes
    alone = verify(AdditiveOracle(eff), {"adversarial": adv}, k=k, window=50)
    assert not alone.checked[hidden].any() and alone.stopped == {"adversarial": "window"}


def test_finds_top_k_on_sparse_oracle():
    rng = np.random.default_rng(1)
    n, k = 1000, 10
    eff = sparse_effects(n, k, seed=3)
    assert np.count_nonzero(eff) == k
    noisy = eff + rng.normal(scale=0.25, size=n)
    budget = 300.0
    oracle = AdditiveOracle(eff, n_pairs=1)
    v = verify(
        oracle,
        {"noisy": rank_by_magnitude(noisy), "random": rng.permutation(n)},
        k=k,
        window=50,
        budget=budget,
    )
    assert top(eff, k) <= set(np.flatnonzero(v.checked).tolist())
    assert v.cost < budget and v.stopped == {"noisy": "window", "random": "window"}
    # asking for more nodes than have any effect: τ stays 0, nothing stops by the window, and
    # the budget ends the search
    more = verify(AdditiveOracle(eff), {"noisy": rank_by_magnitude(noisy)}, k=k + 1, budget=200)
    assert more.tau == 0.0 and more.stopped == {"noisy": "budget"} and more.cost == 200


def test_finds_cancelling_pairs_that_joint_subset_estimates_miss():
    """Pairs of neighbouring nodes with large single effects that cancel when patched together:
    the blocks baseline (patching neighbours jointly) ranks them low; checking single nodes of a
    single-node estimate finds them all."""
    rng = np.random.default_rng(2)
    n = 200
    eff = rng.laplace(scale=0.02, size=n)
    pairs = [(8 * b + 2, 8 * b + 5) for b in (3, 9, 14, 20)]
    for i, j in pairs:
        eff[i] = rng.uniform(2.0, 4.0)
        eff[j] = -rng.uniform(2.0, 4.0)
    singles = np.array([8 * b + 1 for b in (1, 6, 11, 17)])
    eff[singles] = rng.uniform(1.0, 1.5, 4)
    k = 12
    planted = {x for p in pairs for x in p}
    truth = top(eff, k)
    assert truth == planted | set(singles.tolist())
    oracle = CancellationOracle(eff, pairs, n_pairs=2)
    both = oracle.joint([np.array(p) for p in pairs])
    np.testing.assert_allclose(both, 0.0, atol=1e-12)
    np.testing.assert_allclose(oracle.single(np.array(pairs[0])), eff[list(pairs[0])])
    joint_list = blocks(oracle, block_size=8)
    assert not planted & set(joint_list.order[:32].tolist())  # the joint estimate misses them
    single_est = eff + rng.normal(scale=0.3, size=n)
    budget = 2.0 * 150
    cost0 = oracle.cost
    v = verify(
        oracle,
        {"blocks": joint_list.order, "single": rank_by_magnitude(single_est)},
        k=k,
        window=40,
        budget=budget,
    )
    assert v.cost == oracle.cost - cost0 < budget
    assert truth <= set(np.flatnonzero(v.checked).tolist())
    assert planted <= set(v.picks["single"].nodes.tolist())
    np.testing.assert_allclose(v.exact[v.checked], eff[v.checked])
    assert set(v.order[:k].tolist()) == truth


# ----------------------------------------------------------------------------------------------
# On a model.


def test_localize_end_to_end(tiny: Model, tmp_path):
    import pyarrow.parquet as pq

    pairs = random_pairs(2, seed=4)
    names = ("atp", "atp_star", "atp_linear")
    out = localize(
        tiny,
        pairs,
        "heads",
        metric=logit_diff,
        k=4,
        window=8,
        estimators=names,
        certify=True,
        certify_subsets=40,
        batch_size=16,
    )
    truth = exhaustive(tiny, pairs, nodes="heads", metric=logit_diff)
    n = len(truth.nodes)
    assert out.method == "localize" and out.nodes == truth.nodes
    assert out.per_pair.shape == (1, n)
    checked = out.columns["checked"] == 1.0
    assert 0 < checked.sum() <= n
    np.testing.assert_allclose(
        out.columns["exact"][checked], truth.estimate[checked], rtol=1e-10, atol=1e-10
    )
    assert np.isnan(out.columns["exact"][~checked]).all()
    est_atp = atp(tiny, pairs, nodes="heads", metric=logit_diff)
    np.testing.assert_allclose(out.columns["atp"], est_atp.estimate, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        out.estimate, np.where(checked, truth.estimate, est_atp.estimate), rtol=1e-10, atol=1e-10
    )
    assert set(out.columns) == {"exact", "checked", *names}
    # cost = the estimators + the oracle's clean/noise runs + verification + certificate
    n_pairs, L = len(pairs), tiny.n_layers
    parts = out.meta["cost_parts"]
    assert parts["estimators"] == {
        "atp": n_pairs * 4.0,
        "atp_star": n_pairs * (2 + 2 * (1 + L)),
        "atp_linear": n_pairs * 4.0,
    }
    assert parts["oracle_setup"] == 2.0 * n_pairs
    assert parts["verification"] == n_pairs * checked.sum()
    assert 0 <= parts["certificate"] <= 40 * n_pairs
    assert out.cost == pytest.approx(
        sum(parts["estimators"].values())
        + parts["oracle_setup"]
        + parts["verification"]
        + parts["certificate"]
    )
    assert set(out.meta["stopped"]) == set(names)
    assert out.meta["n_checked"] == int(checked.sum())
    cert = out.meta["certificate"]
    assert cert["alpha"] == 0.05 and cert["bound"] >= 0
    # the metadata survives a parquet round trip
    path = out.save(tmp_path / "localize.parquet")
    md = pq.read_table(path).schema.metadata
    assert md[b"method"] == b"localize"
    assert json.loads(md[b"stopped"]) == out.meta["stopped"]
    assert json.loads(md[b"certificate"]) == cert
    assert json.loads(md[b"cost_parts"]) == parts
    assert json.loads(md[b"budget"]) is None
    t = pq.read_table(path)
    assert {"exact", "checked", *names} <= set(t.column_names)


def test_localize_denoising_and_budget():
    m = tiny_model("llama")
    pairs = random_pairs(2, seed=5)
    out = localize(
        m,
        pairs,
        metric=logit_diff,
        k=3,
        window=50,
        estimators=("atp",),
        budget=20.0,
        direction="denoising",
    )
    truth = exhaustive(m, pairs, nodes="heads", metric=logit_diff, direction="denoising")
    checked = out.columns["checked"] == 1.0
    np.testing.assert_allclose(out.columns["exact"][checked], truth.estimate[checked], atol=1e-10)
    assert out.meta["cost_parts"]["verification"] <= 20.0
    assert checked.sum() == 10 and out.meta["stopped"] == {"atp": "budget"}
    # the estimator ran on the swapped pairs: AtP's estimate of a denoising effect
    swapped = [TokenizedPair(p.pair, p.noise, p.clean, p.answer_id, p.foil_id) for p in pairs]
    ref = atp(m, swapped, nodes="heads", metric=logit_diff)
    np.testing.assert_allclose(out.columns["atp"], ref.estimate, atol=1e-12)


def test_unknown_estimator_lists_the_known_ones():
    with pytest.raises(AdagError, match="unknown estimator 'nope'; choose from atp, ") as e:
        localize(None, [], estimators=("atp", "nope"))  # type: ignore[arg-type]
    assert "\n" not in str(e.value)
    for name in ESTIMATORS:
        assert name in str(e.value)


def test_atp_linear_equals_hand_computation(tiny: Model):
    """One neuron (summed over positions) and one head: (a_noise − a_clean) · ∂m/∂a with the
    gradient taken by hand under ``linearize(mlp="relp")``; and, where the model has no final
    softcap, the same number from the linear replica (the affine map the linearised backward
    differentiates) patched at that node — an independent forward computation."""
    from adag.models.linear import linear_replica, replica_sites

    tp = random_pairs(1, seed=6)[0]
    ns = node_set(tiny, "heads,neurons", tp.n_pos)
    out = atp_linear(tiny, [tp], nodes="heads,neurons", metric=logit_diff)
    assert out.method == "atp_linear" and out.nodes == ns.ids()
    assert out.cost == 2 + 2.0
    i_neuron = out.nodes.index("neuron:0:*:5")
    i_head = out.nodes.index("head:1:3:2:z")
    for node, site in (
        (i_neuron, "blocks.0.mlp.hook_post"),
        (i_head, "blocks.1.attn.hook_z"),
    ):
        _, noise = tiny.run_with_cache(tp.noise, [site])
        with tiny.linearize(mlp="relp"), tiny.sites(read=[site], grad=[site]) as run:
            m = logit_diff(tiny(tp.clean), tp)[0]
            g = run.grads(m)[site][0]
        delta = noise[site][0] - run.cache[site][0]
        if site.endswith("hook_post"):
            by_hand = (delta[:, 5] * g[:, 5]).sum()  # neuron 5 at every position
        else:
            by_hand = (delta[2, 3] * g[2, 3]).sum()  # head 2 at position 3: (head, pos, d_head)
        assert out.estimate[node] == pytest.approx(float(by_hand), rel=1e-10, abs=1e-12)
        assert abs(float(by_hand)) > 1e-6
        if tiny.final_softcap is None:
            _, clean = tiny.run_with_cache(tp.clean, [site, *replica_sites(tiny)])
            _, src = tiny.run_with_cache(tp.noise, ns.sites)
            with torch.no_grad(), linear_replica(tiny, clean, mlp="relp"):
                base = logit_diff(tiny.run_with_cache(tp.clean, [])[0], tp)
                patched = logit_diff(
                    tiny.run_with_cache(tp.clean, [], patches=ns.patches([np.array([node])], src))[
                        0
                    ],
                    tp,
                )
            assert out.estimate[node] == pytest.approx(float(patched - base), rel=1e-8, abs=1e-10)
    # AtP itself differs (the plain backward is not the linearised one)
    plain = atp(tiny, [tp], nodes="heads,neurons", metric=logit_diff)
    assert not np.allclose(plain.estimate, out.estimate, rtol=1e-6, atol=1e-9)


def test_atp_star_is_registered_lazily():
    assert set(ESTIMATORS) >= {"atp", "atp_qk", "atp_star", "atp_ig", "atp_dqk", "atp_linear"}
    m = tiny_model("gpt2")
    pairs = random_pairs(1, seed=7)
    a = ESTIMATORS["atp_star"](m, pairs, nodes="heads", metric=logit_diff)
    b = atp_star(m, pairs, nodes="heads", metric=logit_diff)
    np.testing.assert_array_equal(a.estimate, b.estimate)
    q = ESTIMATORS["atp_qk"](m, pairs, nodes="qkv", metric=logit_diff)
    assert q.method == "atp_qk"
