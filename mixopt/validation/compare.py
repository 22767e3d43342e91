"""Compare mixtures at the same budget (`mixopt validate --compare-mixtures [--seeds N]`).

Arms, each a fine-tune with the schedule's budget in examples and the target's rows for the rest:
- `target`: the target alone (seed 0 is the validation's own fine-tune of the target);
- `uniform`: replay spread evenly over the domains; `proportional`: in proportion to each domain's
  scoring part (its size);
- `minimax`, `protect`: `plan`'s solver with that objective on the target's forecast
  (`compare.forecast`, a sweep setting; the recipe's own scores when unset); `protect_forecast`: `protect`'s
  counts, each domain's rows the ones its per-example forecast says the fine-tune hurts most
  (`allocation.replay.select: forecast`).
Replay rows come from the domains' scoring parts (never an evaluation item), in each domain's own format
(an MCQ subject: question with choices -> "Answer: <letter>").

The replay fraction is chosen before any mixopt arm trains (the issue's rule, docs/validation.md): target
and uniform at each of `compare.replay_fractions`, then `choose_replay_fraction`. A seed changes the
training order only (the rows are the same): seed 0 trains in the recipe seed's order, seed k in
`order_seed(seed, k)`. Every statistic (each domain's change, the mean, the worst, the target's own gain)
has a 95% interval over items; a mixture's value is the mean over its seeds, and its paired difference
against uniform (same items, same resamples) adds seed noise, measured as the spread between the seeds of
every mixture (`seed_noise`), so its interval counts both noises. Tables and the chart:
`mixopt.validation.report`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

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
from mixopt.validation.measure import Measurement, note

MIXTURES = ("target", "uniform", "proportional", "minimax", "protect", "protect_forecast")
SOLVED = {
    "minimax": ("minimax", "random"),
    "protect": ("protect", "random"),
    "protect_forecast": ("protect", "forecast"),
}
STATISTICS = ("mean_change", "worst_change", "target_gain_nll")
BAR_REDUCTION = 0.3  # the bar: at least 30% less worst-subject forgetting than uniform
BAR_TARGET_GAIN = 0.9  # ... with the target's own gain within 10% of uniform's


@dataclass(frozen=True)
class Arm:
    """One fine-tune of the comparison: a mixture, its replay fraction (0 for `target`) and a seed index."""

    mixture: str
    replay_fraction: float
    seed: int = 0  # 0: the recipe seed's training order; k: `order_seed(recipe.seed, k)`

    def name(self, target: str) -> str:
        """The run's name (its measurement file): seed 0 of `target` is the validation's own fine-tune."""
        seed = f"-s{self.seed}" if self.seed else ""
        if self.mixture == "target":
            return f"{target}{seed}"
        return f"{target}+{self.mixture}-r{round(100 * self.replay_fraction)}{seed}"


def order_seed(seed: int, index: int) -> int:
    """The training-order seed of seed index `index`: the recipe's own for 0, a hash of (seed, index) else."""
    from mixopt.sts import name_seed

    return seed if index == 0 else name_seed(seed, f"order-{index}")


def draw(rows: Sequence[Pair], count: int, seed: int) -> list[Pair]:
    """`count` rows: seeded permutations of `rows` read in order (a row repeats only after all have appeared)."""
    return [rows[i] for i in epoch_stream(len(rows), count, seed)]


