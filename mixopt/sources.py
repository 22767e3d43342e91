"""Sources: recipe `source:` blocks -> `datasets.Dataset`, and row templating.

Local json/jsonl/csv/parquet files, a `save_to_disk` folder, or a hub dataset id all come back as one
`datasets.Dataset`, so every later stage sees the same thing.

Example:
    >>> from mixopt.recipe import SourceSpec
    >>> ds = load_source(SourceSpec(path="recipes/data/quickstart/law.jsonl"), Path("."))  # doctest: +SKIP
    >>> render_column(ds, "{question}\\n{answer}")[0]                                      # doctest: +SKIP
"""

from __future__ import annotations

import codecs
import itertools
import json
import string
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa

from mixopt.errors import SourceError
from mixopt.files import Digest
from mixopt.quiet import quiet_libraries
from mixopt.recipe import DomainSpec, Recipe, SourceSpec, TargetSpec, TextTemplates

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _builder(spec: SourceSpec, files: list[Path]) -> str:
    if spec.format != "auto":
        return spec.format
    kinds = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if len(kinds) != 1 or None in kinds:
        suffixes = ", ".join(sorted({f.suffix or "(none)" for f in files}))
        raise SourceError(f"cannot tell the format of {files[0]} (suffix {suffixes}); set source.format")
    return kinds.pop()  # type: ignore[return-value]


def describe(spec: SourceSpec) -> str:
    """Short human name of a source for messages and progress bars."""
    if spec.hub:
        return f"hub:{spec.hub}" + (f"/{spec.config}" if spec.config else "") + f"[{spec.split or 'train'}]"
    paths = [spec.path] if isinstance(spec.path, str) or spec.path is None else spec.path
    return str(paths[0]) if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} files)"


def load_source(spec: SourceSpec, base_dir: Path, cap: int | None = None) -> datasets.Dataset:
    """Load a source as a Dataset. Relative paths resolve against `base_dir` (the recipe's folder).

    `source.streaming`: read as a `datasets.IterableDataset` and only its first `cap` rows (the section's
    `max_examples`) are pulled, so a source far larger than memory or disk costs what is scored."""
    datasets.disable_progress_bars()
    if spec.streaming and cap is None:
        raise SourceError(f"{describe(spec)}: source.streaming needs a cap; set max_examples on its section")
    if spec.hub is not None:
        from mixopt.artifacts import hub_offline, require_hub

        if not hub_offline():
            require_hub(f"hub dataset {describe(spec)}", SourceError)
        try:
            with quiet_libraries():
                hub = datasets.load_dataset(
                    spec.hub, spec.config, split=spec.split or "train", streaming=spec.streaming
                )
                return stream_head(hub, cap) if isinstance(hub, datasets.IterableDataset) and cap else hub
        except Exception as err:  # hub errors are many types; all mean the same thing to the user
            raise SourceError(f"cannot load hub dataset {describe(spec)}: {_reason(err)}") from None
    files = spec.paths(base_dir)
    if missing := [str(f) for f in files if not f.exists()]:
        raise SourceError(f"source file not found: {missing[0]} (paths are relative to the recipe file)")
    if spec.format == "arrow" or (len(files) == 1 and files[0].is_dir()):
        try:
            with quiet_libraries():
                loaded = datasets.load_from_disk(str(files[0]))
        except Exception as err:  # not a save_to_disk folder: datasets raises several types
            raise SourceError(
                f"cannot read {files[0]} as a saved dataset ({_reason(err)}); give a datasets.save_to_disk "
                "folder or a file"
            ) from None
        if isinstance(loaded, datasets.DatasetDict):
            split = spec.split or "train"
            if split not in loaded:
                raise SourceError(f"{files[0]}: no split '{split}' (has {', '.join(loaded)}); set source.split")
            loaded = loaded[split]
        return loaded
    builder = _builder(spec, files)
    if builder in {"json", "csv"} and not spec.streaming:  # the check reads whole files; a stream reads its head
        for file in files:
            _check_text_file(file)
    options: dict[str, Any] = {}
    if builder == "csv":  # cells are text as written: pandas would read "None", "NA", "null" or "" as missing
        options = {"keep_default_na": False} | ({"column_names": spec.columns} if spec.columns else {})
    try:
        with quiet_libraries():
            data_files = [str(f) for f in files]
            if spec.streaming and cap is not None:
                return stream_head(
                    datasets.load_dataset(builder, data_files=data_files, split="train", streaming=True, **options), cap
                )
            return datasets.load_dataset(builder, data_files=data_files, split="train", **options)
    except Exception as err:  # parser errors from pandas/pyarrow/json
        bad_line = next((line for f in files if (line := _bad_json_line(f))), None) if builder == "json" else None
        if builder == "csv" and not spec.columns and all(_lines(f) <= 1 for f in files):  # datasets: "no data!"
            bad_line = f"{files[0]}: a header but no rows; point the source at a file with rows"
        raise SourceError(bad_line or f"cannot read {files[0]} as {builder}: {_reason(err)}; fix the file") from None


