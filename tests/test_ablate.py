"""Zero, mean and resample ablation and the faithfulness curve against brute force: full forwards
with the node values set by hand, in float64 on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adag.errors import AdagError
from adag.models.model import Model
from adag.models.sites import Patch
from adag.patching import exhaustive, node_set
from adag.patching.ablate import AblationValues, ablate, default_grid, faithfulness
from adag.patching.node_sets import Group, NodeSet
from adag.patching.patch import PairPatcher
from adag.tasks.pairs import PromptPair, TokenizedPair, make_metric

from .conftest import VOCAB, tiny_model

A_TOK, B_TOK = 3, 11
T = 7
SHARED = 2
"""Every clean prompt starts with the same SHARED tokens."""
PREFIX = 4
"""Each noise prompt shares its clean prompt's first PREFIX tokens (its first differing token)."""


def logit_diff(logits: torch.Tensor, pair: TokenizedPair) -> torch.Tensor:
    return logits[:, -1, A_TOK] - logits[:, -1, B_TOK]


def prefix_pairs(n: int, t: int = T, seed: int = 0) -> list[TokenizedPair]:
    """Pairs whose clean and noise prompts agree on their first PREFIX tokens, and whose clean
    prompts agree on their first SHARED tokens."""
    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(0, VOCAB, (1, SHARED), generator=gen)
    out = []
    for _ in range(n):
        c = torch.cat([head, torch.randint(0, VOCAB, (1, t - SHARED), generator=gen)], 1)
        z = c.clone()
        z[:, PREFIX:] = torch.randint(0, VOCAB, (1, t - PREFIX), generator=gen)
        assert (z[0, PREFIX] != c[0, PREFIX]).item()  # true for these seeds
        out.append(TokenizedPair(PromptPair("c", "n", "a", "b"), c, z, A_TOK, B_TOK))
    return out


def mixed_groups(m: Model, t: int = T) -> list[Group]:
    """Heads per position (z, k) and summed (q), neurons summed and per position, sublayers per
    position and summed."""
    return [
        Group("head", 1, "z", True, (m.n_heads, t)),
        Group("head", 0, "k", True, (m.n_kv_heads, t)),
        Group("head", 2, "q", False, (m.n_heads,)),
        Group("neuron", 0, None, False, (m.d_mlp,)),
        Group("neuron", 2, None, True, (t, m.d_mlp)),
        Group("attn", 1, None, True, (t,)),
        Group("mlp", 0, None, False, (1,)),
    ]


def hand_patch(grp: Group, local: int, val: torch.Tensor | None) -> Patch:
    """One node set to its value in ``val`` (the site on another run, ``1 ...``; None: 0)."""

    def v(*idx: object) -> torch.Tensor | float:
        return 0.0 if val is None else val[(0, *idx)]

    if grp.kind == "head":
        if grp.per_pos:
            h, p = divmod(local, grp.shape[1])
            return Patch(grp.site, v(h, p), head=h, pos=p)
        return Patch(grp.site, v(local), head=local)
    if grp.kind == "neuron":
        if grp.per_pos:
            p, i = divmod(local, grp.shape[1])
            return Patch(grp.site, v(p, i), pos=p, index=i)
        return Patch(grp.site, v(slice(None), local), index=local)
    if grp.per_pos:
        return Patch(grp.site, v(local), pos=local)
    return Patch(grp.site, 0.0 if val is None else val)


def locate(ns: NodeSet, i: int) -> tuple[Group, int]:
    g = int(np.searchsorted(ns.offsets, i, side="right") - 1)
    return ns.groups[g], i - int(ns.offsets[g])


def metric_with(m: Model, tp: TokenizedPair, patches: list[Patch]) -> float:
    logits, _ = m.run_with_cache(tp.clean, [], patches=patches)
    return float(logit_diff(logits, tp)[0])


def hand_values(
    m: Model, ns: NodeSet, prompts: list[torch.Tensor], kind: str
) -> dict[str, torch.Tensor] | None:
    """The site values of one run (a one-prompt list) or their mean over the prompts, by hand;
    None for zero."""
    if kind == "zero":
        return None
    caches = [m.run_with_cache(p, ns.sites)[1] for p in prompts]
    return {s: torch.stack([c[s] for c in caches]).mean(0) for s in ns.sites}


def node_sample(ns: NodeSet, rng: np.random.Generator, k: int) -> np.ndarray:
    """Every node at the first PREFIX positions of two groups, every summed node of the small
    groups, and ``k`` random others."""
    _, pos = ns.layer_pos(np.arange(len(ns)))
    early = np.nonzero((pos >= 0) & (pos < PREFIX))[0]
    early = np.concatenate([early[:4], early[-4:]])
    summed = np.nonzero(pos < 0)[0][:3]
    rest = rng.choice(len(ns), size=k, replace=False)
    return np.unique(np.concatenate([early, summed, rest, [len(ns) - 1]]))


