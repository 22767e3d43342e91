"""Sweep: which scoring settings forecast the measured change best? (`mixopt validate --sweep`)

The design leaves open the number of shifted latents k, the demonstrations per query m, the score
variant and which tokens count (DESIGN.md section 3). The sweep re-scores a finished validation run
under each setting and correlates every scorer with the change of the run's primary (most reliable)
metric. Nothing is trained or measured again: fine-tunes and measurements come from the run folder,
and feature passes from the cache wherever the scored token ids are unchanged (k, and the variants
computed from the same passes); a new m recomputes the sources' shift passes, `icl` runs each domain
once more with its own worked examples (on `ICL_DOMAIN_TOKENS` tokens per domain, to keep the sweep
within minutes on a CPU), and counting only response tokens rescores every source and domain.

Example:
    >>> report = run_validation(recipe, Path("runs/v"), sweep=True).report    # doctest: +SKIP
    >>> print(sweep_table(report["sweep"]))                                   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mixopt import evaluate as ev
from mixopt.recipe import ValidateRecipe

TOP_K = (10, 30, 100, 300, 1000)
DEMOS = (1, 2, 4)
ICL_DOMAIN_TOKENS = 3000
TOKENS = ("content", "response")
SHIFT_SCORERS = ("act", "act_sq", "raw")  # scorers that read the shifted latents (or dimensions)
ALL_SCORERS = (*SHIFT_SCORERS, "similarity", "random")


@dataclass
class Setting:
    name: str
    sts: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's `sts` section
    demos: int | None = None  # m for every source; None keeps each source's own
    scorers: tuple[str, ...] = SHIFT_SCORERS  # which scorers this setting can move


def settings(recipe: ValidateRecipe) -> list[Setting]:
    """The recipe's own setting (with every scorer), then k, m and the `icl` variant one at a time."""
    return [
        Setting("recipe", scorers=ALL_SCORERS),
        *(Setting(f"top_k={k}", {"top_k": k}) for k in TOP_K if k != recipe.sts.top_k),
        *(Setting(f"demos={m}", demos=m) for m in DEMOS if any(s.icl_demos != m for s in recipe.sources)),
        Setting("score=icl", {"score": "icl", "domain_tokens": ICL_DOMAIN_TOKENS}, scorers=("icl",)),
        *(Setting(f"tokens={t}", {"tokens": t}, scorers=ALL_SCORERS) for t in TOKENS if t != recipe.sts.tokens),
    ]


def with_setting(recipe: ValidateRecipe, setting: Setting) -> ValidateRecipe:
    sources = recipe.sources
    if setting.demos is not None:
        sources = [s.model_copy(update={"icl_demos": setting.demos}) for s in sources]
    return recipe.model_copy(update={"sts": recipe.sts.model_copy(update=setting.sts), "sources": sources})


def run_sweep(
    recipe: ValidateRecipe,
    out: Path,
    cells: Any,
    metric: str,
    recipe_matrix: dict[str, np.ndarray],
    check_metrics: Sequence[str] = (),
) -> dict[str, Any]:
    """{metric, reference, rows: [{setting, scorer, pooled, within, versus_reference}]}: each row's
    correlations with |change| and change of `metric`, pooled over the cells and standardised within each
    source (validate.correlations), and its within-source |change| Spearman minus the reference's (the
    recipe's own scorer) with a paired 95% interval: both sides on the same resamples of domains, so a
    setting only beats the default when that interval excludes 0.
    `recipe_matrix`: the run's own score matrix, which is the `recipe` setting's (not scored again).
    `check_metrics`: the best row is compared with the reference on each of these metrics too
    (`best_across_metrics`): one win among many rows is only worth a default if it holds elsewhere."""
    from mixopt.validate import correlations, score_matrix, score_sources, write_json

    n_boot, seed = recipe.evaluation.bootstrap, recipe.seed
    sweep: dict[str, Any] = {"metric": metric, "reference": recipe.sts.score, "rows": []}
    reference: tuple[float, np.ndarray] | None = None  # the recipe scorer's within-source r and its draws
    matrices: dict[tuple[str, str], np.ndarray] = {}  # (setting, scorer) -> (sources, domains) scores
    draws_of = within_abs_spearman_draws(cells, metric, n_boot, seed)
    for setting in settings(recipe):  # the recipe's own setting comes first: it holds the reference
        if setting.name == "recipe":
            matrix = recipe_matrix
        else:
            scores = score_sources(with_setting(recipe, setting), out, cells.domains, out / "sweep" / setting.name)
            matrix = score_matrix(scores, cells.sources, cells.domains)
        matrix = {k: v for k, v in matrix.items() if k in setting.scorers}
        result = correlations(cells, matrix, n_boot, seed)[metric]
        within = result["within"]["scores"]
        if setting.name == "recipe" and recipe.sts.score in matrix:
            r0 = within[recipe.sts.score]["abs"]["spearman"]["r"]
            reference = (r0, draws_of(matrix[recipe.sts.score]))
        for scorer, values in matrix.items():
            matrices[setting.name, scorer] = values
            row = {"setting": setting.name, "scorer": scorer, "pooled": result["pooled"]["scores"][scorer]}
            row["within"] = within[scorer]
            if reference is not None:
                draws = draws_of(values)
                difference = within[scorer]["abs"]["spearman"]["r"] - reference[0]
                row["versus_reference"] = {"difference": difference, "ci": ev.percentile_interval(draws - reference[1])}
            sweep["rows"].append(row)
        write_json(out / "sweep" / "sweep.json", sweep)  # the settings so far, should the sweep be stopped
    best = best_row(sweep)
    if ("recipe", recipe.sts.score) in matrices:
        sweep["best_across_metrics"] = {
            m: versus_on(
                cells, m, matrices[best["setting"], best["scorer"]], matrices["recipe", recipe.sts.score], n_boot, seed
            )
            for m in check_metrics
        }
        write_json(out / "sweep" / "sweep.json", sweep)
    return sweep


