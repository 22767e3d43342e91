"""Compare mixtures at the same budget: target only, + uniform replay, + mixopt's allocation
(`mixopt validate --compare-mixtures`).

The target's own fine-tune from the validation run is the first run; two more fine-tunes keep the same
schedule and budget and give half of it (the recipe's `compare.allocation.target_fraction`) to replay
from the evaluation domains' scoring parts, spread evenly or as `plan`'s solver allocates it from the
target's scores. Every metric is reported (replay can teach a metric's format, so one metric alone can
mislead): each domain's change, the mean and the worst, the target's own gain, each with a 95% interval
over items, and every run minus every other on the same resamples (paired). Tables and the chart:
`mixopt.validation.report`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from mixopt import evaluate as ev
from mixopt import stats
from mixopt.batching import epoch_stream
from mixopt.errors import MixoptError
from mixopt.recipe import ValidateRecipe
from mixopt.scores import Scores
from mixopt.validation.analysis import Cells, Record, build_cells
from mixopt.validation.data import DomainData, Pair, SourceData, scoring_pair
from mixopt.validation.evidence import ValidationRun
from mixopt.validation.finetune import Run, train_and_measure
from mixopt.validation.measure import Measurement


def draw(rows: Sequence[Pair], count: int, seed: int) -> list[Pair]:
    """`count` rows: seeded permutations of `rows` read in order (a row repeats only after all have appeared)."""
    return [rows[i] for i in epoch_stream(len(rows), count, seed)]


def mixture_runs(
    recipe: ValidateRecipe, target: SourceData, domains: Sequence[DomainData], scores: Scores
) -> list[Run]:
    """Target + uniform replay and target + mixopt's allocation, both at the schedule's budget in examples;
    replay comes from the domains' scoring parts (never an evaluation item)."""
    from mixopt.solver import round_to_budget, solve_allocation
    from mixopt.sts import name_seed

    budget = recipe.schedule.budget
    spec = recipe.compare.allocation.model_copy(update={"budget": budget})
    allocation = solve_allocation(scores, spec, seed=recipe.seed)
    replay = budget - allocation.target_count
    caps = [np.floor(spec.max_epochs * len(d.scoring)) for d in domains]
    if sum(caps) < replay:
        raise MixoptError(
            f"uniform replay needs {replay} rows but the scoring parts offer {int(sum(caps))} at "
            f"max_epochs {spec.max_epochs:g}; raise compare.allocation.max_epochs"
        )
    uniform = round_to_budget([replay / len(domains)] * len(domains), replay, caps)
    counts = {
        "uniform": dict(zip([d.name for d in domains], uniform, strict=True)),
        "mixopt": {a.name: a.count for a in allocation.domains},
    }
    target_rows = draw(target.pool, allocation.target_count, name_seed(recipe.seed, target.name))
    runs = []
    for kind, per_domain in counts.items():
        rows = list(target_rows)
        for d in domains:
            rows += draw([scoring_pair(i) for i in d.scoring], per_domain[d.name], name_seed(recipe.seed, d.name))
        runs.append(Run(f"{target.name}+{kind}", target.name, rows, {target.name: len(target_rows), **per_domain}))
    return runs


def compare_summary(
    cells: Cells,
    metric: str,
    base: Measurement,
    after: dict[str, Measurement],
    target: str,
    n_boot: int,
    seed: int,
) -> Record:
    """Per run: each domain's change, the worst one (in the metric's bad direction), the mean, and the
    target's own gain (reply NLL on its held-out rows, before minus after: positive is learning), each with
    a 95% interval over items; and every later run minus every earlier one, paired on the same items (for
    two mixtures, also the Spearman over domains of one's extra rows with its extra gain)."""
    sign = 1.0 if ev.HIGHER_IS_BETTER[metric] else -1.0
    names = cells.sources
    # an item is measured or not by its length alone, so every run keeps the same items of a domain
    per_domain = [
        np.stack([cells.item_deltas[metric][i][j] for i in range(len(names))]) for j in range(len(cells.domains))
    ]
    before_own = base.heldout[target]
    own = np.stack([before_own - after[run].heldout[target] for run in names])
    domain_draws = stats.paired_mean_draws(per_domain, n_boot, seed)  # (n_boot, runs, domains)
    draws = {
        "mean_change": np.nanmean(domain_draws, axis=-1),
        "worst_change": sign * np.nanmin(sign * domain_draws, axis=-1),
        "target_gain_nll": stats.paired_mean_draws([own], n_boot, seed)[..., 0],
    }  # statistic -> (n_boot, runs)
    runs = {}
    for i, run in enumerate(names):
        delta = cells.delta[metric][i]
        worst = int(np.nanargmin(sign * delta))
        point = {
            "mean_change": float(np.nanmean(delta)),
            "worst_change": float(delta[worst]),
            "target_gain_nll": float(np.nanmean(own[i])),
        }
        runs[run] = {
            "per_domain": dict(zip(cells.domains, delta.tolist(), strict=True)),
            "per_domain_stderr": dict(zip(cells.domains, cells.stderr[metric][i].tolist(), strict=True)),
            "worst": {"domain": cells.domains[worst], "change": point["worst_change"]},
            **{k: {"value": v, "ci": stats.percentile_interval(draws[k][:, i])} for k, v in point.items()},
            "mixture": after[run].mixture,
        }
    differences = []
    for i, j in itertools.combinations(range(len(names)), 2):
        later, earlier = runs[names[j]], runs[names[i]]
        diff: dict[str, Any] = {"runs": [names[j], names[i]]}
        for k in draws:
            value = later[k]["value"] - earlier[k]["value"]
            diff[k] = {"difference": value, "ci": stats.percentile_interval(draws[k][:, j] - draws[k][:, i])}
        if later["mixture"] and earlier["mixture"]:
            # did the rows one mixture adds to a domain buy that domain more (in the good direction)?
            extra = [later["mixture"].get(d, 0) - earlier["mixture"].get(d, 0) for d in cells.domains]
            gain = [sign * (later["per_domain"][d] - earlier["per_domain"][d]) for d in cells.domains]
            diff["extra_rows_vs_gain_spearman"] = stats.spearman(np.array(extra, float), np.array(gain))
        differences.append(diff)
    return {
        "metric": metric,
        "higher_is_better": ev.HIGHER_IS_BETTER[metric],
        "target": target,
        "runs": runs,
        "differences": differences,
    }


def run_compare(run: ValidationRun) -> Record:
    """Target only (the target's own fine-tune) vs + uniform replay vs + mixopt's allocation, on every
    metric (replay can teach a metric's format, so one metric alone can mislead); `compare.metric` leads."""
    recipe = run.recipe
    target = run.source(recipe.compare_target)
    runs = {target.name: run.after[target.name]}
    for mixture in mixture_runs(recipe, target, run.domains, run.scores[target.name]):
        t = time.perf_counter()
        runs[mixture.name] = train_and_measure(
            recipe, mixture, run.items, target.heldout, run.out, run.identity, run.recorded_only
        )
        run.timings[f"finetune_{mixture.name}"] = time.perf_counter() - t
    e = recipe.evaluation
    base = run.measured_base
    cells = build_cells(base, runs, run.spans, {r: run.masks[target.name] for r in runs}, e.bootstrap, recipe.seed)
    by_metric = {m: compare_summary(cells, m, base, runs, target.name, e.bootstrap, recipe.seed) for m in ev.METRICS}
    return {"metric": recipe.compare.metric, "by_metric": by_metric}
