"""Statistics: the only statistics code in mixopt (bootstraps, intervals, correlations, reliability,
standardisation). Pure numpy/scipy; every function takes its randomness from a seed or a Generator.

Sources: percentile bootstrap (Efron & Tibshirani 1993, ch. 13); cluster bootstrap over domains (Cameron,
Gelbach & Miller 2008: cells of one domain move together); split-half reliability with the Spearman-Brown
correction (Spearman 1910, Brown 1910); partial correlation (the first-order formula, e.g. Cohen et al. 2003,
eq. 3.3.11). The vectorised row forms exist because every bootstrap needs thousands of correlations.

Example:
    >>> round(pearson(np.array([1.0, 2, 3, 4]), np.array([2.0, 4, 6, 9])), 4)
    0.9939
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def resampled_means(
    values: np.ndarray, n: int, rng: np.random.Generator, weights: np.ndarray | None = None
) -> np.ndarray:
    """(n,) means (token-weighted when `weights` is given) of `values` resampled with replacement."""
    draws = rng.integers(0, len(values), size=(n, len(values)))  # (n, items)
    if weights is None:
        return values[draws].mean(1)
    w = weights[draws]
    return (values[draws] * w).sum(1) / np.maximum(w.sum(1), 1)


def weighted_mean_interval(values: np.ndarray, weights: np.ndarray, n: int, seed: int) -> tuple[float, list[float]]:
    """(standard error, 95% percentile interval) of the weighted mean, resampling items."""
    if len(values) < 2 or n == 0:
        return float("nan"), [float("nan"), float("nan")]
    means = resampled_means(values, n, np.random.default_rng(seed), weights)
    return float(means.std(ddof=1)), [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_mean_draws(groups: Sequence[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """groups[j]: (runs, items_j) per-item values -> (n_boot, runs, groups) means over items resampled
    within each group. Every run reads the same resample (they were measured on the same items), so a
    difference between runs keeps only the noise that does not cancel."""
    rng = np.random.default_rng(seed)
    return np.stack([g[:, rng.integers(0, g.shape[1], size=(n_boot, g.shape[1]))].mean(-1).T for g in groups], axis=-1)


def resampled(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """`values` read at bootstrap indices from `bootstrap_indices`; index -1 (padding) reads NaN: missing."""
    return np.append(values, np.nan)[idx]


def zscored_rows(a: np.ndarray) -> np.ndarray:
    """Standardise each row (a source's domains; NaN ignored): compares domains within a source, not the
    sources' scales. A constant row becomes NaN."""
    mean, std = np.nanmean(a, axis=1, keepdims=True), np.nanstd(a, axis=1, keepdims=True)
    return (a - mean) / np.where(std > 0, std, np.nan)


def bootstrap_se(values: np.ndarray, n: int, seed: int) -> float:
    """Standard error of the mean of `values` (NaN ignored), by resampling items."""
    x = values[~np.isnan(values)]
    if len(x) < 2 or n == 0:
        return float("nan")
    return float(resampled_means(x, n, np.random.default_rng(seed)).std(ddof=1))


def spearman_brown(r: float) -> float:
    """Reliability of the full-length measure from the correlation r of its two halves: 2r / (1 + r)."""
    return 2 * r / (1 + r) if r > -1 else float("nan")


def split_half_reliability(units: Sequence[np.ndarray], splits: int, seed: int) -> float:
    """Spearman-Brown corrected correlation, across units (domains, or source x domain cells), between
    the unit means of two random halves of each unit's items; r averaged over `splits` random splits.
    It says how much of the spread of unit means is signal rather than item sampling noise.

    `units[k]` holds unit k's per-item values (NaN ignored). NaN when fewer than 3 units have 2+ items.
    """
    values = [u[~np.isnan(u)] for u in units]
    values = [v for v in values if len(v) >= 2]
    if len(values) < 3:
        return float("nan")
    rng = np.random.default_rng(seed)
    rs = []
    for _ in range(splits):
        halves = np.array([_half_means(v, rng) for v in values])  # (units, 2)
        rs.append(pearson(halves[:, 0], halves[:, 1]))
    r = float(np.nanmean(rs)) if not np.isnan(rs).all() else float("nan")
    # Below zero the halves disagree: there is no reliability to correct, and 2r/(1+r) would blow up
    # towards -inf as r -> -1, so a negative r is reported as it is.
    return spearman_brown(r) if r >= 0 else r


def _half_means(v: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    order = rng.permutation(len(v))
    return float(v[order[: len(v) // 2]].mean()), float(v[order[len(v) // 2 :]].mean())


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson r of each row pair of (draws, n) arrays, over the columns where both are finite (NaN marks a
    missing value); NaN for a row with fewer than 3 pairs or a constant side. Vectorised for the bootstrap."""
    ok = np.isfinite(x) & np.isfinite(y)
    w = ok.astype(float)
    x, y = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
    n = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = (x - ((w * x).sum(1) / n)[:, None]) * w
        yc = (y - ((w * y).sum(1) / n)[:, None]) * w
        denom = np.sqrt((xc * xc).sum(1) * (yc * yc).sum(1))
        r = (xc * yc).sum(1) / denom
    r[(n < 3) | ~(denom > 1e-300)] = np.nan
    return np.clip(r, -1.0, 1.0)


def spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair: Pearson r of the average ranks, over the jointly finite columns."""
    from scipy.stats import rankdata

    ok = np.isfinite(x) & np.isfinite(y)
    rx = rankdata(np.where(ok, x, np.nan), axis=1, nan_policy="omit")
    ry = rankdata(np.where(ok, y, np.nan), axis=1, nan_policy="omit")
    return pearson_rows(rx, ry)


def partial_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """r(x, y | z) = (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)), per row: what x says about y
    beyond what z already says, over the columns where all three are finite."""
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(z)
    x, y, z = (np.where(ok, a, np.nan) for a in (x, y, z))
    rxy, rxz, ryz = pearson_rows(x, y), pearson_rows(x, z), pearson_rows(y, z)
    with np.errstate(invalid="ignore", divide="ignore"):
        denom = np.sqrt(np.maximum((1 - rxz**2) * (1 - ryz**2), 0.0))
        r = (rxy - rxz * ryz) / denom
    r[~(denom > 1e-12)] = np.nan
    return np.clip(r, -1.0, 1.0)


def _row(fn: Callable[..., np.ndarray], *arrays: np.ndarray) -> float:
    return float(fn(*(np.asarray(a, dtype=float)[None, :] for a in arrays))[0])


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r over the pairs where both are finite; NaN with fewer than 3 pairs or a constant side."""
    return _row(pearson_rows, x, y)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho: Pearson r of the average ranks, over the pairs where both are finite."""
    return _row(spearman_rows, x, y)


def partial_pearson(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Partial correlation r(x, y | z); see `partial_rows`."""
    return _row(partial_rows, x, y, z)


def bootstrap_indices(clusters: np.ndarray, n: int, seed: int) -> np.ndarray:
    """(n, rows) indices of `n` resamples that draw whole clusters with replacement; -1 pads short draws.

    `clusters[k]` is row k's cluster (a domain: its cells across sources move together, so resampling
    cells one by one would understate the error). Index with `np.append(values, np.nan)[indices]`, so the
    padding reads as missing.
    """
    labels = np.unique(clusters)
    members = [np.flatnonzero(clusters == c) for c in labels]
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([members[c] for c in rng.integers(0, len(labels), size=len(labels))]) for _ in range(n)]
    width = max((len(d) for d in draws), default=0)
    out = np.full((n, width), -1, dtype=np.int64)
    for i, d in enumerate(draws):
        out[i, : len(d)] = d
    return out


def percentile_interval(draws: np.ndarray, min_draws: int = 20) -> list[float]:
    """95% percentile interval of the finite draws; NaN when fewer than `min_draws` are finite."""
    finite = draws[np.isfinite(draws)]
    if len(finite) < min_draws:
        return [float("nan"), float("nan")]
    return [float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5))]
