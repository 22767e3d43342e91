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
from mixopt.errors import SourceError
from mixopt.explain import Evidence, ScoredSource, collect_evidence
from mixopt.features import PassResult, SourceStats, cached_pass, pass_key, run_pass
from mixopt.model import LoadedModel, check_layer, load_model
from mixopt.recipe import Recipe, STSSpec
from mixopt.sae import check_sae, load_sae, sae_identity
from mixopt.scores import SCORERS, DomainScore, ForecastResult, Scores
from mixopt.sources import rendered_rows
from mixopt.stats import weighted_mean_interval


@dataclass
class Sample:
    """The examples of one source chosen for scoring, encoded."""

    available: int  # rows the source offers (after max_examples)
    examples: list[Encoded]
    demos: list[tuple[str, str]] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # each example's row in the source (`source_index`)


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


def encode_row(lm: LoadedModel, row: dict[str, str], max_length: int, tokens: str = "content") -> Encoded:
    """`tokens`: which tokens count: all content (prompt and response) or the response alone."""
    if "text" in row:
        return encode_text(lm.tokenizer, row["text"], max_length, lm.format)
    encoded = encode_chat(lm.tokenizer, row["prompt"], row["response"], max_length, lm.format)
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
    examples, indices, n_counted = [], [], 0
    for i in order[n_demos:]:
        if n_counted >= token_budget:
            break
        encoded = encode_row(lm, rows[i], max_length, tokens)
        if encoded.n_counted:
            examples.append(encoded)
            indices.append(i)
            n_counted += encoded.n_counted
    return Sample(len(rows), examples, demos, indices)


def mean_tokens(examples: list[Encoded]) -> tuple[float, float]:
    """(mean tokens per example, mean loss-bearing response tokens per example)."""
    return (float(np.mean([len(e) for e in examples])), float(np.mean([sum(e.response) for e in examples])))


@dataclass
class ScoringModel:
    """The model and SAE a scoring pass reads, with what identifies them (cache keys and records)."""

    lm: LoadedModel
    sae: Any  # sae_lens.SAE; None: no SAE (latents have width 0, only residual scorers apply)
    layer: int
    model_name: str  # as the recipe names it (Scores.model)
    sae_name: str  # as the recipe names it (Scores.sae)
    sae_identity: str  # weights fingerprint (cache keys)


@dataclass
class ScoringSource:
    """One source to score: its rendered rows (columns prompt + response, or text) and how to sample them."""

    name: str
    rows: datasets.Dataset
    seed: int  # sampling order (and, for the target, which rows are demonstrations)
    icl_demos: int = 0  # demonstrations: the target's shift estimate, or a domain's `icl` variant


def load_scoring_model(recipe: Recipe, timings: Timings) -> ScoringModel:
    lm: LoadedModel = timings.timed("load_model", lambda: load_model(recipe.model, recipe.base_dir))
    sae = None  # no SAE: the recipe's scorer reads the residual stream alone (checked in the recipe)
    if recipe.sae.present:
        sae = timings.timed("load_sae", lambda: load_sae(recipe.sae, recipe.base_dir, lm.device))
        check_sae(sae, lm, recipe.sae.layer)
    else:
        check_layer(lm.model, recipe.sae.layer)
    sae_name = recipe.sae.path or (f"{recipe.sae.release}/{recipe.sae.id}" if recipe.sae.release else "none")
    return ScoringModel(
        lm, sae, recipe.sae.layer, recipe.model.path, sae_name, sae_identity(recipe.sae, recipe.base_dir)
    )


def score_recipe(recipe: Recipe, timings: Timings | None = None) -> tuple[Scores, dict[str, Any]]:
    """Compute every domain's scores for the recipe. Returns the Scores and the run's context (model and SAE
    identity, timings) for manifests."""
    timings = timings or Timings()
    model = load_scoring_model(recipe, timings)
    target = ScoringSource(
        recipe.target.name, rendered_rows(recipe.target, recipe, "target"), recipe.target_seed, recipe.target.icl_demos
    )
    domains = [
        ScoringSource(d.name, rendered_rows(d, recipe, f"domains.{i}"), sts.name_seed(recipe.seed, d.name), d.icl_demos)
        for i, d in enumerate(recipe.domains)
    ]
    evidence: list[Evidence] = []
    scores = score_datasets(model, target, domains, recipe.sts, recipe.seed, timings, evidence)
    scores.recipe_sha256 = recipe.sha256()
    context = {
        "model_identity": model.lm.identity,
        "sae_identity": model.sae_identity,
        "device": str(model.lm.device),
        "dtype": str(model.lm.dtype).removeprefix("torch."),
        "timings": timings,
        "tokenizer": model.lm.tokenizer,  # the exports count each file's Megatron tokens with it
        "format": model.lm.format,  # how chat rows were rendered: the mixture renders them the same way
        "evidence": evidence[0],  # for `mixopt explain` and report.html
    }
    return scores, context


