"""Sources: recipe `source:` blocks -> `datasets.Dataset`, and row templating.

Local json/jsonl/csv/parquet files, a `save_to_disk` folder, or a hub dataset id all come back as one
`datasets.Dataset`, so every later stage sees the same thing.

Example:
    >>> from mixopt.recipe import SourceSpec
    >>> ds = load_source(SourceSpec(path="recipes/data/quickstart/law.jsonl"), Path("."))  # doctest: +SKIP
    >>> render_column(ds, "{question}\\n{answer}")[0]                                      # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow as pa

from mixopt.errors import SourceError
from mixopt.files import Digest
from mixopt.recipe import DomainSpec, Recipe, SourceSpec, TargetSpec, TextTemplates, template_fields

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
    return spec.path if isinstance(spec.path, str) else f"{spec.path[0]} (+{len(spec.path) - 1} files)"


def load_source(spec: SourceSpec, base_dir: Path) -> datasets.Dataset:
    """Load a source as a Dataset. Relative paths resolve against `base_dir` (the recipe's folder)."""
    datasets.disable_progress_bars()
    if spec.hub is not None:
        try:
            return datasets.load_dataset(spec.hub, spec.config, split=spec.split or "train")
        except Exception as err:  # hub errors are many types; all mean the same thing to the user
            raise SourceError(f"cannot load hub dataset {describe(spec)}: {err}".splitlines()[0]) from None
    files = spec.paths(base_dir)
    if missing := [str(f) for f in files if not f.exists()]:
        raise SourceError(f"source file not found: {missing[0]} (paths are relative to the recipe file)")
    if spec.format == "arrow" or (len(files) == 1 and files[0].is_dir()):
        loaded = datasets.load_from_disk(str(files[0]))
        if isinstance(loaded, datasets.DatasetDict):
            split = spec.split or "train"
            if split not in loaded:
                raise SourceError(f"{files[0]}: no split '{split}' (has {', '.join(loaded)}); set source.split")
            loaded = loaded[split]
        return loaded
    builder = _builder(spec, files)
    options = {"column_names": spec.columns} if builder == "csv" and spec.columns else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **options)
    except Exception as err:  # parser errors from pandas/pyarrow/json
        raise SourceError(f"cannot read {files[0]} as {builder}: {err}".splitlines()[0]) from None


def check_columns(ds: datasets.Dataset, templates: TextTemplates, where: str) -> None:
    """Fail if a template names a column the dataset lacks, or the dataset is empty."""
    if len(ds) == 0:
        raise SourceError(f"{where}: source has no rows; point it at a non-empty file")
    if missing := [c for c in templates.columns() if c not in ds.column_names]:
        raise SourceError(
            f"{where}: template uses column '{missing[0]}' but the source has {', '.join(ds.column_names)}; "
            "fix the template or set source.columns"
        )


def render_column(ds: datasets.Dataset, template: str) -> list[str]:
    """Render `template` over every row (format strings over the row's columns)."""
    fields = sorted(set(template_fields(template)))
    cols = {f: ds[f] for f in fields}
    return [template.format(**{f: cols[f][i] for f in fields}) for i in range(len(ds))]


def render(ds: datasets.Dataset, templates: TextTemplates) -> datasets.Dataset:
    """Dataset with the rendered `text`, or `prompt` and `response`, columns (the source's columns dropped)."""
    if templates.is_chat:
        columns = {
            "prompt": render_column(ds, templates.prompt or ""),
            "response": render_column(ds, templates.response or ""),
        }
    else:
        columns = {"text": render_column(ds, templates.text or "")}
    return datasets.Dataset.from_dict(columns)


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
    """A plan section's rows, columns checked, capped at `max_examples`, rendered through its templates."""
    ds = load_source(section.source, recipe.base_dir)
    check_columns(ds, section, f"{where} ({describe(section.source)})")
    if section.max_examples is not None:
        ds = ds.select(range(min(len(ds), section.max_examples)))
    return render(ds, section)
