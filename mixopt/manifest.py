"""Manifest: the provenance record of a run, and atomic output folders.

`staged_output` gives a temporary folder beside OUT; everything is written there and renamed into place
only when the run succeeded, so an interrupted run never leaves a half-written OUT (nor its temp folder).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mixopt import __version__
from mixopt.errors import OutputExistsError
from mixopt.files import sha256_file

LIBRARIES = ("torch", "transformers", "sae-lens", "datasets", "cvxpy", "numpy", "pydantic", "pyarrow")


def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExistsError(f"output folder {out} exists; pass --force to replace it, or choose --out")


@contextlib.contextmanager
def staged_output(out: Path, force: bool) -> Iterator[Path]:
    """A temp folder beside `out`, renamed to `out` if the block succeeds and removed if it fails."""
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    if out.exists():  # --force: move the old run aside first so `out` is never missing a half
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, out)


def checksums(folder_or_file: Path | None) -> dict[str, str]:
    """sha256 of a file, or of every file directly in a folder (model weights, SAE weights, configs)."""
    if folder_or_file is None or not folder_or_file.exists():
        return {}
    files = [folder_or_file] if folder_or_file.is_file() else sorted(p for p in folder_or_file.iterdir() if p.is_file())
    return {p.name: sha256_file(p) for p in files}


def versions() -> dict[str, str]:
    found = {"mixopt": __version__, "python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def recipe_record(recipe: Any) -> dict[str, Any]:
    """Where a recipe came from, its content hash and its resolved values (any recipe kind)."""
    return {"file": str(recipe.file) if recipe.file else None, "sha256": recipe.sha256(), "resolved": recipe.to_dict()}
