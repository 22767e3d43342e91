"""Manifest: the provenance record of a run, and atomic output folders.

`staged_output` gives a temporary folder beside OUT; everything is written there and renamed into place
only when the run succeeded, so an interrupted run never leaves a half-written OUT (nor its temp folder).
A run killed outright (`kill -9`) cannot clean up: the next run beside the same OUT removes the temp
folders (`.OUT.tmp-PID`, `.OUT.old-PID`) of processes that no longer exist.
`--force` replaces only an empty folder or one that holds a mixopt manifest, never one that holds the
recipe or anything it reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
from collections.abc import Iterator, Sequence
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


MANIFEST = "manifest.json"


def check_writable(path: Path, what: str, folder: bool) -> None:
    """Fail now, not after the model work, if `path` (a folder or a file) cannot be written: it exists as the
    other kind, a parent is a file, or the nearest existing parent folder is not writable."""
    path = path.absolute()
    if path.exists() and path.is_dir() != folder:
        kind = "file" if folder else "folder"
        raise OutputExistsError(f"cannot write {what} {path}: it is a {kind}; choose another --out")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(f"cannot write {what} {path}: {parent} is a file, not a folder; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputExistsError(f"cannot write {what} {path}: {parent} is not writable; choose another --out")


def _is_mixopt_run(folder: Path) -> bool:
    try:
        return "mixopt_manifest_version" in json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_output(out: Path, force: bool, inputs: Sequence[Path] = ()) -> None:
    """OUT can be written: not there yet, or (with `force`) an empty folder or an earlier mixopt run that
    holds none of `inputs` (the recipe file, its sources, model and SAE)."""
    out = out.resolve()
    check_writable(out, "output folder", folder=True)
    if not out.exists():
        return
    if not force:
        raise OutputExistsError(f"output folder {out} exists; pass --force to replace it, or choose --out")
    if held := [p for p in inputs if p == out or out in p.parents]:
        raise OutputExistsError(
            f"--force would replace {out}, which holds {held[0]} that the recipe reads; choose another --out"
        )
    if any(out.iterdir()) and not _is_mixopt_run(out):
        raise OutputExistsError(
            f"--force replaces only an empty folder or an earlier mixopt run (with {MANIFEST}); {out} is neither: "
            "choose another --out"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_stages(out: Path) -> list[Path]:
    """Remove `.OUT.tmp-PID` and `.OUT.old-PID` folders beside `out` whose process is gone (a run killed with
    SIGKILL or a power cut); returns what was removed. A live process's folders are left alone.

    A run killed between moving the old OUT aside and moving the new one in left both, and no OUT: the new
    one is complete (it is moved only after it is written), so the move is finished instead.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    stale: dict[int, dict[str, Path]] = {}
    if out.parent.is_dir():
        for path in out.parent.iterdir():
            if (match := pattern.fullmatch(path.name)) and path.is_dir() and not _pid_alive(int(match[2])):
                stale.setdefault(int(match[2]), {})[match[1]] = path
    removed = []
    for stages in stale.values():
        if not out.exists() and {"tmp", "old"} <= set(stages):
            os.replace(stages.pop("tmp"), out)
        for path in stages.values():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def staged_output(out: Path, force: bool, inputs: Sequence[Path] = ()) -> Iterator[Path]:
    """A temp folder beside `out`, renamed to `out` if the block succeeds and removed if it fails (also on
    SIGTERM, which `mixopt.cli` turns into an exception)."""
    out = out.resolve()  # `--out .` has no name of its own
    remove_stale_stages(out)  # first: a finished move makes OUT exist again, and then it needs --force
    check_output(out, force, inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    # SIGTERM waits until both renames are done (delivered right after): never an OUT-less moment left behind
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        if out.exists():  # --force: move the old run aside first so `out` is never missing a half
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(staged, out)
        else:
            os.replace(staged, out)
            old = None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
    replay: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything needed to say exactly how a mixture was made (DESIGN.md section 5). `replay`: each
    drawn domain's row selection (`MixturePart.record`)."""
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
            "format": dataclasses.asdict(context["format"]) if context.get("format") else None,  # chat or plain
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
            | ({"replay": replay[d.name]} if replay and d.name in replay else {})
            for d in allocation.domains
        ],
        "dataset": written,
        "timings_seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
