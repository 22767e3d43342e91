"""Sweep: which scoring settings forecast the measured change best? (`mixopt validate --sweep`)

The design leaves open the number of shifted latents k, the demonstrations per query m, the score
variant and which tokens count (DESIGN.md section 3). The sweep re-scores a finished validation run
under each setting and correlates every scorer with the change of the run's primary (most reliable)
metric. Nothing is trained or measured again: fine-tunes and measurements come from the run folder,
and feature passes from the cache wherever the scored token ids are unchanged (k, and the variants
computed from the same passes); a new m recomputes the sources' shift passes, `icl` runs each domain
once more with its own worked examples (on `ICL_DOMAIN_TOKENS` tokens per domain, to keep the sweep
within minutes on a CPU), and counting only response tokens rescores every source and domain. Each other
shipped built-in SAE of the model (the layer-15 one beside the default at 22) re-runs the passes that read
latents with it, at its own layer: the layer is swept because more than one SAE is shipped.
The table: `mixopt.validation.report.sweep_table`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase as fnmatch
from pathlib import Path
from typing import Any

import numpy as np

from mixopt import stats
from mixopt.artifacts import BUILTIN_SAES, builtin_sae_dir, sae_shape
from mixopt.files import write_json
from mixopt.recipe import SAESpec, ValidateRecipe
from mixopt.scores import SCORERS
from mixopt.validation.analysis import Cells, Record, correlations
from mixopt.validation.evidence import ValidationRun
from mixopt.validation.scoring import score_matrix, score_sources
from mixopt.validation.verdict import CostShare, cost_share, judge, reference_setting

TOP_K = (10, 30, 100, 300, 1000)
DEMOS = (1, 2, 4)
ICL_DOMAIN_TOKENS = 3000
PROBE_STEPS = (1, 2, 4, 8)  # the pilot's curve (docs/validation.md, round 2, rule 3)
# the look-ahead scorers read a full forward + backward (grad) or two full forwards (probe) per domain and target:
# ~50 tokens/s on one busy CPU core, 33 min per source at 3,000 tokens per domain. On FORECAST_DOMAIN_TOKENS
# (about 10 MCQ items per domain) the CPU sweep of every setting fits a few hours; it handicaps the forecasts
# against the STS passes (10,000 tokens), and a GPU run should raise it to the recipe's domain_tokens.
FORECAST_DOMAIN_TOKENS = 1000
TOKENS = ("content", "response")
SHIFT_SCORERS = tuple(n for n, s in SCORERS.items() if s.reads_shift and n != "icl")  # k and m move these
ALL_SCORERS = tuple(n for n in SCORERS if n != "icl")  # `icl` has a setting of its own (its extra passes)
PROBE_SCORERS = ("probe", "probe_act")  # one pilot fine-tune measures both


@dataclass
class Setting:
    name: str
    sts: dict[str, Any] = field(default_factory=dict)  # overrides of the recipe's `sts` section
    demos: int | None = None  # m for every source; None keeps each source's own
    scorers: tuple[str, ...] = SHIFT_SCORERS  # which scorers this setting can move
    sae: SAESpec | None = None  # another SAE, with the layer it reads, in place of the recipe's


def settings(recipe: ValidateRecipe, only: Sequence[str] = ()) -> list[Setting]:
    """The recipe's own setting (with every scorer), then k, m, the `icl` variant, the tokens and the look-ahead
    forecasts one at a time; `only`: just those whose names match one of these globs (and the recipe's own)."""
    every = [
        Setting("recipe", scorers=ALL_SCORERS),
        *(Setting(f"top_k={k}", {"top_k": k}) for k in TOP_K if k != recipe.sts.top_k),
        *(Setting(f"demos={m}", demos=m) for m in DEMOS if any(s.icl_demos != m for s in recipe.sources)),
        Setting("score=icl", {"score": "icl", "domain_tokens": ICL_DOMAIN_TOKENS}, scorers=("icl",)),
        *(Setting(f"tokens={t}", {"tokens": t}, scorers=ALL_SCORERS) for t in TOKENS if t != recipe.sts.tokens),
        *forecast_settings(),
        *sae_settings(recipe),
    ]
    return [s for s in every if s.name == "recipe" or not only or any(fnmatch(s.name, g) for g in only)]


def forecast_settings() -> list[Setting]:
    """The look-ahead scorers: `grad` with each update direction, `probe` (and `probe_act`, the same pilot)
    at each step count of the curve."""
    tokens = {"domain_tokens": FORECAST_DOMAIN_TOKENS}
    return [
        *(
            Setting(
                f"score=grad,direction={d}", {"score": "grad", "grad": {"direction": d}, **tokens}, scorers=("grad",)
            )
            for d in ("plain", "adam")
        ),
        *(
            Setting(
                f"score=probe,steps={n}", {"score": "probe", "probe": {"steps": n}, **tokens}, scorers=PROBE_SCORERS
            )
            for n in PROBE_STEPS
        ),
    ]


def sibling_saes(spec: SAESpec, base_dir: Path) -> list[SAESpec]:
    """The other shipped built-in SAEs of the same model as the built-in `spec` (e.g. the layer-15 SAE beside
    the default at layer 22), each with the layer its hook names; none for a local folder or a release."""
    if spec.path not in BUILTIN_SAES:
        return []
    family = spec.path.rsplit("-res-l", 1)[0]
    siblings = []
    for alias in sorted(BUILTIN_SAES):
        if alias == spec.path or alias.rsplit("-res-l", 1)[0] != family:
            continue
        if not (builtin_sae_dir(alias) / "cfg.json").is_file():
            continue  # declared but not shipped in this install
        shape = sae_shape(SAESpec(path=alias, layer=spec.layer), base_dir)
        if shape is not None and shape.layer is not None:
            siblings.append(SAESpec(path=alias, layer=shape.layer))
    return siblings


def sae_settings(recipe: ValidateRecipe) -> list[Setting]:
    """Each sibling SAE (`sibling_saes`) in place of the recipe's: the STS passes, the `icl` variant and the
    probe's `probe_act` at one step (the scorers that read latents), so `--sweep` compares layers and SAEs."""
    every = []
    for sae in sibling_saes(recipe.sae, recipe.base_dir):
        every += [
            Setting(f"sae={sae.path}", sae=sae),
            Setting(
                f"sae={sae.path},score=icl",
                {"score": "icl", "domain_tokens": ICL_DOMAIN_TOKENS},
                scorers=("icl",),
                sae=sae,
            ),
            Setting(
                f"sae={sae.path},score=probe,steps=1",
                {"score": "probe", "probe": {"steps": 1}, "domain_tokens": FORECAST_DOMAIN_TOKENS},
                scorers=("probe_act",),
                sae=sae,
            ),
        ]
    return every


def with_setting(recipe: ValidateRecipe, setting: Setting) -> ValidateRecipe:
    """The recipe with the setting's `sts` overrides (nested sections merged, then validated again) and its
    SAE, if it names one."""
    sources = recipe.sources
    if setting.demos is not None:
        sources = [s.model_copy(update={"icl_demos": setting.demos}) for s in sources]
    sts = recipe.sts.model_dump()
    for key, value in setting.sts.items():
        sts[key] = {**sts[key], **value} if isinstance(value, dict) else value
    update: dict[str, Any] = {"sts": type(recipe.sts).model_validate(sts), "sources": sources}
    if setting.sae is not None:
        update["sae"] = setting.sae
    return recipe.model_copy(update=update)


def run_sweep(
    run: ValidationRun, cells: Cells, metric: str, check_metrics: Sequence[str] = (), only: Sequence[str] = ()
) -> Record:
    """{metric, reference, rows: [{setting, scorer, pooled, within, versus_reference}]}: each row's
    correlations with |change| and change of `metric`, pooled over the cells and standardised within each
    source (validate.correlations), and its within-source |change| Spearman minus the reference's (the
    recipe's own scorer) with a paired 95% interval: both sides on the same resamples of domains, so a
    setting only beats the default when that interval excludes 0.
    The run's own score matrix is the `recipe` setting's (not scored again).
    `check_metrics`: the best row is compared with the reference on each of these metrics too
    (`best_across_metrics`): one win among many rows is only worth a default if it holds elsewhere.
    `only`: globs over the settings' names (`fnmatch`); the recipe's own setting always runs."""
    recipe, out = run.recipe, run.out
    n_boot, seed = recipe.evaluation.bootstrap, recipe.seed
    sweep: Record = {"metric": metric, "reference": recipe.sts.score, "rows": []}
    reference: tuple[float, np.ndarray] | None = None  # the recipe scorer's within-source r and its draws
    matrices: dict[tuple[str, str], np.ndarray] = {}  # (setting, scorer) -> (sources, domains) scores
    draws_of = within_abs_spearman_draws(cells, metric, n_boot, seed)
    costs: dict[str, CostShare | None] = {}  # setting -> its forecast's cost share (look-ahead settings)
    for setting in settings(recipe, only):  # the recipe's own setting comes first: it holds the reference
        if setting.name == "recipe":
            scores, matrix = run.scores, run.matrix
        else:
            scored = with_setting(recipe, setting)
            scores = score_sources(scored, run.sources, run.domains, out / "sweep" / setting.name)
            matrix = score_matrix(scores, cells.sources, cells.domains)
        costs[setting.name] = cost_share(scores, run.after)
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
                row["versus_reference"] = {
                    "difference": difference,
                    "ci": stats.percentile_interval(draws - reference[1]),
                }
            sweep["rows"].append(row)
        write_json(out / "sweep" / "sweep.json", sweep, strict=True)  # the settings so far, should the sweep be stopped
    default = reference_setting(recipe.sts.tokens)
    stand_in = ("recipe", default[1])  # the default's scorer under the recipe's tokens, when its own were not swept
    if default in matrices or stand_in in matrices:  # round 2's rule: which forecast becomes the default
        judged_against = default if default in matrices else stand_in
        verdict = judge(cells, matrices, costs, judged_against, metric, check_metrics, n_boot, seed)
        sweep["verdict"] = verdict.to_record() | {"shipped_default": list(default)}
        write_json(out / "sweep" / "sweep.json", sweep, strict=True)
    best = best_row(sweep)
    if ("recipe", recipe.sts.score) in matrices:
        sweep["best_across_metrics"] = {
            m: versus_on(
                cells, m, matrices[best["setting"], best["scorer"]], matrices["recipe", recipe.sts.score], n_boot, seed
            )
            for m in check_metrics
        }
        write_json(out / "sweep" / "sweep.json", sweep, strict=True)
    return sweep


def versus_on(cells: Cells, metric: str, scores: np.ndarray, reference: np.ndarray, n_boot: int, seed: int) -> Record:
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
        "ci": stats.percentile_interval(diff),
        "share_not_above": float(np.mean(finite <= 0)) if len(finite) else float("nan"),
        "by_source": {
            s: stats.spearman(scores[i], np.abs(cells.delta[metric][i])) for i, s in enumerate(cells.sources)
        },
    }


