"""Mixture: the allocated rows of every domain (and the target) as one seeded Hugging Face dataset.

Each part (a domain or the target) gives its rendered rows (`prompt`/`response` or `text` columns, from
`mixopt.sources.render`) and a count. `select_examples` draws the count from a seeded permutation,
repeating whole epochs when the count exceeds the source; `build_mixture` renders every part to one
schema (`messages` when all parts are chat, else `text`), tags rows with `domain` and `source_index`,
concatenates and shuffles. All row work runs in Arrow through datasets' own ops, never a Python loop
over rows. Same parts + seed -> the same rows in the same order (`mixopt.sources.content_hash`).

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

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mixopt.errors import MixoptError

Schema = Literal["messages", "text"]
FORMATS = ("arrow", "parquet")
ROWS_PER_SHARD = 100_000  # parquet shard size: a few hundred MB of text, what hub uploads and loaders like

_TAGS = {"domain": datasets.Value("string"), "source_index": datasets.Value("int64")}
FEATURES: dict[str, datasets.Features] = {
    "messages": datasets.Features(
        {"messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}), **_TAGS}
    ),
    "text": datasets.Features({"text": datasets.Value("string"), **_TAGS}),
}


@dataclass
class MixturePart:
    """One domain (or the target) of the mixture: its rendered rows and how many of them to draw."""

    name: str
    rows: datasets.Dataset  # rendered: `prompt` + `response`, or `text`
    count: int  # examples to draw; above len(rows) whole epochs repeat
    seed: int  # the draw's seed, e.g. mixopt.sts.name_seed(recipe.seed, name): parts draw independently


# ------------------------------------------------------------------------------------------- selection


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


def _column(batch: pa.Table, name: str) -> pa.Array:
    return batch.column(name).combine_chunks()


def _messages(batch: pa.Table) -> pa.Array:
    """list<struct<role, content>>: [user: prompt, assistant: response] per row, built in Arrow."""
    n = batch.num_rows
    pairs = np.stack([np.arange(n), np.arange(n) + n], axis=1).ravel()  # (2n,): p0, r0, p1, r1, ...
    contents = pa.concat_arrays([_column(batch, "prompt"), _column(batch, "response")]).take(pairs)
    roles = pa.array(["user", "assistant"]).take(np.tile([0, 1], n))
    turns = pa.StructArray.from_arrays([roles, contents], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)), turns)


def _text(batch: pa.Table) -> pa.Array:
    if "text" in batch.column_names:
        return _column(batch, "text")
    return pc.binary_join_element_wise(_column(batch, "prompt"), _column(batch, "response"), "\n")


def _render_group(parts: Sequence[MixturePart], schema: Schema) -> datasets.Dataset:
    """The selected rows of parts with the same columns, in `schema`, tagged with `domain` and `source_index`.

    One select and one map over all the parts together: per-part maps cost ~25 ms each in fixed overhead,
    minutes for thousands of domains.
    """
    columns = ["prompt", "response"] if _kind(parts[0]) == "messages" else ["text"]
    draws = [epoch_indices(len(p.rows), p.count, p.seed) for p in parts]  # per part: (count,) source rows
    offsets = np.cumsum([0, *(len(p.rows) for p in parts[:-1])])  # where each source starts in `rows`
    # select_columns deep-copies the dataset info (~1 ms): only where a part has other columns too
    same = [p.rows if p.rows.column_names == columns else p.rows.select_columns(columns) for p in parts]
    rows = datasets.concatenate_datasets(same)
    picked = rows.select(np.concatenate([o + d for o, d in zip(offsets, draws, strict=True)]), keep_in_memory=True)
    source = np.concatenate(draws)  # (rows,) index in the row's own source
    owner = np.repeat(np.arange(len(parts)), [len(d) for d in draws])  # (rows,) which part
    names = pa.array([p.name for p in parts], type=pa.string())

    def convert(batch: pa.Table, positions: list[int]) -> pa.Table:
        at = np.asarray(positions)
        body = _messages(batch) if schema == "messages" else _text(batch)
        return pa.table({schema: body, "domain": names.take(owner[at]), "source_index": pa.array(source[at])})

    return picked.with_format("arrow").map(
        convert,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        features=FEATURES[schema],
        keep_in_memory=True,  # never write cache files next to a user's source data
    )


def build_mixture(parts: Sequence[MixturePart], seed: int) -> datasets.Dataset:
    """All parts' selected rows in one schema, shuffled with `seed`, indices flattened (contiguous on disk).

    Columns: `messages` (user/assistant turns) or `text`, then `domain` (part name) and `source_index`
    (int64 row in the part's source). Deterministic: same parts and seed give the same rows in the same order.
    """
    if not parts:
        raise MixoptError("a mixture needs at least one part (the target or a domain)")
    if dupes := sorted(name for name, n in Counter(p.name for p in parts).items() if n > 1):
        raise MixoptError(f"mixture part names must be unique; repeated: {', '.join(dupes)}")
    schema = common_schema(parts)
    drawn = [part for part in parts if part.count > 0]
    if not drawn:
        return datasets.Dataset.from_dict({name: [] for name in FEATURES[schema]}, features=FEATURES[schema])
    kinds = list(dict.fromkeys(_kind(part) for part in drawn))  # chat and/or text parts, in first-seen order
    rendered = [_render_group([p for p in drawn if _kind(p) == kind], schema) for kind in kinds]
    shuffled = datasets.concatenate_datasets(rendered).shuffle(seed=seed, keep_in_memory=True)
    return _contiguous(shuffled)


def _contiguous(ds: datasets.Dataset) -> datasets.Dataset:
    """`ds` with its indices mapping applied: rows stored in order, as `flatten_indices` does.

    An identity map in Arrow format: `flatten_indices` round-trips every row through Python objects
    (34 s for 240k chat rows here, against 1.6 s).
    """
    flat = ds.with_format("arrow").map(lambda batch: batch, batched=True, keep_in_memory=True)
    return flat.with_format(None)


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


def _write_parquet(ds: datasets.Dataset, out: Path) -> dict[str, str]:
    # datasets' features in the file metadata (load_dataset("parquet") restores them); not its fingerprint
    table = ds.with_format("arrow")[:].replace_schema_metadata(ds.features.arrow_schema.metadata)
    (out / "parquet" / "domains").mkdir(parents=True, exist_ok=True)
    written: dict[str, str] = {}
    shards = max(1, math.ceil(table.num_rows / ROWS_PER_SHARD))
    sizes = [table.num_rows // shards + (i < table.num_rows % shards) for i in range(shards)]  # as ds.shard
    for i, (start, size) in enumerate(zip(np.cumsum([0, *sizes[:-1]]), sizes, strict=True)):
        rel = f"parquet/mixture-{i:05d}-of-{shards:05d}.parquet"
        pq.write_table(table.slice(int(start), size), out / rel)
        written[f"parquet:{i:05d}"] = rel
    # Trainers without mixing weights (axolotl) need each domain's allocated rows in a file of its own.
    by_domain, spans = _by_domain(table)
    for name, (start, size) in spans.items():
        rel = f"parquet/domains/{name}.parquet"
        pq.write_table(by_domain.slice(start, size), out / rel)
        written[f"domain:{name}"] = rel
    return written


def write_mixture(ds: datasets.Dataset, out: Path, formats: Sequence[str]) -> dict[str, str]:
    """Write the mixture under `out`; returns what was written -> its path relative to `out`.

    "arrow": `mixture/` (`datasets.load_from_disk`). "parquet": `parquet/mixture-0000i-of-0000N.parquet`
    shards of ~100k rows, and one `parquet/domains/<domain>.parquet` per domain.
    Keys: "arrow", "parquet:00000", ..., "domain:<name>".

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
        ds.save_to_disk(str(out / "mixture"))
        written["arrow"] = "mixture"
    if "parquet" in formats:
        written.update(_write_parquet(ds, out))
    return written
