"""SAE: load a sparse autoencoder with sae-lens, check it fits the model, and train one from a recipe.

Loading: a local folder in sae-lens format (`cfg.json` + `sae_weights.safetensors`), a built-in alias
(an SAE shipped inside mixopt), or a sae-lens `release` + `id` (same code path, needs the hub).
Training (`mixopt sae train`): activations from our own truncated forward pass are collected once into
resumable on-disk shards, then sae-lens's `SAETrainer` fits the SAE on them with checkpoints.
`import sae_lens` costs ~5 s (it imports transformer_lens), so it happens only inside these functions.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from mixopt.artifacts import (
    ModelShape,
    SAEShape,
    cache_dir,
    fit_problems,
    hub_offline,
    require_hub,
    resolve_sae_dir,
    sae_shape,
)
from mixopt.batching import length_batches, pad_right
from mixopt.encoding import Encoded, encode_chat, encode_text
from mixopt.errors import SAEError
from mixopt.files import Digest, atomic_write, files_fingerprint
from mixopt.model import LoadedModel, check_layer, load_model, residual_stream
from mixopt.quiet import quiet_libraries
from mixopt.recipe import SAESpec, SAETrainRecipe
from mixopt.sources import check_columns, describe, load_source, render


def sae_identity(spec: SAESpec, base_dir: Path) -> str:
    if not spec.present:
        return "none"  # the residual stream alone (a recipe whose scorer reads no latents)
    folder = resolve_sae_dir(spec, base_dir)
    if folder is None:
        return f"{spec.release}/{spec.id}"
    return f"{spec.path}:{files_fingerprint(sorted(folder.iterdir()))}"


def load_sae(spec: SAESpec, base_dir: Path, device: torch.device) -> Any:
    """Load the recipe's SAE (a sae_lens.SAE) in float32 on `device`, ready to `encode`."""
    from sae_lens import SAE

    folder = resolve_sae_dir(spec, base_dir)
    sae_shape(spec, base_dir)  # cfg.json against the weights' shapes: one clear line before sae-lens tries
    if folder is None and not hub_offline():
        require_hub(f"SAE {spec.release}/{spec.id}", SAEError)
    try:
        with quiet_libraries():
            if folder is not None:
                sae = SAE.load_from_disk(folder, device=str(device), dtype="float32")
            else:
                sae = SAE.from_pretrained(spec.release, spec.id, device=str(device))
    except Exception as err:  # sae-lens raises many types for a bad folder or an unknown id
        message = " ".join(str(err).split())  # the whole message: its first line ends at a colon
        raise SAEError(f"cannot load SAE {spec.path or f'{spec.release}/{spec.id}'}: {message}") from None
    return sae.eval()


def check_sae(sae: Any, lm: LoadedModel, layer: int) -> None:
    """Fail with one line if the SAE cannot read the model's residual stream at `layer`."""
    check_layer(lm.model, layer)
    shape = SAEShape(int(sae.cfg.d_in), sae.cfg.metadata.get("hook_name"))
    if problems := fit_problems(ModelShape(lm.n_layers, lm.hidden_size, lm.name), shape, layer, "sae.layer"):
        raise SAEError(problems[0][1])


# ---------------------------------------------------------------- training


def corpus_encodings(recipe: SAETrainRecipe, lm: LoadedModel) -> list[Encoded]:
    """Every corpus example encoded, interleaved in a seeded order so any prefix mixes all sources."""
    encoded: list[Encoded] = []
    for i, corpus in enumerate(recipe.data):
        ds = load_source(corpus.source, recipe.base_dir, corpus.max_examples)
        check_columns(ds, corpus, f"data.{i} ({describe(corpus.source)})")
        rows = render(ds.select(range(min(len(ds), corpus.max_examples or len(ds)))), corpus)
        max_len = recipe.training.max_length
        for row in rows:
            encoded.append(
                encode_chat(lm.tokenizer, row["prompt"], row["response"], max_len, lm.format)
                if corpus.is_chat
                else encode_text(lm.tokenizer, row["text"], max_len, lm.format)
            )
    order = np.random.default_rng(recipe.seed).permutation(len(encoded))
    return [encoded[i] for i in order]