def within_abs_spearman(cells: Cells, metric: str, scores: np.ndarray) -> float:
    """Spearman of scores with |change| over the cells, both standardised within each source first."""
    return stats.spearman(stats.zscored_rows(scores).ravel(), stats.zscored_rows(np.abs(cells.delta[metric])).ravel())


def within_abs_spearman_draws(cells: Cells, metric: str, n_boot: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """scores -> (n_boot,) within-source Spearman with |change| on the resamples `correlations` draws
    (same seed and clusters); the resamples and the resampled target are built once for the whole sweep."""
    n_src, n_dom = len(cells.sources), len(cells.domains)
    idx = stats.bootstrap_indices(np.tile(np.arange(n_dom), n_src), n_boot, seed)
    target = stats.resampled(stats.zscored_rows(np.abs(cells.delta[metric])).ravel(), idx)
    return lambda values: stats.spearman_rows(stats.resampled(stats.zscored_rows(values).ravel(), idx), target)


def best_row(sweep: Record) -> Record:
    """The row whose scores track |change| best within sources (sources' scales differ, DESIGN.md 7);
    a correlation that could not be computed (None once read back from JSON, or NaN) ranks last."""

    def within_r(row: Record) -> float:
        r = row["within"]["abs"]["spearman"]["r"]
        return r if r is not None and np.isfinite(r) else -np.inf

    return max(sweep["rows"], key=within_r)
