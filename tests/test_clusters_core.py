"""The core of clustering (issue 10): units and their profiles on a real tiny graph, the multi-view
similarity against its definition (a direct double loop), the sparse and dense paths against each
other, spectral clustering recovering planted groups, the baselines and the diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.metrics import adjusted_rand_score

import adag.clusters.similarity as simmod
from adag.clusters.diagnostics import diagnostics
from adag.clusters.similarity import similarity, similarity_reference, similarity_with_stats
from adag.clusters.spectral import baseline_features, baseline_labels, spectral_labels
from adag.clusters.units import PromptUnits, parse_unit, prompt_units, unit_name
from adag.errors import AdagError
from adag.graphs.trace import trace
from adag.models.model import Model

# -- synthetic data ------------------------------------------------------------------------------


def _pu(units, inputs, outputs, pid="") -> PromptUnits:
    order = sorted(range(len(units)), key=lambda r: units[r])
    return PromptUnits(
        units=[units[r] for r in order],
        inputs=[np.asarray(inputs[r], dtype=np.float64) for r in order],
        outputs=np.asarray(outputs, dtype=np.float64).reshape(len(units), -1)[order],
        prompt_id=pid,
    )


def random_prompts(seed: int = 0, n_prompts: int = 10) -> list[PromptUnits]:
    """Random prompts over a pool of 24 units with every edge case of the definition: all-zero
    input or output vectors, inputs whose signed sum is 0, one unit whose input is zero wherever
    it occurs (its pairs are output-only), two units that never meet."""
    rng = np.random.default_rng(seed)
    pool = [(layer, i, s) for layer in range(3) for i in range(4) for s in (1, -1)]
    never_a, never_b = pool[0], pool[1]
    out_only = pool[2]
    prompts = []
    for p in range(n_prompts):
        m = int(rng.integers(3, 14))
        chosen = [pool[k] for k in rng.choice(len(pool), m, replace=False)]
        if never_a in chosen and never_b in chosen:
            chosen.remove(never_b)
        T, K = int(rng.integers(2, 7)), int(rng.integers(1, 5))
        x = rng.normal(size=(len(chosen), T))
        o = rng.normal(size=(len(chosen), K))
        for r, u in enumerate(chosen):
            roll = rng.random()
            if u == out_only or roll < 0.1:
                x[r] = 0.0
            elif roll < 0.2:
                o[r] = 0.0
            elif roll < 0.3:
                x[r] = 0.0
                x[r, 0], x[r, -1] = 1.5, -1.5  # signed sum 0: L2-normalised only
            elif roll < 0.35:
                x[r], o[r] = 0.0, 0.0  # takes part in no view
        prompts.append(_pu(chosen, list(x), o, pid=str(p)))
    return prompts


def planted(
    k: int = 4, per_group: int = 15, n_prompts: int = 20, noise: float = 0.8, seed: int = 0
) -> tuple[list[PromptUnits], dict[tuple[int, int, int], int]]:
    """Prompts whose units fall in ``k`` planted groups: on each prompt every group has a random
    input and output prototype, and each present unit is its group's prototype plus noise."""
    rng = np.random.default_rng(seed)
    units = [(g % 3, 10 * g + i, 1 if i % 2 else -1) for g in range(k) for i in range(per_group)]
    group = {u: g for g in range(k) for u in units[g * per_group : (g + 1) * per_group]}
    prompts = []
    for p in range(n_prompts):
        T, K = int(rng.integers(5, 12)), 5
        proto_in, proto_out = rng.normal(size=(k, T)), rng.normal(size=(k, K))
        proto_in[:, -1] += 2.0  # profiles concentrate on the last token, as real ones do
        present = [u for u in units if rng.random() < 0.6]
        g = np.array([group[u] for u in present])
        x = proto_in[g] + noise * rng.normal(size=(len(present), T))
        o = proto_out[g] + noise * rng.normal(size=(len(present), K))
        prompts.append(_pu(present, list(x), o, pid=f"p{p}"))
    return prompts, group


def _same(a: sp.csr_matrix, b: sp.csr_matrix, atol: float = 1e-12) -> None:
    """Same stored structure (explicit zeros included) and values."""
    a, b = a.tocsr(), b.tocsr()
    a.sort_indices()
    b.sort_indices()
    np.testing.assert_array_equal(a.indptr, b.indptr)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.data, b.data, rtol=0, atol=atol)


@pytest.fixture
def small_stripes(monkeypatch):
    """Make the sparse path use many stripes of a few rows each."""
    monkeypatch.setattr(simmod, "STRIPE_BINS", 50)


# -- units ---------------------------------------------------------------------------------------


