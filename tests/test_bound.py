"""The false-negative bound (AtP* §3.3) on synthetic additive models: calibrated coverage over
seeds, informative (close to the true largest unverified effect, shrinking as K grows), exact
forward-pass accounting."""

from __future__ import annotations

import numpy as np
import pytest

from adag.patching.bound import BoundResult, bound_curve, false_negative_bound, t_quantile
from adag.patching.oracle import AdditiveOracle

ALPHA = 0.05
N_SEEDS = 200


def _model(seed: int, *, n: int = 300, n_big: int = 5, theta_star: float = 1.0):
    """Many small Laplace effects, ``n_big`` big nodes (the ones an estimator would rank first)
    and one planted node of effect ±theta_star that is left unverified."""
    rng = np.random.default_rng(seed)
    eff = rng.laplace(scale=0.02, size=n)
    idx = rng.permutation(n)
    big, planted = idx[:n_big], int(idx[n_big])
    eff[big] = rng.choice([-1.0, 1.0], n_big) * rng.uniform(3.0, 6.0, n_big)
    eff[planted] = rng.choice([-1.0, 1.0]) * theta_star
    ranking = np.concatenate([big, np.setdiff1d(np.arange(n), big)])
    return eff, big, planted, ranking


@pytest.mark.parametrize(
    ("q", "df", "expected"),
    [
        (0.95, 1, 6.3138),
        (0.95, 2, 2.9200),
        (0.95, 3, 2.3534),
        (0.95, 3, 2.3534),
        (0.95, 5, 2.0150),
        (0.95, 10, 1.8125),
        (0.95, 30, 1.6973),
        (0.99, 10, 2.7638),
        (0.975, 20, 2.0860),
        (0.95, np.inf, 1.6449),
    ],
)
def test_t_quantile_matches_tables(q: float, df: float, expected: float) -> None:
    assert float(t_quantile(q, df)) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_vectorised_and_degenerate() -> None:
    out = t_quantile(0.95, np.array([np.nan, 0.5, 5.0, np.inf]))
    assert np.isinf(out[0]) and np.isinf(out[1])
    assert out[2] > out[3]
    with pytest.raises(ValueError):
        t_quantile(0.3, 5.0)


@pytest.mark.parametrize("noise", [0.0, 0.1])
def test_bound_covers_planted_effect_and_is_tight(noise: float) -> None:
    covered = covered_max = 0
    ratios = []
    for seed in range(N_SEEDS):
        eff, big, planted, _ = _model(seed)
        oracle = AdditiveOracle(eff, n_pairs=1, noise_scale=noise, seed=seed)
        res = false_negative_bound(oracle, big, alpha=ALPHA, n_subsets=400, seed=seed)
        true_max = np.abs(np.delete(eff, big)).max()
        covered += res.theta >= abs(eff[planted])
        covered_max += res.theta >= true_max
        ratios.append(res.theta / true_max)
    # measured: 0.945 / 0.970 here (0.9455 / 0.950 over 2000 seeds); binomial slack 0.03
    assert covered / N_SEEDS >= 1 - ALPHA - 0.03
    assert covered_max / N_SEEDS >= 1 - ALPHA - 0.03
    # measured mean θ / max|unverified effect| ≈ 1.04 (noise 0) and 1.16 (noise 0.1)
    assert np.mean(ratios) <= 1.35
    assert np.median(ratios) >= 1.0


def test_bound_shrinks_as_k_covers_the_big_nodes() -> None:
    thetas = []
    for seed in range(40):
        eff, _, _, ranking = _model(seed)
        oracle = AdditiveOracle(eff, noise_scale=0.05, seed=seed)
        curve = bound_curve(oracle, ranking, [0, 2, 5, 50], n_subsets=400, seed=seed)
        assert [r.k for r in curve] == [0, 2, 5, 50]
        assert curve[0].theta >= np.abs(eff).max() * 0.9  # the big nodes are still unverified
        thetas.append([r.theta for r in curve])
    t = np.array(thetas)
    mean = t.mean(0)
    assert mean[0] > mean[1] > mean[2]
    assert mean[2] < 0.4 * mean[0]  # measured ≈ 0.17 (6.34 → 1.07): big nodes verified
    assert np.all(t[:, 3] <= t[:, 2] * 1.3)  # no worse beyond K covering the big nodes


def test_cost_accounting_and_determinism() -> None:
    eff, big, _, _ = _model(3)
    oracle = AdditiveOracle(eff, n_pairs=3)
    res = false_negative_bound(oracle, big, n_subsets=250, subset_prob=0.2, seed=7)
    assert isinstance(res, BoundResult)
    assert res.cost == oracle.cost == 250 * 3  # no empty subset at p=0.2 over 295 nodes
    assert (res.k, res.n_subsets, res.alpha, res.subset_prob) == (5, 250, 0.05, 0.2)
    assert res.worst_node not in set(big.tolist())
    again = false_negative_bound(
        AdditiveOracle(eff, n_pairs=3), big, n_subsets=250, subset_prob=0.2, seed=7
    )
    assert again == res
    curve = bound_curve(
        AdditiveOracle(eff, n_pairs=3), np.arange(300), [0, 10], n_subsets=100, seed=1
    )
    assert all(r.cost == 300 for r in curve)


def test_empty_subsets_are_free() -> None:
    oracle = AdditiveOracle(np.ones(4))
    res = false_negative_bound(oracle, [], n_subsets=500, subset_prob=0.1, seed=0)
    assert res.cost == oracle.cost < 500 * 0.5  # P(empty) = 0.9**4 ≈ 0.66


def test_degenerate_cases() -> None:
    eff = np.zeros(20)
    eff[:3] = [5.0, -4.0, 3.0]
    # everything verified: nothing left to miss
    full = false_negative_bound(AdditiveOracle(eff), np.arange(20))
    assert (full.theta, full.cost, full.n_subsets) == (0.0, 0.0, 0)
    # noise-free and every unverified effect exactly zero: the bound is exactly zero
    zero = false_negative_bound(AdditiveOracle(eff), [0, 1, 2], n_subsets=200)
    assert zero.theta == 0.0
    # too few subsets for some node to be both in and out of two: no conclusion
    few = false_negative_bound(AdditiveOracle(eff), [0], n_subsets=3, subset_prob=0.1)
    assert few.theta == np.inf
    with pytest.raises(ValueError):
        false_negative_bound(AdditiveOracle(eff), [25])
    with pytest.raises(ValueError):
        false_negative_bound(AdditiveOracle(eff), [0], alpha=0.7)
    with pytest.raises(ValueError):
        false_negative_bound(AdditiveOracle(eff), [0], subset_prob=1.0)
