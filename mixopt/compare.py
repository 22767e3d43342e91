"""Compare mixtures at the same budget: target only, + uniform replay, + mixopt's allocation
(`mixopt validate --compare-mixtures`).

The target's own fine-tune from the validation run is the first run; two more fine-tunes keep the same
schedule and budget and give half of it (the recipe's `compare.allocation.target_fraction`) to replay
from the evaluation domains' scoring parts, spread evenly or as `plan`'s solver allocates it from the
target's scores. Every metric is reported (replay can teach a metric's format, so one metric alone can
mislead): each domain's change, the mean and the worst, the target's own gain, each with a 95% interval
over items, and every run minus every other on the same resamples (paired).

Example:
    >>> report = run_validation(recipe, Path("runs/v"), compare=True).report     # doctest: +SKIP
    >>> print(compare_table(report["compare"]))                                  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixopt import evaluate as ev
from mixopt.errors import MixoptError
from mixopt.evaluate import MCQItem
from mixopt.recipe import ValidateRecipe
from mixopt.validate import (
    Cells,
    DomainData,
    Pair,
    Run,
    SourceData,
    _r,
    build_cells,
    scoring_pair,
    train_and_measure,
)


def draw(rows: Sequence[Pair], count: int, seed: int) -> list[Pair]:
    """`count` rows: seeded permutations of `rows` read in order (a row repeats only after all have appeared)."""
    out: list[Pair] = []
    epoch = 0
    while len(out) < count:
        out += [rows[i] for i in np.random.default_rng([seed, epoch]).permutation(len(rows))]
        epoch += 1
    return out[:count]


def mixture_runs(recipe: ValidateRecipe, target: SourceData, domains: Sequence[DomainData], scores: Any) -> list[Run]:
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


def paired_mean_draws(groups: Sequence[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """groups[j]: (runs, items_j) per-item values -> (n_boot, runs, groups) means over items resampled
    within each group. Every run reads the same resample (they were measured on the same items), so a
    difference between runs keeps only the noise that does not cancel."""
    rng = np.random.default_rng(seed)
    return np.stack([g[:, rng.integers(0, g.shape[1], size=(n_boot, g.shape[1]))].mean(-1).T for g in groups], axis=-1)


def compare_summary(
    cells: Cells,
    metric: str,
    base: dict[str, Any],
    after: dict[str, dict[str, Any]],
    target: str,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
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
    before_own = np.asarray(base["heldout"][target], dtype=float)
    own = np.stack([before_own - np.asarray(after[run]["heldout"][target], dtype=float) for run in names])
    domain_draws = paired_mean_draws(per_domain, n_boot, seed)  # (n_boot, runs, domains)
    draws = {
        "mean_change": np.nanmean(domain_draws, axis=-1),
        "worst_change": sign * np.nanmin(sign * domain_draws, axis=-1),
        "target_gain_nll": paired_mean_draws([own], n_boot, seed)[..., 0],
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
            **{k: {"value": v, "ci": ev.percentile_interval(draws[k][:, i])} for k, v in point.items()},
            "mixture": after[run].get("mixture", {}),
        }
    differences = []
    for i, j in itertools.combinations(range(len(names)), 2):
        later, earlier = runs[names[j]], runs[names[i]]
        diff: dict[str, Any] = {"runs": [names[j], names[i]]}
        for k in draws:
            value = later[k]["value"] - earlier[k]["value"]
            diff[k] = {"difference": value, "ci": ev.percentile_interval(draws[k][:, j] - draws[k][:, i])}
        if later["mixture"] and earlier["mixture"]:
            # did the rows one mixture adds to a domain buy that domain more (in the good direction)?
            extra = [later["mixture"].get(d, 0) - earlier["mixture"].get(d, 0) for d in cells.domains]
            gain = [sign * (later["per_domain"][d] - earlier["per_domain"][d]) for d in cells.domains]
            diff["extra_rows_vs_gain_spearman"] = ev.spearman(np.array(extra, float), np.array(gain))
        differences.append(diff)
    return {
        "metric": metric,
        "higher_is_better": ev.HIGHER_IS_BETTER[metric],
        "target": target,
        "runs": runs,
        "differences": differences,
    }


def run_compare(
    recipe: ValidateRecipe,
    domains: Sequence[DomainData],
    sources: Sequence[SourceData],
    scores: dict[str, Any],
    base: dict[str, Any],
    after: dict[str, dict[str, Any]],
    items: Sequence[MCQItem],
    spans: dict[str, slice],
    masks: dict[str, np.ndarray],
    out: Path,
    identity: str,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Target only (the target's own fine-tune above) vs + uniform replay vs + mixopt's allocation, on every
    metric (replay can teach a metric's format, so one metric alone can mislead); `compare.metric` leads."""
    target = next(s for s in sources if s.name == recipe.compare_target)
    runs = {target.name: after[target.name]}
    for run in mixture_runs(recipe, target, domains, scores[target.name]):
        t = time.perf_counter()
        runs[run.name] = train_and_measure(recipe, run, items, target.heldout, out, identity)
        timings[f"finetune_{run.name}"] = time.perf_counter() - t
    cells = build_cells(
        base, runs, spans, {r: masks[target.name] for r in runs}, recipe.evaluation.bootstrap, recipe.seed
    )
    by_metric = {
        m: compare_summary(cells, m, base, runs, target.name, recipe.evaluation.bootstrap, recipe.seed)
        for m in ev.METRICS
    }
    return {"metric": recipe.compare.metric, "by_metric": by_metric}