def test_unit_names():
    assert unit_name((12, 873, 1)) == "12:873:+"
    assert unit_name((0, 5, -1)) == "0:5:-"
    for u in [(12, 873, 1), (0, 0, -1)]:
        assert parse_unit(unit_name(u)) == u
    for bad in ["12:873", "12:873:x", "a:1:+", "-1:3:+", "1:2:+:3", ""]:
        with pytest.raises(AdagError, match="bad unit name"):
            parse_unit(bad)


def test_prompt_units_on_tiny_graph(tiny: Model):
    ids = torch.randint(0, 61, (9,), generator=torch.Generator().manual_seed(1))
    g = trace(tiny, ids, k=3, node_threshold=0.0, edge_threshold=0.0)[0]
    pu = prompt_units(g, prompt_id="x")
    rows = np.flatnonzero(g.mask("neuron"))
    keys = [
        (int(g.node_layer[r]), int(g.node_index[r]), -1 if g.node_activation[r] < 0 else 1)
        for r in rows
    ]
    assert pu.units == sorted(set(keys)) and pu.prompt_id == "x"
    assert pu.outputs.shape == (len(pu.units), len(g.target_ids))
    excluded = g.settings.get("excluded_positions", [])
    pos = [p for p in range(len(g.prompt_ids)) if p not in excluded]
    # by hand: a unit with several nodes (positions), the first and the last unit
    multi = [u for u in pu.units if keys.count(u) > 1]
    assert multi, "the graph should hold a neuron that is a node at several positions"
    for u in [multi[0], pu.units[0], pu.units[-1]]:
        i = pu.units.index(u)
        mine = [r for r, key in zip(rows, keys, strict=True) if key == u]
        want_in = sum(g.input_attr[r, pos] / g.node_activation[r] for r in mine)
        want_out = sum(g.output_attr[r] / g.target_logits for r in mine)
        np.testing.assert_allclose(pu.inputs[i], want_in, rtol=1e-12)
        np.testing.assert_allclose(pu.outputs[i], want_out, rtol=1e-12)
    # a leading position excluded (as for a BOS) leaves the input side
    g.settings["excluded_positions"] = [0]
    pu0 = prompt_units(g)
    assert all(len(x) == len(g.prompt_ids) - 1 for x in pu0.inputs)
    np.testing.assert_allclose(np.stack(pu0.inputs), np.stack(pu.inputs)[:, 1:], rtol=1e-12)


# -- similarity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_similarity_equals_definition(seed, small_stripes):
    prompts = random_prompts(seed)
    units, ref = similarity_reference(prompts)
    u_dense, dense = similarity(prompts, dense=True)
    u_sparse, sparse = similarity(prompts, dense=False)
    assert units == u_dense == u_sparse
    _same(dense, ref)
    _same(sparse, ref)
    assert abs(sparse - sparse.T).max() == 0
    np.testing.assert_array_equal(sparse.diagonal(), 1.0)
    # the edge cases are really there
    ix = {u: i for i, u in enumerate(units)}
    a, b = ix[(0, 0, 1)], ix[(0, 0, -1)]
    assert ref[a, b] == 0 and not sparse[a].indices.tolist().count(b)  # never together: absent
    R = ref.toarray()
    assert (ref.data == 0).any()  # clamped pairs stay stored as 0
    assert (R >= 0).all() and (R <= 1 + 1e-12).all()


def test_similarity_views_by_hand():
    """Two prompts, three units: both views, the harmonic mean, a one-view pair, the signed sum."""
    u1, u2, u3 = (0, 1, 1), (0, 2, -1), (1, 7, 1)
    p1 = _pu(
        [u1, u2, u3],
        [[2.0, 0.0], [1.0, 1.0], [0.0, 0.0]],  # u3: no input view here
        [[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]],
    )
    p2 = _pu(
        [u1, u2, u3],
        [[1.0, -1.0], [-1.0, -1.0], [0.0, 0.0]],  # u1: signed sum 0 -> L2 only; u2: sum -2
        [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]],  # u3: no output view either
    )
    units, S = similarity([p1, p2], dense=True)
    assert units == [u1, u2, u3]
    r2 = 1 / np.sqrt(2)
    # input: p1 cos((1,0),(r2,r2)) = r2; p2 cos((r2,-r2), (r2,r2)) = 0 -> a = r2/2
    # output: p1 cos((1,0),(r2,r2)) = r2; p2 cos((0,1),(1,0)) = 0 -> b = r2/2
    a = b = r2 / 2
    assert S[0, 1] == pytest.approx(2 * a * b / (a + b))
    # (u1, u3): output view only, on p1: cos((1,0),(0,1)) = 0 -> stored 0
    assert S[0, 2] == 0 and 2 in S[0].indices
    # (u2, u3): output only on p1: cos((r2,r2),(0,1)) = r2
    assert S[1, 2] == pytest.approx(r2)
    _same(S, similarity([p1, p2], dense=False)[1])
    _same(S, similarity_reference([p1, p2])[1])


