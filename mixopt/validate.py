"""Validate: does STS forecast what a real fine-tune moves? (`mixopt validate`, DESIGN.md section 7)

1. Split each evaluation domain by content hash into a scoring part (what the scores see) and held-out
   evaluation items (what the metrics measure); hold out some of each source too (its own gain).
2. Measure every metric on the evaluation items with the base model.
3. Fine-tune a fresh copy on each source (`finetune.py`), measure again.
4. Score every (source, domain): STS variants, `raw`, centered `similarity`, `random`, each source taken
   as the target and the domains' scoring parts as the domains (`pipeline.score_recipe`).
5. Correlate each score with |change| and signed change over the source x domain cells, for the metrics
   whose change is reliable; report the partial correlation of STS given similarity.
6. Optionally (`compare=True`, `mixopt.compare`): at the same budget, target only vs target + uniform
   replay vs target + mixopt's allocation.

Everything lands in the run folder and is keyed by content (data, schedule, model), so a stopped run
resumes: finished fine-tunes and measurements are read back, a half-done fine-tune resumes from its
checkpoint, and feature statistics come from mixopt's cache.

Example:
    >>> from mixopt.recipe import load_validate_recipe
    >>> result = run_validation(load_validate_recipe("recipes/validate-mmlu.yaml"), Path("runs/v"))  # doctest: +SKIP
    >>> print(result.table())                                                                         # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mixopt import evaluate as ev
from mixopt.errors import SourceError
from mixopt.evaluate import MCQItem
from mixopt.recipe import EvalDomainSpec, FinetuneSourceSpec, MCQTemplates, Recipe, ValidateRecipe
from mixopt.sources import check_columns, describe, load_source, render_column

STS_VARIANTS = ("act", "act_sq", "icl")
SCORERS = {
    "act": "act",
    "act_sq": "act_sq",
    "icl": "icl",
    "raw": "raw_act",
    "similarity": "similarity",
    "random": "random",
}  # name in the report -> key in DomainScore.variants
Pair = tuple[str, str]  # (prompt, response)


# ------------------------------------------------------------------------------------------- data


@dataclass
class DomainData:
    name: str
    evaluation: list[MCQItem]  # held out: measured before and after each fine-tune
    scoring: list[MCQItem]  # what the scores (and replay mixtures) see
    duplicates: int  # rows dropped as repeats of an earlier row


@dataclass
class SourceData:
    name: str
    pool: list[Pair]  # rows it may be trained on
    heldout: list[Pair]  # rows never trained on: its own gain
    seen: set[str]  # every normalised text of its rows: evaluation items matching one are not its to judge


def mcq_items(ds: Any, mcq: MCQTemplates, where: str) -> list[MCQItem]:
    """Rows -> items; SourceError naming the row when an answer is not a valid letter or index."""
    questions = render_column(ds, mcq.question)
    choices = list(zip(*(render_column(ds, t) for t in mcq.choices), strict=True))
    answers = render_column(ds, mcq.answer)
    items = []
    for i, (question, options, answer) in enumerate(zip(questions, choices, answers, strict=True)):
        try:
            answer_index = ev.parse_answer(answer, len(options))
            items.append(MCQItem(question.strip(), tuple(o.strip() for o in options), answer_index))
        except ValueError as err:
            raise SourceError(f"{where}: row {i}: {err}; fix the data or the `mcq.answer` template") from None
    return items


def split_items(items: Sequence[MCQItem], n_eval: int, seed: int) -> tuple[list[MCQItem], list[MCQItem], int]:
    """(evaluation, scoring, duplicates): repeats dropped, then rows ordered by sha256(seed, text); the
    first `n_eval` are held out. The order depends on the text alone, so every process and machine agrees."""
    unique = list({item.text: item for item in reversed(items)}.values())[::-1]  # first occurrence wins
    ordered = sorted(unique, key=lambda item: ev.content_key(item.text, seed))
    return ordered[:n_eval], ordered[n_eval:], len(items) - len(unique)


def _selected(ds: Any, limit: int | None) -> Any:
    return ds.select(range(min(len(ds), limit))) if limit is not None else ds


def load_domains(recipe: ValidateRecipe) -> list[DomainData]:
    """Every evaluation domain split; a scoring row that is another domain's evaluation item is dropped."""
    domains = []
    for i, spec in enumerate(recipe.domains):
        domains.append(_load_domain(recipe, spec, f"domains.{i} ({describe(spec.source)})"))
    held = {ev.normalized(item.question) for d in domains for item in d.evaluation}
    for d in domains:
        d.scoring = [item for item in d.scoring if ev.normalized(item.question) not in held]
        if len(d.scoring) < recipe.split.min_scoring_items:
            raise SourceError(
                f"domain {d.name}: {len(d.scoring)} items left to score after holding out "
                f"{recipe.split.eval_items}; lower split.eval_items or split.min_scoring_items"
            )
    return domains