def replay_counts(
    arm: Arm, recipe: ValidateRecipe, domains: Sequence[DomainData], scores: Scores | None
) -> tuple[int, dict[str, int]]:
    """(target rows, domain -> replay rows) of an arm at the schedule's budget in examples."""
    from mixopt.solver import round_to_budget, solve_allocation

    budget = recipe.schedule.budget
    replay = round(arm.replay_fraction * budget)
    names = [d.name for d in domains]
    if arm.mixture == "target":
        return budget, dict.fromkeys(names, 0)
    spec = recipe.compare.allocation
    caps = [np.floor(spec.max_epochs * len(d.scoring)) for d in domains]
    if sum(caps) < replay:
        raise MixoptError(
            f"{arm.mixture} replay needs {replay} rows but the scoring parts offer {int(sum(caps))} at "
            f"max_epochs {spec.max_epochs:g}; raise compare.allocation.max_epochs"
        )
    if arm.mixture in SOLVED:
        if scores is None:
            raise MixoptError(f"the {arm.mixture} mixture needs the target's forecast")
        objective, select = SOLVED[arm.mixture]
        spec = spec.model_copy(
            update={"budget": budget, "objective": objective, "target_fraction": 1.0 - arm.replay_fraction}
        )
        allocation = solve_allocation(scores, spec, seed=recipe.seed)
        return allocation.target_count, {a.name: a.count for a in allocation.domains}
    sizes = {"uniform": [1.0] * len(domains), "proportional": [float(len(d.scoring)) for d in domains]}
    if arm.mixture not in sizes:
        raise MixoptError(f"unknown mixture '{arm.mixture}'; use one of {', '.join(MIXTURES)}")
    weights = np.array(sizes[arm.mixture])
    counts = round_to_budget(list(replay * weights / weights.sum()), replay, caps)
    return budget - replay, dict(zip(names, counts, strict=True))


def arm_run(
    arm: Arm, recipe: ValidateRecipe, target: SourceData, domains: Sequence[DomainData], scores: Scores | None
) -> Run:
    """The arm's training rows: the target's draw, then each domain's replay rows (its own seeded draw, or
    for `protect_forecast` its rows ranked by per-example forecast, most hurt first)."""
    from mixopt.mixture import forecast_selection, ranked_indices
    from mixopt.sts import name_seed

    name = arm.name(target.name)
    order = order_seed(recipe.seed, arm.seed)
    if arm.mixture == "target":
        if arm.seed == 0:  # the validation's own fine-tune: the pool, of which training draws the budget
            return Run(name, target.name, list(target.pool), order_seed=order)
        # the rows seed 0 trained on (its step batches draw them from the pool by the same stream), reordered
        rows = draw(target.pool, recipe.schedule.budget, recipe.seed)
        return Run(name, target.name, rows, {target.name: len(rows)}, order_seed=order)
    target_count, counts = replay_counts(arm, recipe, domains, scores)
    rows = draw(target.pool, target_count, name_seed(recipe.seed, target.name))
    ranked = arm.mixture in SOLVED and SOLVED[arm.mixture][1] == "forecast"
    by_name = {d.name: d for d in scores.domains} if scores is not None else {}
    scorer = scores.score if scores is not None else ""
    for d in domains:
        pairs = [scoring_pair(i) for i in d.scoring]
        seed = name_seed(recipe.seed, d.name)
        if ranked:
            s = by_name[d.name]
            selection = forecast_selection(len(pairs), s.example_indices, s.example_scores, seed, scorer)
            rows += [pairs[i] for i in ranked_indices(selection.ranking, counts[d.name])]
        else:
            rows += draw(pairs, counts[d.name], seed)
    return Run(name, target.name, rows, {target.name: target_count, **counts}, order_seed=order)


@dataclass
class Regime:
    """The replay fraction the mixopt arms train at, and why (`choose_replay_fraction`)."""

    replay_fraction: float
    reason: str
    candidates: dict[str, Record]  # "10%" -> uniform's worst domain, its change and 95% interval, clear?

    def to_record(self) -> Record:
        return {"replay_fraction": self.replay_fraction, "reason": self.reason, "candidates": self.candidates}


