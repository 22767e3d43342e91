"""Features: the streaming engine. Token batches -> residual at layer L -> SAE latents -> reductions.

Nothing of size tokens x d_sae outlives a batch: per source we keep float64 per-latent sums (and the
same for raw residual dimensions) plus per-example sums, O(examples x width), and each latent's top
activating examples (`TopContexts`, O(d_sae x N)), so `mixopt explain` shows snippets with no new pass.
Results are cached on disk keyed by the exact token ids scored, the model, the SAE and the layer, so a
second run, or a run killed half-way, recomputes nothing it already finished.

ICL alignment (DESIGN.md section 3): the demonstration prefix (with the conversation's head: the template's
system block) and the query's own turn are tokenized separately and their ids concatenated, so the turn's
ids are identical in the zero-shot input ([head] + turn) and the ICL input ([head] + demos + turn), one
conversation in both; only the query's counted tokens are compared, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from tqdm.auto import tqdm

from mixopt import distributed
from mixopt.artifacts import cache_dir
from mixopt.batching import length_batches, pad_right
from mixopt.encoding import Encoded
from mixopt.files import Digest, atomic_write
from mixopt.model import LoadedModel, prefix_cache, residual_stream

# 2: the ICL query no longer repeats the conversation head after the demonstrations
# 3: SourceStats.top (each latent's top activating examples)
CACHE_VERSION = 3
TOP_CONTEXTS = 8  # N: examples kept per latent and source (`TopContexts`)


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
class TopContexts:
    """Each latent's N examples where it fires most, with its peak activation in each and where that
    peak is: a bounded heap per latent, kept for all latents at once by merging each batch's peaks with
    the stored N (torch.topk). One context per example, as SAE dashboards show them: a latent that fires
    on a long example would otherwise fill all N slots with one example's neighbouring tokens.

    Only positive activations count: a slot nothing filled has activation 0 and example = position = -1.
    All latents are kept, not only the shifted ones, so the cached pass serves any top_k and target."""

    values: torch.Tensor  # (W, N) float32: peak activations, largest first
    example: torch.Tensor  # (W, N) int32: index of the example (in the pass's example list)
    position: torch.Tensor  # (W, N) int32: the peak token's position in that example's ids

    @classmethod
    def empty(cls, width: int, n: int = TOP_CONTEXTS) -> TopContexts:
        return cls(
            torch.zeros(width, n),
            torch.full((width, n), -1, dtype=torch.int32),
            torch.full((width, n), -1, dtype=torch.int32),
        )

    @torch.no_grad()
    def update(self, values: torch.Tensor, mask: torch.Tensor, example: torch.Tensor) -> None:
        """values: (tokens, W) of a batch's counted tokens, row-major; mask: (batch, longest) bool, the
        counted tokens; example: (batch,) each row's index in the pass's example list."""
        n = self.values.shape[1]
        dense = values.new_zeros((*mask.shape, values.shape[1]))  # (batch, longest, W); padding: 0
        dense[mask.to(values.device)] = values
        peak, at = dense.max(dim=1)  # (batch, W) each row's peak and its first position
        merged = torch.cat([self.values, peak.float().cpu().t()], dim=1)  # (W, N + batch)
        self.values, pick = merged.topk(n, dim=1)  # (W, N)
        from_batch = pick >= n
        row = (pick - n).clamp(min=0)  # (W, N) batch row of each pick taken from the batch
        batch_example = example.to(torch.int32)[row]
        batch_position = at.cpu().t().to(torch.int32).gather(1, row)
        stored = pick.clamp(max=n - 1)
        self.example = torch.where(from_batch, batch_example, self.example.gather(1, stored))
        self.position = torch.where(from_batch, batch_position, self.position.gather(1, stored))
        empty = self.values <= 0  # a latent that did not fire in an example has no context there
        self.example[empty], self.position[empty] = -1, -1

    def all_ranks(self) -> None:
        """Merge every rank's top N per latent (each from its own batches) into the top N of all of them."""
        if distributed.world_size() == 1:
            return
        n = self.values.shape[1]
        merged = [torch.cat(distributed.all_gather(part), dim=1) for part in (self.values, self.example, self.position)]
        self.values, pick = merged[0].topk(n, dim=1)  # (W, N) of (W, N x ranks)
        self.example, self.position = merged[1].gather(1, pick), merged[2].gather(1, pick)