# ---------------------------------------------------------------------------------------- report


def _vci(stat: dict[str, Any], key: str = "value") -> str:
    lo, hi = stat["ci"]
    return f"{stat[key]:+.4f} [{lo:+.4f},{hi:+.4f}]"


COMPARE_ROWS = {
    "mean_change": "mean change",
    "worst_change": "worst domain's change",
    "target_gain_nll": "target held-out NLL drop",
}


def compare_table(compare: dict[str, Any]) -> str:
    """The recipe's metric in full (every domain), then each other metric's mean and worst change; every
    run with its 95% interval over items, and the paired differences between runs."""
    primary = compare["by_metric"][compare["metric"]]
    runs, width = primary["runs"], 28
    names = list(runs)
    lines = [
        "mixture comparison at the same budget (95% intervals resample items, not fine-tune seeds)",
        f"{'change in ' + _metric_label(primary):<34}" + "".join(f"{n:>{width}}" for n in names),
    ]
    for d in runs[names[0]]["per_domain"]:
        lines.append(f"{d:<34}" + "".join(f"{runs[n]['per_domain'][d]:>+{width}.4f}" for n in names))
    lines.append(
        f"{'worst domain':<34}" + "".join(f"{runs[n]['worst']['domain'][: width - 2]:>{width}}" for n in names)
    )
    lines += _compare_rows(primary, list(COMPARE_ROWS), width)
    for metric, summary in compare["by_metric"].items():
        if metric != compare["metric"]:
            lines += ["", f"change in {_metric_label(summary)}", *_compare_rows(summary, list(COMPARE_ROWS)[:2], width)]
    return "\n".join(lines)


def _metric_label(summary: dict[str, Any]) -> str:
    return f"{summary['metric']} ({'higher' if summary['higher_is_better'] else 'lower'} is better)"


def _compare_rows(summary: dict[str, Any], keys: list[str], width: int) -> list[str]:
    """Each run's statistics (one row per key), then each paired difference (one column per key)."""
    runs = summary["runs"]
    lines = [f"{COMPARE_ROWS[k]:<34}" + "".join(f"{_vci(run[k]):>{width}}" for run in runs.values()) for k in keys]
    lines.append(f"{'paired difference (same items)':<34}" + "".join(f"{COMPARE_ROWS[k]:>{width}}" for k in keys))
    for diff in summary["differences"]:
        later, earlier = diff["runs"]
        spread = diff.get("extra_rows_vs_gain_spearman")
        lines.append(
            f"{'  ' + later + ' - ' + earlier:<34}"
            + "".join(f"{_vci(diff[k], 'difference'):>{width}}" for k in keys)
            + ("" if spread is None else f"   extra rows vs gain, Spearman over domains {_r(spread)}")
        )
    return lines


def plot_compare(summary: dict[str, Any], path: Path) -> None:
    """Each domain's change under each run (bars: one bootstrap standard error over items), domains ordered by
    the target-only change."""
    from mixopt.plots import _height, _save, plt

    runs = summary["runs"]
    names = list(runs)
    domains = sorted(runs[names[0]]["per_domain"], key=lambda d: runs[names[0]]["per_domain"][d])
    y = np.arange(len(domains))
    fig, ax = plt.subplots(figsize=(8, _height(len(domains) * 1.5)))
    for k, (run, color) in enumerate(zip(names, ("#9a9a9a", "#5b8c5a", "#3b6ea8"), strict=False)):
        values = [runs[run]["per_domain"][d] for d in domains]
        ax.barh(
            y + (k - 1) * 0.27,
            values,
            height=0.27,
            xerr=[runs[run]["per_domain_stderr"][d] for d in domains],
            error_kw={"elinewidth": 0.6, "capsize": 1.5},
            color=color,
            label=f"{run} (target NLL drop {runs[run]['target_gain_nll']['value']:+.3f})",
        )
    ax.set_yticks(y, domains, fontsize=7)
    direction = "higher is better" if summary["higher_is_better"] else "lower is better"
    ax.set_xlabel(f"change in {summary['metric']} ({direction})")
    ax.set_title("Same budget: target only vs uniform replay vs mixopt", loc="left")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
