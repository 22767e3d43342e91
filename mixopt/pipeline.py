"""Pipeline: wire the stages for `mixopt score` (and `plan`): recipe -> sources -> model + SAE ->
features -> STS -> Scores. Each stage lives in its own module; this one only chooses what to run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from mixopt import sts
from mixopt.encoding import Encoded, encode_chat, encode_demonstrations, encode_text
from mixopt.features import PassResult, SourceStats, cached_pass, pass_key, run_pass
from mixopt.model import LoadedModel, load_model
from mixopt.recipe import DomainSpec, Recipe, TargetSpec
from mixopt.sae import check_sae, load_sae, sae_identity
from mixopt.scores import DomainScore, ForecastResult, Scores
from mixopt.sources import check_columns, describe, load_source, render


@dataclass
class Sample:
    """The examples of one source chosen for scoring, encoded."""

    available: int  # rows the source offers (after max_examples)
    examples: list[Encoded]
    demos: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0
    passes: int = 0

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        out = fn()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return out


def rendered_rows(section: TargetSpec | DomainSpec, recipe: Recipe, where: str) -> datasets.Dataset:
    ds = load_source(section.source, recipe.base_dir)
    check_columns(ds, section, f"{where} ({describe(section.source)})")
    if section.max_examples is not None:
        ds = ds.select(range(min(len(ds), section.max_examples)))
    return render(ds, section)


def encode_row(lm: LoadedModel, row: dict[str, str], max_length: int, tokens: str = "content") -> Encoded:
    """`tokens`: which tokens count: all content (prompt and response) or the response alone."""
    if "text" in row:
        return encode_text(lm.tokenizer, row["text"], max_length)
    encoded = encode_chat(lm.tokenizer, row["prompt"], row["response"], max_length)
    return dataclasses.replace(encoded, counted=encoded.response) if tokens == "response" else encoded


def sample_source(
    rows: datasets.Dataset,
    lm: LoadedModel,
    seed: int,
    n_demos: int,
    token_budget: int,
    max_length: int,
    tokens: str = "content",
) -> Sample:
    """Seeded order; the first `n_demos` rows are demonstrations (never queries), then queries until
    `token_budget` counted tokens (`tokens`: see `encode_row`)."""
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    demo_rows = [rows[i] for i in order[:n_demos]]
    demos = [(r["prompt"], r["response"]) if "prompt" in r else (r["text"], "") for r in demo_rows]
    examples, n_counted = [], 0
    for i in order[n_demos:]:
        if n_counted >= token_budget:
            break
        encoded = encode_row(lm, rows[i], max_length, tokens)
        if encoded.n_counted:
            examples.append(encoded)
            n_counted += encoded.n_counted
    return Sample(len(rows), examples, demos)


def mean_tokens(examples: list[Encoded]) -> tuple[float, float]:
    """(mean tokens per example, mean loss-bearing response tokens per example)."""
    return (float(np.mean([len(e) for e in examples])), float(np.mean([sum(e.response) for e in examples])))


def score_recipe(recipe: Recipe, timings: Timings | None = None) -> tuple[Scores, dict[str, Any]]:
    """Compute every domain's STS for the recipe. Returns the Scores and the run's context (model and SAE
    identity, timings) for manifests."""
    timings = timings or Timings()
    lm: LoadedModel = timings.timed("load_model", lambda: load_model(recipe.model, recipe.base_dir))
    sae = timings.timed("load_sae", lambda: load_sae(recipe.sae, recipe.base_dir, lm.device))
    layer, k, variant, counted = recipe.sae.layer, recipe.sts.top_k, recipe.sts.score, recipe.sts.tokens
    check_sae(sae, lm, layer)
    identity = {
        "model": lm.identity,
        "sae": sae_identity(recipe.sae, recipe.base_dir),
        "layer": layer,
        "dtype": str(lm.dtype),
    }

    def stream(name: str, sample: Sample, prefix: list[int]) -> PassResult:
        key = pass_key(identity, sample.examples, prefix)
        compute = lambda: run_pass(lm, sae, layer, sample.examples, prefix, recipe.sts.batch_tokens, name)  # noqa: E731
        result, hit = timings.timed("features", lambda: cached_pass(key, compute))
        timings.passes += 1
        timings.cache_hits += hit
        return result

    target = recipe.target
    target_rows = rendered_rows(target, recipe, "target")
    if len(target_rows) <= target.icl_demos:
        from mixopt.errors import SourceError

        raise SourceError(f"target has {len(target_rows)} rows; it needs more than icl_demos={target.icl_demos}")
    target_sample = sample_source(
        target_rows, lm, recipe.target_seed, target.icl_demos, recipe.sts.target_tokens, recipe.sts.max_length, counted
    )
    prefix = encode_demonstrations(lm.tokenizer, target_sample.demos)
    target_pass = stream(f"target {target.name}", target_sample, prefix)
    shift = target_pass.shift or SourceStats(target_pass.stats.example_tokens, *_zero_like(target_pass.stats))
    latents, shift_values = sts.shifted_latents(shift.latents, k)
    raw_dims, _ = sts.shifted_latents(shift.resid, k)

    samples: dict[str, Sample] = {}
    passes: dict[str, PassResult] = {}
    icl_passes: dict[str, PassResult] = {}
    for i, domain in enumerate(recipe.domains):
        rows = rendered_rows(domain, recipe, f"domains.{i}")
        seed = sts.name_seed(recipe.seed, domain.name)
        samples[domain.name] = sample_source(
            rows, lm, seed, 0, recipe.sts.domain_tokens, recipe.sts.max_length, counted
        )
        passes[domain.name] = stream(f"domain {domain.name}", samples[domain.name], [])
        if variant == "icl":
            icl_sample = sample_source(
                rows, lm, seed, domain.icl_demos, recipe.sts.domain_tokens, recipe.sts.max_length, counted
            )
            icl_prefix = encode_demonstrations(lm.tokenizer, icl_sample.demos)
            icl_passes[domain.name] = stream(f"domain {domain.name} (icl)", icl_sample, icl_prefix)

    forecasts = Forecasts()
    if variant in FORECASTS:
        every = {target.name: target_sample} | samples
        stats = {target.name: target_pass.stats} | {name: p.stats for name, p in passes.items()}
        run = lambda: forecast_scores(recipe, lm, sae, identity, target_rows, every, stats)  # noqa: E731
        forecasts = timings.timed(variant, run)

    grand = torch.stack([sts.mean_residual(p.stats) for p in [target_pass, *passes.values()]]).mean(0)
    target_mean = sts.mean_residual(target_pass.stats)

    def record(name: str, sample: Sample, result: PassResult, icl: PassResult | None) -> DomainScore:
        stats = result.stats
        variants = {v: sts.domain_score(stats.latents, stats.n_tokens, latents, v) for v in ("act", "act_sq")}
        variants |= {f"raw_{v}": sts.domain_score(stats.resid, stats.n_tokens, raw_dims, v) for v in ("act", "act_sq")}
        if icl is not None and icl.shift is not None:
            variants["icl"] = sts.domain_score(icl.shift.latents, icl.shift.n_tokens, latents, "icl")
            variants["raw_icl"] = sts.domain_score(icl.shift.resid, icl.shift.n_tokens, raw_dims, "icl")
        variants["similarity"] = sts.centered_similarity(sts.mean_residual(stats), target_mean, grand)
        variants["random"] = sts.random_control(stats, k)
        variants |= {key: result.sources[name].value for key, result in forecasts.results.items()}
        scored = variant if variant != "icl" or "icl" in variants else "act"  # the target has no ICL pass of its own
        if variant in forecasts.results:
            forecast = forecasts.results[variant].sources[name]
            per_example, tokens = np.array(forecast.example_values), np.array(forecast.example_tokens)
        else:
            per_example, tokens = scorer_examples(scored, stats, icl, latents, raw_dims, target_mean, grand)
        stderr, interval = sts.bootstrap(per_example, tokens, recipe.sts.bootstrap, sts.name_seed(recipe.seed, name))
        mean_all, mean_response = mean_tokens(sample.examples)
        return DomainScore(
            name=name,
            sts=variants[SCORER_KEYS.get(scored, scored)],
            baseline=variants[BASELINE_KEYS.get(scored, "raw_act")],
            similarity=variants["similarity"],
            tokens=stats.n_tokens,
            examples=len(sample.examples),
            available=sample.available,
            mean_tokens=mean_all,
            mean_response_tokens=mean_response,
            stderr=stderr,
            interval=interval,
            example_scores=[float(f"{s:.7g}") for s in per_example],  # significant digits: forecasts are ~1e-6
            example_tokens=[int(t) for t in tokens],
            variants=variants,
        )

    domains = [record(d.name, samples[d.name], passes[d.name], icl_passes.get(d.name)) for d in recipe.domains]
    if forecasts.shifted is not None:  # probe_act: the shift the scorer used is the measured one
        latents, shift_values = forecasts.shifted
    chosen = forecasts.results.get(variant)
    scores = Scores(
        recipe_sha256=recipe.sha256(),
        model=recipe.model.path,
        sae=recipe.sae.path or f"{recipe.sae.release}/{recipe.sae.id}",
        layer=layer,
        top_k=len(latents),
        score=variant,
        shifted_latents=[{"index": int(i), "shift": float(v)} for i, v in zip(latents, shift_values, strict=True)],
        target=record(target.name, target_sample, target_pass, None),
        domains=domains,
        transfer=chosen.transfer if chosen else None,
        cost=chosen.cost if chosen else None,
    )
    context = {
        "model_identity": lm.identity,
        "sae_identity": identity["sae"],
        "device": str(lm.device),
        "dtype": str(lm.dtype).removeprefix("torch."),
        "timings": timings,
    }
    return scores, context


SCORER_KEYS = {"raw": "raw_act"}  # scorer name (recipe `sts.score`) -> key in DomainScore.variants
BASELINE_KEYS = {"act": "raw_act", "act_sq": "raw_act_sq", "icl": "raw_icl", "probe_act": "raw_probe_act"}
FORECASTS = ("probe", "grad", "probe_act")  # scorers with a module of their own (gradients.py, probe.py)


@dataclass
class Forecasts:
    """The recipe's forecasting scorer's results by variant name."""

    results: dict[str, ForecastResult] = field(default_factory=dict)  # probe_act's raw baseline too: raw_probe_act
    shifted: tuple[torch.Tensor, torch.Tensor] | None = None  # probe_act: (latents, shift) of the measured shift


def forecast_scores(
    recipe: Recipe,
    lm: LoadedModel,
    sae: Any,
    identity: dict[str, Any],
    target_rows: datasets.Dataset,
    samples: dict[str, Sample],
    stats: dict[str, SourceStats],
) -> Forecasts:
    """The recipe's forecasting scorer (`sts.score` in FORECASTS) on the target and every domain. `samples`
    and `stats`: each source's scoring sample and feature statistics, by name; the target's rows (all of
    them) are what the pilot fine-tune trains on and its sample what `grad`'s update is estimated from."""
    spec, target = recipe.sts, recipe.target.name
    examples = {name: sample.examples for name, sample in samples.items()}
    if spec.score == "grad":
        from mixopt.gradients import grad_forecast

        return Forecasts({"grad": grad_forecast(lm, target, examples, spec.grad, spec.batch_tokens, recipe.seed)})
    from mixopt import probe

    # probe and probe_act read one pilot fine-tune: both are measured (and cached) whenever either is chosen,
    # so the pilot trains at most once and each is reported beside the other
    encoded = (encode_row(lm, row, spec.probe.max_length) for row in target_rows)
    pilot = probe.Pilot(lm, [e for e in encoded if any(e.response[1:])], spec.probe, recipe.seed)
    started = time.perf_counter()
    losses = probe.probe_forecast(lm, pilot, examples, spec.batch_tokens)
    shift = probe.measured_shift(lm, pilot, sae, identity, examples[target], spec.batch_tokens)
    measured, raw = (probe.probe_act_forecast(shift, stats, spec.top_k, raw=r) for r in (False, True))
    losses.cost = measured.cost = probe.pilot_cost(pilot, time.perf_counter() - started)
    shifted = sts.shifted_latents(shift.latents, spec.top_k) if spec.score == "probe_act" else None
    return Forecasts({"probe": losses, "probe_act": measured, "raw_probe_act": raw}, shifted)