@dataclass
class SourceStats:
    """A source's SAE-latent and raw-residual reductions over its counted tokens."""

    example_tokens: torch.Tensor  # (examples,) int64: counted tokens per example
    latents: Reduction  # width d_sae
    resid: Reduction  # width d_model
    top: TopContexts | None = None  # each latent's top activating examples (zero-shot passes only)

    @property
    def n_tokens(self) -> int:
        return int(self.example_tokens.sum())

    def all_ranks(self) -> None:
        """Sum every rank's part of the reductions (`distributed`: each rank reduced its own batches)."""
        for part in (self.latents, self.resid):
            distributed.all_sum(*(getattr(part, f.name) for f in fields(Reduction)))
        if self.top is not None:
            self.top.all_ranks()

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}example_tokens": self.example_tokens}
        for part in ("latents", "resid"):
            for f in fields(Reduction):
                out[f"{prefix}{part}.{f.name}"] = getattr(getattr(self, part), f.name)
        if self.top is not None:
            out |= {f"{prefix}top.{f.name}": getattr(self.top, f.name) for f in fields(TopContexts)}
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> SourceStats:
        parts = {
            part: Reduction(**{f.name: tensors[f"{prefix}{part}.{f.name}"] for f in fields(Reduction)})
            for part in ("latents", "resid")
        }
        top = (
            TopContexts(**{f.name: tensors[f"{prefix}top.{f.name}"] for f in fields(TopContexts)})
            if f"{prefix}top.values" in tensors
            else None
        )
        return cls(tensors[f"{prefix}example_tokens"], **parts, top=top)


@dataclass
class PassResult:
    """What one pass over a source yields: its zero-shot stats and, with demonstrations, the ICL shift
    (a SourceStats whose values are per-token squared differences f(ICL) - f(zero-shot))."""

    stats: SourceStats
    shift: SourceStats | None = None


def _sae_width(sae: Any) -> int:
    return 0 if sae is None else int(sae.cfg.d_sae)  # no SAE: latents of width 0, the residual alone


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
    # (counted tokens, d_model), row-major: aligned across ICL/zero-shot; onto the SAE's device (a model spread
    # over GPUs by `placement` hands block L's output over on that block's GPU)
    h = resid[mask.to(resid.device)].to(lm.device)
    with torch.inference_mode():
        latents = sae.encode(h.float()) if sae is not None else h.new_zeros((h.shape[0], 0))  # no SAE: width 0
        return h.float(), latents.float()  # (tokens, d_model), (tokens, d_sae)


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
        top := TopContexts.empty(d_sae),
    )
    shift = (
        SourceStats(stats.example_tokens.clone(), Reduction.empty(n, d_sae), Reduction.empty(n, d_model))
        if prefix or other is not None
        else None
    )
    cache = prefix_cache(lm.model, prefix, layer, lm.device) if prefix else None  # demos: computed once
    # with several ranks, this rank's share of the one-process batch plan (`distributed.shard`)
    batches = distributed.shard(list(length_batches([len(e) for e in examples], batch_tokens)))
    mine = int(sum(stats.example_tokens[batch].sum() for batch in batches))  # counted tokens of this rank
    bar = tqdm(total=mine, unit="tok", unit_scale=True, desc=desc, leave=False, disable=not distributed.is_main())
    with bar:
        for batch in batches:
            rows = [examples[i] for i in batch]
            example = torch.repeat_interleave(torch.tensor(batch), stats.example_tokens[batch])
            mask = _counted_mask(rows)
            h0, f0 = _encode_counted(lm, sae, layer, [r.ids for r in rows], mask)
            stats.latents.update(f0, example)
            stats.resid.update(h0, example)
            top.update(f0, mask, torch.tensor(batch))
            if shift is not None and other is not None:  # measured shift: the same ids in the other model
                h1, f1 = _encode_counted(other, sae, layer, [r.ids for r in rows], mask)
            elif shift is not None:  # the same turn ids after the demonstrations: counted tokens align one to one
                turns = [r.turn for r in rows]  # one conversation: the head (system block) only before the demos
                h1, f1 = _encode_counted(lm, sae, layer, [t.ids for t in turns], _counted_mask(turns), cache)
            if shift is not None:
                shift.latents.update((f1 - f0).square(), example)
                shift.resid.update((h1 - h0).square(), example)
            bar.update(len(example))
    for part in (stats, shift):
        if part is not None:
            part.all_ranks()
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
    if distributed.agree(path.exists()):  # several ranks: all read it, or all compute their shard
        return load_file(path), True
    tensors = {k: v.contiguous() for k, v in compute().items()}
    if distributed.is_main():  # only rank 0 writes, once every rank's part is summed in
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