def _load_domain(recipe: ValidateRecipe, spec: EvalDomainSpec, where: str) -> DomainData:
    ds = load_source(spec.source, recipe.base_dir)
    check_columns(ds, spec, where)  # type: ignore[arg-type]
    items = mcq_items(_selected(ds, spec.max_examples), spec.mcq, where)
    evaluation, scoring, duplicates = split_items(items, recipe.split.eval_items, recipe.seed)
    if len(evaluation) < recipe.split.eval_items:
        raise SourceError(
            f"{where}: {len(evaluation)} distinct items, fewer than split.eval_items "
            f"{recipe.split.eval_items}; lower it or drop the domain"
        )
    return DomainData(spec.name, evaluation, scoring, duplicates)


def load_source_data(recipe: ValidateRecipe, index: int) -> SourceData:
    """A fine-tuning source's rows as (prompt, response), split into pool and held-out by content hash."""
    spec = recipe.sources[index]
    where = f"sources.{index} ({describe(spec.source)})"
    ds = load_source(spec.source, recipe.base_dir)
    check_columns(ds, spec, where)  # type: ignore[arg-type]
    ds = _selected(ds, spec.max_examples)
    pairs = _source_pairs(ds, spec, where)
    seen = {ev.normalized(v) for column in ds.column_names for v in ds[column] if isinstance(v, str) and v.strip()}
    seen |= {ev.normalized(p) for p, _ in pairs}
    unique = list(dict.fromkeys(pairs))
    ordered = sorted(unique, key=lambda pair: ev.content_key("\n".join(pair), recipe.seed))
    n_heldout = recipe.split.source_heldout
    if len(ordered) < n_heldout + recipe.schedule.batch_size:
        raise SourceError(
            f"{where}: {len(ordered)} distinct rows; it needs split.source_heldout ({n_heldout}) "
            f"plus at least one batch ({recipe.schedule.batch_size})"
        )
    return SourceData(spec.name, ordered[n_heldout:], ordered[:n_heldout], seen)


def _source_pairs(ds: Any, spec: FinetuneSourceSpec, where: str) -> list[Pair]:
    if spec.mcq is not None:  # trained as question -> the correct answer's text
        return [(item.question, item.answer_text) for item in mcq_items(ds, spec.mcq, where)]
    return list(zip(render_column(ds, spec.prompt or ""), render_column(ds, spec.response or ""), strict=True))


def scoring_pair(item: MCQItem) -> Pair:
    """How a domain's item is scored (and replayed): the question with choices, then the letter."""
    return item.prompt, f"{ev.REPLY_START} {item.letter}"


def excluded(items: Sequence[MCQItem], source: SourceData) -> np.ndarray:
    """(items,) bool: items whose question appears in the source's own data."""
    return np.array([ev.normalized(item.question) in source.seen for item in items], dtype=bool)


def write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def write_data(out: Path, domains: Sequence[DomainData], sources: Sequence[SourceData]) -> None:
    """The exact rows of every part, for the scores (which read files) and for the record."""
    for d in domains:
        write_jsonl(
            out / "data" / "eval" / f"{d.name}.jsonl",
            [
                {"key": ev.content_key(i.text), "question": i.question, "choices": list(i.choices), "answer": i.letter}
                for i in d.evaluation
            ],
        )
        write_jsonl(
            out / "data" / "scoring" / f"{d.name}.jsonl",
            [dict(zip(("prompt", "response"), scoring_pair(i), strict=True)) for i in d.scoring],
        )
    for s in sources:
        write_jsonl(out / "data" / "train" / f"{s.name}.jsonl", [{"prompt": p, "response": r} for p, r in s.pool])
        write_jsonl(out / "data" / "heldout" / f"{s.name}.jsonl", [{"prompt": p, "response": r} for p, r in s.heldout])


