"""Fine-tune: a plain supervised fine-tuning loop for `mixopt validate`, with checkpoints and resume.

Loss on response tokens only (the prompt and template tokens are context, as in TRL's assistant-only
loss), token-mean over each batch; AdamW with linear warmup and cosine decay to lr/10; gradient norm
clipped at 1. The batch of step s is a pure function of (seed, s), so a run stopped at step s and
resumed from its checkpoint sees exactly the batches an uninterrupted run would have seen.

A plain loop rather than `transformers.Trainer`: it is short, and it lets the loss read only the
response positions through the LM head (`logits_to_keep`), which on CPU saves a fifth of each step.

Example:
    >>> result = finetune(lm.model, examples, recipe.schedule, seed=0, folder=Path("run/finetune/gsm8k"),
    ...                   pad_id=lm.tokenizer.pad_token_id)                                    # doctest: +SKIP
    >>> result.steps, result.losses[-1]                                                         # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from mixopt.batching import epoch_stream, pad_right
from mixopt.encoding import Encoded
from mixopt.errors import MixoptError
from mixopt.files import Digest, atomic_write
from mixopt.recipe import ScheduleSpec

CHECKPOINT = "checkpoint.pt"


@dataclass
class FinetuneResult:
    steps: int  # optimizer steps done
    tokens: int  # loss-bearing (response) tokens seen
    seconds: float  # training wall time, summed over resumed sessions
    losses: list[float] = field(default_factory=list)  # mean response-token loss of each step

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def step_batches(n_rows: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Row indices of each step: seeded permutations of the rows, one per epoch, read in order."""
    stream = epoch_stream(n_rows, steps * batch_size, seed)
    return [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


def learning_rate(step: int, schedule: ScheduleSpec) -> float:
    """Linear warmup to `lr`, then cosine decay to lr/10 at the last step."""
    if step < schedule.warmup_steps:
        return schedule.lr * (step + 1) / schedule.warmup_steps
    progress = (step - schedule.warmup_steps) / max(schedule.steps - schedule.warmup_steps - 1, 1)
    return schedule.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def training_batch(rows: list[Encoded], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask, read, targets): `read` (batch, seq) marks the positions whose next
    token is a response token, `targets` those tokens in row-major order."""
    ids, attention = pad_right([r.ids for r in rows], pad_id, device)
    read = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(rows):
        response = torch.tensor(row.response[1:], dtype=torch.bool)  # token t+1 is read at position t
        read[b, : len(response)] = response
    targets = ids[:, 1:][read[:, :-1]]  # (response tokens,)
    return ids, attention, read, targets


def loss_tokens(rows: list[Encoded]) -> torch.Tensor:
    """(rows,) int64: the response tokens each row's loss reads (`training_batch`: token t+1 at position t)."""
    return torch.tensor([sum(r.response[1:]) for r in rows], dtype=torch.int64)


def fingerprint(examples: list[Encoded], schedule: ScheduleSpec, seed: int) -> str:
    """What a checkpoint belongs to: the exact training data, schedule and seed."""
    # key order as it always was (unsorted): a new order would orphan stored checkpoints and measurements
    key = Digest().add([schedule.model_dump(), seed], sort_keys=False)
    for e in examples:
        key.add([e.ids, e.response])
    return key.hex(16)


def _save(path: Path, state: dict[str, object]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))  # a run killed while saving keeps the last one


def _resume(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, key: str) -> FinetuneResult:
    path = folder / CHECKPOINT
    if not path.exists():
        return FinetuneResult(0, 0, 0.0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["fingerprint"] != key:  # other data, schedule or seed: its steps are no use to this run
        tqdm.write(f"{path}: checkpoint of another configuration; starting this fine-tune afresh", file=sys.stderr)
        return FinetuneResult(0, 0, 0.0)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return FinetuneResult(**state["result"])


def finetune(
    model: nn.Module,
    examples: list[Encoded],
    schedule: ScheduleSpec,
    seed: int,
    folder: Path,
    pad_id: int,
    max_steps: int | None = None,
    desc: str = "fine-tune",
) -> FinetuneResult:
    """Train `model` in place on `examples` for `schedule.steps` steps, resuming from `folder`'s checkpoint.

    `max_steps` stops early (after that many steps in total, checkpoint written): a stand-in for a run
    killed part-way, used by the tests. The model must be in float32 (master weights); on CUDA the
    forward runs under bf16 autocast.
    """
    if not examples:
        raise MixoptError("no training examples with response tokens; check the source's templates")
    folder.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    key = fingerprint(examples, schedule, seed)
    result = _resume(folder, model, optimizer, key)
    batches = step_batches(len(examples), schedule.steps, schedule.batch_size, seed)
    stop = min(schedule.steps, max_steps if max_steps is not None else schedule.steps)
    model.train()
    with tqdm(total=schedule.steps, initial=result.steps, unit="step", desc=desc) as bar:
        while result.steps < stop:
            started = time.perf_counter()
            loss, tokens = _step(
                model,
                optimizer,
                [examples[i] for i in batches[result.steps]],
                schedule,
                learning_rate(result.steps, schedule),
                pad_id,
                device,
            )
            result.steps += 1
            result.tokens += tokens
            result.losses.append(round(loss, 5))
            result.seconds += time.perf_counter() - started
            bar.set_postfix(loss=f"{loss:.3f}", response_tok_s=f"{result.tokens / max(result.seconds, 1e-9):.0f}")
            bar.update(1)
            if result.steps % schedule.checkpoint_every == 0 or result.steps == stop:
                _save(
                    folder / CHECKPOINT,
                    {
                        "fingerprint": key,
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "result": result.to_dict(),
                    },
                )
    model.eval()
    return result


def _step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: list[Encoded],
    schedule: ScheduleSpec,
    lr: float,
    pad_id: int,
    device: torch.device,
) -> tuple[float, int]:
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses, _ = token_losses(model, rows, pad_id, device)
    loss = losses.mean()  # token mean over the batch
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach()), int(losses.numel())


def token_losses(
    model: nn.Module, rows: list[Encoded], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, row) of every response token of `rows`, row-major: the trainer's loss before its mean.
    Shapes: (response tokens,) each; `row` is the index in `rows` of each token's example."""
    ids, attention, read, targets = training_batch(rows, pad_id, device)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=read, use_cache=False).logits
    losses = nn.functional.cross_entropy(logits.float(), targets, reduction="none")  # (response tokens,)
    return losses, read[:, :-1].nonzero()[:, 0]  # targets are read row-major: the same order


def remove_checkpoint(folder: Path) -> None:
    """Drop the checkpoint once its run is measured: weights + AdamW state are ~12 bytes per parameter."""
    (folder / CHECKPOINT).unlink(missing_ok=True)
