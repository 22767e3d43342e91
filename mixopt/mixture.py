"""Mixture: the allocated rows of every domain (and the target) as one seeded Hugging Face dataset.

Each part (a domain or the target) gives its rendered rows (`prompt`/`response` or `text` columns, from
`mixopt.sources.render` with the part's own templates, so replay rows keep the format the capability is
used in) and a count. `select_examples` draws the count from a seeded permutation, repeating whole epochs
when the count exceeds the source; a part with a `Selection` (recipe `allocation.replay.select: forecast`,
`forecast_selection`) draws its rows in rank order instead: the rows with the highest per-example forecast
first (the scorer's `example_scores`, higher = more exposed; ties by source index), then the rows that
were not scored, in seeded order. `build_mixture` renders every part to one
schema (`messages` when all parts are chat, else `text`), tags rows with `domain` and `source_index`,
shuffles them together. The draws and the shuffle are numpy index arrays; one Arrow `take` then gathers
every row's text straight into mixture order, never a Python loop over rows. Same parts + seed -> the same
rows in the same order (`mixopt.sources.content_hash`).

Example:
    >>> from datasets import Dataset
    >>> import numpy as np
    >>> law = Dataset.from_dict({"prompt": ["q1", "q2", "q3"], "response": ["a1", "a2", "a3"]})
    >>> mix = build_mixture([MixturePart("law", law, count=5, seed=1)], seed=0)
    >>> mix.column_names, len(mix)
    (['messages', 'domain', 'source_index'], 5)
    >>> sorted(np.bincount(mix["source_index"]).tolist())  # one whole epoch, then 2 rows of a fresh one
    [1, 2, 2]
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.fingerprint import Hasher

from mixopt.errors import MixoptError

if TYPE_CHECKING:
    from mixopt.encoding import PromptFormat
    from mixopt.recipe import DomainSpec, Recipe, TargetSpec
    from mixopt.scores import Scores
    from mixopt.solver import Allocation

Schema = Literal["messages", "text"]
FORMATS = ("arrow", "parquet")
ROWS_PER_SHARD = 100_000  # parquet shard size: a few hundred MB of text, what hub uploads and loaders like
_PIECE_BYTES = 1 << 30  # text per gathered Arrow array: a `string` array holds under 2 GiB
_ARROW_BATCH_ROWS = 10_000  # rows per record batch in the save_to_disk folder
_ROLES = pa.array(["user", "assistant"], type=pa.string())

_TAGS = {"domain": datasets.Value("string"), "source_index": datasets.Value("int64")}
FEATURES: dict[str, datasets.Features] = {
    "messages": datasets.Features(
        {"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}), **_TAGS}
    ),
    "text": datasets.Features({"text": datasets.Value("string"), **_TAGS}),
}


@dataclass
class Selection:
    """Which rows of a part are replayed first (recipe `allocation.replay.select: forecast`).

    Every source row once, in the order they are replayed: a count of k draws the first k (the rows the
    fine-tune is forecast to hurt most), a count above the source's size repeats whole rankings.
    """

    ranking: np.ndarray  # (n,) int64 source indices, first replayed first
    forecasts: dict[int, float]  # source index -> its per-example forecast, for the rows that have one
    scorer: str  # the scorer whose per-example values ranked the rows

    def record(self, count: int) -> dict[str, object]:
        """For the manifest: the drawn rows that had a forecast, in rank order, and how many had none."""
        drawn = self.ranking[: min(count, self.ranking.size)]
        ranked = [[int(i), self.forecasts[int(i)]] for i in drawn if int(i) in self.forecasts]
        return {
            "select": "forecast",
            "scorer": self.scorer,
            "rows_with_forecast": ranked,  # [source_index, forecast], highest forecast first
            "rows_without_forecast": int(drawn.size - len(ranked)),  # after them, in seeded random order
        }


@dataclass
class MixturePart:
    """One domain (or the target) of the mixture: its rendered rows and how many of them to draw."""

    name: str
    rows: datasets.Dataset  # rendered: `prompt` + `response`, or `text`
    count: int  # examples to draw; above len(rows) whole epochs repeat
    seed: int  # the draw's seed, e.g. mixopt.sts.name_seed(recipe.seed, name): parts draw independently
    selection: Selection | None = None  # None: random rows (seeded permutations); else highest forecast first

    def draw(self) -> np.ndarray:
        """(count,) int64 source indices: whole epochs first, each a seeded permutation or the ranking."""
        if self.selection is None:
            return epoch_indices(len(self.rows), self.count, self.seed)
        return ranked_indices(self.selection.ranking, self.count)

    def record(self) -> dict[str, object]:
        """How the rows were chosen, for the manifest's domain record."""
        return {"select": "random", "seed": self.seed} if self.selection is None else self.selection.record(self.count)