def score_datasets(
    model: ScoringModel,
    target: ScoringSource,
    domains: list[ScoringSource],
    spec: STSSpec,
    seed: int,
    timings: Timings | None = None,
    evidence: list[Evidence] | None = None,
) -> Scores:
    """Every domain's scores against the target: the shift pass on the target (with its demonstrations),
    one pass per domain (two for `icl`), then every scorer of the registry from the cached reductions.
    `seed` seeds each domain's bootstrap (per name). `Scores.recipe_sha256` is left empty for the caller.
    `evidence`: when a list is given, the explanation data (`explain.Evidence`: decoded snippets of the
    shifted latents, each domain's latent terms and top examples) is appended to it."""
    timings = timings or Timings()
    lm, sae, layer, k, variant, counted = model.lm, model.sae, model.layer, spec.top_k, spec.score, spec.tokens
    identity = {"model": lm.identity, "sae": model.sae_identity, "layer": layer, "dtype": str(lm.dtype)}

    def stream(name: str, sample: Sample, prefix: list[int]) -> PassResult:
        key = pass_key(identity, sample.examples, prefix)
        compute = lambda: run_pass(lm, sae, layer, sample.examples, prefix, spec.batch_tokens, name)  # noqa: E731
        result, hit = timings.timed("features", lambda: cached_pass(key, compute))
        timings.passes += 1
        timings.cache_hits += hit
        return result

    if len(target.rows) <= target.icl_demos:
        raise SourceError(f"target has {len(target.rows)} rows; it needs more than icl_demos={target.icl_demos}")
    target_sample = sample_source(
        target.rows, lm, target.seed, target.icl_demos, spec.target_tokens, spec.max_length, counted
    )
    prefix = encode_demonstrations(lm.tokenizer, target_sample.demos, lm.format)
    target_pass = stream(f"target {target.name}", target_sample, prefix)
    shift = target_pass.shift or SourceStats(target_pass.stats.example_tokens, *_zero_like(target_pass.stats))
    latents, shift_values = sts.shifted_latents(shift.latents, k)
    raw_dims, _ = sts.shifted_latents(shift.resid, k)

    samples: dict[str, Sample] = {}
    passes: dict[str, PassResult] = {}
    icl_passes: dict[str, PassResult] = {}
    icl_samples: dict[str, Sample] = {}
    for domain in domains:
        samples[domain.name] = sample_source(
            domain.rows, lm, domain.seed, 0, spec.domain_tokens, spec.max_length, counted
        )
        passes[domain.name] = stream(f"domain {domain.name}", samples[domain.name], [])
        if variant == "icl":
            icl_sample = sample_source(
                domain.rows, lm, domain.seed, domain.icl_demos, spec.domain_tokens, spec.max_length, counted
            )
            icl_prefix = encode_demonstrations(lm.tokenizer, icl_sample.demos, lm.format)
            icl_samples[domain.name] = icl_sample
            icl_passes[domain.name] = stream(f"domain {domain.name} (icl)", icl_sample, icl_prefix)

    forecasts = Forecasts()
    if SCORERS[variant].looks_ahead:
        every = {target.name: target_sample} | samples
        stats = {target.name: target_pass.stats} | {name: p.stats for name, p in passes.items()}
        run = lambda: forecast_scores(spec, seed, model, identity, target, every, stats)  # noqa: E731
        forecasts = timings.timed(variant, run)

    grand = torch.stack([sts.mean_residual(p.stats) for p in [target_pass, *passes.values()]]).mean(0)
    target_mean = sts.mean_residual(target_pass.stats)

    def record(name: str, sample: Sample, result: PassResult, icl: PassResult | None) -> DomainScore:
        stats = result.stats
        variants = {f"raw_{v}": sts.domain_score(stats.resid, stats.n_tokens, raw_dims, v) for v in ("act", "act_sq")}
        if sae is not None:  # the SAE's own variants; without one the latents have width 0
            variants |= {v: sts.domain_score(stats.latents, stats.n_tokens, latents, v) for v in ("act", "act_sq")}
        if icl is not None and icl.shift is not None:
            variants["icl"] = sts.domain_score(icl.shift.latents, icl.shift.n_tokens, latents, "icl")
            variants["raw_icl"] = sts.domain_score(icl.shift.resid, icl.shift.n_tokens, raw_dims, "icl")
        variants["similarity"] = sts.centered_similarity(sts.mean_residual(stats), target_mean, grand)
        if sae is not None:
            variants["random"] = sts.random_control(stats, k)
        variants |= {key: result.sources[name].value for key, result in forecasts.results.items()}
        scored = variant if variant != "icl" or "icl" in variants else "act"  # the target has no ICL pass of its own
        if variant in forecasts.results:
            forecast = forecasts.results[variant].sources[name]
            per_example, tokens = np.array(forecast.example_values), np.array(forecast.example_tokens)
        else:
            per_example, tokens = scorer_examples(scored, stats, icl, latents, raw_dims, target_mean, grand)
        stderr, interval = weighted_mean_interval(per_example, tokens, spec.bootstrap, sts.name_seed(seed, name))
        mean_all, mean_response = mean_tokens(sample.examples)
        return DomainScore(
            name=name,
            score=variants[SCORERS[scored].key],
            baseline=variants[SCORERS[scored].baseline],
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
            example_indices=(icl_samples[name] if scored == "icl" else sample).indices,  # whose rows scored
            variants=variants,
        )

    domain_scores = [record(d.name, samples[d.name], passes[d.name], icl_passes.get(d.name)) for d in domains]
    target_score = record(target.name, target_sample, target_pass, None)
    if forecasts.shifted is not None:  # probe_act: the shift the scorer used is the measured one
        latents, shift_values = forecasts.shifted
    chosen = forecasts.results.get(variant)
    scores = Scores(
        recipe_sha256="",
        model=model.model_name,
        sae=model.sae_name,
        layer=layer,
        top_k=len(latents),
        score=variant,
        shifted_latents=[{"index": int(i), "shift": float(v)} for i, v in zip(latents, shift_values, strict=True)],
        target=target_score,
        domains=domain_scores,
        transfer=chosen.transfer if chosen else None,
        cost=chosen.cost if chosen else None,
    )
    if evidence is not None:  # for `mixopt explain` and report.html, while the passes are in memory
        scored = [ScoredSource(target.name, target_sample.examples, target_pass, scores.target)]
        for d, score in zip(domains, scores.domains, strict=True):
            icl_examples = icl_samples[d.name].examples if d.name in icl_samples else None
            icl = (icl_passes.get(d.name), icl_examples) if icl_examples is not None else (None, None)
            scored.append(ScoredSource(d.name, samples[d.name].examples, passes[d.name], score, *icl))
        evidence.append(collect_evidence(lm.tokenizer, scores, counted, scored))
    return scores