def test_similarity_edge_inputs():
    u, w = (0, 1, 1), (0, 2, 1)
    bad = PromptUnits([u, u], [np.ones(2), np.ones(2)], np.ones((2, 1)))
    with pytest.raises(AdagError, match="twice"):
        similarity([bad])
    ragged = PromptUnits([u, w], [np.ones(2), np.ones(3)], np.ones((2, 1)))
    with pytest.raises(AdagError, match="differ in length"):
        similarity([ragged])
    with pytest.raises(AdagError, match="agree"):
        PromptUnits([u], [np.ones(2)], np.ones((2, 1)))
    empty = PromptUnits([], [], np.zeros((0, 3)))
    ok = PromptUnits([u, w], [np.ones(2), np.ones(2)], np.ones((2, 1)))
    for dense in (True, False):
        units, S = similarity([empty, ok, empty], dense=dense)
        assert units == [u, w]
        np.testing.assert_allclose(S.toarray(), 1.0)
    units, S = similarity([])
    assert units == [] and S.shape == (0, 0)
    with pytest.raises(AdagError, match="top_m"):
        similarity(random_prompts(), top_m=0)
    with pytest.raises(AdagError, match="min_count"):
        similarity(random_prompts(), min_count=0)


def _top_m_by_hand(S: sp.csr_matrix, m: int) -> set[tuple[int, int]]:
    keep = set()
    for i in range(S.shape[0]):
        row = S[i].tocoo()
        nb = [(-v, j) for j, v in zip(row.col, row.data, strict=True) if j != i and v > 0]
        for _, j in sorted(nb)[:m]:
            keep.add((min(i, j), max(i, j)))
    return keep


def test_top_m_and_min_count(small_stripes):
    prompts = random_prompts(3, n_prompts=14)
    units, full = similarity(prompts, dense=True)
    for kw in [{"top_m": 2}, {"min_count": 2}, {"top_m": 3, "min_count": 2}]:
        _, d = similarity(prompts, dense=True, **kw)
        _, s = similarity(prompts, dense=False, **kw)
        _same(d, s)
    _, t = similarity(prompts, dense=True, top_m=2)
    kept = {(i, j) for i, j in zip(*sp.triu(t, k=1).nonzero(), strict=True)}
    assert kept == _top_m_by_hand(full, 2)
    a, b = (np.array(x) for x in zip(*kept, strict=True))
    np.testing.assert_array_equal(t[a, b], full[a, b])
    _, _, stats = similarity_with_stats(prompts, dense=False, min_count=2)
    assert stats["distinct_pairs"] == (full.nnz - len(units)) // 2 > stats["stored_pairs"]


def test_top_m_selector_exact_with_ties_and_recounts(monkeypatch):
    """The streaming top-m (floors from histograms, recounts) = a brute-force selection, with
    many ties and values sharing histogram bins, fed in random batches."""
    monkeypatch.setattr(simmod._TopM, "COMPACT_AT", 7)
    rng = np.random.default_rng(0)
    n, m = 40, 3
    i, j = np.triu_indices(n, 1)
    pick = rng.random(len(i)) < 0.6
    i, j = i[pick], j[pick]
    v = np.round(rng.random(len(i)) * 20) / 20 * 0.1  # many ties, all in a few bins
    v[rng.random(len(v)) < 0.1] = 0.0
    S = sp.csr_matrix((np.r_[v, v], (np.r_[i, j], np.r_[j, i])), shape=(n, n))
    sel = simmod._TopM(n, m)
    order = rng.permutation(len(i))
    for part in np.array_split(order, 13):
        sel.add(i[part], j[part], v[part])
    a, b, x = sel.pairs()
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == _top_m_by_hand(S, m)
    np.testing.assert_array_equal(x, S[a, b].A1)


# -- spectral clustering -------------------------------------------------------------------------