# ------------------------------------------------------------------------------------------- selection


def forecast_selection(
    n: int, indices: Sequence[int], forecasts: Sequence[float], seed: int, scorer: str = ""
) -> Selection:
    """Rank a part's `n` source rows for replay: the rows with a per-example forecast (`indices`, their
    source rows, and `forecasts`) by forecast, highest first, ties by lower source index; then the rows
    without one (not scored) in seeded random order.

    >>> forecast_selection(5, [3, 1, 4], [0.2, 0.9, 0.2], seed=0).ranking[:3].tolist()
    [1, 3, 4]
    """
    idx = np.asarray(indices, dtype=np.int64)  # (k,)
    values = np.asarray(forecasts, dtype=float)  # (k,)
    if idx.shape != values.shape:
        raise MixoptError(f"{idx.size} source indices for {values.size} per-example forecasts; re-run `mixopt score`")
    if idx.size and (idx.min() < 0 or idx.max() >= n or np.unique(idx).size != idx.size):
        raise MixoptError(f"per-example forecasts name rows outside 0..{n - 1} or twice; re-run `mixopt score`")
    if not np.isfinite(values).all():
        raise MixoptError("per-example forecasts are not all finite; re-run `mixopt score`")
    ranked = idx[np.lexsort((idx, -values))]  # last key first: forecast descending, then source index
    rest = np.random.default_rng(seed).permutation(n)
    rest = rest[~np.isin(rest, idx)]
    return Selection(
        np.concatenate([ranked, rest]).astype(np.int64),
        {int(i): float(v) for i, v in zip(idx, values, strict=True)},
        scorer,
    )


def ranked_indices(ranking: np.ndarray, count: int) -> np.ndarray:
    """(count,) int64: whole repeats of `ranking`, then its head. Every row appears floor(count / n) or
    ceil(count / n) times, the first-ranked rows the extra time; a smaller count is a prefix of a larger one.

    >>> ranked_indices(np.array([2, 0, 1]), 4).tolist()
    [2, 0, 1, 2]
    """
    if count < 0:
        raise MixoptError(f"cannot draw a negative number of examples ({count})")
    if count and ranking.size == 0:
        raise MixoptError(f"cannot draw {count} examples from an empty source; give the domain some rows")
    full, rest = divmod(count, ranking.size) if ranking.size else (0, 0)
    return np.concatenate([np.tile(ranking, full), ranking[:rest]]).astype(np.int64)


def epoch_indices(n: int, count: int, seed: int) -> np.ndarray:
    """(count,) int64 source indices: whole seeded permutations of range(n), then the head of one more.

    Every row appears floor(count / n) or ceil(count / n) times, and a smaller count is a prefix of a larger
    one with the same seed (raising a budget only adds rows).

    >>> epoch_indices(3, 7, seed=0).tolist().count(0) in (2, 3)
    True
    """
    if count < 0:
        raise MixoptError(f"cannot draw a negative number of examples ({count})")
    if count and n == 0:
        raise MixoptError(f"cannot draw {count} examples from an empty source; give the domain some rows")
    rng = np.random.default_rng(seed)
    full, rest = divmod(count, n) if n else (0, 0)
    epochs = [rng.permutation(n) for _ in range(full)]  # a loop over epochs, not rows
    if rest:
        epochs.append(rng.permutation(n)[:rest])
    return np.concatenate(epochs).astype(np.int64) if epochs else np.zeros(0, dtype=np.int64)