def test_single_node_ablations_equal_brute_force(tiny: Model):
    pairs = prefix_pairs(3, seed=1)
    groups = mixed_groups(tiny)
    ns = node_set(tiny, groups, T)
    n = len(ns)
    rng = np.random.default_rng(0)
    clean_prompts = [tp.clean for tp in pairs]
    _, pos = ns.layer_pos(np.arange(n))
    for kind in ("zero", "mean", "resample"):
        out = ablate(
            tiny, pairs, nodes=groups, metric=logit_diff, kind=kind, n_resamples=2, batch_size=48
        )
        assert out.method == f"ablate_{kind}" and out.nodes == ns.ids()
        cost = 0.0
        for j, tp in enumerate(pairs):
            base = metric_with(tiny, tp, [])
            if kind == "resample":
                draws = out.meta["resample_prompts"][j]
                assert len(draws) == 2 and j not in draws
                vals = [hand_values(tiny, ns, [clean_prompts[d]], kind) for d in draws]
            else:
                vals = [hand_values(tiny, ns, clean_prompts, kind)]
            for i in node_sample(ns, rng, 12):
                grp, local = locate(ns, i)
                truth = np.mean(
                    [
                        metric_with(
                            tiny, tp, [hand_patch(grp, local, None if v is None else v[grp.site])]
                        )
                        - base
                        for v in vals
                    ]
                )
                assert out.per_pair[j, i] == pytest.approx(truth, abs=1e-10), (kind, ns.ids()[i])
            # forwards: the clean run, a row per node (per draw), the draws' runs
            if kind == "resample":
                # a drawn clean prompt shares its first tokens (at least SHARED): nodes there
                # are skipped
                cost += 1 + 2
                for d in out.meta["resample_prompts"][j]:
                    fd = int((clean_prompts[d] != tp.clean)[0].nonzero()[0])
                    assert fd >= SHARED
                    cost += int(((pos < 0) | (pos >= fd)).sum())
            else:
                cost += 1 + n
        # nodes before the pairs' first differing token change the metric too (no shortcut)
        early = (pos >= 0) & (pos < PREFIX)
        if kind != "resample":
            assert np.abs(out.per_pair[:, early]).max() > 1e-3
            cost += 3 if kind == "mean" else 0  # the set's runs, once
        else:
            assert np.all(out.per_pair[:, (pos >= 0) & (pos < SHARED)] == 0)
            assert np.abs(out.per_pair[:, early & (pos >= SHARED)]).max() > 1e-3
        assert out.cost == cost


def test_prefix_shortcut_is_off_for_values_that_are_not_the_pairs_run():
    """With the pair's first differing token as the shortcut, zero-ablating nodes before it would
    read 0: PairPatcher given values starts at position 0, and equals brute force there."""
    m = tiny_model("qwen2")
    tp = prefix_pairs(1, seed=3)[0]
    ns = node_set(m, "heads", T)
    met = make_metric(logit_diff)
    zeros = {s: torch.zeros_like(v) for s, v in m.run_with_cache(tp.clean, ns.sites)[1].items()}
    pp = PairPatcher(m, tp, ns, met, source=zeros)
    assert pp.first_diff == 0 and pp.cost == 1 and np.isnan(pp.noise_metric)
    _, pos = ns.layer_pos(np.arange(len(ns)))
    early = np.nonzero(pos < PREFIX)[0]
    eff = pp.effects([np.array([i]) for i in early])
    assert pp.cost == 1 + len(early)
    base = metric_with(m, tp, [])
    for i, e in zip(early, eff, strict=True):
        grp, local = locate(ns, int(i))
        assert e == pytest.approx(
            metric_with(m, tp, [hand_patch(grp, local, None)]) - base, abs=1e-10
        )
    assert np.abs(eff).max() > 1e-3
    # the shortcut, wrongly kept, would skip them all
    wrong = PairPatcher(m, tp, ns, met, source=zeros, first_diff=PREFIX)
    assert np.all(wrong.effects([np.array([i]) for i in early]) == 0)
    # the pair's own noise run: they are unchanged, and skipped
    noise = ablate(m, [tp], nodes="heads", metric=logit_diff, kind="noise")
    assert np.all(noise.per_pair[0, early] == 0)
    assert noise.cost == 2 + int((pos >= PREFIX).sum())


def test_noise_ablation_is_exhaustive_patching():
    m = tiny_model("gpt2")
    pairs = prefix_pairs(2, seed=4)
    a = ablate(m, pairs, nodes="heads,neurons", metric=logit_diff, kind="noise")
    e = exhaustive(m, pairs, nodes="heads,neurons", metric=logit_diff)
    assert a.nodes == e.nodes and a.cost == e.cost
    np.testing.assert_array_equal(a.per_pair, e.per_pair)


