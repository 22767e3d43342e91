"""Validation data: evaluation domains split into scoring rows and held-out evaluation items; fine-tuning
sources split into a training pool and held-out rows. Splits are by content hash, so identical on every machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mixopt import evaluate as ev
from mixopt.errors import SourceError
from mixopt.evaluate import MCQItem
from mixopt.files import write_jsonl
from mixopt.recipe import EvalDomainSpec, FinetuneSourceSpec, MCQTemplates, ValidateRecipe
from mixopt.sources import check_columns, describe, load_source, render_column

Pair = tuple[str, str]  # (prompt, response)


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