def select_examples(rows: datasets.Dataset, count: int, seed: int) -> tuple[datasets.Dataset, np.ndarray]:
    """`count` rows of `rows` in seeded order (whole epochs first), and their (count,) int64 source indices.

    >>> rows = datasets.Dataset.from_dict({"text": ["a", "b"]})
    >>> picked, idx = select_examples(rows, 3, seed=0)
    >>> len(picked), sorted(set(idx[:2].tolist()))  # the first epoch holds every row once
    (3, [0, 1])
    """
    indices = epoch_indices(len(rows), count, seed)
    # keep_in_memory: never write cache files next to a user's source data
    return rows.select(indices, keep_in_memory=True), indices


# --------------------------------------------------------------------------------------------- schema


def _kind(part: MixturePart) -> Schema:
    columns = set(part.rows.column_names)
    if {"prompt", "response"} <= columns:
        return "messages"
    if "text" in columns:
        return "text"
    raise MixoptError(
        f"part '{part.name}' has columns {', '.join(sorted(columns)) or '(none)'}; "
        "expected 'prompt' + 'response' or 'text' (render it with mixopt.sources.render)"
    )


def common_schema(parts: Sequence[MixturePart]) -> Schema:
    """`messages` when every part is chat (`prompt` + `response`), else `text` (chat rows become one text).

    >>> chat = datasets.Dataset.from_dict({"prompt": ["q"], "response": ["a"]})
    >>> plain = datasets.Dataset.from_dict({"text": ["t"]})
    >>> common_schema([MixturePart("a", chat, 1, 0)]), common_schema([MixturePart("a", chat, 1, 0),
    ...                                                              MixturePart("b", plain, 1, 0)])
    ('messages', 'text')
    """
    kinds = {_kind(part) for part in parts}
    return "messages" if kinds == {"messages"} else "text"


@dataclass
class _Source:
    """A part's string columns as Arrow chunks, and where its drawn rows sit in them."""

    columns: dict[str, list[pa.Array]]  # column -> the chunks of the part's whole table (no copy)
    draw: np.ndarray  # (count,) int64: the drawn rows of the part's dataset, whole epochs first (`source_index`)
    rows: np.ndarray  # (count,) int64: the same rows as rows of `columns` (through the indices mapping, if any)
    bound: int  # bytes of text the draw gathers, at most


def _source(part: MixturePart, columns: list[str]) -> _Source:
    """`part`'s drawn rows as rows of its Arrow table: no row moves yet.

    A dataset that was `select`ed or shuffled keeps its rows in place behind an indices mapping; the draw goes
    through it, so a few rows drawn from a big (memory-mapped) source never load the rest.
    """
    draw = part.draw()
    table = part.rows.data.table
    chunks = {name: table.column(name).chunks for name in columns}
    size = sum(c.nbytes for name in columns for c in chunks[name])
    mapping = part.rows._indices  # datasets has no public accessor for it; None without a mapping
    if mapping is None:
        return _Source(chunks, draw, draw, size * math.ceil(part.count / len(part.rows)))
    rows = mapping.column(0).to_numpy()[draw].astype(np.int64)
    return _Source(chunks, draw, rows, size * part.count)  # a mapping may repeat rows: any row, every time


def _strings(chunks: list[pa.Array]) -> list[pa.Array]:
    """`chunks` as one Arrow string type: `string`, or `large_string` where any chunk is one."""
    if all(pa.types.is_string(c.type) for c in chunks):
        return chunks
    wide = any(pa.types.is_large_string(c.type) for c in chunks)
    return [c.cast(pa.large_string() if wide else pa.string()) for c in chunks]


def _lengths(chunks: list[pa.Array]) -> np.ndarray:
    """int64 bytes of text in each row of the concatenated `chunks` (a null counts 0)."""
    lengths = [pc.fill_null(pc.binary_length(c), 0).to_numpy(zero_copy_only=False) for c in chunks]
    return np.concatenate([np.zeros(0, np.int64), *lengths]).astype(np.int64)


def _bounds(sizes: np.ndarray | None, n: int) -> np.ndarray:
    """Row bounds of consecutive pieces of `n` rows holding about _PIECE_BYTES of text at most (sizes: per row).

    An Arrow `string` array holds under 2 GiB of text; a mixture of long documents holds more.
    """
    if sizes is None or not n:
        return np.array([0, n])
    ends = np.cumsum(sizes)
    cuts = np.searchsorted(ends, np.arange(_PIECE_BYTES, ends[-1], _PIECE_BYTES), side="right")
    return np.unique(np.concatenate([[0], cuts, [n]]))


