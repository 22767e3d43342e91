"""`mixopt validate`: the closed loop, orchestrated (the steps: `mixopt.validation`'s docstring).

Everything lands in the run folder and is keyed by content (data, schedule, model), so a stopped run
resumes: finished fine-tunes and measurements are read back, a half-done fine-tune resumes from its
checkpoint, and feature statistics come from mixopt's cache.

Example:
    >>> from mixopt.recipe import load_validate_recipe
    >>> result = run_validation(load_validate_recipe("recipes/validate-mmlu.yaml"), Path("runs/v"))  # doctest: +SKIP
    >>> print(result.table())                                                                         # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixopt import evaluate as ev
from mixopt.files import digest
from mixopt.recipe import ValidateRecipe
from mixopt.validation.analysis import Cells, Record, build_cells, correlations, primary_metric, reliabilities
from mixopt.validation.data import SourceData, excluded, load_domains, load_source_data, write_data
from mixopt.validation.evidence import ValidationRun, spans_of
from mixopt.validation.finetune import Run, train_and_measure
from mixopt.validation.measure import (
    Measurement,
    cached_measurement,
    load_validation_model,
    measure,
    model_identity,
    note,
)
from mixopt.validation.report import report_table, write_report
from mixopt.validation.scoring import score_matrix, score_sources


@dataclass
class ValidationResult:
    out: Path
    report: Record  # what validation.json holds

    def table(self) -> str:
        return report_table(self.report)


def prepare(recipe: ValidateRecipe, out: Path) -> ValidationRun:
    """Split the data and write its exact rows to the run folder; nothing is scored or measured yet."""
    from mixopt.checks import check_static

    check_static(recipe)  # fail on a missing file or column before any model loads
    out.mkdir(parents=True, exist_ok=True)
    domains = load_domains(recipe)
    sources = [load_source_data(recipe, i) for i in range(len(recipe.sources))]
    write_data(out, domains, sources)
    items = [item for d in domains for item in d.evaluation]
    masks = {s.name: ~excluded(items, s) for s in sources}
    return ValidationRun(recipe, out, domains, sources, items, spans_of(domains), masks, model_identity(recipe))


def measure_all(run: ValidationRun) -> None:
    """The base model, then each source's fine-tune, measured (each read back when already stored)."""
    recipe, t = run.recipe, time.perf_counter()
    heldout = {s.name: s.heldout for s in run.sources}
    run.base = cached_measurement(
        run.out / "metrics" / "base.json",
        digest(run.identity, [i.text for i in run.items], heldout, recipe.evaluation.max_length),
        lambda: measure(load_validation_model(recipe), recipe, run.items, heldout, "base model"),
        run.recorded_only,
    )
    run.timings["evaluate_base"] = time.perf_counter() - t
    for s in run.sources:
        t = time.perf_counter()
        run.after[s.name] = train_and_measure(
            recipe, Run(s.name, s.name, s.pool), run.items, s.heldout, run.out, run.identity, run.recorded_only
        )
        run.timings[f"finetune_{s.name}"] = time.perf_counter() - t


