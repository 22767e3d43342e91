"""SAE: load a sparse autoencoder with sae-lens, check it fits the model, and train one from a recipe.

Loading: a local folder in sae-lens format (`cfg.json` + `sae_weights.safetensors`), a built-in alias
(an SAE shipped inside mixopt), or a sae-lens `release` + `id` (same code path, needs the hub).
Training (`mixopt sae train`): activations from our own truncated forward pass are collected once into
resumable, extendable on-disk shards (`sae_data`), then sae-lens's `SAETrainer` fits the SAE on them with
checkpoints, and `sae_quality` measures it on held-out examples.
`import sae_lens` costs ~5 s (it imports transformer_lens), so it happens only inside these functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

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
from mixopt.errors import SAEError
from mixopt.files import files_fingerprint, write_json
from mixopt.model import LoadedModel, check_layer, load_model, resolve_model_source
from mixopt.quiet import quiet_libraries
from mixopt.recipe import SAESpec, SAETrainRecipe
from mixopt.sae_data import ActivationStore, activation_key, collect_activations, corpus_encodings
from mixopt.sae_quality import measure_quality


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


@dataclass
class SAEQuality:
    """quality.json: the SAE on held-out activations (sae_quality), with what it was trained on and how."""

    explained_variance: float  # 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2
    normalized_mse: float  # sum ||x - x_hat||^2 / sum ||x||^2
    mean_l0: float  # active latents per token
    dead_fraction: float  # latents that never fire on held-out activations
    dense_fraction: float  # latents that fire on > 10% of held-out tokens
    monosemanticity: float  # top-20 examples of a latent: share from its most common source/subject, mean
    monosemanticity_chance: float  # the same share for 20 random held-out examples
    monosemanticity_latents: int  # latents with >= 20 firing held-out examples (the mean's latents)
    tokens_train: int
    tokens_heldout: int
    d_in: int
    d_sae: int
    architecture: str
    k: int | None
    aux_k_coefficient: float | None
    epochs: float
    lr: float
    dead_tokens: int  # the aux-k loss's dead-latent window, in training tokens
    layer: int
    wall_seconds: float


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
        config = TopKTrainingSAEConfig(k=recipe.sae.k, aux_loss_coefficient=recipe.sae.aux_k_coefficient, **common)
        return TopKTrainingSAE(config)
    return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=recipe.sae.l1_coefficient, **common))


def training_steps(recipe: SAETrainRecipe, n_train: int) -> tuple[int, int]:
    """(total training samples, dead-latent window in steps) for `n_train` training activations."""
    t = recipe.training
    total = int(t.epochs * n_train) // t.batch_size * t.batch_size
    steps = total // t.batch_size
    window = max(1, t.dead_tokens // t.batch_size) if t.dead_tokens else max(50, steps // 10)
    return total, window


NORM_BATCHES = 50  # batches sae-lens reads to estimate the activation scale, before the first step


def fit_sae(recipe: SAETrainRecipe, acts: torch.Tensor, work: Path) -> Any:
    """Train with sae-lens's SAETrainer on in-memory activations; resumes from the last checkpoint with
    the same result as an uninterrupted run (same weights, optimizer, counters and batch stream)."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(recipe.seed)
    t = recipe.training
    total, window = training_steps(recipe, len(acts))
    cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=t.batch_size,
        lr=t.lr,
        lr_end=t.lr * t.lr_end_fraction,
        lr_scheduler_name="cosineannealing",
        lr_warm_up_steps=min(100, total // t.batch_size // 10),
        n_checkpoints=t.checkpoints,
        checkpoint_path=str(work / "checkpoints"),
        n_batches_for_norm_estimate=NORM_BATCHES,
        dead_feature_window=window,
        feature_sampling_window=10**9,
    )
    sae = _training_sae(recipe, acts.shape[1])
    latest = latest_checkpoint(work / "checkpoints")
    if latest is not None:  # resume: weights, optimizer, scheduler, scale and counters
        sae = type(sae).load_from_disk(latest)
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=_batches(acts, t.batch_size, recipe.seed, 0))
    if latest is not None:
        trainer.load_trainer_state(latest)
        # sae-lens (6.54) saves the state before it counts the step just taken: count from the samples
        trainer.n_training_steps = trainer.n_training_samples // t.batch_size
        # the fresh run drew NORM_BATCHES batches for the scale estimate before its first step
        skip = trainer.n_training_steps + (NORM_BATCHES if sae.cfg.normalize_activations != "none" else 0)
        trainer.data_provider = _batches(acts, t.batch_size, recipe.seed, skip)
        print(
            f"resuming SAE training from {latest.name} ({trainer.n_training_samples:,} samples done)", file=sys.stderr
        )
    return trainer.fit()


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the most training samples (sae-lens names them by that count)."""
    done = [p.parent for p in folder.glob("*/trainer_state.pt")]
    return max(done, key=lambda p: int(p.name.rsplit("_", 1)[-1]), default=None)


def work_dir(recipe: SAETrainRecipe) -> Path:
    """Checkpoints of this recipe's training run (its content decides: a changed knob starts afresh)."""
    return cache_dir() / "sae-train" / recipe.sha256()[:16]