def _gather(chunks: list[pa.Array], rows: np.ndarray, bounds: np.ndarray) -> list[pa.Array]:
    """`rows` of the concatenated `chunks`, one Arrow take per piece, as `string` arrays."""
    values = pa.chunked_array(chunks)
    return [values.take(rows[a:b]).combine_chunks().cast(pa.string()) for a, b in itertools.pairwise(bounds)]


def _messages(sources: Sequence[_Source], order: np.ndarray, big: bool) -> list[pa.Array]:
    """list<struct<role, content>> pieces: [user: prompt, assistant: response] per mixture row, in `order`.

    One take over every part's prompts then responses, with the indices interleaved (p0, r0, p1, r1, ...),
    gathers the turns' contents already in place.
    """
    prompts = [c for s in sources for c in s.columns["prompt"]]
    values = _strings(prompts + [c for s in sources for c in s.columns["response"]])
    offsets = np.cumsum([0, *(sum(len(c) for c in s.columns["prompt"]) for s in sources)])
    rows = np.concatenate([o + s.rows for o, s in zip(offsets[:-1], sources, strict=True)])[order]
    turns = np.stack([rows, rows + offsets[-1]], axis=1).ravel()  # (2 * rows,): into prompts + responses
    if big:
        lengths = _lengths(values)
        sizes = lengths[rows] + lengths[rows + offsets[-1]]
    pieces = []
    for a, b in itertools.pairwise(_bounds(sizes if big else None, len(rows))):
        (contents,) = _gather(values, turns[2 * a : 2 * b], np.array([0, 2 * (b - a)]))
        structs = pa.StructArray.from_arrays([_ROLES.take(np.tile([0, 1], b - a)), contents], ["role", "content"])
        pieces.append(pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * (b - a) + 1, 2, dtype=np.int32)), structs))
    return pieces


def _joined(source: _Source, big: bool) -> list[pa.Array]:
    """A chat part's drawn rows (in draw order) as `prompt` + newline + `response` text pieces."""
    prompts = source.columns["prompt"]
    values = _strings(prompts + source.columns["response"])
    rows = source.rows
    total = sum(len(c) for c in prompts)
    if big:
        lengths = _lengths(values)
        bounds = _bounds(lengths[rows] + lengths[rows + total] + 1, len(rows))
    else:
        bounds = _bounds(None, len(rows))
    pairs = zip(_gather(values, rows, bounds), _gather(values, rows + total, bounds), strict=True)
    return [pc.binary_join_element_wise(p, r, "\n") for p, r in pairs]


def _text(sources: Sequence[_Source], parts: Sequence[MixturePart], order: np.ndarray, big: bool) -> list[pa.Array]:
    """`text` pieces in `order`: a text part's own text, a chat part's prompt + newline + response.

    A chat part's drawn rows are joined first, then every mixture row is gathered in one take.
    """
    chunks: list[pa.Array] = []
    rows = []
    start = 0  # rows in `chunks` so far
    for source, part in zip(sources, parts, strict=True):
        if _kind(part) == "text":
            own, at = source.columns["text"], source.rows
        else:
            own = _joined(source, big)
            at = np.arange(len(source.rows), dtype=np.int64)  # joined in draw order
        rows.append(start + at)
        chunks += own
        start += sum(len(c) for c in own)
    values = _strings(chunks)
    picked = np.concatenate(rows)[order]
    return _gather(values, picked, _bounds(_lengths(values)[picked] if big else None, len(picked)))


@dataclass
class _Layout:
    """Where every mixture row comes from: the drawn parts (each kind's together), their rows as Arrow
    chunks, and the shuffle. `build_mixture` gathers all rows at once; `mixture_batches` gathers them a range
    at a time through the same functions, so the two give the same rows in the same order."""

    schema: Schema
    drawn: list[MixturePart]
    sources: list[_Source]
    order: np.ndarray  # (rows,) mixture position -> index into the parts' draws, concatenated in part order
    big: bool  # over _PIECE_BYTES of text: gather in pieces