def test_mean_over_prompts_of_other_lengths():
    """Same-length prompts when the set has them; else per position over those reaching it."""
    m = tiny_model("llama")
    gen = torch.Generator().manual_seed(5)
    p5, p7a, p7b, p9 = (torch.randint(0, VOCAB, (1, k), generator=gen) for k in (5, 7, 7, 9))
    site = "blocks.1.hook_attn_out"
    runs = {
        k: m.run_with_cache(p, [site])[1][site]
        for k, p in zip("5ab9", (p5, p7a, p7b, p9), strict=True)
    }
    base = torch.zeros(1, 7, dtype=torch.long)

    vals = AblationValues(m, "mean", [site], prompts=[p5, p7a, p9, p7b])
    got = vals.for_base(base)[0]
    assert got.first_diff == 0 and got.prompt is None and vals.cost == 4
    torch.testing.assert_close(got.values[site], (runs["a"] + runs["b"]) / 2, rtol=0, atol=1e-12)

    vals = AblationValues(m, "mean", [site], prompts=[p5, p9])
    got = vals.for_base(base)[0].values[site]
    torch.testing.assert_close(got[:, :5], (runs["5"] + runs["9"][:, :5]) / 2, rtol=0, atol=1e-12)
    torch.testing.assert_close(got[:, 5:], runs["9"][:, 5:7], rtol=0, atol=1e-12)
    assert vals.for_base(torch.zeros(1, 3, dtype=torch.long))[0].values[site].shape[1] == 3
    assert vals.cost == 2  # the set runs once
    with pytest.raises(AdagError, match="no prompt of the set reaches"):
        vals.for_base(torch.zeros(1, 10, dtype=torch.long))

    with pytest.raises(AdagError, match="no other prompt of 7 tokens"):
        AblationValues(m, "resample", [site], prompts=[p5, p9]).for_base(base)
    with pytest.raises(AdagError, match="unknown ablation"):
        ablate(m, prefix_pairs(1), nodes="heads", metric=logit_diff, kind="shuffle")


