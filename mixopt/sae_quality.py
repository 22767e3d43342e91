"""How good a trained SAE is, on held-out activations: reconstruction, sparsity, dead and dense latents,
and an offline interpretability proxy (monosemanticity) from the source label of each held-out token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mixopt.sae_data import Activations

DENSE_RATE = 0.10  # a latent firing on more than this share of tokens is "dense" (not a feature, a bias)
TOP_EXAMPLES = 20  # monosemanticity: top-activating examples per latent
CHANCE_DRAWS = 2000  # random draws for the chance level of monosemanticity


@dataclass
class Reconstruction:
    explained_variance: float  # 1 - sum ||x - x_hat||^2 / sum ||x - mean||^2
    normalized_mse: float  # sum ||x - x_hat||^2 / sum ||x||^2
    mean_l0: float  # active latents per token
    dead_fraction: float  # latents that never fire
    dense_fraction: float  # latents that fire on > DENSE_RATE of tokens


@dataclass
class Monosemanticity:
    """For each latent with >= TOP_EXAMPLES firing examples: its TOP_EXAMPLES highest-activating examples
    (one activation per example, its maximum), and the share of them from the most common source label
    (an MMLU subject, GSM8K, a quickstart topic). Averaged over those latents; `chance` is the same share
    for TOP_EXAMPLES examples drawn at random, so monosemanticity well above chance means latents pick
    out a subject or source."""

    monosemanticity: float
    monosemanticity_chance: float
    monosemanticity_latents: int  # latents with enough firing examples to count


def reconstruction(sae: object, acts: torch.Tensor, batch: int = 8192) -> Reconstruction:
    """How well `sae` (a sae_lens.SAE) reconstructs activations (tokens, d_in), and how sparsely."""
    return encode_all(sae, acts, batch)[0]


@torch.no_grad()
def encode_all(sae: object, acts: torch.Tensor, batch: int = 8192) -> tuple[Reconstruction, np.ndarray]:
    """Reconstruction metrics and every firing as (token, latent, activation) rows."""
    err = total = raw = l0 = 0.0
    d_sae = sae.cfg.d_sae  # type: ignore[attr-defined]
    fires = torch.zeros(d_sae, dtype=torch.long)
    mean = sum(chunk.float().sum(0) for chunk in acts.split(batch)) / len(acts)
    rows = []
    for start in range(0, len(acts), batch):
        x = acts[start : start + batch].float()
        feats = sae.encode(x)  # type: ignore[attr-defined]  # (batch, d_sae)
        x_hat = sae.decode(feats)  # type: ignore[attr-defined]
        err += (x - x_hat).pow(2).sum().item()
        total += (x - mean).pow(2).sum().item()
        raw += x.pow(2).sum().item()
        active = feats > 0
        l0 += active.sum().item()
        fires += active.sum(0)
        token, latent = active.nonzero(as_tuple=True)
        rows.append(np.stack([(token + start).numpy(), latent.numpy(), feats[token, latent].numpy()], axis=1))
    rate = fires.float() / len(acts)
    metrics = Reconstruction(
        explained_variance=1 - err / total,
        normalized_mse=err / raw,
        mean_l0=l0 / len(acts),
        dead_fraction=(fires == 0).float().mean().item(),
        dense_fraction=(rate > DENSE_RATE).float().mean().item(),
    )
    return metrics, np.concatenate(rows) if rows else np.zeros((0, 3))


def monosemanticity(firings: np.ndarray, examples: np.ndarray, labels: np.ndarray, seed: int = 0) -> Monosemanticity:
    """`firings`: (n, 3) rows of (token, latent, activation); `examples`, `labels`: per token."""
    token = firings[:, 0].astype(np.int64)
    latent = firings[:, 1].astype(np.int64)
    value = firings[:, 2]
    example = examples[token].astype(np.int64)
    # one row per (latent, example): the example's highest activation of the latent
    order = np.lexsort((-value, example, latent))
    latent, example, value = latent[order], example[order], value[order]
    first = np.ones(len(order), dtype=bool)
    first[1:] = (latent[1:] != latent[:-1]) | (example[1:] != example[:-1])
    latent, example, value = latent[first], example[first], value[first]
    # rank each latent's examples by activation; keep the top TOP_EXAMPLES
    order = np.lexsort((example, -value, latent))
    latent, example = latent[order], example[order]
    starts = np.searchsorted(latent, latent, side="left")
    rank = np.arange(len(latent)) - starts
    top = rank < TOP_EXAMPLES
    latent, example = latent[top], example[top]
    label_of_example = np.zeros(examples.max() + 1 if len(examples) else 1, dtype=np.int64)
    label_of_example[examples] = labels
    counts = np.zeros((latent.max() + 1 if len(latent) else 1, int(labels.max(initial=0)) + 1), dtype=np.int64)
    np.add.at(counts, (latent, label_of_example[example]), 1)
    full = counts.sum(1) == TOP_EXAMPLES
    shares = counts[full].max(1) / TOP_EXAMPLES
    # chance: the same share for TOP_EXAMPLES distinct held-out examples drawn at random
    held = np.unique(examples)
    rng = np.random.default_rng(seed)
    k = min(TOP_EXAMPLES, len(held))
    draws = [np.bincount(label_of_example[rng.choice(held, k, replace=False)]).max() / k for _ in range(CHANCE_DRAWS)]
    return Monosemanticity(
        monosemanticity=float(shares.mean()) if full.any() else float("nan"),
        monosemanticity_chance=float(np.mean(draws)),
        monosemanticity_latents=int(full.sum()),
    )


def measure_quality(sae: object, data: Activations, batch: int = 8192) -> tuple[Reconstruction, Monosemanticity]:
    """Quality of `sae` (a sae_lens.SAE) on held-out activations with their source labels."""
    metrics, firings = encode_all(sae, data.acts, batch)
    return metrics, monosemanticity(firings, data.examples, data.labels)