def _layout(parts: Sequence[MixturePart], seed: int) -> _Layout:
    if not parts:
        raise MixoptError("a mixture needs at least one part (the target or a domain)")
    if dupes := sorted(name for name, n in Counter(p.name for p in parts).items() if n > 1):
        raise MixoptError(f"mixture part names must be unique; repeated: {', '.join(dupes)}")
    schema = common_schema(parts)
    drawn = [part for part in parts if part.count > 0]
    kinds = list(dict.fromkeys(_kind(part) for part in drawn))  # chat and/or text parts, in first-seen order
    drawn = [part for kind in kinds for part in drawn if _kind(part) == kind]  # each kind's parts together
    columns = {"messages": ["prompt", "response"], "text": ["text"]}
    sources = [_source(part, columns[_kind(part)]) for part in drawn]
    order = np.random.default_rng(seed).permutation(sum(part.count for part in drawn))  # as Dataset.shuffle draws
    big = sum(source.bound for source in sources) >= _PIECE_BYTES  # else one piece: no need to count bytes
    return _Layout(schema, drawn, sources, order, big)


def _table(layout: _Layout, start: int = 0, stop: int | None = None) -> pa.Table:
    """Mixture rows `start` to `stop` (all by default) as an Arrow table in the mixture's schema.

    A range gathers only its own rows: each part's source is cut down to the drawn rows the range holds (kept
    in draw order), and the range's order is re-expressed in them, so `_messages` / `_text` do the same work
    on fewer rows."""
    features = FEATURES[layout.schema]
    counts = np.array([part.count for part in layout.drawn], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])  # (parts + 1,) where each part's draw starts
    picked = layout.order[start:stop]  # (rows,) indices into the concatenated draws, in mixture order
    sources, order = layout.sources, picked
    if start != 0 or (stop is not None and stop < layout.order.size):
        keep = np.sort(picked)  # the range's draws, part by part, each part's in draw order
        cuts = np.searchsorted(keep, offsets)  # (parts + 1,) where each part's draws start in `keep`
        sources = []
        for s, a, b, o in zip(layout.sources, cuts[:-1], cuts[1:], offsets[:-1], strict=True):
            local = keep[a:b] - o  # this part's draws in the range, as positions in its whole draw
            sources.append(_Source(s.columns, s.draw[local], s.rows[local], s.bound))
        order = np.searchsorted(keep, picked)
    if layout.schema == "messages":
        body = _messages(sources, order, layout.big)
    else:
        body = _text(sources, layout.drawn, order, layout.big)
    owner = np.searchsorted(offsets, picked, side="right") - 1  # the part each row comes from
    draws = np.concatenate([s.draw for s in layout.sources])
    return pa.Table.from_arrays(
        [
            pa.chunked_array(body, type=features.arrow_schema.field(layout.schema).type),
            pa.array([p.name for p in layout.drawn], type=pa.string()).take(owner),
            pa.array(draws[picked], type=pa.int64()),
        ],
        schema=features.arrow_schema,
    )


def build_mixture(parts: Sequence[MixturePart], seed: int) -> datasets.Dataset:
    """All parts' selected rows in one schema, shuffled with `seed`, stored in mixture order (no indices mapping).

    Columns: `messages` (user/assistant turns) or `text`, then `domain` (part name) and `source_index`
    (int64 row in the part's source). Deterministic: same parts and seed give the same rows in the same order.

    Every column is built in Arrow over the whole mixture at once: the draws and the shuffle are index arrays,
    composed in numpy, then one `take` gathers the text of every row straight into mixture order.
    """
    layout = _layout(parts, seed)
    features = FEATURES[layout.schema]
    if not layout.drawn:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    table = _table(layout)
    # datasets would hash the whole table for a fingerprint; the parts' own fingerprints and the draw say the same
    drawn = layout.drawn
    ranked = [Hasher.hash(p.selection.ranking.tobytes()) for p in drawn if p.selection is not None]
    fingerprint = Hasher.hash(
        [
            "mixopt.mixture",
            layout.schema,
            seed,
            [(p.name, p.count, p.seed, p.rows._fingerprint) for p in drawn],
            *ranked,
        ]
    )
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features), fingerprint=fingerprint)