def stream_head(stream: datasets.IterableDataset, cap: int) -> datasets.Dataset:
    """The first `cap` rows of a stream, in its order, as a Dataset: exactly `cap` rows are pulled from it
    (fewer if it ends first), never one more.

    Every rank of a distributed run reads the same head (the ranks then split the *forward passes*); datasets'
    `split_dataset_by_node` would give each rank other rows (whole shards) or make each read the whole head
    anyway (every N-th row), so it serves the trainer side instead (`mixopt.blend.load_mixture`)."""
    rows = list(itertools.islice(iter(stream), cap))
    if stream.features is not None:
        return datasets.Dataset.from_list(rows, features=stream.features)
    return datasets.Dataset.from_list(rows)


def _lines(path: Path) -> int:
    """Non-blank lines of a text file."""
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _reason(err: BaseException) -> str:
    """The innermost cause's message on one line: datasets wraps parser errors in "An error occurred while
    generating the dataset"."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return " ".join(str(err).split()) or type(err).__name__


def _check_text_file(path: Path) -> None:
    """A JSON or CSV file must be UTF-8 and hold something. Checked here because the JSON reader accepts
    other bytes and fails only when a row is read (after the model loaded), the CSV reader's failure names
    no file, and an empty file gets an empty message from datasets."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, blank = 1, True
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                at = line + err.object[: err.start].count(b"\n")
                raise SourceError(
                    f"{path}: line {at} is not UTF-8 (byte 0x{err.object[err.start]:02x}); re-save the file as "
                    f"UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}"
                ) from None
            if not block:
                break
            line += block.count(b"\n")
            blank = blank and not block.strip()
    if blank:
        raise SourceError(f"{path}: the file is empty (no rows); point the source at a file with rows")


def _bad_json_line(path: Path) -> str | None:
    """The first line of a JSON Lines file that is not JSON, named as an editor shows it (1-based); for a
    JSON document (an array), where it breaks. None if the file parses."""
    with path.open(encoding="utf-8") as f:
        if f.read(4096).lstrip().startswith("["):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                return f"{path}: line {err.lineno}: not valid JSON ({err.msg}); fix the file"
            return None
        f.seek(0)
        for number, line in enumerate(f, 1):
            try:
                if line.strip():
                    json.loads(line)
            except json.JSONDecodeError as err:
                return f"{path}: line {number} is not valid JSON ({err.msg}, column {err.colno}); fix or remove it"
    return None


def check_columns(ds: datasets.Dataset, templates: TextTemplates, where: str) -> None:
    """Fail if a template names a column the dataset lacks, or the dataset is empty."""
    if len(ds) == 0:
        raise SourceError(f"{where}: source has no rows; point it at a non-empty file")
    if missing := [c for c in templates.columns() if c not in ds.column_names]:
        raise SourceError(
            f"{where}: template uses column '{missing[0]}' but the source has {', '.join(ds.column_names)}; "
            "fix the template or set source.columns"
        )


def _fields(template: str) -> list[str]:
    return sorted({name for _, name, _, _ in string.Formatter().parse(template) if name is not None})


def _values(ds: datasets.Dataset, templates: list[str]) -> dict[str, list[Any]]:
    """The columns the templates read, as Python lists, fetched at once (row by row is ~1000x slower)."""
    columns = sorted({field.split("[")[0] for template in templates for field in _fields(template)})
    if not columns:
        return {}
    table = ds.select_columns(columns).with_format("arrow")[:]
    return {column: table.column(column).to_pylist() for column in columns}


def _rendered(values: dict[str, list[Any]], rows: int, template: str) -> tuple[list[str], dict[int, str]]:
    """Each row's text ("" where it cannot render) and, for the rows that cannot, why not.

    A row cannot render where a field's column is null or missing (JSON rows without the key read as null),
    an index goes past the end of its list, or an indexed value is not a list. Templates are only columns
    and indexes (`recipe._check_template`), so nothing else can fail in `str.format`.
    """
    fields = _fields(template)
    columns = sorted({field.split("[")[0] for field in fields})
    bad: dict[int, str] = {}
    for field in fields:
        column, *indexes = field.replace("]", "").split("[")
        for row, value in enumerate(values[column]):
            reason = None
            for index in map(int, indexes):
                if value is None:
                    break
                if not isinstance(value, list | tuple | str):
                    reason = f"column '{column}' holds a {type(value).__name__}, not a list, so {{{field}}} fails"
                    break
                if index >= len(value):
                    reason = f"column '{column}' has {len(value)} items but the template reads {{{field}}}"
                    break
                value = value[index]
            if reason is None and value is None:
                reason = f"{{{field}}} is null or missing"
            if reason is not None and row not in bad:
                bad[row] = reason
    texts = [
        "" if row in bad else template.format(**{column: values[column][row] for column in columns})
        for row in range(rows)
    ]
    return texts, bad


