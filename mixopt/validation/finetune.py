"""One validation fine-tune: a fresh copy of the model trained on a run's rows by the core trainer
(`mixopt.finetune`, resuming from its checkpoint), then measured; the checkpoint is dropped once measured."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mixopt.evaluate import MCQItem
from mixopt.files import digest
from mixopt.recipe import ValidateRecipe
from mixopt.validation.data import Pair
from mixopt.validation.measure import Measurement, cached_measurement, load_validation_model, measure


@dataclass
class Run:
    """One fine-tune: its training rows and the source whose own items it must not be judged on."""

    name: str
    source: str
    rows: list[Pair]
    mixture: dict[str, int] = field(default_factory=dict)  # rows per part, for mixture runs
    order_seed: int | None = None  # the training order's seed (`compare.order_seed`); None: the recipe's seed


def train_and_measure(
    recipe: ValidateRecipe,
    run: Run,
    items: Sequence[MCQItem],
    heldout: list[Pair],
    out: Path,
    identity: str,
    recorded_only: bool = False,
) -> Measurement:
    """Fine-tune a fresh copy on the run's rows (resuming), then measure it; the checkpoint is then dropped."""
    import torch

    from mixopt.encoding import encode_chat
    from mixopt.finetune import finetune, fingerprint, remove_checkpoint
    from mixopt.model import resolve_dtype

    lm = load_validation_model(recipe, dtype="float32")  # fp32 master weights; CUDA runs the forward in bf16
    n = recipe.schedule.max_length
    examples = [e for e in (encode_chat(lm.tokenizer, p, r, n, lm.format) for p, r in run.rows) if any(e.response[1:])]
    seed = recipe.seed if run.order_seed is None else run.order_seed
    key = digest(
        identity,
        fingerprint(examples, recipe.schedule, seed),
        [i.text for i in items],
        heldout,
        recipe.evaluation.max_length,
    )

    def compute() -> Measurement:
        torch.manual_seed(seed)
        folder = out / "finetune" / run.name
        result = finetune(
            lm.model,
            examples,
            recipe.schedule,
            seed,
            folder,
            pad_id=lm.tokenizer.pad_token_id or 0,
            desc=f"fine-tune {run.name}",
        )
        dtype = resolve_dtype(recipe.model.dtype, lm.device)
        measured = measure(
            dataclasses.replace(lm, model=lm.model.to(dtype), dtype=dtype),
            recipe,
            items,
            {run.source: heldout},
            run.name,
        )
        remove_checkpoint(folder)
        return dataclasses.replace(measured, finetune=result.to_dict(), mixture=run.mixture, examples=len(examples))

    return cached_measurement(out / "metrics" / f"{run.name}.json", key, compute, recorded_only)