def test_planted_groups_recovered_and_paths_agree(small_stripes):
    prompts, group = planted()
    units, S = similarity(prompts, dense=False)
    _, D = similarity(prompts, dense=True)
    _same(S, D)
    truth = [group[u] for u in units]
    labels = spectral_labels(S, 4)
    assert adjusted_rand_score(truth, labels) >= 0.9
    np.testing.assert_array_equal(labels, spectral_labels(D, 4))
    np.testing.assert_array_equal(labels, spectral_labels(S, 4, dense=False))  # ARPACK
    assert labels[0] == 0 and set(labels.tolist()) == {0, 1, 2, 3}
    for method in ("kmeans", "agglomerative", "random"):
        base = baseline_labels(method, prompts, units, 4)
        assert base.shape == (len(units),) and set(base.tolist()) == {0, 1, 2, 3}
        np.testing.assert_array_equal(base, baseline_labels(method, prompts, units, 4))
    assert adjusted_rand_score(truth, baseline_labels("random", prompts, units, 4)) < 0.5
    d = diagnostics(S, labels, units, prompts)
    assert d["silhouette"] > 0.2 and d["intra_inter_ratio"] > 2
    assert d["size_entropy"] > 0.95 and 0 < d["size_min_max"] <= 1
    assert 0 <= d["conflict_share"] < 0.1
    shuffled = diagnostics(S, baseline_labels("random", prompts, units, 4), units, prompts)
    assert shuffled["silhouette"] < d["silhouette"]
    assert shuffled["conflict_share"] > d["conflict_share"]


def test_spectral_isolated_units_and_bad_k():
    # two blocks and two units that meet nobody
    S = sp.block_diag([np.full((3, 3), 0.9), np.full((3, 3), 0.8), np.eye(2)]).tocsr()
    labels = spectral_labels(S, 4)
    assert len(set(labels[:3].tolist())) == 1 and len(set(labels[3:6].tolist())) == 1
    assert labels[6] != labels[7]
    for k in (1, 0, 9):
        with pytest.raises(AdagError, match="n_clusters"):
            spectral_labels(S, k)
    prompts, _ = planted(n_prompts=3)
    units = sorted({u for p in prompts for u in p.units})
    with pytest.raises(AdagError, match="n_clusters"):
        baseline_labels("kmeans", prompts, units, len(units) + 1)
    with pytest.raises(AdagError, match="unknown baseline"):
        baseline_labels("dbscan", prompts, units, 2)


def test_baseline_features_layout():
    u1, u2 = (0, 1, 1), (2, 3, -1)
    p1 = _pu([u1], [np.r_[np.zeros(9), 1.0, 3.0]], [[3.0, 4.0]])  # T = 11 > INPUT_TAIL
    p2 = _pu([u1, u2], [[1.0, 1.0], [0.0, 0.0]], [[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    X = baseline_features([p1, p2], [u1, u2]).toarray()
    F = 8 + 1 + 3
    assert X.shape == (2, 2 * F)
    np.testing.assert_allclose(X[0, 0:9], np.r_[np.zeros(6), 1, 3, 0] / np.sqrt(10))
    np.testing.assert_allclose(X[0, 9:12], [0.6, 0.8, 0.0])
    np.testing.assert_allclose(X[1, :F], 0.0)  # u2 absent from p1
    np.testing.assert_allclose(X[0, F + 6 : F + 9], [np.sqrt(0.5), np.sqrt(0.5), 0.0])
    np.testing.assert_allclose(X[1, F : 2 * F], [0] * 9 + [1.0, 0.0, 0.0])  # zero input view


# -- diagnostics ---------------------------------------------------------------------------------


def test_diagnostics_by_hand():
    u = [(0, i, 1) for i in range(4)]
    # u0, u1 push the same way on both prompts; u2, u3 opposite ways on p1, same on p2,
    # opposite on average
    p1 = _pu(u, [np.ones(2)] * 4, [[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    p2 = _pu(u[2:], [np.ones(2)] * 2, [[0.0, 1.0], [0.0, 0.5]])
    units, S = similarity([p1, p2])
    labels = np.array([0, 0, 1, 1])
    d = diagnostics(S, labels, units, [p1, p2])
    assert d["conflict_pairs"] == 2
    assert d["conflict_share"] == 0.0  # (u2, u3): mean cosine (-1 + 1) / 2 = 0: no conflict
    p3 = _pu(u[2:], [np.ones(2)] * 2, [[0.0, 1.0], [0.0, -0.5]])
    d = diagnostics(S, labels, units, [p1, p3])
    assert d["conflict_share"] == 0.5
    assert d["size_entropy"] == pytest.approx(1.0) and d["size_min_max"] == 1.0
    R = S.toarray()
    assert d["intra_mean"] == pytest.approx((R[0, 1] + R[2, 3]) / 2)
    assert d["inter_mean"] == pytest.approx(np.mean([R[i, j] for i in (0, 1) for j in (2, 3)]))
    one = diagnostics(S, np.zeros(4, dtype=int), units, [p1])
    assert np.isnan(one["silhouette"]) and one["size_entropy"] == 1.0
    with pytest.raises(AdagError, match="labels"):
        diagnostics(S, labels[:3], units, [p1])