def cached_activations(recipe: SAETrainRecipe, lm: LoadedModel | None = None) -> ActivationStore:
    """The recipe's activation cache, collected or extended first if it falls short (resumes). The model
    is loaded only to collect: the cache's key needs its fingerprint, not its weights."""
    identity = lm.identity if lm else resolve_model_source(recipe.model, recipe.base_dir)[1]
    store = ActivationStore(cache_dir() / "activations" / activation_key(recipe, identity))
    store.folder.mkdir(parents=True, exist_ok=True)
    with FileLock(store.folder / ".collect.lock"):  # a second run on the same cache waits, then reuses it
        if not store.complete(recipe.layers, recipe.training.tokens):
            lm = lm or load_model(recipe.model, recipe.base_dir)
            for layer in recipe.layers:
                check_layer(lm.model, layer)
            collect_activations(recipe, lm, corpus_encodings(recipe, lm), store)
    return store


def train_sae(recipe: SAETrainRecipe) -> SAEQuality:
    """`mixopt sae train`: collect activations (resumable), fit, write the SAE + quality.json atomically."""
    started = time.perf_counter()
    store = cached_activations(recipe)
    train, heldout = store.load(recipe.layer, recipe.training.tokens, recipe.training.holdout)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the quality JSON only (sae-lens prints)
        sae = fit_sae(recipe, train.acts, work_dir(recipe))

    from sae_lens import SAE

    out = (recipe.base_dir / recipe.output).resolve()
    staged = out.with_name(out.name + ".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    sae.cfg.metadata.hook_name = f"blocks.{recipe.layer}.hook_resid_post"
    sae.cfg.metadata.model_name = recipe.model.path
    sae.save_inference_model(staged)
    _to_fp16(staged)
    inference = SAE.load_from_disk(staged, dtype="float32")  # measured as shipped: fp16 weights
    reconstruction, mono = measure_quality(inference, heldout)
    topk = recipe.sae.architecture == "topk"
    quality = SAEQuality(
        **asdict(reconstruction),
        **asdict(mono),
        tokens_train=len(train),
        tokens_heldout=len(heldout),
        d_in=train.acts.shape[1],
        d_sae=recipe.sae.d_sae,
        architecture=recipe.sae.architecture,
        k=recipe.sae.k if topk else None,
        aux_k_coefficient=recipe.sae.aux_k_coefficient if topk else None,
        epochs=recipe.training.epochs,
        lr=recipe.training.lr,
        dead_tokens=training_steps(recipe, len(train))[1] * recipe.training.batch_size,
        layer=recipe.layer,
        wall_seconds=round(time.perf_counter() - started, 1),
    )
    write_json(staged / "quality.json", asdict(quality))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staged, out)
    return quality


def _to_fp16(folder: Path) -> None:
    """Store weights in fp16 (half the size to ship); `load_sae` upcasts to fp32 for scoring."""
    from safetensors.torch import load_file, save_file

    weights = folder / "sae_weights.safetensors"
    save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, weights)
