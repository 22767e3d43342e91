"""Probe: forecasts from a pilot fine-tune (DESIGN.md section 3b).

The pilot is a short run of validation's own trainer (`finetune.finetune`: AdamW, response-token loss,
clipping, seeded batches) on the target's rows: `sts.probe` steps (default 8, a few percent of a typical
fine-tune), no warmup, cosine to lr/10. Two scorers read it:
- `probe`: each source's mean response-token loss on its scoring examples, after the pilot minus before
  (positive = the pilot made it worse), with per-example changes (the lookahead of TAG, Fifty et al.
  NeurIPS'21; Grad-TAG, KDD'24, for its cost).
- `probe_act`: STS with the shift measured instead of imagined: the top-k SAE latents by squared change
  between the base and the pilot model on the target's own tokens (aligned; no demonstrations), then the
  `act` formula on each source.

Cached by the pilot's key (model, exact training ids, schedule, seed): its training record, and every
measurement made with it, so a second `mixopt score` trains nothing. The pilot's weights are not kept
(with AdamW's state that is 12 bytes per parameter); a new source measured later retrains it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mixopt import distributed, sts
from mixopt.artifacts import cache_dir
from mixopt.batching import length_batches
from mixopt.encoding import Encoded, loss_digest
from mixopt.features import SourceStats, cached_pass, cached_tensors, pass_key, run_pass
from mixopt.files import Digest, write_json
from mixopt.finetune import FinetuneResult, finetune, loss_tokens, remove_checkpoint, token_losses
from mixopt.model import LoadedModel
from mixopt.recipe import ProbeSpec, ScheduleSpec
from mixopt.scores import Forecast, ForecastResult, ScorerCost

CACHE_VERSION = 2  # 2: each loss entry keeps the seconds computing it took


def probe_schedule(spec: ProbeSpec) -> ScheduleSpec:
    """The trainer's schedule for the pilot: no warmup, cosine from lr to lr/10 over its steps."""
    return ScheduleSpec(
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        warmup_steps=0,
        max_length=spec.max_length,
        checkpoint_every=spec.steps,
    )


class Pilot:
    """The pilot fine-tune of `lm` on `train`, trained on first use (`loaded`) and never when every
    measurement that needs it is cached. `record` is its training record, kept in the cache with its key."""

    def __init__(self, lm: LoadedModel, train: list[Encoded], spec: ProbeSpec, seed: int):
        self.lm, self.train, self.spec, self.seed = lm, train, spec, seed
        setting = {"v": CACHE_VERSION, "model": lm.identity, "dtype": str(lm.dtype), "seed": seed, **spec.model_dump()}
        self.key = Digest().add(setting).add(loss_digest(train)).hex(24)
        self._record_path = cache_dir() / "probe" / f"{self.key}.json"
        self._loaded: LoadedModel | None = None

    @property
    def record(self) -> FinetuneResult:
        if self._record_path.exists():
            return FinetuneResult(**json.loads(self._record_path.read_text()))
        return FinetuneResult(0, 0, 0.0)

    @property
    def trained(self) -> bool:
        return self._loaded is not None

    def loaded(self) -> LoadedModel:
        """The pilot model, in the base model's dtype (trained now if this run has not yet)."""
        if self._loaded is None:
            model = copy.deepcopy(self.lm.model).float()  # float32 master weights, as validation trains
            if self.spec.steps and not distributed.is_main():  # rank 0 trains; the others take its weights
                distributed.broadcast_module(model)
            elif self.spec.steps:
                folder = cache_dir() / "probe" / self.key
                torch.manual_seed(self.seed)
                result = finetune(
                    model,
                    self.train,
                    probe_schedule(self.spec),
                    self.seed,
                    folder,
                    pad_id=self.lm.tokenizer.pad_token_id or 0,
                    desc="probe: pilot fine-tune",
                )
                remove_checkpoint(folder)  # the measurements are cached; weights + AdamW state are not worth it
                folder.rmdir()
                write_json(self._record_path, result.to_dict())
                distributed.broadcast_module(model)  # several ranks: every one measures with these weights
            else:
                result = FinetuneResult(0, 0, 0.0)
                if distributed.is_main():
                    write_json(self._record_path, result.to_dict())
            self._loaded = dataclasses.replace(self.lm, model=model.to(self.lm.dtype).eval())
        return self._loaded

    def release(self) -> None:
        self._loaded = None