def activation_key(recipe: SAETrainRecipe, lm: LoadedModel) -> str:
    """Activations depend on model, layer, corpus and limits, not on the SAE's shape: a sweep reuses them."""
    fields = {
        "model": lm.identity,
        "layer": recipe.layer,
        "data": [d.model_dump(mode="json") for d in recipe.data],
        "base": str(recipe.base_dir),
        "seed": recipe.seed,
        "max_length": recipe.training.max_length,
    }  # not `tokens`: a longer run extends the same stream
    return Digest().add(fields).hex(16)


@dataclass
class ActivationShards:
    """Residual activations on disk: fp16 `.npy` shards written one forward batch group at a time."""

    folder: Path

    def shards(self) -> list[Path]:
        return sorted(self.folder.glob("shard_*.npy"))

    def progress(self) -> dict[str, int]:
        path = self.folder / "progress.json"
        return json.loads(path.read_text()) if path.exists() else {"examples": 0, "tokens": 0}

    def append(self, acts: np.ndarray, examples: int, tokens: int) -> None:
        name = self.folder / f"shard_{len(self.shards()):05d}.npy"
        half = acts.astype(np.float16)
        atomic_write(name, lambda tmp: np.save(tmp.open("wb"), half))
        # progress is written after the shard, so a crash between the two only repeats one shard's work
        (self.folder / "progress.json").write_text(json.dumps({"examples": examples, "tokens": tokens}))

    def load(self) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([np.load(p) for p in self.shards()]))


def collect_activations(
    recipe: SAETrainRecipe, lm: LoadedModel, encoded: list[Encoded], store: ActivationShards
) -> None:
    """Run the truncated forward over the corpus until `training.tokens` activations are on disk (resumes)."""
    done = store.progress()
    total = recipe.training.tokens
    bar = tqdm(total=total, initial=min(done["tokens"], total), unit="tok", unit_scale=True, desc="activations")
    start = done["examples"]
    chunk = 256  # examples per shard: small enough to lose little on a crash
    while done["tokens"] < total and start < len(encoded):
        group = encoded[start : start + chunk]
        acts = []
        for batch in length_batches([len(e) for e in group], recipe.training.batch_tokens):
            ids, mask = pad_right([group[i].ids for i in batch], lm.tokenizer.pad_token_id or 0, lm.device)
            resid = residual_stream(lm.model, ids, mask, recipe.layer)  # (batch, seq, d_model)
            counted = torch.zeros_like(mask, dtype=torch.bool)
            for b, i in enumerate(batch):
                counted[b, : len(group[i])] = torch.tensor(group[i].counted)
            acts.append(resid[counted].float().cpu().numpy())
        block = np.concatenate(acts)
        start += len(group)
        done = {"examples": start, "tokens": done["tokens"] + len(block)}
        store.append(block, **done)
        bar.update(len(block))
    bar.close()


@dataclass
class SAEQuality:
    explained_variance: float  # 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2, on held-out activations
    normalized_mse: float  # sum ||x - x_hat||^2 / sum ||x||^2
    mean_l0: float  # active latents per token
    dead_fraction: float  # latents that never fire on held-out activations
    tokens_train: int
    tokens_heldout: int
    d_in: int
    d_sae: int
    architecture: str
    layer: int
    wall_seconds: float


@torch.no_grad()
def measure_quality(sae: Any, acts: torch.Tensor, batch: int = 8192) -> dict[str, float]:
    """Reconstruction and sparsity of `sae` on activations (n, d_in)."""
    err = total = raw = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    mean = acts.float().mean(0)
    for chunk in acts.split(batch):
        x = chunk.float()
        feats = sae.encode(x)
        x_hat = sae.decode(feats)
        err += (x - x_hat).pow(2).sum().item()
        total += (x - mean).pow(2).sum().item()
        raw += x.pow(2).sum().item()
        l0 += (feats > 0).sum().item()
        fired |= (feats > 0).any(0)
    return {
        "explained_variance": 1 - err / total,
        "normalized_mse": err / raw,
        "mean_l0": l0 / len(acts),
        "dead_fraction": 1 - fired.float().mean().item(),
    }