def run_validation(
    recipe: ValidateRecipe,
    out: Path,
    compare: bool = False,
    sweep: bool = False,
    rescore: bool = False,
    only: tuple[str, ...] = (),
    seeds: int | None = None,
) -> ValidationResult:
    """The whole closed loop; writes OUT/validation.json and OUT/plots, returns the report.
    `compare`: also fine-tune the mixtures (`validation.compare`); `sweep`: re-score under each open setting
    of the design (`validation.sweep`); `rescore`: score again, but read every measurement back (an error if
    one is missing): the same fine-tunes judge a new scorer. `only`: the sweep's settings matching these globs.
    `seeds`: training-order seeds per mixture (default: the recipe's `compare.seeds`)."""
    started = time.perf_counter()
    if compare:
        from mixopt.validation.compare import check_forecast

        check_forecast(recipe)  # before hours of fine-tuning, not after
    run = prepare(recipe, out)
    run.recorded_only = rescore
    note(
        f"validate: {len(run.sources)} sources x {len(run.domains)} domains; {recipe.split.eval_items} evaluation "
        f"items per domain; {recipe.schedule.steps} steps x {recipe.schedule.batch_size} = {recipe.schedule.budget} "
        f"examples per fine-tune"
    )
    if rescore:  # a missing record fails before the scoring passes, not after them
        measure_all(run)
    t = time.perf_counter()
    run.scores = score_sources(recipe, run.sources, run.domains, out / "scores")
    run.timings["scores"] = time.perf_counter() - t
    run.matrix = score_matrix(run.scores, [s.name for s in run.sources], [d.name for d in run.domains])
    if not rescore:
        measure_all(run)

    e = recipe.evaluation
    cells = build_cells(run.measured_base, run.after, run.spans, run.masks, e.bootstrap, recipe.seed)
    report = assemble(run, cells)
    report["correlations"] = correlations(cells, run.matrix, e.bootstrap, recipe.seed)
    if compare:
        from mixopt.validation.compare import run_compare

        report["compare"] = run_compare(run, seeds)
    if sweep:
        from mixopt.validation.analysis import reliable_metrics
        from mixopt.validation.sweep import run_sweep

        t = time.perf_counter()
        report["sweep"] = run_sweep(run, cells, primary_metric(report), reliable_metrics(report), only)
        run.timings["sweep"] = time.perf_counter() - t
    run.timings["total"] = time.perf_counter() - started
    report["timings"] = {k: round(v, 1) for k, v in run.timings.items()}
    write_report(out, report, run.matrix, cells, recipe.sts.score)
    return ValidationResult(out, report)


def assemble(run: ValidationRun, cells: Cells) -> Record:
    """validation.json without the correlations: provenance, split, fine-tunes, cells, reliabilities."""
    from mixopt.manifest import recipe_record, versions

    recipe, domains, sources, scores, matrix = run.recipe, run.domains, run.sources, run.scores, run.matrix
    base, after, spans = run.measured_base, run.after, run.spans
    e = recipe.evaluation
    rel = reliabilities(cells, base, spans, e.split_halves, recipe.seed)
    too_long = np.isnan(base.items["answer_nll"])
    first = next(iter(scores.values()))
    return {
        "mixopt_validation_version": 1,
        "versions": versions(),
        "recipe": recipe_record(recipe),
        "model": recipe.model.path,
        "sae": first.sae,
        "layer": first.layer,
        "top_k": first.top_k,
        "sts_score": recipe.sts.score,
        "budget": recipe.schedule.budget,
        "min_reliability": e.min_reliability,
        "domains": [d.name for d in domains],
        "split": {
            "eval_items": recipe.split.eval_items,
            "seed": recipe.seed,
            "domains": {
                d.name: {
                    "evaluation": len(d.evaluation),
                    "scoring": len(d.scoring),
                    "duplicates": d.duplicates,
                    "too_long": int(too_long[spans[d.name]].sum()),
                }
                for d in domains
            },
        },
        "sources": {s.name: _source_record(s, base, after[s.name], cells, i) for i, s in enumerate(sources)},
        "metrics": {
            m: {
                "higher_is_better": ev.HIGHER_IS_BETTER[m],
                "reliability": rel[m],
                "reliable": bool(rel[m]["change_pooled"] >= e.min_reliability),
            }
            for m in ev.METRICS
        },
        "cells": [
            {
                "source": s,
                "domain": d,
                "n": int(cells.n[i, j]),
                "scores": {k: float(v[i, j]) for k, v in matrix.items()},
                "change": {
                    m: {
                        "before": cells.before[m][i, j],
                        "after": cells.after[m][i, j],
                        "delta": cells.delta[m][i, j],
                        "stderr": cells.stderr[m][i, j],
                    }
                    for m in ev.METRICS
                },
            }
            for i, s in enumerate(cells.sources)
            for j, d in enumerate(cells.domains)
        ],
    }


def _source_record(source: SourceData, base: Measurement, after: Measurement, cells: Cells, index: int) -> Record:
    before, now = base.heldout[source.name], after.heldout[source.name]
    ok = np.isfinite(before) & np.isfinite(now)
    return {
        "pool": len(source.pool),
        "heldout": len(source.heldout),
        "examples": after.examples,
        "finetune": after.finetune,
        "own_nll": {"before": float(before[ok].mean()), "after": float(now[ok].mean()), "n": int(ok.sum())},
        "items_measured": dict(zip(cells.domains, cells.n[index].tolist(), strict=True)),
    }
