"""Features: the streaming engine. Token batches -> residual at layer L -> SAE latents -> reductions.

Nothing of size tokens x d_sae outlives a batch: per source we keep float64 per-latent sums (and the
same for raw residual dimensions) plus per-example sums, O(examples x width). Results are cached on
disk keyed by the exact token ids scored, the model, the SAE and the layer, so a second run, or a run
killed half-way, recomputes nothing it already finished.

ICL alignment (DESIGN.md section 3): the demonstration prefix and the query are tokenized separately
and their ids concatenated, so the query's ids are identical with and without the prefix; only the
query's counted tokens are compared, position by position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from tqdm.auto import tqdm

from mixopt.batching import length_batches, pad_right
from mixopt.encoding import Encoded
from mixopt.files import Digest, atomic_write
from mixopt.model import LoadedModel, cache_dir, prefix_cache, residual_stream

CACHE_VERSION = 1


@dataclass
class Reduction:
    """Sums over tokens of one per-token quantity of width W: in total (float64) and per example."""

    total: torch.Tensor  # (W,) float64: sum over tokens
    total_sq: torch.Tensor  # (W,) float64: sum of squares
    active: torch.Tensor  # (W,) float64: tokens where the value is > 0
    per_example: torch.Tensor  # (examples, W) float32: sum over each example's tokens
    per_example_sq: torch.Tensor  # (examples, W) float32

    @classmethod
    def empty(cls, n_examples: int, width: int) -> Reduction:
        z = torch.zeros
        return cls(
            z(width, dtype=torch.float64),
            z(width, dtype=torch.float64),
            z(width, dtype=torch.float64),
            z(n_examples, width),
            z(n_examples, width),
        )

    @torch.no_grad()
    def update(self, values: torch.Tensor, example: torch.Tensor) -> None:
        """values: (tokens, W) for the tokens of a batch; example: (tokens,) index of each token's example."""
        values = values.float().cpu()
        squares = values.square()
        self.total += values.sum(0, dtype=torch.float64)  # float64: long sums keep precision
        self.total_sq += squares.sum(0, dtype=torch.float64)
        self.active += (values > 0).sum(0, dtype=torch.float64)
        self.per_example.index_add_(0, example, values)
        self.per_example_sq.index_add_(0, example, squares)


@dataclass
class SourceStats:
    """A source's SAE-latent and raw-residual reductions over its counted tokens."""

    example_tokens: torch.Tensor  # (examples,) int64: counted tokens per example
    latents: Reduction  # width d_sae
    resid: Reduction  # width d_model

    @property
    def n_tokens(self) -> int:
        return int(self.example_tokens.sum())

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}example_tokens": self.example_tokens}
        for part in ("latents", "resid"):
            for f in fields(Reduction):
                out[f"{prefix}{part}.{f.name}"] = getattr(getattr(self, part), f.name)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> SourceStats:
        parts = {
            part: Reduction(**{f.name: tensors[f"{prefix}{part}.{f.name}"] for f in fields(Reduction)})
            for part in ("latents", "resid")
        }
        return cls(tensors[f"{prefix}example_tokens"], **parts)


@dataclass
class PassResult:
    """What one pass over a source yields: its zero-shot stats and, with demonstrations, the ICL shift
    (a SourceStats whose values are per-token squared differences f(ICL) - f(zero-shot))."""

    stats: SourceStats
    shift: SourceStats | None = None


def _sae_width(sae: Any) -> int:
    return int(sae.cfg.d_sae)


def _counted_mask(rows: list[Encoded]) -> torch.Tensor:
    """(batch, longest row) bool: each row's counted tokens."""
    mask = torch.zeros((len(rows), max(len(r) for r in rows)), dtype=torch.bool)
    for b, row in enumerate(rows):
        mask[b, : len(row)] = torch.tensor(row.counted, dtype=torch.bool)
    return mask