def choose_replay_fraction(worst: dict[float, Record], higher_is_better: bool) -> Regime:
    """The rule set before the mixopt runs (docs/validation.md, mixtures round 2): the largest replay
    fraction at which uniform replay still leaves clear forgetting (its worst domain's change in the bad
    direction, the 95% item interval excluding 0); if none does, the smallest, and the reason says that
    uniform already removes worst-domain forgetting there. `worst`: fraction -> {domain, value, ci}."""
    sign = 1.0 if higher_is_better else -1.0
    candidates = {}
    clear = []
    for fraction, w in sorted(worst.items()):
        bad_side = max(sign * w["ci"][0], sign * w["ci"][1]) < 0  # the whole interval on the bad side
        candidates[f"{round(100 * fraction)}%"] = {**w, "clear_forgetting": bool(bad_side)}
        if bad_side:
            clear.append(fraction)
    if clear:
        chosen = max(clear)
        reason = (
            f"the largest replay fraction at which uniform replay leaves clear forgetting "
            f"({len(clear)} of {len(worst)} candidates do)"
        )
    else:
        chosen = min(worst)
        reason = "uniform replay leaves no clear worst-domain forgetting at any candidate: the smallest is used"
    return Regime(chosen, reason, candidates)


# ------------------------------------------------------------------------------------------ statistics


def compare_summary(
    cells: Cells,
    metric: str,
    base: Measurement,
    after: dict[str, Measurement],
    target: str,
    n_boot: int,
    seed: int,
    arms: dict[str, Arm] | None = None,
) -> Record:
    """Per run: each domain's change, the worst one (in the metric's bad direction), the mean, and the
    target's own gain (reply NLL on its held-out rows, before minus after: positive is learning), each with
    a 95% interval over items. With `arms` (run -> its arm): per mixture, the mean over its seeds; the seed
    noise of each statistic; and every mixture minus uniform, paired on the same items, with an interval
    that adds the seed noise (`mixture_summary`)."""
    sign = 1.0 if ev.HIGHER_IS_BETTER[metric] else -1.0
    names = cells.sources
    # an item is measured or not by its length alone, so every run keeps the same items of a domain
    per_domain = [
        np.stack([cells.item_deltas[metric][i][j] for i in range(len(names))]) for j in range(len(cells.domains))
    ]
    own = np.stack([base.heldout[target] - after[run].heldout[target] for run in names])
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
    summary: Record = {
        "metric": metric,
        "higher_is_better": ev.HIGHER_IS_BETTER[metric],
        "target": target,
        "runs": runs,
    }
    if arms:
        summary |= mixture_summary(runs, draws, [arms[n] for n in names], sign, cells.domains, seed)
    return summary


def mixture_summary(
    runs: Record, draws: dict[str, np.ndarray], arms: Sequence[Arm], sign: float, domains: Sequence[str], seed: int
) -> Record:
    """{mixtures, seed_noise, versus_uniform}. A mixture's statistic is the mean over its seeds (point and
    item draws alike: the runs share the resamples). Seed noise: the pooled standard deviation of a statistic
    between seeds of the same mixture (same rows and items, so the spread is training noise alone), over every
    mixture with two seeds or more. Mixture minus uniform: the paired item draws plus a normal draw of the
    seed noise of a difference of two seed means, sd = seed_sd * sqrt(1/S_a + 1/S_u) (both noises counted;
    none added, and `seed_noise` null, when no mixture has two seeds)."""
    names = list(runs)
    groups: dict[str, list[int]] = {}
    for i, arm in enumerate(arms):
        groups.setdefault(arm.mixture, []).append(i)
    mixtures: Record = {}
    means: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
    for mixture, idx in groups.items():
        means[mixture] = {
            k: (float(np.mean([runs[names[i]][k]["value"] for i in idx])), draws[k][:, idx].mean(axis=1))
            for k in STATISTICS
        }
        per_domain = {d: float(np.mean([runs[names[i]]["per_domain"][d] for i in idx])) for d in domains}
        mixtures[mixture] = {
            "runs": [names[i] for i in idx],
            "seeds": len(idx),
            "per_domain": per_domain,
            **{k: {"value": v, "ci": stats.percentile_interval(d)} for k, (v, d) in means[mixture].items()},
            "item_sd": {k: float(np.std(d)) for k, (_, d) in means[mixture].items()},
        }
    seed_sd = {
        k: pooled_seed_sd([[runs[names[i]][k]["value"] for i in idx] for idx in groups.values()]) for k in STATISTICS
    }
    result: Record = {"mixtures": mixtures, "seed_noise": seed_sd, "versus_uniform": {}}
    if "uniform" not in groups:
        return result
    rng = np.random.default_rng([seed, 7])
    for mixture, idx in groups.items():
        if mixture == "uniform":
            continue
        diff: Record = {}
        for k in STATISTICS:
            value = means[mixture][k][0] - means["uniform"][k][0]
            item = means[mixture][k][1] - means["uniform"][k][1]  # (n_boot,) paired over items
            sd = seed_sd[k]
            spread = 0.0 if sd is None else sd * np.sqrt(1 / len(idx) + 1 / len(groups["uniform"]))
            total = item + rng.normal(0.0, 1.0, item.shape) * spread
            diff[k] = {
                "difference": value,
                "ci": stats.percentile_interval(total),
                "item_sd": float(np.std(item)),
                "seed_sd": float(spread) if sd is not None else None,
            }
        diff["bar"] = bar_verdict(mixtures[mixture], mixtures["uniform"], diff["worst_change"], sign)
        result["versus_uniform"][mixture] = diff
    return result


