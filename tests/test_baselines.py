"""Baselines (AtP* §4.1) and the cost-to-find-top-x evaluation on synthetic additive oracles:
exact accounting, the analytic iterative curve, sparse recovery, plot and parquet outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from adag.errors import AdagError
from adag.patching.baselines import (
    MethodResult,
    blocks,
    estimator,
    hierarchical,
    iterative,
    subsampling,
    subset_sample,
)
from adag.patching.evaluate import (
    cost_to_find,
    curves,
    curves_table,
    plot_curves,
    rank_of_true_top,
    recall_at,
    write_curves,
)
from adag.patching.oracle import AdditiveOracle

N_PAIRS = 2


def _sparse(seed: int, n: int = 1000, n_big: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Heavy-tailed effects: ``n_big`` big nodes of magnitude 1–4 at random places among tiny
    Laplace noise."""
    rng = np.random.default_rng(seed)
    eff = rng.laplace(scale=1e-3, size=n)
    big = rng.choice(n, n_big, replace=False)
    eff[big] = rng.choice([-1.0, 1.0], n_big) * rng.uniform(1.0, 4.0, n_big)
    return eff, big


def test_exact_estimator_costs_n_pairs_per_node() -> None:
    eff = np.random.default_rng(0).standard_t(2, size=300)
    res = estimator("exact", eff, 0.0)
    xs = np.arange(1, 301)
    np.testing.assert_array_equal(cost_to_find(res, eff, xs, n_pairs=N_PAIRS), N_PAIRS * xs)
    assert recall_at(res, eff, top_true=20, within=20) == 1.0
    np.testing.assert_array_equal(rank_of_true_top(eff, eff, top_true=20), np.arange(20))
    # an estimator's own cost shifts the curve
    shifted = cost_to_find(estimator("atp", eff, 6.0), eff, [1, 5], n_pairs=N_PAIRS)
    np.testing.assert_array_equal(shifted, [6.0 + N_PAIRS, 6.0 + 5 * N_PAIRS])


def test_estimator_orders_by_magnitude_ties_by_index() -> None:
    res = estimator("s", np.array([1.0, -3.0, 3.0, np.nan, 0.0, -1.0]), 2.0)
    np.testing.assert_array_equal(res.order, [1, 2, 0, 5, 4, 3])
    assert res.cost == 2.0 and res.cum_cost is None


def test_iterative_matches_expected_max_of_random_positions() -> None:
    n, xs = 200, np.array([1, 2, 5, 20])
    eff = np.random.default_rng(1).normal(size=n)
    oracle = AdditiveOracle(eff, n_pairs=N_PAIRS)
    runs = np.array(
        [cost_to_find(iterative(oracle, seed=s), eff, xs, n_pairs=N_PAIRS) for s in range(2000)]
    )
    assert oracle.cost == 0
    # E[max position (1-based) of x random nodes among n] = x (n + 1) / (x + 1)
    expected = N_PAIRS * xs * (n + 1) / (xs + 1)
    np.testing.assert_allclose(runs.mean(0), expected, rtol=0.03)


def _run_all(oracle: AdditiveOracle, seed: int) -> list[MethodResult]:
    out = []
    for fn in (
        lambda: subsampling(oracle, n_samples=300, prob=0.1, seed=seed),
        lambda: blocks(oracle, block_size=16),
        lambda: hierarchical(oracle, branching=4),
    ):
        before = oracle.cost
        res = fn()
        assert res.cost == oracle.cost - before, res.name  # accounting = what the oracle counted
        out.append(res)
    return out


def test_baselines_beat_iterative_on_sparse_effects() -> None:
    n, xs = 1000, np.array([1, 2, 5, 10])
    costs: dict[str, list[np.ndarray]] = {}
    recalls: dict[str, list[float]] = {}
    for seed in range(10):
        eff, _ = _sparse(seed, n)
        oracle = AdditiveOracle(eff, n_pairs=N_PAIRS)
        for res in _run_all(oracle, seed):
            costs.setdefault(res.name, []).append(cost_to_find(res, eff, xs, n_pairs=N_PAIRS))
            within = 10 * 16 if res.name == "blocks" else 10
            recalls.setdefault(res.name, []).append(recall_at(res, eff, top_true=10, within=within))
    iterative_mean = N_PAIRS * xs * (n + 1) / (xs + 1)
    for name, c in costs.items():
        assert np.all(np.mean(c, 0) < 0.8 * iterative_mean), name
        # measured recall of the 10 planted nodes: subsampling 0.84, blocks 0.98, hierarchical 0.99
        assert np.mean(recalls[name]) >= 0.75, name
    # measured cost / iterative for x = 1, 2, 5, 10: subsampling 0.6–0.4 (its 600 upfront),
    # blocks 0.15–0.23, hierarchical 0.11–0.15
    for name in ("blocks", "hierarchical"):
        assert np.all(np.mean(costs[name], 0) < 0.3 * iterative_mean), name
        assert np.mean(recalls[name]) >= 0.95, name


def test_subset_sample_is_unbiased_with_calibrated_errors() -> None:
    rng = np.random.default_rng(5)
    eff = rng.normal(size=200)
    oracle = AdditiveOracle(eff, n_pairs=1, noise_scale=0.5, seed=1)
    nodes = np.arange(0, 200, 2)
    st = subset_sample(oracle, nodes, n_subsets=2000, prob=0.2, rng=np.random.default_rng(0))
    assert st.cost == oracle.cost <= 2000
    z = (st.diff - eff[nodes]) / st.se
    assert abs(z.mean()) < 0.4 and 0.8 < z.std() < 1.2
    assert np.all(st.n_in > 300) and np.all(st.df > 100)