def _encode_counted(
    lm: LoadedModel, sae: Any, layer: int, ids: list[list[int]], mask: torch.Tensor, prefix: Any | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, _ = pad_right(ids, lm.tokenizer.pad_token_id or 0, lm.device)
    # No attention mask: rows are right-padded, so under the causal mask real tokens never see padding,
    # and SDPA's is_causal path is faster than an explicit mask (padding outputs are dropped below).
    resid = residual_stream(lm.model, input_ids, None, layer, prefix)  # (batch, seq, d_model)
    h = resid[mask.to(lm.device)]  # (counted tokens, d_model), row-major: aligned across ICL/zero-shot
    with torch.inference_mode():
        return h.float(), sae.encode(h.float()).float()  # (tokens, d_model), (tokens, d_sae)


def run_pass(
    lm: LoadedModel,
    sae: Any,
    layer: int,
    examples: list[Encoded],
    prefix: list[int],
    batch_tokens: int,
    desc: str,
    other: LoadedModel | None = None,
) -> PassResult:
    """Stream `examples` through model and SAE; with a non-empty `prefix`, also the ICL shift; with `other`
    (e.g. a fine-tuned copy, same tokenizer), the shift from `lm` to `other` on the same ids instead.

    The prefix's keys and values are computed once and every query continues them, which is the same
    computation as running `prefix + query` ids (tested) at a fraction of the cost."""
    n, d_sae, d_model = len(examples), _sae_width(sae), lm.hidden_size
    stats = SourceStats(
        torch.tensor([e.n_counted for e in examples], dtype=torch.int64),
        Reduction.empty(n, d_sae),
        Reduction.empty(n, d_model),
    )
    shift = (
        SourceStats(stats.example_tokens.clone(), Reduction.empty(n, d_sae), Reduction.empty(n, d_model))
        if prefix or other is not None
        else None
    )
    cache = prefix_cache(lm.model, prefix, layer, lm.device) if prefix else None  # demos: computed once
    with tqdm(total=stats.n_tokens, unit="tok", unit_scale=True, desc=desc, leave=False) as bar:
        for batch in length_batches([len(e) for e in examples], batch_tokens):
            rows = [examples[i] for i in batch]
            example = torch.repeat_interleave(torch.tensor(batch), stats.example_tokens[batch])
            mask = _counted_mask(rows)
            h0, f0 = _encode_counted(lm, sae, layer, [r.ids for r in rows], mask)
            stats.latents.update(f0, example)
            stats.resid.update(h0, example)
            if shift is not None:  # the same ids (after the demonstrations, or in `other`): aligned one to one
                h1, f1 = _encode_counted(other or lm, sae, layer, [r.ids for r in rows], mask, cache)
                shift.latents.update((f1 - f0).square(), example)
                shift.resid.update((h1 - h0).square(), example)
            bar.update(len(example))
    return PassResult(stats, shift)


# ---------------------------------------------------------------- cache


def pass_key(identity: dict[str, Any], examples: list[Encoded], prefix: list[int]) -> str:
    """Cache key: model, SAE, layer, dtype and the exact ids + masks scored (which pin down source content,
    templates, tokenizer, sampling and limits)."""
    key = Digest().add({**identity, "v": CACHE_VERSION}).add(prefix)
    for e in examples:
        key.add([e.ids, e.counted])
    return key.hex(24)


def cached_tensors(
    kind: str, key: str, compute: Callable[[], dict[str, torch.Tensor]]
) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors stored in the cache's `kind` folder under `key`, or computed and stored atomically (a killed
    run leaves no half-written entry). Returns (tensors, hit)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / kind / f"{key}.safetensors"
    if path.exists():
        return load_file(path), True
    tensors = {k: v.contiguous() for k, v in compute().items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return tensors, False


def cached_pass(key: str, compute: Callable[[], PassResult]) -> tuple[PassResult, bool]:
    """The pass's result from the on-disk cache, or computed and stored atomically. Returns (result, hit)."""

    def tensors() -> dict[str, torch.Tensor]:
        result = compute()
        out = result.stats.to_tensors("stats.")
        return out | result.shift.to_tensors("shift.") if result.shift is not None else out

    stored, hit = cached_tensors("features", key, tensors)
    shift = SourceStats.from_tensors(stored, "shift.") if "shift.example_tokens" in stored else None
    return PassResult(SourceStats.from_tensors(stored, "stats."), shift), hit