# ----------------------------------------------------------------------------------------- scores


def plan_recipe_for(recipe: ValidateRecipe, source: FinetuneSourceSpec, out: Path, domains: Sequence[str]) -> Recipe:
    """A plan recipe with the source as the target and the domains' scoring parts as the domains."""
    chat = {"prompt": "{prompt}", "response": "{response}"}
    data = {
        "seed": recipe.seed,
        "model": recipe.model.model_dump(mode="json"),
        "sae": recipe.sae.model_dump(mode="json", exclude_none=True),
        "sts": recipe.sts.model_dump(mode="json"),
        "target": {
            "name": source.name,
            "source": {"path": str(out / "data" / "train" / f"{source.name}.jsonl")},
            "icl_demos": source.icl_demos,
            **chat,
        },
        "domains": [
            {"name": d, "source": {"path": str(out / "data" / "scoring" / f"{d}.jsonl")}, **chat} for d in domains
        ],
    }
    plan = Recipe.model_validate(data)
    plan._base_dir = recipe.base_dir  # the model and SAE paths are relative to the validate recipe
    return plan


def score_sources(
    recipe: ValidateRecipe, out: Path, domains: Sequence[str], folder: Path | None = None
) -> dict[str, Any]:
    """Scores (mixopt.scores.Scores) of each source against the domains; also saved under `folder`
    (default OUT/scores)."""
    from mixopt.pipeline import score_recipe

    folder = folder or out / "scores"
    scores = {}
    for source in recipe.sources:
        _note(f"scores: {source.name} as the target, {len(domains)} domains")
        scores[source.name], _ = score_recipe(plan_recipe_for(recipe, source, out, domains))
        folder.mkdir(parents=True, exist_ok=True)
        scores[source.name].save(folder / f"{source.name}.json")
    return scores


def score_matrix(scores: dict[str, Any], sources: Sequence[str], domains: Sequence[str]) -> dict[str, np.ndarray]:
    """scorer -> (sources, domains) array; scorers the scores lack (e.g. `icl` unless computed) are left out."""
    matrix: dict[str, np.ndarray] = {}
    for name, key in SCORERS.items():
        values = [
            [next(d for d in scores[s].domains if d.name == dom).variants.get(key, np.nan) for dom in domains]
            for s in sources
        ]
        if np.isfinite(values).any():
            matrix[name] = np.array(values, dtype=float)
    return matrix


# --------------------------------------------------------------------------------------- measuring


@dataclass
class Run:
    """One fine-tune: its training rows and the source whose own items it must not be judged on."""

    name: str
    source: str
    rows: list[Pair]
    mixture: dict[str, int] = field(default_factory=dict)  # rows per part, for mixture runs


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(recipe: ValidateRecipe) -> str:
    """Weights fingerprint, device and evaluation dtype: what a stored measurement depends on (no load)."""
    from mixopt.model import resolve_device, resolve_dtype, resolve_model_source

    _, identity = resolve_model_source(recipe.model, recipe.base_dir)
    device = resolve_device(recipe.model.device)
    return f"{identity}|{device.type}|{resolve_dtype(recipe.model.dtype, device)}"


def _load_model(recipe: ValidateRecipe, dtype: str | None = None) -> Any:
    from mixopt.model import load_model

    spec = recipe.model if dtype is None else recipe.model.model_copy(update={"dtype": dtype})
    return load_model(spec, recipe.base_dir)


def measure(
    lm: Any, recipe: ValidateRecipe, items: Sequence[MCQItem], heldout: dict[str, list[Pair]], desc: str
) -> dict[str, Any]:
    """Per-item metrics on the evaluation items and reply NLL on the sources' held-out rows."""
    e = recipe.evaluation
    values = ev.score_items(lm, items, e.max_length, e.batch_tokens, desc=f"evaluate {desc}")
    own = {
        name: ev.score_replies(lm, pairs, e.max_length, e.batch_tokens, desc=f"held-out {name}")
        for name, pairs in heldout.items()
    }
    return {"items": {m: v.tolist() for m, v in values.items()}, "heldout": {k: v.tolist() for k, v in own.items()}}