@torch.no_grad()
def example_losses(lm: LoadedModel, examples: list[Encoded], batch_tokens: int, desc: str) -> np.ndarray:
    """Each example's mean response-token loss, (examples,) float64; NaN where no loss token is read."""
    sums = torch.zeros(len(examples), dtype=torch.float64)
    counts = torch.zeros(len(examples), dtype=torch.float64)
    pad_id = lm.tokenizer.pad_token_id or 0
    batches = distributed.shard(list(length_batches([len(e) for e in examples], batch_tokens)))  # this rank's
    for batch in tqdm(batches, desc=desc, leave=False, disable=not distributed.is_main()):
        losses, row = token_losses(lm.model, [examples[i] for i in batch], pad_id, lm.device)
        index = torch.tensor(batch, dtype=torch.int64)[row.cpu()]
        sums.index_add_(0, index, losses.double().cpu())
        counts.index_add_(0, index, torch.ones_like(losses, dtype=torch.float64).cpu())
    distributed.all_sum(sums, counts)  # each example's row from the one rank that ran it
    return (sums / counts).numpy()  # 0 / 0 = NaN for an example without loss tokens


def _cached_losses(
    model_key: str, lm: Any, examples: list[Encoded], batch_tokens: int, desc: str
) -> tuple[np.ndarray, float]:
    """(`example_losses`, the seconds computing them took), cached by the model's key and the exact ids;
    `lm` is a LoadedModel or a callable that makes one (so a cached run never trains the pilot)."""
    key = Digest().add({"v": CACHE_VERSION, "model": model_key}).add(loss_digest(examples))

    def compute() -> dict[str, torch.Tensor]:
        model = lm() if callable(lm) else lm
        started = time.perf_counter()  # after the pilot's training, which its own record times
        losses = torch.from_numpy(example_losses(model, examples, batch_tokens, desc))
        return {"loss": losses, "seconds": torch.tensor(time.perf_counter() - started)}

    tensors, _ = cached_tensors("probe", key.hex(24), compute)
    return tensors["loss"].numpy(), float(tensors["seconds"])


def probe_forecast(
    lm: LoadedModel, pilot: Pilot, sources: dict[str, list[Encoded]], batch_tokens: int
) -> ForecastResult:
    """The `probe` scorer: per source, its mean response-token loss after the pilot minus before, token-
    weighted over its scoring examples (positive = worse), and each example's own change."""
    base_key = f"{lm.identity}|{lm.dtype}"
    forecasts, seconds = {}, 0.0
    for name, examples in sources.items():
        before, t0 = _cached_losses(base_key, lm, examples, batch_tokens, f"probe: {name} before")
        after, t1 = _cached_losses(
            f"{pilot.key}|{lm.dtype}", pilot.loaded, examples, batch_tokens, f"probe: {name} after"
        )
        seconds += t0 + t1
        change = np.nan_to_num(after - before)  # an example without loss tokens has weight 0 anyway
        tokens = loss_tokens(examples).numpy()
        value = float((change * tokens).sum() / max(tokens.sum(), 1))
        forecasts[name] = Forecast(value, [float(x) for x in change], [int(t) for t in tokens])
    return ForecastResult(forecasts, pilot_cost(pilot, seconds))


def measured_shift(
    lm: LoadedModel,
    pilot: Pilot,
    sae: Any,
    identity: dict[str, Any],
    examples: list[Encoded],
    batch_tokens: int,
) -> SourceStats:
    """Per latent (and residual dimension), Σ over the target's counted tokens of (f(pilot) - f(base))²,
    the same ids in both models, position by position. Cached like the feature passes (`identity`: model,
    SAE, layer, dtype) with the pilot's key."""
    layer = int(identity["layer"])

    def compute() -> Any:
        return run_pass(lm, sae, layer, examples, [], batch_tokens, "probe_act: target shift", other=pilot.loaded())

    result, _ = cached_pass(pass_key({**identity, "pilot": pilot.key}, examples, []), compute)
    assert result.shift is not None
    return result.shift


def probe_act_forecast(
    shift: SourceStats, sources: dict[str, SourceStats], k: int, raw: bool = False
) -> ForecastResult:
    """The `probe_act` scorer: the `act` formula (mean over a source's tokens of the sum of its shifted
    latents) with the top-k latents of the measured `shift`. `raw`: the same on residual dimensions."""
    part = "resid" if raw else "latents"
    latents, _ = sts.shifted_latents(getattr(shift, part), k)
    forecasts = {}
    for name, stats in sources.items():
        reduction = getattr(stats, part)
        value = sts.domain_score(reduction, stats.n_tokens, latents, "act")
        per_example = sts.example_scores(reduction, stats.example_tokens, latents, "act")
        forecasts[name] = Forecast(value, [float(x) for x in per_example], [int(t) for t in stats.example_tokens])
    return ForecastResult(forecasts, ScorerCost())


def pilot_cost(pilot: Pilot, loss_seconds: float) -> ScorerCost:
    """The scorer's cost, cached or not: the pilot's training (its record) plus the loss passes before and
    after it (`loss_seconds`, each kept with its cached losses)."""
    record = pilot.record
    return ScorerCost(record.seconds + loss_seconds, record.steps, record.tokens, record.seconds)