def mixture_batches(
    parts: Sequence[MixturePart], seed: int, rows: int = 10_000, start: int = 0, stop: int | None = None
) -> Iterator[pa.Table]:
    """Rows `start` to `stop` (default: all) of `build_mixture(parts, seed)`, in the same order, as Arrow tables
    of up to `rows` rows each: the same layout and gathering, one range at a time, so no more than a batch of
    mixture rows is ever in memory."""
    layout = _layout(parts, seed)
    end = layout.order.size if stop is None else min(stop, layout.order.size)
    for first in range(start, end, rows):
        yield _table(layout, first, min(first + rows, end))


# ---------------------------------------------------------------------------------------------- output


def _by_domain(table: pa.Table) -> tuple[pa.Table, dict[str, tuple[int, int]]]:
    """`table` sorted by domain (mixture order kept within each), and domain -> (offset, rows) in it.

    One stable sort, not one filter pass per domain.
    """
    encoded = pc.dictionary_encode(table.column("domain")).combine_chunks()
    codes = encoded.indices.to_numpy(zero_copy_only=False)  # (rows,)
    sizes = np.bincount(codes, minlength=len(encoded.dictionary))  # (domains,)
    starts = np.cumsum(sizes) - sizes
    spans = {name: (int(starts[k]), int(sizes[k])) for k, name in enumerate(encoded.dictionary.to_pylist())}
    return table.take(np.argsort(codes, kind="stable")), dict(sorted(spans.items()))


def _write_shards(table: pa.Table, out: Path, stem: str) -> list[str]:
    """`table` as `OUT/<stem>-0000i-of-0000N.parquet` shards of ~ROWS_PER_SHARD rows (as ds.shard cuts them)."""
    shards = max(1, math.ceil(table.num_rows / ROWS_PER_SHARD))
    sizes = [table.num_rows // shards + (i < table.num_rows % shards) for i in range(shards)]
    written = []
    for i, (start, size) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)):
        rel = f"{stem}-{i:05d}-of-{shards:05d}.parquet"
        pq.write_table(table.slice(int(start), size), out / rel)
        written.append(rel)
    return written


def prompt_completion(table: pa.Table) -> pa.Table:
    """A `messages` mixture in TRL's conversational prompt/completion form, same rows and order.

    `prompt` = the user turn, `completion` = the assistant turn (each a one-message list), then `domain` and
    `source_index`. TRL's SFTTrainer puts the loss on the completion only for this form (completion_only_loss).
    """
    messages = table.column("messages")
    return pa.table(
        {
            "prompt": pc.list_slice(messages, 0, 1),  # [user]: every mixture row is [user, assistant]
            "completion": pc.list_slice(messages, 1, 2),  # [assistant]
            "domain": table.column("domain"),
            "source_index": table.column("source_index"),
        }
    )


def _write_parquet(ds: datasets.Dataset, out: Path) -> dict[str, str]:
    # datasets' features in the file metadata (load_dataset("parquet") restores them); not its fingerprint
    table = ds.with_format("arrow")[:].replace_schema_metadata(ds.features.arrow_schema.metadata)
    (out / "parquet" / "domains").mkdir(parents=True, exist_ok=True)
    written = {f"parquet:{i:05d}": rel for i, rel in enumerate(_write_shards(table, out, "parquet/mixture"))}
    if "messages" in table.column_names:  # TRL trains on completions only from this form
        (out / "parquet" / "trl").mkdir(exist_ok=True)
        trl = _write_shards(prompt_completion(table), out, "parquet/trl/prompt-completion")
        written |= {f"trl:{i:05d}": rel for i, rel in enumerate(trl)}
    # Trainers without mixing weights (axolotl) need each domain's allocated rows in a file of its own.
    by_domain, spans = _by_domain(table)
    for name, (start, size) in spans.items():
        rel = f"parquet/domains/{name}.parquet"
        pq.write_table(by_domain.slice(start, size), out / rel)
        written[f"domain:{name}"] = rel
    return written


