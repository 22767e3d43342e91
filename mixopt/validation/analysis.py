"""Analysis: per (source, domain) change of each metric, which changes are signal (split-half reliability),
and every scorer's correlation with the change, pooled and within source, with intervals that resample whole
domains (`mixopt.stats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mixopt import evaluate as ev
from mixopt import stats
from mixopt.scores import SCORERS
from mixopt.validation.measure import Measurement

Record = dict[str, Any]  # a JSON-able piece of validation.json


@dataclass
class Cells:
    """Per (source, domain) change of each metric, over the domain's evaluation items the source may judge."""

    sources: list[str]
    domains: list[str]
    before: dict[str, np.ndarray]  # metric -> (sources, domains) mean before
    after: dict[str, np.ndarray]
    delta: dict[str, np.ndarray]  # mean of after - before, paired by item
    stderr: dict[str, np.ndarray]  # bootstrap standard error of `delta`
    n: np.ndarray  # (sources, domains) items measured
    item_deltas: dict[str, list[list[np.ndarray]]]  # metric -> [source][domain] per-item changes


def build_cells(
    base: Measurement,
    after: dict[str, Measurement],
    spans: dict[str, slice],
    masks: dict[str, np.ndarray],
    n_boot: int,
    seed: int,
) -> Cells:
    """`spans[domain]`: the domain's items in the flat item list; `masks[source]`: (items,) judged by it."""
    sources, domains = list(after), list(spans)
    shape = (len(sources), len(domains))
    out = Cells(sources, domains, {}, {}, {}, {}, np.zeros(shape, dtype=int), {})
    for m in ev.METRICS:
        b0 = base.items[m]
        for key in ("before", "after", "delta", "stderr"):
            getattr(out, key)[m] = np.full(shape, np.nan)
        out.item_deltas[m] = [[np.empty(0)] * len(domains) for _ in sources]
        for i, s in enumerate(sources):
            a = after[s].items[m]
            for j, d in enumerate(domains):
                keep = masks[s][spans[d]] & np.isfinite(b0[spans[d]]) & np.isfinite(a[spans[d]])
                diff = (a[spans[d]] - b0[spans[d]])[keep]
                out.item_deltas[m][i][j] = diff
                out.n[i, j] = keep.sum()
                if keep.any():
                    out.before[m][i, j], out.after[m][i, j] = b0[spans[d]][keep].mean(), a[spans[d]][keep].mean()
                    out.delta[m][i, j] = diff.mean()
                    out.stderr[m][i, j] = stats.bootstrap_se(diff, n_boot, seed)
    return out


def reliabilities(
    cells: Cells, base: Measurement, spans: dict[str, slice], splits: int, seed: int
) -> dict[str, Record]:
    """Split-half reliability of each metric: its level across domains (base model), and its change across
    the pooled cells and across each source's domains."""
    out = {}
    for m in ev.METRICS:
        b0 = base.items[m]
        cells_flat = [x for row in cells.item_deltas[m] for x in row]
        out[m] = {
            "level": stats.split_half_reliability([b0[sl] for sl in spans.values()], splits, seed),
            "change_pooled": stats.split_half_reliability(cells_flat, splits, seed),
            "change_by_source": {
                s: stats.split_half_reliability(cells.item_deltas[m][i], splits, seed)
                for i, s in enumerate(cells.sources)
            },
        }
    return out


def correlation(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Record:
    """Pearson and Spearman of x with y, each with a 95% interval over the resamples `idx` (whole domains)."""
    out: Record = {"n": int((np.isfinite(x) & np.isfinite(y)).sum())}
    bx, by = stats.resampled(x, idx), stats.resampled(y, idx)
    for name, point, rows in (
        ("pearson", stats.pearson, stats.pearson_rows),
        ("spearman", stats.spearman, stats.spearman_rows),
    ):
        out[name] = {"r": point(x, y), "ci": stats.percentile_interval(rows(bx, by))}
    return out


def partial(x: np.ndarray, y: np.ndarray, z: np.ndarray, idx: np.ndarray) -> Record:
    """Partial Pearson r(x, y | z) with its 95% interval over the resamples `idx`."""
    draws = stats.partial_rows(stats.resampled(x, idx), stats.resampled(y, idx), stats.resampled(z, idx))
    return {"r": stats.partial_pearson(x, y, z), "ci": stats.percentile_interval(draws)}


def view(scores: dict[str, np.ndarray], targets: dict[str, np.ndarray], idx: np.ndarray) -> Record:
    """Every scorer against each target (|change|, change), and each STS variant's partial r given similarity."""
    out: Record = {
        "scores": {name: {t: correlation(x, y, idx) for t, y in targets.items()} for name, x in scores.items()}
    }
    if "similarity" in scores:
        out["partial_given_similarity"] = {
            v: {t: partial(scores[v], y, scores["similarity"], idx) for t, y in targets.items()}
            for v, scorer in SCORERS.items()
            if scorer.sts and v in scores
        }
    return out


def correlations(cells: Cells, matrix: dict[str, np.ndarray], n_boot: int, seed: int) -> Record:
    """metric -> {pooled, within, by_source}: `pooled` correlates raw values over all cells; `within`
    standardises scores and changes per source first (sources' score scales differ); intervals resample
    whole domains."""
    n_src, n_dom = len(cells.sources), len(cells.domains)
    # cell (i, j) flattened row-major belongs to domain j: a resample draws whole domains, all sources' cells
    pooled_idx = stats.bootstrap_indices(np.tile(np.arange(n_dom), n_src), n_boot, seed)
    source_idx = stats.bootstrap_indices(np.arange(n_dom), n_boot, seed)
    out = {}
    for m in ev.METRICS:
        delta = cells.delta[m]  # (sources, domains)
        pooled = {"abs": np.abs(delta).ravel(), "signed": delta.ravel()}
        within = {"abs": stats.zscored_rows(np.abs(delta)).ravel(), "signed": stats.zscored_rows(delta).ravel()}
        by_source = {
            s: view({k: v[i] for k, v in matrix.items()}, {"abs": np.abs(delta[i]), "signed": delta[i]}, source_idx)
            for i, s in enumerate(cells.sources)
        }
        out[m] = {
            "pooled": view({k: v.ravel() for k, v in matrix.items()}, pooled, pooled_idx),
            "within": view({k: stats.zscored_rows(v).ravel() for k, v in matrix.items()}, within, pooled_idx),
            "by_source": by_source,
        }
    return out


def reliable_metrics(report: Record) -> list[str]:
    return [m for m, info in report["metrics"].items() if info["reliable"]]


def primary_metric(report: Record) -> str:
    """The metric whose change is most reliable: the one the scatter plots show."""
    metrics = report["metrics"]
    return max(metrics, key=lambda m: np.nan_to_num(metrics[m]["reliability"]["change_pooled"], nan=-np.inf))