def pooled_seed_sd(groups: Sequence[Sequence[float]]) -> float | None:
    """Pooled within-group standard deviation over the groups with two values or more (None if none has):
    sqrt(sum of squared deviations from each group's mean / sum of (size - 1))."""
    used = [np.asarray(g, dtype=float) for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in used)
    if dof == 0:
        return None
    return float(np.sqrt(sum(float(((g - g.mean()) ** 2).sum()) for g in used) / dof))


def bar_verdict(mixture: Record, uniform: Record, worst_difference: Record, sign: float) -> Record:
    """The issue's bar on one metric: at least 30% less worst-domain forgetting than uniform, the paired
    interval of the worst-domain difference on the good side of 0, and the target's gain within 10%."""
    forgetting = {
        k: max(0.0, -sign * r["worst_change"]["value"]) for k, r in (("mixture", mixture), ("uniform", uniform))
    }
    reduction = (
        1.0 - forgetting["mixture"] / forgetting["uniform"] if forgetting["uniform"] > 0 else None
    )  # None: uniform forgets nothing here, nothing to cut
    lo, hi = worst_difference["ci"]
    gain_ok = mixture["target_gain_nll"]["value"] >= BAR_TARGET_GAIN * uniform["target_gain_nll"]["value"]
    excludes = bool(min(sign * lo, sign * hi) > 0)
    return {
        "forgetting": forgetting,
        "reduction": reduction,
        "interval_excludes_0": excludes,
        "target_gain_within_10pct": bool(gain_ok),
        "passes": bool(reduction is not None and reduction >= BAR_REDUCTION and excludes and gain_ok),
    }


# ----------------------------------------------------------------------------------------------- runs


def regime_arms(recipe: ValidateRecipe) -> list[Arm]:
    """What trains before the replay fraction is chosen: target and uniform at every candidate fraction,
    seed 0 (the other seeds train only at the chosen fraction)."""
    return [Arm("target", 0.0), *(Arm("uniform", r) for r in replay_fractions(recipe))]


def replay_fractions(recipe: ValidateRecipe) -> list[float]:
    c = recipe.compare
    return list(c.replay_fractions) if c.replay_fractions else [1.0 - c.allocation.target_fraction]


def chosen_arms(recipe: ValidateRecipe, fraction: float, seeds: int) -> list[Arm]:
    """Every mixture of `compare.mixtures` at the chosen fraction, each with every seed (target: fraction 0)."""
    return [Arm(m, 0.0 if m == "target" else fraction, s) for m in recipe.compare.mixtures for s in range(seeds)]


def check_forecast(recipe: ValidateRecipe) -> None:
    """`compare.forecast` names a sweep setting: checked before any fine-tune, so a typo costs nothing."""
    from mixopt.errors import RecipeError
    from mixopt.validation.sweep import settings

    name = recipe.compare.forecast
    known = [s.name for s in settings(recipe) if s.name != "recipe"]
    if name is not None and name not in known:
        file = str(recipe.file) if recipe.file else None
        raise RecipeError(f"no sweep setting '{name}'; use one of {', '.join(known)}", file, "compare.forecast")