def scorer_examples(
    scorer: str,
    stats: SourceStats,
    icl: PassResult | None,
    latents: torch.Tensor,
    raw_dims: torch.Tensor,
    target_mean: torch.Tensor,
    grand: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """(per-example scores, token counts) whose token-weighted mean is the scorer's value: the solver's
    bootstrap and the score's interval resample them. `icl` needs the domain's ICL pass."""
    tokens = stats.example_tokens
    if scorer == "similarity":
        return sts.similarity_example_scores(stats, target_mean, grand), tokens.numpy()
    if scorer == "icl":
        assert icl is not None and icl.shift is not None
        shift = icl.shift
        return sts.example_scores(shift.latents, shift.example_tokens, latents, "icl"), shift.example_tokens.numpy()
    if scorer == "raw":
        return sts.example_scores(stats.resid, tokens, raw_dims, "act"), tokens.numpy()
    return sts.example_scores(stats.latents, tokens, latents, scorer), tokens.numpy()


def _zero_like(stats: SourceStats) -> tuple[Any, Any]:
    """Zero reductions shaped like `stats` (the shift when there are no demonstrations)."""
    from mixopt.features import Reduction

    n = len(stats.example_tokens)
    return (Reduction.empty(n, stats.latents.total.numel()), Reduction.empty(n, stats.resid.total.numel()))


@dataclass
class PlanResult:
    scores: Scores
    allocation: Any  # mixopt.solver.Allocation
    out: Path | None  # None for a dry run
    rows: int = 0
    content_sha256: str = ""
    seconds: dict[str, float] = field(default_factory=dict)


def _mixture_parts(recipe: Recipe, allocation: Any) -> list[Any]:
    from mixopt.mixture import MixturePart

    counts = {d.name: d.count for d in allocation.domains}
    parts = [
        MixturePart(
            recipe.target.name,
            rendered_rows(recipe.target, recipe, "target"),
            allocation.target_count,
            sts.name_seed(recipe.seed, recipe.target.name),
        )
    ]
    for i, domain in enumerate(recipe.domains):
        if counts.get(domain.name, 0) > 0:
            parts.append(
                MixturePart(
                    domain.name,
                    rendered_rows(domain, recipe, f"domains.{i}"),
                    counts[domain.name],
                    sts.name_seed(recipe.seed, domain.name),
                )
            )
    return parts


def manifest_record(
    recipe: Recipe,
    scores: Scores,
    allocation: Any,
    context: dict[str, Any],
    written: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Everything needed to say exactly how a mixture was made (DESIGN.md section 5)."""
    from mixopt.manifest import checksums, recipe_record, versions
    from mixopt.model import BUILTIN_MODELS, builtin_gguf
    from mixopt.sae import resolve_sae_dir

    model_files = (
        builtin_gguf(recipe.model.path)
        if recipe.model.path in BUILTIN_MODELS
        else (recipe.base_dir / recipe.model.path)
        if recipe.model.path.startswith((".", "/"))
        else None
    )
    return {
        "mixopt_manifest_version": 1,
        "versions": versions(),
        "recipe": recipe_record(recipe),
        "model": {
            "path": recipe.model.path,
            "identity": context["model_identity"],
            "device": context["device"],
            "dtype": context["dtype"],
            "checksums": checksums(model_files),
        },
        "sae": {
            "path": scores.sae,
            "identity": context["sae_identity"],
            "layer": recipe.sae.layer,
            "checksums": checksums(resolve_sae_dir(recipe.sae, recipe.base_dir)),
        },
        "sts": {
            "score": scores.score,
            "top_k": scores.top_k,
            "icl_demos": recipe.target.icl_demos,
            "seed": recipe.seed,
            "target_seed": recipe.target_seed,
            "shifted_latents": scores.shifted_latents,
            "domains": [
                {
                    "name": d.name,
                    "sts": d.sts,
                    "baseline": d.baseline,
                    "similarity": d.similarity,
                    "interval": d.interval,
                }
                for d in scores.domains
            ],
        },
        "solver": {k: v for k, v in allocation.to_dict().items() if k != "domains"},
        "allocation": [
            {"name": d.name, "count": d.count, "tokens": d.tokens, "share": d.share, "epochs": d.epochs}
            for d in allocation.domains
        ],
        "dataset": written,
        "timings_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }


def plan_recipe(recipe: Recipe, out: Path, force: bool = False, dry_run: bool = False) -> PlanResult:
    """`mixopt plan`: score, solve, then write mixture, manifest, exports, plots and README atomically."""
    from mixopt.checks import check_static
    from mixopt.exports import write_exports
    from mixopt.files import write_json
    from mixopt.manifest import check_output, staged_output
    from mixopt.mixture import build_mixture, common_schema, write_mixture
    from mixopt.plots import plot_allocation, plot_scores
    from mixopt.report import write_run_readme
    from mixopt.solver import limits_from_domains, solve_allocation
    from mixopt.sources import content_hash

    if not dry_run:
        check_output(out, force)  # fail before the expensive part
    check_static(recipe)
    timings = Timings()
    scores, context = timings.timed("score", lambda: score_recipe(recipe, timings))
    allocation = timings.timed(
        "solve",
        lambda: solve_allocation(scores, recipe.allocation, limits_from_domains(recipe.domains), seed=recipe.seed),
    )
    if dry_run:
        return PlanResult(scores, allocation, None, seconds=timings.seconds)
    with staged_output(out, force) as staged:
        parts = _mixture_parts(recipe, allocation)
        mixture = timings.timed("mixture", lambda: build_mixture(parts, recipe.seed))
        files = timings.timed("write", lambda: write_mixture(mixture, staged, recipe.output.formats))
        digest = content_hash(mixture)
        counts = {recipe.target.name: allocation.target_count} | {d.name: d.count for d in allocation.domains}
        available = {recipe.target.name: scores.target.available} | {d.name: d.available for d in scores.domains}
        epochs = {name: counts[name] / max(available[name], 1) for name in counts}
        schema = common_schema(parts)
        if "parquet" in recipe.output.formats:  # the exports point at the per-domain parquet files
            write_exports(staged, counts, epochs, schema)
        (staged / "plots").mkdir()
        ranked = scores.ranked()
        plot_scores(
            [d.name for d in ranked],
            [d.sts for d in ranked],
            [d.baseline for d in ranked],
            staged / "plots" / "sts.png",
            recipe.sts.score,
        )
        shares = {d.name: d.share for d in allocation.domains}
        shares = {recipe.target.name: 1 - sum(shares.values())} | shares  # in the budget's unit
        plot_allocation(
            list(shares), list(shares.values()), staged / "plots" / "allocation.png", target=recipe.target.name
        )
        write_run_readme(staged, allocation_markdown(scores, allocation), counts, epochs, schema, recipe.target.name)
        scores.save(staged / "scores.json")
        allocation.save(staged / "allocation.json")
        written = {"rows": len(mixture), "content_sha256": digest, "schema": schema, "files": files}
        write_json(
            staged / "manifest.json", manifest_record(recipe, scores, allocation, context, written, timings.seconds)
        )
    return PlanResult(scores, allocation, out, len(mixture), digest, timings.seconds)


def allocation_markdown(scores: Scores, allocation: Any) -> str:
    """The domain table (the recipe's score, baseline, allocation) as markdown, target first."""
    by_name = {d.name: d for d in scores.domains}
    lines = [
        f"| domain | {scores.score} | 95% interval | raw baseline | count | share | epochs |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        f"| {scores.target.name} (target) | | | | {allocation.target_count} | {allocation.target_fraction:.1%} | |",
    ]
    for d in sorted(allocation.domains, key=lambda a: by_name[a.name].sts, reverse=True):
        s = by_name[d.name]
        lo, hi = s.interval or [float("nan")] * 2
        lines.append(
            f"| {d.name} | {s.sts:.4g} | [{lo:.4g}, {hi:.4g}] | {s.baseline:.4g} | {d.count} | "
            f"{d.share:.1%} | {d.epochs:.2f} |"
        )
    return "\n".join(lines)