def versus_on(
    cells: Any, metric: str, scores: np.ndarray, reference: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    """Within-source |change| Spearman of `scores` and of `reference` on `metric`, their paired difference
    with its 95% interval and the share of resamples where `scores` does not beat `reference`, and
    `scores`' Spearman within each source."""
    draws_of = within_abs_spearman_draws(cells, metric, n_boot, seed)
    r = within_abs_spearman(cells, metric, scores)
    r0 = within_abs_spearman(cells, metric, reference)
    diff = draws_of(scores) - draws_of(reference)
    finite = diff[np.isfinite(diff)]
    return {
        "r": r,
        "reference_r": r0,
        "difference": r - r0,
        "ci": ev.percentile_interval(diff),
        "share_not_above": float(np.mean(finite <= 0)) if len(finite) else float("nan"),
        "by_source": {s: ev.spearman(scores[i], np.abs(cells.delta[metric][i])) for i, s in enumerate(cells.sources)},
    }


def within_abs_spearman(cells: Any, metric: str, scores: np.ndarray) -> float:
    """Spearman of scores with |change| over the cells, both standardised within each source first."""
    from mixopt.validate import _zscored

    return ev.spearman(_zscored(scores).ravel(), _zscored(np.abs(cells.delta[metric])).ravel())


def within_abs_spearman_draws(cells: Any, metric: str, n_boot: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """scores -> (n_boot,) within-source Spearman with |change| on the resamples `correlations` draws
    (same seed and clusters); the resamples and the resampled target are built once for the whole sweep."""
    from mixopt.validate import _resampled, _zscored

    n_src, n_dom = len(cells.sources), len(cells.domains)
    idx = ev.bootstrap_indices(np.tile(np.arange(n_dom), n_src), n_boot, seed)
    target = _resampled(_zscored(np.abs(cells.delta[metric])).ravel(), idx)
    return lambda values: ev.spearman_rows(_resampled(_zscored(values).ravel(), idx), target)


def best_row(sweep: dict[str, Any]) -> dict[str, Any]:
    """The row whose scores track |change| best within sources (sources' scales differ, DESIGN.md 7);
    a correlation that could not be computed (None once read back from JSON, or NaN) ranks last."""

    def within_r(row: dict[str, Any]) -> float:
        r = row["within"]["abs"]["spearman"]["r"]
        return r if r is not None and np.isfinite(r) else -np.inf

    return max(sweep["rows"], key=within_r)


def sweep_table(sweep: dict[str, Any]) -> str:
    from mixopt.validate import _r, _rci

    reference = sweep.get("reference", "act")
    lines = [
        f"sweep: every setting against the change in {sweep['metric']} (95% intervals resample domains; "
        f"the last column is paired, against the recipe's {reference})",
        f"{'setting':<15} {'scorer':<11} {'|change| Pearson':>20} {'|change| Spearman':>20} "
        f"{'within |change| Spearman':>24} {'change Pearson':>20} {'within minus ' + reference:>22}",
    ]
    for r in sweep["rows"]:
        p, w = r["pooled"], r["within"]
        versus = r.get("versus_reference", {"difference": None, "ci": [None, None]})
        lines.append(
            f"{r['setting']:<15} {r['scorer']:<11} {_rci(p['abs']['pearson']):>20} {_rci(p['abs']['spearman']):>20} "
            f"{_rci(w['abs']['spearman']):>24} {_rci(p['signed']['pearson']):>20} "
            f"{_rci({'r': versus['difference'], 'ci': versus['ci']}):>22}"
        )
    best = best_row(sweep)
    lines.append(f"best within-source forecaster of |change|: {best['scorer']} at {best['setting']}; {_beats(best)}")
    if sweep.get("best_across_metrics"):
        lines.append(
            f"the same row on every reliable metric (within-source |change| Spearman; minus {reference}, paired; "
            "share of resamples where it is not above; per source):"
        )
        for m, v in sweep["best_across_metrics"].items():
            per_source = ", ".join(f"{s} {_r(r)}" for s, r in v["by_source"].items())
            lines.append(
                f"  {m:<12} {_r(v['r'])} ({reference} {_r(v['reference_r'])})  "
                f"{_rci({'r': v['difference'], 'ci': v['ci']})}  {v['share_not_above']:.3f}  {per_source}"
            )
    return "\n".join(lines)


def _beats(row: dict[str, Any]) -> str:
    """Whether a row's edge over the recipe's scorer is more than resampling noise (paired interval)."""
    lo, hi = row.get("versus_reference", {}).get("ci", [None, None])
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return "no paired interval"
    if lo > 0:
        return "better than the recipe's scorer beyond resampling noise"
    if lo == hi == 0:
        return "identical to the recipe's scorer on every resample"
    return "not distinguishable from the recipe's scorer (the paired interval includes 0)"
