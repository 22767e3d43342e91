"""mixopt.stats against independent computations: scipy, closed-form formulas, and simulations whose true
value is known. These are the statistics that chose the default scorer, so each one is checked on its own."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from mixopt import stats


@pytest.fixture
def xyz() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x, z = rng.normal(size=60), rng.normal(size=60)
    return x, x + z + rng.normal(size=60), z


def test_correlations__equal_scipy_and_the_residual_partial(xyz: tuple[np.ndarray, ...]) -> None:
    x, y, z = xyz
    assert stats.pearson(x, y) == pytest.approx(sps.pearsonr(x, y).statistic)
    assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x, y).statistic)
    # partial r as pingouin computes it: correlate the residuals of x and y regressed on z (with intercept)
    rx = x - np.polyval(np.polyfit(z, x, 1), z)
    ry = y - np.polyval(np.polyfit(z, y, 1), z)
    assert stats.partial_pearson(x, y, z) == pytest.approx(sps.pearsonr(rx, ry).statistic)


def test_correlations__skip_missing_pairs_like_scipy_on_the_complete_ones(xyz: tuple[np.ndarray, ...]) -> None:
    x, y, _ = xyz
    x = x.copy()
    x[[3, 17, 40]] = np.nan
    ok = np.isfinite(x)
    assert stats.spearman(x, y) == pytest.approx(sps.spearmanr(x[ok], y[ok]).statistic)
    assert np.isnan(stats.pearson(np.ones(10), np.arange(10.0)))  # a constant side has no correlation


def test_row_forms__equal_the_point_functions_row_by_row(xyz: tuple[np.ndarray, ...]) -> None:
    x, y, z = xyz
    idx = np.random.default_rng(1).integers(0, 60, size=(5, 60))
    for fn, rows in ((stats.pearson, stats.pearson_rows), (stats.spearman, stats.spearman_rows)):
        assert rows(x[idx], y[idx]) == pytest.approx([fn(x[i], y[i]) for i in idx])
    assert stats.partial_rows(x[idx], y[idx], z[idx]) == pytest.approx(
        [stats.partial_pearson(x[i], y[i], z[i]) for i in idx]
    )


def test_zscored_rows__equal_scipy_zscore_per_row() -> None:
    a = np.random.default_rng(2).normal(size=(4, 32)) * [[1], [10], [0.1], [3]] + [[0], [5], [-2], [1]]
    a[1, 7] = np.nan
    expected = sps.zscore(a, axis=1, nan_policy="omit")
    assert stats.zscored_rows(a) == pytest.approx(expected, nan_ok=True)
    assert np.isnan(stats.zscored_rows(np.ones((1, 5)))).all()  # a constant source has no within-source order


def test_cluster_bootstrap__draws_whole_clusters_and_its_se_matches_the_cluster_formula() -> None:
    rng = np.random.default_rng(3)
    clusters = np.repeat(np.arange(40), 4)  # 40 domains x 4 sources, cells of a domain move together
    values = np.repeat(rng.normal(size=40), 4) + 0.1 * rng.normal(size=160)
    idx = stats.bootstrap_indices(clusters, 4000, seed=0)
    assert idx.shape == (4000, 160)
    assert (clusters[idx].reshape(4000, 40, 4) == clusters[idx].reshape(4000, 40, 4)[..., :1]).all()
    means = np.nanmean(stats.resampled(values, idx), axis=1)
    cluster_means = values.reshape(40, 4).mean(1)
    # the bootstrap SE of the grand mean is the SE of a mean of 40 cluster means (ddof 0: the bootstrap's)
    assert means.std() == pytest.approx(cluster_means.std() / np.sqrt(40), rel=0.05)


def test_resampled__reads_padding_as_missing() -> None:
    assert np.isnan(stats.resampled(np.array([1.0, 2.0]), np.array([[0, -1]]))[0, 1])


def test_split_half_reliability__recovers_a_known_reliability() -> None:
    """Units with true means of variance 1 measured by n items with noise variance s2: the reliability of a
    unit's mean is 1 / (1 + s2 / n) (classical test theory), here 1 / (1 + 4 / 20) = 0.833."""
    rng = np.random.default_rng(4)
    units = [mu + rng.normal(scale=2.0, size=20) for mu in rng.normal(size=400)]
    assert stats.split_half_reliability(units, splits=20, seed=0) == pytest.approx(1 / (1 + 4 / 20), abs=0.04)
    assert stats.spearman_brown(0.5) == pytest.approx(2 / 3)


def test_weighted_mean_interval__se_matches_the_delta_method_formula() -> None:
    rng = np.random.default_rng(5)
    x, w = rng.normal(size=300), rng.integers(1, 50, size=300).astype(float)
    se, (lo, hi) = stats.weighted_mean_interval(x, w, 4000, seed=0)
    mean = np.average(x, weights=w)
    # linearised SE of a ratio estimator sum(w x) / sum(w) under resampling of items
    formula = np.sqrt(np.sum((w * (x - mean)) ** 2)) / w.sum()
    assert se == pytest.approx(formula, rel=0.07)
    assert lo < mean < hi
    assert stats.bootstrap_se(x, 4000, seed=0) == pytest.approx(x.std() / np.sqrt(len(x)), rel=0.07)


def test_paired_mean_draws__a_constant_shift_has_no_paired_noise() -> None:
    rng = np.random.default_rng(6)
    groups = [np.stack([g, g + 0.25]) for g in (rng.normal(size=30), rng.normal(size=12))]
    draws = stats.paired_mean_draws(groups, n_boot=300, seed=0)  # (300, 2 runs, 2 groups)
    assert draws[:, 1] - draws[:, 0] == pytest.approx(np.full((300, 2), 0.25))
    assert draws[:, 0].std(0).min() > 0.05  # while each run alone varies over resamples


def test_percentile_interval__needs_enough_finite_draws() -> None:
    assert stats.percentile_interval(np.arange(101.0)) == pytest.approx([2.5, 97.5])
    assert np.isnan(stats.percentile_interval(np.array([1.0, np.nan]))).all()