def forecast_scores(run: ValidationRun, target: SourceData) -> Scores:
    """The forecast the mixopt arms read: the target's scores under `compare.forecast` (a sweep setting's
    name), or the run's own scores when it is unset."""
    from mixopt.validation.scoring import score_sources
    from mixopt.validation.sweep import settings, with_setting

    name = run.recipe.compare.forecast
    if name is None:
        return run.scores[target.name]
    check_forecast(run.recipe)
    matches = [s for s in settings(run.recipe) if s.name == name]
    scored = with_setting(run.recipe, matches[0])
    return score_sources(scored, [target], run.domains, run.out / "sweep" / name)[target.name]


def run_compare(run: ValidationRun, seeds: int | None = None) -> Record:
    """Train and measure the arms (regime first, then the mixtures at the chosen fraction), then summarise
    every metric (replay can teach a metric's format, so one metric alone can mislead); `compare.metric` leads
    and decides the regime. Under `--rescore`: the arms recorded so far; the others are listed in `not_run`."""
    recipe = run.recipe
    c = recipe.compare
    seeds = seeds if seeds is not None else c.seeds
    target = run.source(recipe.compare_target)
    needs_forecast = any(m in SOLVED for m in c.mixtures)
    scores = forecast_scores(run, target) if needs_forecast else None
    measured: dict[str, Measurement] = {target.name: run.after[target.name]}
    arms: dict[str, Arm] = {target.name: Arm("target", 0.0, 0)}

    not_run: list[str] = []

    def train(arm: Arm) -> None:
        name = arm.name(target.name)
        if name in measured:
            return
        if run.recorded_only and arm in chosen_set and not (run.out / "metrics" / f"{name}.json").exists():
            not_run.append(name)  # --rescore reports the arms recorded so far and names the rest
            return
        t = time.perf_counter()
        mixture = arm_run(arm, recipe, target, run.domains, scores)
        measured[name] = train_and_measure(
            recipe, mixture, run.items, target.heldout, run.out, run.identity, run.recorded_only
        )
        arms[name] = arm
        run.timings[f"finetune_{name}"] = time.perf_counter() - t

    chosen_set: set[Arm] = set()
    for arm in regime_arms(recipe):
        train(arm)
    e = recipe.evaluation
    base = run.measured_base
    fractions = replay_fractions(recipe)

    def summarise(names: list[str], metric: str) -> Record:
        sub = {n: measured[n] for n in names}
        cells = build_cells(base, sub, run.spans, {n: run.masks[target.name] for n in names}, e.bootstrap, recipe.seed)
        return compare_summary(
            cells, metric, base, sub, target.name, e.bootstrap, recipe.seed, {n: arms[n] for n in names}
        )

    regime_names = [Arm("uniform", r).name(target.name) for r in fractions]
    primary = summarise([target.name, *regime_names], c.metric)
    worst = {
        r: {
            "domain": primary["runs"][n]["worst"]["domain"],
            "value": primary["runs"][n]["worst_change"]["value"],
            "ci": primary["runs"][n]["worst_change"]["ci"],
        }
        for r, n in zip(fractions, regime_names, strict=True)
    }
    regime = choose_replay_fraction(worst, ev.HIGHER_IS_BETTER[c.metric])
    note(f"compare: replay fraction {regime.replay_fraction:.0%} ({regime.reason})")
    chosen = chosen_arms(recipe, regime.replay_fraction, seeds)
    chosen_set.update(chosen)
    for arm in chosen:
        train(arm)
    names = [n for n in (a.name(target.name) for a in chosen) if n in measured]
    by_metric = {m: summarise(names, m) for m in ev.METRICS}
    return {
        "metric": c.metric,
        "seeds": seeds,
        "forecast": c.forecast or recipe.sts.score,
        "forecast_scorer": scores.score if scores is not None else None,
        "regime": regime.to_record(),
        "not_run": not_run,  # --rescore: arms of the plan with no recorded measurement yet
        "by_metric": by_metric,
    }