def test_blocks_accounting_and_layout() -> None:
    eff = np.zeros(50)
    eff[[3, 37]] = [1.0, -5.0]
    oracle = AdditiveOracle(eff, n_pairs=3)
    res = blocks(oracle, block_size=8)
    assert res.cost == oracle.cost == 7 * 3  # ceil(50 / 8) blocks
    np.testing.assert_array_equal(res.order[:8], np.arange(32, 40))
    np.testing.assert_array_equal(res.order[8:16], np.arange(0, 8))
    assert res.scores is not None and res.scores[37] == -5.0
    # a random grouping by seed is still a permutation and deterministic
    a, b = blocks(oracle, block_size=8, seed=1), blocks(oracle, block_size=8, seed=1)
    np.testing.assert_array_equal(a.order, b.order)


def test_hierarchical_best_first_accounting() -> None:
    eff = np.zeros(64)
    eff[[5, 40]] = [2.0, -3.0]
    oracle = AdditiveOracle(eff, n_pairs=1)
    res = hierarchical(oracle, branching=4)
    assert res.cum_cost is not None
    assert res.order[0] == 40 and res.order[1] == 5
    # found after 4 children per level, 3 levels deep: 12 patches for the first node
    assert res.cum_cost[0] == 12
    assert res.cost == oracle.cost == res.cum_cost[-1]
    np.testing.assert_array_equal(cost_to_find(res, eff, [1, 2], n_pairs=1), res.cum_cost[:2])
    # a budget stops the search; the rest is verified at n_pairs per node
    budgeted = hierarchical(AdditiveOracle(eff, n_pairs=1), branching=4, max_cost=30)
    assert budgeted.cost == 28  # 12 + 8 + 8; one more expansion (4) would pass 30
    assert budgeted.cum_cost is not None
    tail = np.diff(budgeted.cum_cost[budgeted.cum_cost >= budgeted.cost])
    assert set(tail.tolist()) <= {0.0, 1.0}
    assert set(budgeted.order[:2].tolist()) == {5, 40}


def test_method_result_validates() -> None:
    with pytest.raises(ValueError):
        MethodResult("bad", np.array([0, 0, 1]), 0.0)
    with pytest.raises(ValueError):
        MethodResult("bad", np.array([0, 1]), 0.0, cum_cost=np.array([2.0, 1.0]))
    res = iterative(AdditiveOracle(np.zeros(5)), seed=0)
    with pytest.raises(ValueError):
        cost_to_find(res, np.zeros(6), [1], n_pairs=1)
    with pytest.raises(ValueError):
        cost_to_find(res, np.zeros(5), [6], n_pairs=1)


_ORACLE = AdditiveOracle(np.arange(5.0))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: blocks(_ORACLE, block_size=0), "block_size must be at least 1, got 0"),
        (lambda: hierarchical(_ORACLE, branching=1), "branching must be at least 2, got 1"),
        (lambda: subsampling(_ORACLE, prob=0.0), "probability must be in (0, 1), got 0.0"),
        (lambda: subsampling(_ORACLE, n_samples=0), "n_subsets must be at least 1, got 0"),
        (lambda: blocks(_ORACLE, order=np.array([0, 1])), "order must be a permutation of 0..4"),
        (lambda: estimator("e", np.zeros((2, 3)), 0.0), "e: scores must be one value per node"),
        (lambda: recall_at(np.zeros(4), np.zeros(5), top_true=1, within=1), "ranks 4 nodes"),
        (lambda: recall_at(np.zeros(5), np.zeros(5), top_true=6, within=1), "top_true must be"),
        (lambda: rank_of_true_top(np.zeros(5), np.zeros(5), top_true=-1), "got -1"),
        (
            lambda: cost_to_find(iterative(_ORACLE), np.zeros(5), [1], n_pairs=0),
            "n_pairs must be at least 1, got 0",
        ),
        (lambda: cost_to_find(iterative(_ORACLE), np.zeros(5), [6], n_pairs=1), "xs must be"),
    ],
)
def test_user_errors_are_one_line(call, message: str) -> None:
    with pytest.raises(AdagError) as e:
        call()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_curves_plot_and_parquet(tmp_path: Path) -> None:
    eff, _ = _sparse(0, n=200, n_big=5)
    oracle = AdditiveOracle(eff, n_pairs=N_PAIRS)
    results = [estimator("exact", eff, 0.0), iterative(oracle, seed=0), *_run_all(oracle, 0)]
    xs = np.arange(1, 11)
    cv = curves(results, eff, n_pairs=N_PAIRS, xs=xs)
    assert list(cv) == ["exact", "iterative", "subsampling", "blocks", "hierarchical"]
    assert all(c.shape == (10,) and np.all(np.diff(c) >= 0) for c in cv.values())
    with pytest.raises(ValueError):
        curves([results[0], results[0]], eff, n_pairs=N_PAIRS)

    out = plot_curves(cv, xs, tmp_path / "plots" / "curves.png", title="synthetic")
    assert out == tmp_path / "plots" / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]

    table = curves_table(cv, xs)
    assert table.column_names == ["method", "x", "cost"] and table.num_rows == 50
    path = write_curves(table, tmp_path / "curves.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.parquet", "plots"]
    back = pq.read_table(path)
    assert back.equals(table)
    df = back.to_pandas()
    got = df[df.method == "hierarchical"].cost.to_numpy()
    np.testing.assert_array_equal(got, cv["hierarchical"])
