"""Blend: a mixture written as how to draw it, not as its rows (`output.materialize: never`), and the loader
that streams the same rows in the same order: `mixopt.load_mixture(OUT)`.

`OUT/blend.json` holds what `mixture.build_mixture` draws from: per part (the target, then each domain with
rows) its section (source spec, templates, `max_examples`), count, draw seed and, for `replay.select:
forecast`, the per-example forecasts that rank its rows; the shuffle seed; the schema; and the sha256 of each
part's rendered rows. `load_mixture` renders each part again with the plan's own function
(`sources.render_section`), refuses a source whose rows changed since, and gathers the mixture a batch at a
time with `mixture.mixture_batches`: the same draw, shuffle and row layout as `build_mixture`, so the
streamed rows cannot drift from the materialised ones. Sources are read (a streamed source: its capped
head) when the loader starts; what is never written, nor held whole, is the mixture.

Trainers on several ranks give each rank its own part with datasets' `split_dataset_by_node`: the stream has
one shard per batch of rows, so with a batch count divisible by the ranks each rank reads only its batches.

Example:
    >>> ds = load_mixture("runs/quickstart")                       # doctest: +SKIP
    >>> from datasets.distributed import split_dataset_by_node
    >>> mine = split_dataset_by_node(ds, rank=0, world_size=8)     # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets

from mixopt.errors import MixoptError, SourceError
from mixopt.files import digest, write_json
from mixopt.mixture import FEATURES, MixturePart, common_schema, forecast_selection, mixture_batches, plain_rows
from mixopt.recipe import DomainSpec
from mixopt.sources import content_hash, render_section

if TYPE_CHECKING:
    from mixopt.encoding import PromptFormat
    from mixopt.recipe import Recipe, TargetSpec

BLEND = "blend.json"
VERSION = 1
BATCH_ROWS = 10_000  # mixture rows gathered at a time; also one shard of the stream
_SECTION_FIELDS = {"name", "source", "max_examples", "text", "prompt", "response"}


@dataclass
class BlendPart:
    """One part of the mixture: where its rows come from and how many are drawn, how."""

    section: dict[str, Any]  # name, source, max_examples and templates, as the recipe resolved them
    where: str  # the recipe field it came from ("target", "domains.2"), for messages
    count: int
    seed: int
    rows_sha256: str  # content hash of the part's rendered rows when the plan ran
    forecasts: list[list[float]] | None = None  # replay.select forecast: [source_index, forecast] of scored rows
    scorer: str = ""


@dataclass
class Blend:
    """A mixture as the draw that makes it: `build_mixture(parts, seed)` of the parts re-rendered."""

    seed: int  # the shuffle's
    schema: str  # messages or text
    rows: int
    base_dir: str  # the recipe's folder: relative source paths resolve against it
    on_bad_row: str
    parts: list[BlendPart]
    version: int = VERSION
    plain_separator: str | None = None  # a base model's plain format: rows are prompt + separator + response

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sha256(self) -> str:
        """Content hash of the blend: the manifest's `content_sha256` in place of the rows' hash."""
        return digest(self.to_dict(), length=64)

    @classmethod
    def load(cls, out: Path) -> Blend:
        path = out / BLEND if out.is_dir() else out
        if not path.is_file():
            raise MixoptError(f"{path}: no {BLEND}; give the folder of a plan with output.materialize: never")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            parts = [BlendPart(**part) for part in data.pop("parts")]
            blend = cls(**data, parts=parts)
        except (ValueError, TypeError, KeyError) as err:
            raise MixoptError(f"{path}: not a mixopt blend ({err}); re-run mixopt plan") from None
        if blend.version != VERSION:
            raise MixoptError(f"{path}: blend version {blend.version}, this mixopt reads {VERSION}; re-run mixopt plan")
        return blend


def write_blend(out: Path, recipe: Recipe, parts: list[MixturePart], fmt: PromptFormat | None = None) -> Blend:
    """Write `out/blend.json` for `parts` (`mixture.mixture_parts` of the plan, with the model's prompt format
    `fmt`) and the recipe's seed."""
    sections: dict[str, tuple[TargetSpec | DomainSpec, str]] = {recipe.target.name: (recipe.target, "target")}
    sections |= {d.name: (d, f"domains.{i}") for i, d in enumerate(recipe.domains)}
    blended = []
    for part in parts:
        section, where = sections[part.name]
        ranked = part.selection
        blended.append(
            BlendPart(
                section=section.model_dump(mode="json", include=_SECTION_FIELDS, exclude_none=True),
                where=where,
                count=part.count,
                seed=part.seed,
                rows_sha256=content_hash(part.rows),
                forecasts=[[i, v] for i, v in sorted(ranked.forecasts.items())] if ranked else None,
                scorer=ranked.scorer if ranked else "",
            )
        )
    blend = Blend(
        recipe.seed,
        common_schema(parts),
        sum(part.count for part in parts),
        str(recipe.base_dir),
        recipe.on_bad_row,
        blended,
        plain_separator=fmt.separator if fmt is not None and not fmt.chat else None,
    )
    write_json(out / BLEND, blend.to_dict())
    return blend


def blend_parts(blend: Blend) -> list[MixturePart]:
    """The mixture's parts again: each section rendered as the plan rendered it, its rows checked unchanged."""
    parts = []
    for part in blend.parts:
        section = DomainSpec.model_validate(part.section)  # a target section is a valid chat domain section
        rows = render_section(section, Path(blend.base_dir), blend.on_bad_row, part.where)
        if blend.plain_separator is not None:  # as `mixture_parts` rendered them for a base model
            rows = plain_rows(rows, blend.plain_separator)
        if (found := content_hash(rows)) != part.rows_sha256:
            raise SourceError(
                f"{part.where} ({part.section['name']}): its rows changed since the plan (sha256 {found[:16]}, the "
                f"blend has {part.rows_sha256[:16]}); re-run mixopt plan"
            )
        selection = None
        if part.forecasts is not None:
            indices = [int(i) for i, _ in part.forecasts]
            values = [v for _, v in part.forecasts]
            selection = forecast_selection(len(rows), indices, values, part.seed, part.scorer)
        parts.append(MixturePart(section.name, rows, part.count, part.seed, selection))
    return parts


def load_mixture(out: str | Path, batch_rows: int = BATCH_ROWS) -> datasets.IterableDataset:
    """The rows of a `materialize: never` plan in OUT, streamed in mixture order: the same rows, in the same
    order, as `datasets.load_from_disk(OUT/mixture)` of the same recipe and seed with `materialize: always`.

    Columns as the materialised mixture's: `messages` or `text`, `domain`, `source_index`. One shard per
    `batch_rows` rows (`datasets.distributed.split_dataset_by_node` hands whole shards to ranks)."""
    blend = Blend.load(Path(out))
    parts = blend_parts(blend)
    spans = [(a, min(a + batch_rows, blend.rows)) for a in range(0, blend.rows, batch_rows)]

    def rows(spans: list[tuple[int, int]]) -> Iterator[dict[str, Any]]:
        for start, stop in spans:
            for table in mixture_batches(parts, blend.seed, batch_rows, start, stop):
                yield from table.to_pylist()

    return datasets.IterableDataset.from_generator(rows, features=FEATURES[blend.schema], gen_kwargs={"spans": spans})