def _cached(path: Path, key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Read a measurement back if it was made from the same inputs, else compute and store it atomically."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == key:
            return stored
    result = {"fingerprint": key, **compute()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return result


def train_and_measure(
    recipe: ValidateRecipe, run: Run, items: Sequence[MCQItem], heldout: list[Pair], out: Path, identity: str
) -> dict[str, Any]:
    """Fine-tune a fresh copy on the run's rows (resuming), then measure it; the checkpoint is then dropped."""
    from mixopt.encoding import encode_chat
    from mixopt.finetune import finetune, fingerprint, remove_checkpoint
    from mixopt.model import resolve_dtype

    lm = _load_model(recipe, dtype="float32")  # fp32 master weights; CUDA runs the forward in bf16 autocast
    n = recipe.schedule.max_length
    examples = [e for e in (encode_chat(lm.tokenizer, p, r, n) for p, r in run.rows) if any(e.response[1:])]
    key = _digest(
        identity,
        fingerprint(examples, recipe.schedule, recipe.seed),
        [i.text for i in items],
        heldout,
        recipe.evaluation.max_length,
    )

    def compute() -> dict[str, Any]:
        import torch

        torch.manual_seed(recipe.seed)
        folder = out / "finetune" / run.name
        result = finetune(
            lm.model,
            examples,
            recipe.schedule,
            recipe.seed,
            folder,
            pad_id=lm.tokenizer.pad_token_id or 0,
            desc=f"fine-tune {run.name}",
        )
        dtype = resolve_dtype(recipe.model.dtype, lm.device)
        measured = measure(
            dataclasses.replace(lm, model=lm.model.to(dtype), dtype=dtype),
            recipe,
            items,
            {run.source: heldout},
            run.name,
        )
        remove_checkpoint(folder)
        return {**measured, "finetune": result.to_dict(), "mixture": run.mixture, "examples": len(examples)}

    return _cached(out / "metrics" / f"{run.name}.json", key, compute)


# ---------------------------------------------------------------------------------------- analysis


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
    base: dict[str, Any],
    after: dict[str, dict[str, Any]],
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
        b0 = np.asarray(base["items"][m], dtype=float)
        for key in ("before", "after", "delta", "stderr"):
            getattr(out, key)[m] = np.full(shape, np.nan)
        out.item_deltas[m] = [[np.empty(0)] * len(domains) for _ in sources]
        for i, s in enumerate(sources):
            a = np.asarray(after[s]["items"][m], dtype=float)
            for j, d in enumerate(domains):
                keep = masks[s][spans[d]] & np.isfinite(b0[spans[d]]) & np.isfinite(a[spans[d]])
                diff = (a[spans[d]] - b0[spans[d]])[keep]
                out.item_deltas[m][i][j] = diff
                out.n[i, j] = keep.sum()
                if keep.any():
                    out.before[m][i, j], out.after[m][i, j] = b0[spans[d]][keep].mean(), a[spans[d]][keep].mean()
                    out.delta[m][i, j] = diff.mean()
                    out.stderr[m][i, j] = ev.bootstrap_se(diff, n_boot, seed)
    return out


def reliabilities(
    cells: Cells, base: dict[str, Any], spans: dict[str, slice], splits: int, seed: int
) -> dict[str, dict[str, Any]]:
    """Split-half reliability of each metric: its level across domains (base model), and its change across
    the pooled cells and across each source's domains."""
    out = {}
    for m in ev.METRICS:
        b0 = np.asarray(base["items"][m], dtype=float)
        cells_flat = [x for row in cells.item_deltas[m] for x in row]
        out[m] = {
            "level": ev.split_half_reliability([b0[sl] for sl in spans.values()], splits, seed),
            "change_pooled": ev.split_half_reliability(cells_flat, splits, seed),
            "change_by_source": {
                s: ev.split_half_reliability(cells.item_deltas[m][i], splits, seed) for i, s in enumerate(cells.sources)
            },
        }
    return out


def _resampled(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.append(a, np.nan)[idx]  # index -1 (padding) reads the appended NaN: missing


def correlation(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    """Pearson and Spearman of x with y, each with a 95% interval over the resamples `idx` (whole domains)."""
    out: dict[str, Any] = {"n": int((np.isfinite(x) & np.isfinite(y)).sum())}
    bx, by = _resampled(x, idx), _resampled(y, idx)
    for name, fn in (("pearson", ev.pearson_rows), ("spearman", ev.spearman_rows)):
        out[name] = {"r": ev._row(fn, x, y), "ci": ev.percentile_interval(fn(bx, by))}
    return out


def partial(x: np.ndarray, y: np.ndarray, z: np.ndarray, idx: np.ndarray) -> dict[str, Any]:
    """Partial Pearson r(x, y | z) with its 95% interval over the resamples `idx`."""
    draws = ev.partial_rows(_resampled(x, idx), _resampled(y, idx), _resampled(z, idx))
    return {"r": ev.partial_pearson(x, y, z), "ci": ev.percentile_interval(draws)}


def view(scores: dict[str, np.ndarray], targets: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, Any]:
    """Every scorer against each target (|change|, change), and each STS variant's partial r given similarity."""
    out: dict[str, Any] = {
        "scores": {name: {t: correlation(x, y, idx) for t, y in targets.items()} for name, x in scores.items()}
    }
    if "similarity" in scores:
        out["partial_given_similarity"] = {
            v: {t: partial(scores[v], y, scores["similarity"], idx) for t, y in targets.items()}
            for v in STS_VARIANTS
            if v in scores
        }
    return out


def _zscored(a: np.ndarray) -> np.ndarray:
    """Standardise each row (a source's domains): compares domains within a source, not sources' scales."""
    mean, std = np.nanmean(a, axis=1, keepdims=True), np.nanstd(a, axis=1, keepdims=True)
    return (a - mean) / np.where(std > 0, std, np.nan)


def correlations(cells: Cells, matrix: dict[str, np.ndarray], n_boot: int, seed: int) -> dict[str, Any]:
    """metric -> {pooled, within, by_source}: `pooled` correlates raw values over all cells; `within`
    standardises scores and changes per source first (sources' score scales differ); intervals resample
    whole domains."""
    n_src, n_dom = len(cells.sources), len(cells.domains)
    # cell (i, j) flattened row-major belongs to domain j: a resample draws whole domains, all sources' cells
    pooled_idx = ev.bootstrap_indices(np.tile(np.arange(n_dom), n_src), n_boot, seed)
    source_idx = ev.bootstrap_indices(np.arange(n_dom), n_boot, seed)
    out = {}
    for m in ev.METRICS:
        delta = cells.delta[m]  # (sources, domains)
        pooled = {"abs": np.abs(delta).ravel(), "signed": delta.ravel()}
        within = {"abs": _zscored(np.abs(delta)).ravel(), "signed": _zscored(delta).ravel()}
        by_source = {
            s: view({k: v[i] for k, v in matrix.items()}, {"abs": np.abs(delta[i]), "signed": delta[i]}, source_idx)
            for i, s in enumerate(cells.sources)
        }
        out[m] = {
            "pooled": view({k: v.ravel() for k, v in matrix.items()}, pooled, pooled_idx),
            "within": view({k: _zscored(v).ravel() for k, v in matrix.items()}, within, pooled_idx),
            "by_source": by_source,
        }
    return out


# ---------------------------------------------------------------------------------------- report


@dataclass
class ValidationResult:
    out: Path
    report: dict[str, Any]  # what validation.json holds

    def table(self) -> str:
        return report_table(self.report)


def _r(value: float | None) -> str:
    """A correlation-like number; None (a NaN read back from validation.json) and NaN print as n/a."""
    return "   n/a" if value is None or not np.isfinite(value) else f"{value:+.2f}"


def _rci(stat: dict[str, Any]) -> str:
    lo, hi = stat["ci"]
    return f"{_r(stat['r'])} [{_r(lo)},{_r(hi)}]"


def reliable_metrics(report: dict[str, Any]) -> list[str]:
    return [m for m, info in report["metrics"].items() if info["reliable"]]


def report_table(report: dict[str, Any]) -> str:
    """The terminal summary: fine-tunes, metric reliabilities, pooled correlations, per-source Pearson."""
    lines = [
        f"validation: {len(report['sources'])} sources x {len(report['domains'])} domains, "
        f"{report['split']['eval_items']} evaluation items per domain, "
        f"{report['budget']} examples per fine-tune",
        "",
        f"{'source':<22} {'steps':>6} {'first loss':>10} {'last 10 loss':>12} {'own NLL before':>15} {'after':>8}",
    ]
    for name, s in report["sources"].items():
        losses = s["finetune"]["losses"]
        lines.append(
            f"{name:<22} {s['finetune']['steps']:>6} {losses[0]:>10.3f} {np.mean(losses[-10:]):>12.3f} "
            f"{s['own_nll']['before']:>15.3f} {s['own_nll']['after']:>8.3f}"
        )
    threshold = report["min_reliability"]
    lines += [
        "",
        f"split-half reliability (Spearman-Brown; a change counts at >= {threshold:g})",
        f"{'metric':<12} {'level':>7} {'change':>7}  counts",
    ]
    for m, info in report["metrics"].items():
        rel = info["reliability"]
        counts = "yes" if info["reliable"] else "no"
        lines.append(f"{m:<12} {_r(rel['level']):>7} {_r(rel['change_pooled']):>7}  {counts}")
    shown = reliable_metrics(report)
    if not shown:
        shown = list(report["metrics"])
        lines += ["", f"no metric's change reaches reliability {threshold:g}: the correlations below are noise-level"]
    for m in shown:
        lines += ["", *_metric_table(report, m)]
    if report.get("compare"):
        from mixopt.compare import compare_table

        lines += ["", compare_table(report["compare"])]
    if report.get("sweep"):
        from mixopt.sweep import sweep_table

        lines += ["", sweep_table(report["sweep"])]
    return "\n".join(lines)


def _metric_table(report: dict[str, Any], metric: str) -> list[str]:
    pooled = report["correlations"][metric]["pooled"]
    n = next(iter(pooled["scores"].values()))["abs"]["n"]
    lines = [
        f"{metric}: correlation over {n} source x domain cells (95% intervals resample domains)",
        f"{'score':<11} {'|change| Pearson':>22} {'|change| Spearman':>22} {'change Pearson':>22} "
        f"{'change Spearman':>22}  {'within-source |change| r':>24}",
    ]
    within = report["correlations"][metric]["within"]["scores"]
    for name, stats in pooled["scores"].items():
        lines.append(
            f"{name:<11} {_rci(stats['abs']['pearson']):>22} {_rci(stats['abs']['spearman']):>22} "
            f"{_rci(stats['signed']['pearson']):>22} {_rci(stats['signed']['spearman']):>22}  "
            f"{_rci(within[name]['abs']['pearson']):>24}"
        )
    for variant, stats in pooled.get("partial_given_similarity", {}).items():
        lines.append(
            f"partial r({variant}, |change| | similarity) = {_rci(stats['abs'])}; "
            f"r({variant}, change | similarity) = {_rci(stats['signed'])}"
        )
    by_source = report["correlations"][metric]["by_source"]
    lines.append(
        "per source, Pearson with |change|: "
        + "; ".join(
            f"{s}: " + ", ".join(f"{k} {_r(v['abs']['pearson']['r'])}" for k, v in info["scores"].items())
            for s, info in by_source.items()
        )
    )
    return [*lines, verdict(report, metric)]


def verdict(report: dict[str, Any], metric: str) -> str:
    """One line: which score forecasts |change| best here, and whether STS adds anything beyond similarity."""
    pooled = report["correlations"][metric]["pooled"]
    r = {k: v["abs"]["pearson"]["r"] for k, v in pooled["scores"].items()}
    finite = {k: v for k, v in r.items() if v is not None and np.isfinite(v)}
    if not finite:
        return "verdict: no score correlates (too few cells)"
    best = max(finite, key=lambda k: finite[k])
    line = f"verdict: best forecaster of |change| is {best} (Pearson {_r(finite[best])})"
    sts_name = report["sts_score"]
    partial = pooled.get("partial_given_similarity", {}).get(sts_name)
    if partial is not None:
        lo, hi = partial["abs"]["ci"]
        if lo is not None and hi is not None and np.isfinite(lo) and np.isfinite(hi):
            adds = (
                "adds signal beyond" if lo > 0 else "points the wrong way beyond" if hi < 0 else "adds nothing beyond"
            )
            line += f"; STS {sts_name} {adds} similarity (partial r {_rci(partial['abs'])})"
    return line


# ----------------------------------------------------------------------------------------- plots


def primary_metric(report: dict[str, Any]) -> str:
    """The metric whose change is most reliable: the one the scatter plots show."""
    metrics = report["metrics"]
    return max(metrics, key=lambda m: np.nan_to_num(metrics[m]["reliability"]["change_pooled"], nan=-np.inf))


def plot_scatter(
    source: str,
    domains: Sequence[str],
    scores: dict[str, np.ndarray],
    delta: np.ndarray,
    metric: str,
    sts_name: str,
    path: Path,
) -> None:
    """One source: its STS and its centered similarity against each domain's change, points labelled."""
    from mixopt.plots import _save, plt

    panels = [name for name in (sts_name, "similarity") if name in scores]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.5), squeeze=False)
    for ax, name in zip(axes[0], panels, strict=True):
        ax.scatter(scores[name], delta, color="#3b6ea8", s=18)
        for x, y, label in zip(scores[name], delta, domains, strict=True):
            ax.annotate(label, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        r = ev.pearson(scores[name], np.abs(delta))
        ax.set_title(f"{source}: {name} (Pearson with |change| {_r(r)})", loc="left", fontsize=10)
        ax.set_xlabel(name)
        ax.set_ylabel(f"change in {metric} (after - before)")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def plot_correlations(report: dict[str, Any], path: Path) -> None:
    """Pooled Pearson of each score with |change| and change, with 95% intervals, one panel per metric."""
    from mixopt.plots import _save, plt

    metrics = reliable_metrics(report) or list(report["metrics"])
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 4), squeeze=False, sharey=True)
    for ax, m in zip(axes[0], metrics, strict=True):
        scores = report["correlations"][m]["pooled"]["scores"]
        x = np.arange(len(scores))
        for offset, target, color in ((-0.2, "abs", "#3b6ea8"), (0.2, "signed", "#c4622d")):
            r = np.array([s[target]["pearson"]["r"] for s in scores.values()], dtype=float)
            ci = np.array([s[target]["pearson"]["ci"] for s in scores.values()], dtype=float)  # (scores, 2)
            err = np.abs(np.nan_to_num(np.stack([r - ci[:, 0], ci[:, 1] - r]), nan=0.0))
            ax.bar(
                x + offset,
                np.nan_to_num(r),
                width=0.4,
                yerr=err,
                capsize=3,
                color=color,
                label="|change|" if target == "abs" else "change",
            )
        ax.set_xticks(x, list(scores), rotation=30)
        reliable = "" if report["metrics"][m]["reliable"] else " (unreliable)"
        ax.set_title(f"{m}{reliable}", loc="left", fontsize=10)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylim(-1.05, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Pearson r, pooled cells (95% interval)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


# ------------------------------------------------------------------------------------------- run


def _note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)  # progress to stderr, results to stdout


def _finite(node: Any) -> Any:
    """NaN/inf -> None, so validation.json is strict JSON."""
    if isinstance(node, dict):
        return {k: _finite(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_finite(v) for v in node]
    if isinstance(node, float | np.floating):
        return float(node) if np.isfinite(node) else None
    if isinstance(node, np.integer):
        return int(node)
    return node


def _spans(domains: Sequence[DomainData]) -> dict[str, slice]:
    spans, start = {}, 0
    for d in domains:
        spans[d.name] = slice(start, start + len(d.evaluation))
        start += len(d.evaluation)
    return spans


def run_validation(recipe: ValidateRecipe, out: Path, compare: bool = False, sweep: bool = False) -> ValidationResult:
    """The whole closed loop (module docstring); writes OUT/validation.json and OUT/plots, returns the report.
    `sweep`: also re-score under each open setting of the design (`mixopt.sweep`)."""
    from mixopt.checks import check_static

    timings: dict[str, float] = {}
    started = time.perf_counter()
    check_static(recipe)  # fail on a missing file or column before any model loads
    out.mkdir(parents=True, exist_ok=True)
    domains = load_domains(recipe)
    sources = [load_source_data(recipe, i) for i in range(len(recipe.sources))]
    write_data(out, domains, sources)
    names = [d.name for d in domains]
    _note(
        f"validate: {len(sources)} sources x {len(domains)} domains; {recipe.split.eval_items} evaluation items per "
        f"domain; {recipe.schedule.steps} steps x {recipe.schedule.batch_size} = {recipe.schedule.budget} "
        f"examples per fine-tune"
    )
    t = time.perf_counter()
    scores = score_sources(recipe, out, names)
    timings["scores"] = time.perf_counter() - t
    matrix = score_matrix(scores, [s.name for s in sources], names)
    items = [item for d in domains for item in d.evaluation]
    spans = _spans(domains)
    masks = {s.name: ~excluded(items, s) for s in sources}
    heldout = {s.name: s.heldout for s in sources}

    t = time.perf_counter()
    identity = model_identity(recipe)
    base = _cached(
        out / "metrics" / "base.json",
        _digest(identity, [i.text for i in items], heldout, recipe.evaluation.max_length),
        lambda: measure(_load_model(recipe), recipe, items, heldout, "base model"),
    )
    timings["evaluate_base"] = time.perf_counter() - t
    after = {}
    for s in sources:
        t = time.perf_counter()
        after[s.name] = train_and_measure(recipe, Run(s.name, s.name, s.pool), items, s.heldout, out, identity)
        timings[f"finetune_{s.name}"] = time.perf_counter() - t

    e = recipe.evaluation
    cells = build_cells(base, after, spans, masks, e.bootstrap, recipe.seed)
    report = assemble(recipe, domains, sources, scores, matrix, base, after, cells, spans)
    report["correlations"] = correlations(cells, matrix, e.bootstrap, recipe.seed)
    if compare:
        from mixopt.compare import run_compare

        report["compare"] = run_compare(
            recipe, domains, sources, scores, base, after, items, spans, masks, out, identity, timings
        )
    if sweep:
        from mixopt.sweep import run_sweep

        t = time.perf_counter()
        report["sweep"] = run_sweep(recipe, out, cells, primary_metric(report), matrix, reliable_metrics(report))
        timings["sweep"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    report["timings"] = {k: round(v, 1) for k, v in timings.items()}
    write_report(out, report, matrix, cells, recipe.sts.score)
    return ValidationResult(out, report)


def assemble(
    recipe: ValidateRecipe,
    domains: Sequence[DomainData],
    sources: Sequence[SourceData],
    scores: dict[str, Any],
    matrix: dict[str, np.ndarray],
    base: dict[str, Any],
    after: dict[str, dict[str, Any]],
    cells: Cells,
    spans: dict[str, slice],
) -> dict[str, Any]:
    """validation.json without the correlations: provenance, split, fine-tunes, cells, reliabilities."""
    from mixopt.manifest import recipe_record, versions

    e = recipe.evaluation
    rel = reliabilities(cells, base, spans, e.split_halves, recipe.seed)
    too_long = np.isnan(np.asarray(base["items"]["answer_nll"], dtype=float))
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


def _source_record(
    source: SourceData, base: dict[str, Any], after: dict[str, Any], cells: Cells, index: int
) -> dict[str, Any]:
    before = np.asarray(base["heldout"][source.name], dtype=float)
    now = np.asarray(after["heldout"][source.name], dtype=float)
    ok = np.isfinite(before) & np.isfinite(now)
    return {
        "pool": len(source.pool),
        "heldout": len(source.heldout),
        "examples": after["examples"],
        "finetune": after["finetune"],
        "own_nll": {"before": float(before[ok].mean()), "after": float(now[ok].mean()), "n": int(ok.sum())},
        "items_measured": dict(zip(cells.domains, cells.n[index].tolist(), strict=True)),
    }


def write_report(out: Path, report: dict[str, Any], matrix: dict[str, np.ndarray], cells: Cells, sts_name: str) -> None:
    """validation.json (atomically) and the plots."""
    metric = primary_metric(report)
    report["primary_metric"] = metric
    for i, source in enumerate(cells.sources):
        plot_scatter(
            source,
            cells.domains,
            {k: v[i] for k, v in matrix.items()},
            cells.delta[metric][i],
            metric,
            sts_name,
            out / "plots" / f"scatter_{source}.png",
        )
    plot_correlations(report, out / "plots" / "correlations.png")
    if report.get("compare"):
        from mixopt.compare import plot_compare

        plot_compare(report["compare"]["by_metric"][report["compare"]["metric"]], out / "plots" / "compare.png")
    write_json(out / "validation.json", report)


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Strict JSON (NaN as null), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(record), indent=1) + "\n")
    os.replace(tmp, path)
