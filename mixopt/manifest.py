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
from typing import TYPE_CHECKING, Any

from mixopt import __version__
from mixopt.errors import OutputExistsError
from mixopt.files import sha256_file

if TYPE_CHECKING:
    from mixopt.recipe import Recipe
    from mixopt.scores import Scores
    from mixopt.solver import Allocation

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


def manifest_record(
    recipe: Recipe,
    scores: Scores,
    allocation: Allocation,
    context: dict[str, Any],
    written: dict[str, Any],
    seconds: dict[str, float],
) -> dict[str, Any]:
    """Everything needed to say exactly how a mixture was made (DESIGN.md section 5)."""
    from mixopt.model import BUILTIN_MODELS, builtin_gguf
    from mixopt.sae import resolve_sae_dir

    model_files = (
        builtin_gguf(recipe.model.path)
        if recipe.model.path in BUILTIN_MODELS
        else (recipe.base_dir / recipe.model.path)
        if recipe.model.path.startswith((".", "/"))
        else None
    )
    return {
        "mixopt_manifest_version": 1,
        "versions": versions(),
        "recipe": recipe_record(recipe),
        "model": {
            "path": recipe.model.path,
            "identity": context["model_identity"],
            "device": context["device"],
            "dtype": context["dtype"],
            "checksums": checksums(model_files),
        },
        "sae": {
            "path": scores.sae,
            "identity": context["sae_identity"],
            "layer": recipe.sae.layer,
            "checksums": checksums(resolve_sae_dir(recipe.sae, recipe.base_dir)),
        },
        "sts": {
            "score": scores.score,
            "top_k": scores.top_k,
            "icl_demos": recipe.target.icl_demos,
            "seed": recipe.seed,
            "target_seed": recipe.target_seed,
            "shifted_latents": scores.shifted_latents,
            "domains": [
                {
                    "name": d.name,
                    "score": d.score,
                    "baseline": d.baseline,
                    "similarity": d.similarity,
                    "interval": d.interval,
                }
                for d in scores.domains
            ],
        },
        "solver": {k: v for k, v in allocation.to_dict().items() if k != "domains"},
        "allocation": [
            {"name": d.name, "count": d.count, "tokens": d.tokens, "share": d.share, "epochs": d.epochs}
            for d in allocation.domains
        ],
        "dataset": written,
        "timings_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