@dataclass
class Forecasts:
    """The recipe's forecasting scorer's results by variant name."""

    results: dict[str, ForecastResult] = field(default_factory=dict)  # probe_act's raw baseline too: raw_probe_act
    shifted: tuple[torch.Tensor, torch.Tensor] | None = None  # probe_act: (latents, shift) of the measured shift


def forecast_scores(
    spec: STSSpec,
    seed: int,
    model: ScoringModel,
    identity: dict[str, Any],
    target: ScoringSource,
    samples: dict[str, Sample],
    stats: dict[str, SourceStats],
) -> Forecasts:
    """The recipe's forecasting scorer (a `looks_ahead` scorer) on the target and every domain. `samples`
    and `stats`: each source's scoring sample and feature statistics, by name; the target's rows (all of
    them) are what the pilot fine-tune trains on and its sample what `grad`'s update is estimated from."""
    from mixopt.placement import require_one_device

    lm, sae = model.lm, model.sae
    require_one_device(lm.model, f"sts.score: {spec.score}")
    examples = {name: sample.examples for name, sample in samples.items()}
    if spec.score == "grad":
        from mixopt.gradients import grad_forecast

        return Forecasts({"grad": grad_forecast(lm, target.name, examples, spec.grad, spec.batch_tokens, seed)})
    from mixopt import probe

    # probe and probe_act read one pilot fine-tune: both are measured (and cached) whenever either is chosen,
    # so the pilot trains at most once and each is reported beside the other
    encoded = (encode_row(lm, row, spec.probe.max_length) for row in target.rows)
    pilot = probe.Pilot(lm, [e for e in encoded if any(e.response[1:])], spec.probe, seed)
    losses = probe.probe_forecast(lm, pilot, examples, spec.batch_tokens)
    if sae is None:  # no SAE: the loss changes alone (probe_act reads SAE latents)
        return Forecasts({"probe": losses})
    shift = probe.measured_shift(lm, pilot, sae, identity, examples[target.name], spec.batch_tokens)
    measured, raw = (probe.probe_act_forecast(shift, stats, spec.top_k, raw=r) for r in (False, True))
    measured.cost = losses.cost  # the same pilot (probe_act's one extra pass on the target is not counted)
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
    blended: bool = False  # output.materialize: never: OUT/blend.json instead of the rows