def _batches(acts: torch.Tensor, batch_size: int, seed: int, skip: int) -> Iterator[torch.Tensor]:
    """Infinite shuffled batches; `skip` batches are dropped so a resumed run sees the same stream."""
    epoch, served = 0, 0
    while True:
        order = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(acts) - batch_size + 1, batch_size):
            served += 1
            if served > skip:
                yield acts[order[start : start + batch_size]].float()
        epoch += 1


def _training_sae(recipe: SAETrainRecipe, d_in: int) -> Any:
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig

    # sae-lens estimates a scale that brings inputs to norm sqrt(d_in), and folds it back in on save.
    common = {"d_in": d_in, "d_sae": recipe.sae.d_sae, "normalize_activations": "expected_average_only_in"}
    if recipe.sae.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=recipe.sae.k, **common))
    return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=recipe.sae.l1_coefficient, **common))


def fit_sae(recipe: SAETrainRecipe, acts: torch.Tensor, work: Path) -> Any:
    """Train with sae-lens's SAETrainer on in-memory activations; resumes from the last checkpoint."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(recipe.seed)
    t = recipe.training
    total = int(t.epochs * len(acts)) // t.batch_size * t.batch_size
    cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=t.batch_size,
        lr=t.lr,
        lr_end=t.lr / 10,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, total // t.batch_size // 10),
        n_checkpoints=t.checkpoints,
        checkpoint_path=str(work / "checkpoints"),
        n_batches_for_norm_estimate=50,
        dead_feature_window=max(50, total // t.batch_size // 10),
        feature_sampling_window=10**9,
    )
    sae = _training_sae(recipe, acts.shape[1])
    checkpoints = sorted((work / "checkpoints").glob("*/trainer_state.pt"), key=lambda p: p.stat().st_mtime)
    skip = 0
    if checkpoints:  # resume: weights, optimizer, scheduler and counters from the newest checkpoint
        latest = checkpoints[-1].parent
        sae = type(sae).load_from_disk(latest)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=_batches(acts, t.batch_size, recipe.seed, 0))
    if checkpoints:
        trainer.load_trainer_state(latest)
        skip = trainer.n_training_steps
        trainer.data_provider = _batches(acts, t.batch_size, recipe.seed, skip)
        print(
            f"resuming SAE training from {latest.name} ({trainer.n_training_samples:,} samples done)", file=sys.stderr
        )
    return trainer.fit()


def train_sae(recipe: SAETrainRecipe) -> SAEQuality:
    """`mixopt sae train`: collect activations (resumable), fit, write the SAE + quality.json atomically."""
    started = time.perf_counter()
    lm = load_model(recipe.model, recipe.base_dir)
    check_layer(lm.model, recipe.layer)
    work = cache_dir() / "sae-train" / recipe.sha256()[:16]
    store = ActivationShards(cache_dir() / "activations" / activation_key(recipe, lm))
    store.folder.mkdir(parents=True, exist_ok=True)
    if store.progress()["tokens"] < recipe.training.tokens:
        collect_activations(recipe, lm, corpus_encodings(recipe, lm), store)
    acts = store.load()
    n_heldout = max(1, math.ceil(len(acts) * recipe.training.holdout))
    train, heldout = acts[:-n_heldout], acts[-n_heldout:]
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the quality JSON only (sae-lens prints)
        sae = fit_sae(recipe, train, work)

    from sae_lens import SAE

    out = (recipe.base_dir / recipe.output).resolve()
    staged = out.with_name(out.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    sae.cfg.metadata.hook_name = f"blocks.{recipe.layer}.hook_resid_post"
    sae.cfg.metadata.model_name = recipe.model.path
    sae.save_inference_model(staged)
    inference = SAE.load_from_disk(staged, dtype="float32")
    quality = SAEQuality(
        **measure_quality(inference, heldout),
        tokens_train=len(train),
        tokens_heldout=len(heldout),
        d_in=acts.shape[1],
        d_sae=recipe.sae.d_sae,
        architecture=recipe.sae.architecture,
        layer=recipe.layer,
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    _to_fp16(staged)
    (staged / "quality.json").write_text(json.dumps(asdict(quality), indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staged, out)
    return quality


def _to_fp16(folder: Path) -> None:
    """Store weights in fp16 (half the size to ship); `load_sae` upcasts to fp32 for scoring."""
    from safetensors.torch import load_file, save_file

    weights = folder / "sae_weights.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, weights)