@pytest.mark.parametrize("arch", ["llama", "gemma2", "olmo2", "gpt2"])
def test_mask_rows_equal_index_rows(arch):
    """PairPatcher.mask_effects (one masked replacement per site) equals effects() on the same
    node sets as index lists: pair runs (prefix shortcut on), zero values (off), full forwards
    (base patches)."""
    m = tiny_model(arch)
    tp = prefix_pairs(1, seed=6)[0]
    ns = node_set(m, "all", T)
    met = make_metric(logit_diff)
    rng = np.random.default_rng(1)
    masks = rng.random((9, len(ns))) < np.array([0, 1e-3, 0.01, 0.1, 0.5, 0.9, 0.99, 1, 0])[:, None]
    masks[-1, len(ns) // 2] = True
    rows = [np.nonzero(r)[0] for r in masks]
    zeros = {s: torch.zeros_like(v) for s, v in m.run_with_cache(tp.clean, ns.sites)[1].items()}
    freeze = [Patch("blocks.0.hook_mlp_out", 1.0, op="scale")]
    for kw in ({}, {"source": zeros}, {"source": zeros, "base_patches": freeze}):
        a = PairPatcher(m, tp, ns, met, **kw)  # type: ignore[arg-type]
        b = PairPatcher(m, tp, ns, met, **kw)  # type: ignore[arg-type]
        np.testing.assert_allclose(
            a.mask_effects(masks, batch_size=4), b.effects(rows, batch_size=4), rtol=0, atol=1e-10
        )
        assert a.cost == b.cost


def complement_by_hand(
    m: Model,
    tp: TokenizedPair,
    ns: NodeSet,
    ablated: np.ndarray,
    val: dict[str, torch.Tensor] | None,
) -> float:
    patches = []
    for i in np.nonzero(ablated)[0]:
        grp, local = locate(ns, int(i))
        patches.append(hand_patch(grp, local, None if val is None else val[grp.site]))
    return metric_with(m, tp, patches)


def test_faithfulness_equals_brute_force(tiny: Model):
    pairs = prefix_pairs(2, seed=7)
    nodes = "heads,neurons,sublayers"
    ns = node_set(tiny, nodes, T)
    n = len(ns)
    scores = np.random.default_rng(2).normal(size=n)
    grid = [0, 1, 5, 40, n - 3, n]
    f = faithfulness(tiny, pairs, scores, nodes=nodes, metric=logit_diff, kind="mean", ns=grid)
    order = np.argsort(-np.abs(scores), kind="stable")
    assert f.order == [ns.ids()[i] for i in order] and f.n_nodes == n
    mean = hand_values(tiny, ns, [tp.clean for tp in pairs], "mean")
    for j, tp in enumerate(pairs):
        clean = metric_with(tiny, tp, [])
        assert f.clean[j] == pytest.approx(clean, abs=1e-12)
        everything = complement_by_hand(tiny, tp, ns, np.ones(n, bool), mean)
        assert f.ablated[j] == pytest.approx(everything, abs=1e-10)
        for k, top in enumerate(grid):
            outside = np.ones(n, bool)
            outside[order[:top]] = False
            truth = complement_by_hand(tiny, tp, ns, outside, mean)
            assert f.per_pair[j, k] == pytest.approx(truth, abs=1e-10), top
    assert f.normalised[0] == 0 and f.normalised[-1] == pytest.approx(1, abs=1e-12)
    assert abs(f.clean.mean() - f.ablated.mean()) > 1e-3
    # forwards: per pair the clean run and a row per n below n_nodes; the set's 2 runs
    assert f.cost == 2 * (1 + len(grid) - 1) + 2


def test_faithfulness_kinds_rankings_and_table(tmp_path):
    m = tiny_model("qwen3")
    pairs = prefix_pairs(2, seed=8)
    ns = node_set(m, "heads", T)
    n = len(ns)
    truth = exhaustive(m, pairs, nodes="heads", metric=logit_diff)
    order = truth.order()
    grid = [0, 3, 20, n]
    outside = np.ones((len(grid), n), bool)
    for k, top in enumerate(grid):
        outside[k, order[:top]] = False
    # a NodeScores, the same order as ids, and its scores rank alike
    f = faithfulness(m, pairs, truth, nodes="heads", metric=logit_diff, kind="noise", ns=grid)
    g = faithfulness(
        m, pairs, [truth.nodes[i] for i in order[:20]], nodes="heads", metric=logit_diff,
        kind="noise", ns=grid,
    )  # fmt: skip
    h = faithfulness(
        m, pairs, truth.estimate, nodes="heads", metric=logit_diff, kind="noise", ns=grid
    )
    np.testing.assert_array_equal(f.per_pair, g.per_pair)
    np.testing.assert_array_equal(f.per_pair, h.per_pair)
    for j, tp in enumerate(pairs):
        noise = m.run_with_cache(tp.noise, ns.sites)[1]
        for k in range(len(grid)):
            by_hand = complement_by_hand(m, tp, ns, outside[k], noise)
            assert f.per_pair[j, k] == pytest.approx(by_hand, abs=1e-10)
    assert f.cost == 2 * (2 + len(grid) - 1)  # clean and noise runs, a row per n < n_nodes

    r = faithfulness(
        m, pairs, truth, nodes="heads", metric=logit_diff, kind="resample", ns=grid,
        n_resamples=2, seed=3,
    )  # fmt: skip
    for j, tp in enumerate(pairs):
        draws = r.meta["resample_prompts"][j]
        assert len(draws) == 2
        for k in range(len(grid)):
            by_hand = np.mean(
                [
                    complement_by_hand(
                        m, tp, ns, outside[k], m.run_with_cache(pairs[d].clean, ns.sites)[1]
                    )
                    for d in draws
                ]
            )
            assert r.per_pair[j, k] == pytest.approx(by_hand, abs=1e-10)
    assert r.normalised[0] == 0 and r.normalised[-1] == 1

    t = f.save(tmp_path / "faith.parquet")
    import pyarrow.parquet as pq

    table = pq.read_table(t)
    assert table.column_names == ["n", "metric", "normalised"]
    assert table.column("n").to_pylist() == grid
    assert table.schema.metadata[b"kind"] == b"noise"
    with pytest.raises(AdagError, match="not in the node set"):
        faithfulness(m, pairs, ["head:9:0:0:z"], nodes="heads", metric=logit_diff)
    with pytest.raises(AdagError, match="ns must be in"):
        faithfulness(m, pairs, truth, nodes="heads", metric=logit_diff, ns=[n + 1])


def test_default_grid_and_prompts_of_other_lengths():
    g = default_grid(1000)
    assert g[0] == 0 and g[1] == 1 and g[-1] == 1000 and np.all(np.diff(g) > 0) and len(g) <= 22
    assert default_grid(3).tolist() == [0, 1, 2, 3]
    # two lengths: each pair's nodes and means are its own length's; the ends are still 0 and 1
    m = tiny_model("gemma3_text")
    pairs = [prefix_pairs(1, t=6, seed=9)[0], prefix_pairs(1, t=7, seed=10)[0]]
    scores = np.arange(m.n_layers * 2 * 7, dtype=np.float64)
    f = faithfulness(m, pairs, scores, nodes="sublayers", metric=logit_diff, kind="zero")
    assert f.n_nodes == m.n_layers * 2 * 7
    assert f.normalised[0] == 0 and f.normalised[-1] == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(f.per_pair[:, -1], f.clean, rtol=0, atol=1e-12)