def plan_recipe(recipe: Recipe, out: Path, force: bool = False, dry_run: bool = False) -> PlanResult:
    """`mixopt plan`: score, solve, then write mixture, manifest, exports, plots and README atomically."""
    from mixopt.checks import check_static
    from mixopt.exports import write_exports
    from mixopt.files import write_json
    from mixopt.html_report import write_explanation
    from mixopt.manifest import check_output, manifest_record, staged_output
    from mixopt.mixture import build_mixture, common_schema, mixture_parts, write_mixture
    from mixopt.plots import plot_allocation, plot_scores
    from mixopt.report import allocation_markdown, write_run_readme
    from mixopt.solver import limits_from_domains, solve_allocation
    from mixopt.sources import content_hash

    if not dry_run:
        check_output(out, force, recipe.input_paths())  # fail before the expensive part
    checked = check_static(recipe)
    timings = Timings()
    scores, context = timings.timed("score", lambda: score_recipe(recipe, timings))
    allocation = timings.timed(
        "solve",
        lambda: solve_allocation(scores, recipe.allocation, limits_from_domains(recipe.domains), seed=recipe.seed),
    )
    if dry_run:
        return PlanResult(scores, allocation, None, seconds=timings.seconds)
    with staged_output(out, force, recipe.input_paths()) as staged:
        parts = mixture_parts(recipe, allocation, scores, context["format"])
        never = recipe.output.materialize == "never"  # the blend instead of the rows: mixopt.load_mixture(OUT)
        if never:
            from mixopt.blend import BLEND, write_blend

            blend = timings.timed("blend", lambda: write_blend(staged, recipe, parts, context["format"]))
            rows, digest, files = blend.rows, blend.sha256(), {"blend": BLEND}
        else:
            mixture = timings.timed("mixture", lambda: build_mixture(parts, recipe.seed))
            files = timings.timed("write", lambda: write_mixture(mixture, staged, recipe.output.formats))
            rows, digest = len(mixture), content_hash(mixture)
        counts = {recipe.target.name: allocation.target_count} | {d.name: d.count for d in allocation.domains}
        available = {recipe.target.name: scores.target.available} | {d.name: d.available for d in scores.domains}
        epochs = {name: counts[name] / max(available[name], 1) for name in counts}
        schema = common_schema(parts)
        if "parquet" in recipe.output.formats and not never:  # the exports point at the per-domain parquet files
            write_exports(staged, counts, epochs, schema, context["tokenizer"])
        (staged / "plots").mkdir()
        ranked = scores.ranked()
        plot_scores(
            [d.name for d in ranked],
            [d.score for d in ranked],
            [d.baseline for d in ranked],
            staged / "plots" / "sts.png",
            recipe.sts.score,
        )
        shares = {d.name: d.share for d in allocation.domains}
        shares = {recipe.target.name: 1 - sum(shares.values())} | shares  # in the budget's unit
        plot_allocation(
            list(shares), list(shares.values()), staged / "plots" / "allocation.png", target=recipe.target.name
        )
        table_md = allocation_markdown(scores, allocation)
        write_run_readme(staged, table_md, counts, epochs, schema, recipe.target.name, blended=never)
        scores.save(staged / "scores.json")
        allocation.save(staged / "allocation.json")
        written = {"rows": rows, "content_sha256": digest, "schema": schema, "files": files}
        written["materialize"] = recipe.output.materialize  # never: content_sha256 is the blend's (blend.json)
        written["skipped_rows"] = checked.skipped  # on_bad_row: skip, rows left out per target/domain
        replay = {part.name: part.record() for part in parts[1:]}  # parts[0] is the target
        manifest = manifest_record(recipe, scores, allocation, context, written, timings.seconds, replay)
        write_json(staged / "manifest.json", manifest)
        write_explanation(staged, scores, allocation, context["evidence"], manifest)  # explain.json, report.html
    return PlanResult(scores, allocation, out, rows, digest, timings.seconds, blended=never)