@contextlib.contextmanager
def _record_batches(rows: int) -> Iterator[None]:
    """Meanwhile `save_to_disk` writes record batches of up to `rows` rows (datasets' default: 1,000).

    Its writer casts and checks each batch (~1 ms): 80% of the time to write short rows in 1,000-row batches.
    It still cuts batches of big rows to ~100 MB, and `load_from_disk` reads any batch size. The setting is
    process-wide: no other thread should write datasets meanwhile.
    """
    default = datasets.config.DEFAULT_MAX_BATCH_SIZE
    datasets.config.DEFAULT_MAX_BATCH_SIZE = max(rows, default)
    try:
        yield
    finally:
        datasets.config.DEFAULT_MAX_BATCH_SIZE = default


def write_mixture(ds: datasets.Dataset, out: Path, formats: Sequence[str]) -> dict[str, str]:
    """Write the mixture under `out`; returns what was written -> its path relative to `out`.

    "arrow": `mixture/` (`datasets.load_from_disk`). "parquet": `parquet/mixture-0000i-of-0000N.parquet`
    shards of ~100k rows, one `parquet/domains/<domain>.parquet` per domain, and for a chat mixture the same
    shards in TRL's prompt/completion form (`parquet/trl/prompt-completion-0000i-of-0000N.parquet`).
    Keys: "arrow", "parquet:00000", ..., "trl:00000", ..., "domain:<name>".

    >>> import tempfile
    >>> ds = build_mixture([MixturePart("law", datasets.Dataset.from_dict({"text": ["a", "b"]}), 2, 0)], 0)
    >>> sorted(write_mixture(ds, Path(tempfile.mkdtemp()), ["arrow", "parquet"]).values())
    ['mixture', 'parquet/domains/law.parquet', 'parquet/mixture-00000-of-00001.parquet']
    """
    if unknown := sorted(set(formats) - set(FORMATS)):
        raise MixoptError(f"unknown output format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    if "arrow" in formats:
        with _record_batches(_ARROW_BATCH_ROWS):
            ds.save_to_disk(str(out / "mixture"))
        written["arrow"] = "mixture"
    if "parquet" in formats:
        written.update(_write_parquet(ds, out))
    return written


def plain_rows(rows: datasets.Dataset, separator: str) -> datasets.Dataset:
    """Chat rows (`prompt`, `response`) as the plain text a base model was scored on: one `text` column,
    prompt + separator + response (`mixopt.encoding.PromptFormat`, plain); text rows as they are."""
    if "prompt" not in rows.column_names:
        return rows
    table = rows.with_format("arrow")[:]  # (rows,) columns prompt, response: one Arrow join, no row loop
    text = pc.binary_join_element_wise(table.column("prompt"), table.column("response"), separator)
    return datasets.Dataset(pa.table({"text": text}))


def mixture_parts(
    recipe: Recipe, allocation: Allocation, scores: Scores, fmt: PromptFormat | None = None
) -> list[MixturePart]:
    """The target and every domain with a nonzero count, rendered, each with its own seeded draw; with
    `allocation.replay.select: forecast`, a domain's rows most hurt by the forecast come first. `fmt`: the
    model's prompt format; plain (a base model) renders chat rows as text (`plain_rows`), so the mixture
    holds the text mixopt scored, and trainers need no chat template."""
    from mixopt.sources import rendered_rows
    from mixopt.sts import name_seed

    def rendered(section: TargetSpec | DomainSpec, where: str) -> datasets.Dataset:
        rows = rendered_rows(section, recipe, where)
        return plain_rows(rows, fmt.separator) if fmt is not None and not fmt.chat else rows

    counts = {d.name: d.count for d in allocation.domains}
    scored = {d.name: d for d in scores.domains}
    parts = [
        MixturePart(
            recipe.target.name,
            rendered(recipe.target, "target"),
            allocation.target_count,
            name_seed(recipe.seed, recipe.target.name),
        )
    ]
    for i, domain in enumerate(recipe.domains):
        if counts.get(domain.name, 0) > 0:
            rows, seed = rendered(domain, f"domains.{i}"), name_seed(recipe.seed, domain.name)
            selection = None
            if recipe.allocation.replay.select == "forecast":  # the domain's own rows, most hurt first
                d = scored[domain.name]
                selection = forecast_selection(len(rows), d.example_indices, d.example_scores, seed, scores.score)
            parts.append(MixturePart(domain.name, rows, counts[domain.name], seed, selection))
    return parts
