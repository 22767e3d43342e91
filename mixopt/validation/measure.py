"""Measurements: every metric of every evaluation item (and each source's held-out reply NLL) under one
model, stored in the run folder keyed by content so a stopped run reads back what it finished."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mixopt import evaluate as ev
from mixopt.errors import MixoptError
from mixopt.evaluate import MCQItem
from mixopt.files import write_json
from mixopt.model import LoadedModel
from mixopt.recipe import ValidateRecipe
from mixopt.validation.data import Pair


@dataclass
class Measurement:
    """One model measured: what `OUT/metrics/<run>.json` holds (its JSON form is unchanged since v1)."""

    items: dict[str, np.ndarray]  # metric -> (items,) per-item values over the flat item list (NaN: too long)
    heldout: dict[str, np.ndarray]  # source -> (rows,) reply NLL of the source's held-out rows
    finetune: dict[str, Any] | None = None  # the fine-tune measured (FinetuneResult.to_dict); None: base model
    mixture: dict[str, int] = field(default_factory=dict)  # rows per part, for mixture runs
    examples: int | None = None  # training examples the fine-tune kept

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Measurement:
        return cls(
            items={m: np.asarray(v, dtype=float) for m, v in record["items"].items()},
            heldout={k: np.asarray(v, dtype=float) for k, v in record["heldout"].items()},
            finetune=record.get("finetune"),
            mixture=record.get("mixture", {}),
            examples=record.get("examples"),
        )

    def to_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "items": {m: v.tolist() for m, v in self.items.items()},
            "heldout": {k: v.tolist() for k, v in self.heldout.items()},
        }
        if self.finetune is not None:
            record |= {"finetune": self.finetune, "mixture": self.mixture, "examples": self.examples}
        return record


def note(message: str) -> None:
    tqdm.write(message, file=sys.stderr)  # progress to stderr, results to stdout


def model_identity(recipe: ValidateRecipe) -> str:
    """Weights fingerprint, device and evaluation dtype: what a stored measurement depends on (no load)."""
    from mixopt.model import resolve_device, resolve_dtype, resolve_model_source

    _, identity = resolve_model_source(recipe.model, recipe.base_dir)
    device = resolve_device(recipe.model.device)
    return f"{identity}|{device.type}|{resolve_dtype(recipe.model.dtype, device)}"


def load_validation_model(recipe: ValidateRecipe, dtype: str | None = None) -> LoadedModel:
    from mixopt.model import load_model

    spec = recipe.model if dtype is None else recipe.model.model_copy(update={"dtype": dtype})
    return load_model(spec, recipe.base_dir)


def measure(
    lm: LoadedModel, recipe: ValidateRecipe, items: Sequence[MCQItem], heldout: dict[str, list[Pair]], desc: str
) -> Measurement:
    """Per-item metrics on the evaluation items and reply NLL on the sources' held-out rows."""
    e = recipe.evaluation
    values = ev.score_items(lm, items, e.max_length, e.batch_tokens, desc=f"evaluate {desc}")
    own = {
        name: ev.score_replies(lm, pairs, e.max_length, e.batch_tokens, desc=f"held-out {name}")
        for name, pairs in heldout.items()
    }
    return Measurement(values, own)


def cached_measurement(
    path: Path, key: str, compute: Callable[[], Measurement], recorded_only: bool = False
) -> Measurement:
    """Read a measurement back if it was made from the same inputs, else compute and store it atomically.
    `recorded_only` (`--rescore`): never compute; a missing or stale record is an error."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("fingerprint") == key:
            return Measurement.from_record(stored)
    if recorded_only:
        state = "was made from other inputs" if path.exists() else "is missing"
        raise MixoptError(
            f"{path}: the recorded measurement {state} (--rescore trains and measures nothing); restore the kept "
            "evidence with --from DIR, or run without --rescore"
        )
    result = compute()
    write_json(path, {"fingerprint": key, **result.to_record()})
    return result
