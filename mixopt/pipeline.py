"""Pipeline: wire the stages for `mixopt score` (and `plan`): recipe -> sources -> model + SAE ->
features -> STS -> Scores. Each stage lives in its own module; this one only chooses what to run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
from mixopt.scores import DomainScore, Scores
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


def encode_row(lm: LoadedModel, row: dict[str, str], max_length: int) -> Encoded:
    if "text" in row:
        return encode_text(lm.tokenizer, row["text"], max_length)
    return encode_chat(lm.tokenizer, row["prompt"], row["response"], max_length)


def sample_source(rows: datasets.Dataset, lm: LoadedModel, seed: int, n_demos: int, token_budget: int,
                  max_length: int) -> Sample:
    """Seeded order; the first `n_demos` rows are demonstrations (never queries), then queries until
    `token_budget` counted tokens."""
    order = np.random.default_rng(seed).permutation(len(rows)).tolist()
    demo_rows = [rows[i] for i in order[:n_demos]]
    demos = [(r["prompt"], r["response"]) if "prompt" in r else (r["text"], "") for r in demo_rows]
    examples, tokens = [], 0
    for i in order[n_demos:]:
        if tokens >= token_budget:
            break
        encoded = encode_row(lm, rows[i], max_length)
        if encoded.n_counted:
            examples.append(encoded)
            tokens += encoded.n_counted
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
    layer, k, variant = recipe.sae.layer, recipe.sts.top_k, recipe.sts.score
    check_sae(sae, lm, layer)
    identity = {"model": lm.identity, "sae": sae_identity(recipe.sae, recipe.base_dir), "layer": layer,
                "dtype": str(lm.dtype)}

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
    target_sample = sample_source(target_rows, lm, recipe.target_seed, target.icl_demos,
                                  recipe.sts.target_tokens, recipe.sts.max_length)
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
        samples[domain.name] = sample_source(rows, lm, seed, 0, recipe.sts.domain_tokens, recipe.sts.max_length)
        passes[domain.name] = stream(f"domain {domain.name}", samples[domain.name], [])
        if variant == "icl":
            icl_sample = sample_source(rows, lm, seed, domain.icl_demos, recipe.sts.domain_tokens,
                                       recipe.sts.max_length)
            icl_prefix = encode_demonstrations(lm.tokenizer, icl_sample.demos)
            icl_passes[domain.name] = stream(f"domain {domain.name} (icl)", icl_sample, icl_prefix)

    grand = torch.stack([sts.mean_residual(p.stats) for p in [target_pass, *passes.values()]]).mean(0)
    target_mean = sts.mean_residual(target_pass.stats)

    def record(name: str, sample: Sample, result: PassResult, icl: PassResult | None) -> DomainScore:
        stats = result.stats
        scored = icl.shift if (variant == "icl" and icl is not None and icl.shift is not None) else stats
        reduction = scored.latents
        raw_reduction = scored.resid
        per_example = sts.example_scores(reduction, scored.example_tokens, latents, variant)
        tokens = scored.example_tokens.numpy()
        stderr, interval = sts.bootstrap(per_example, tokens, recipe.sts.bootstrap, sts.name_seed(recipe.seed, name))
        variants = {v: sts.domain_score(stats.latents, stats.n_tokens, latents, v) for v in ("act", "act_sq")}
        variants |= {f"raw_{v}": sts.domain_score(stats.resid, stats.n_tokens, raw_dims, v) for v in ("act", "act_sq")}
        if icl is not None and icl.shift is not None:
            variants["icl"] = sts.domain_score(icl.shift.latents, icl.shift.n_tokens, latents, "icl")
            variants["raw_icl"] = sts.domain_score(icl.shift.resid, icl.shift.n_tokens, raw_dims, "icl")
        variants["similarity"] = sts.centered_similarity(sts.mean_residual(stats), target_mean, grand)
        variants["random"] = sts.random_control(stats, k)
        mean_all, mean_response = mean_tokens(sample.examples)
        return DomainScore(
            name=name, sts=sts.domain_score(reduction, scored.n_tokens, latents, variant),
            baseline=sts.domain_score(raw_reduction, scored.n_tokens, raw_dims, variant),
            similarity=variants["similarity"], tokens=stats.n_tokens, examples=len(sample.examples),
            available=sample.available, mean_tokens=mean_all, mean_response_tokens=mean_response,
            stderr=stderr, interval=interval, example_scores=[round(float(s), 6) for s in per_example],
            example_tokens=[int(t) for t in tokens], variants=variants,
        )

    domains = [record(d.name, samples[d.name], passes[d.name], icl_passes.get(d.name)) for d in recipe.domains]
    scores = Scores(
        recipe_sha256=recipe.sha256(), model=recipe.model.path,
        sae=recipe.sae.path or f"{recipe.sae.release}/{recipe.sae.id}", layer=layer, top_k=len(latents),
        score=variant,
        shifted_latents=[{"index": int(i), "shift": float(v)} for i, v in zip(latents, shift_values, strict=True)],
        target=record(target.name, target_sample, target_pass, None), domains=domains,
    )
    context = {"model_identity": lm.identity, "sae_identity": identity["sae"], "device": str(lm.device),
               "dtype": str(lm.dtype).removeprefix("torch."), "timings": timings}
    return scores, context


def _zero_like(stats: SourceStats) -> tuple[Any, Any]:
    """Zero reductions shaped like `stats` (the shift when there are no demonstrations)."""
    from mixopt.features import Reduction

    n = len(stats.example_tokens)
    return (Reduction.empty(n, stats.latents.total.numel()), Reduction.empty(n, stats.resid.total.numel()))