def _bad_row(where: str, row: int, reason: str, skippable: bool) -> SourceError:
    hint = " (or set on_bad_row: skip in the recipe)" if skippable else ""
    return SourceError(f"{where}: row {row + 1}: {reason}; fix or remove the row{hint}")


def render_columns(ds: datasets.Dataset, templates: list[str], where: str = "source") -> list[list[str]]:
    """Render each template over every row (format strings over the row's columns); SourceError naming the
    first row that cannot render (rows count from 1, in file order)."""
    values = _values(ds, templates)
    rendered = [_rendered(values, len(ds), template) for template in templates]
    if bad := {row: reason for _, reasons in reversed(rendered) for row, reason in reasons.items()}:
        raise _bad_row(where, *min(bad.items()), skippable=False)
    return [texts for texts, _ in rendered]


def render_column(ds: datasets.Dataset, template: str, where: str = "source") -> list[str]:
    """Render `template` over every row; SourceError naming the first row that cannot render."""
    return render_columns(ds, [template], where)[0]


def render(
    ds: datasets.Dataset, templates: TextTemplates, where: str = "source", on_bad_row: str | None = None
) -> datasets.Dataset:
    """Dataset with the rendered `text`, or `prompt` and `response`, columns (the source's columns dropped).

    A row that cannot render is a SourceError naming it, or with `on_bad_row="skip"` left out (the caller
    counts them: `len(ds) - len(result)`). `on_bad_row=None`: the recipe kind offers no skipping.
    """
    names = ["prompt", "response"] if templates.is_chat else ["text"]
    values = _values(ds, [getattr(templates, name) or "" for name in names])
    rendered = {name: _rendered(values, len(ds), getattr(templates, name) or "") for name in names}
    bad = {row: reason for _, reasons in reversed(rendered.values()) for row, reason in reasons.items()}
    if bad and on_bad_row != "skip":
        raise _bad_row(where, *min(bad.items()), skippable=on_bad_row is not None)
    keep = [row for row in range(len(ds)) if row not in bad]
    return datasets.Dataset.from_dict({name: [texts[row] for row in keep] for name, (texts, _) in rendered.items()})


def row_digests(ds: datasets.Dataset) -> list[bytes]:
    """sha256 of each row's content (its columns as canonical JSON): equal rows, equal digests."""
    from mixopt.files import text_digest

    digests = []
    for batch in ds.with_format("arrow").iter(batch_size=10_000):
        rows: list[dict[str, Any]] = batch.to_pylist()
        digests += [text_digest(json.dumps(row, sort_keys=True, default=str)) for row in rows]
    return digests


def content_hash(table: datasets.Dataset | pa.Table) -> str:
    """sha256 of a dataset's rows (Arrow IPC bytes of its table), stable across save/load and processes.

    datasets' `_fingerprint` changes across save_to_disk/load_from_disk, so it cannot say "same rows".
    """
    if isinstance(table, datasets.Dataset):
        table = table.with_format("arrow")[:]
    digest = Digest().add_bytes(table.schema.to_string(show_schema_metadata=False).encode())
    # Re-chunk first: IPC bytes depend on chunk boundaries, which differ between equal tables.
    for batch in table.combine_chunks().to_batches(max_chunksize=65_536):
        digest.add_bytes(batch.serialize().to_pybytes())
    return digest.hex()


def rendered_rows(section: TargetSpec | DomainSpec, recipe: Recipe, where: str) -> datasets.Dataset:
    """A plan section's rows, columns checked, capped at `max_examples`, rendered through its templates; bad
    rows fail or, with `on_bad_row: skip`, are left out."""
    return render_section(section, recipe.base_dir, recipe.on_bad_row, where)


def render_section(section: TargetSpec | DomainSpec, base_dir: Path, on_bad_row: str, where: str) -> datasets.Dataset:
    """`rendered_rows` given the recipe's folder and `on_bad_row` (a blend re-renders its parts with them)."""
    ds = load_source(section.source, base_dir, section.max_examples)
    check_columns(ds, section, f"{where} ({describe(section.source)})")
    if section.max_examples is not None:
        ds = ds.select(range(min(len(ds), section.max_examples)))
    return render(ds, section, f"{where} ({describe(section.source)})", on_bad_row)
