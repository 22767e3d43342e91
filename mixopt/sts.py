"""STS: shifted latents and domain scores, as pure functions over the engine's reductions.

Notation (DESIGN.md section 3): f_j(t) is latent j of the SAE at token t; S the shifted latents.
- shift_j = sum over target queries and aligned tokens of (f_j(ICL) - f_j(zero-shot))^2; S = top-k.
- `act`    (paper's STS_act):      mean_t sum_{j in S} f_j(t)
- `act_sq` (released notebook's):  mean_{j in S} mean_t f_j(t)^2
- `icl`    (paper's STS_ICL):      mean_t sum_{j in S} (f_j(demos_D, x) - f_j(x))^2 over D's own queries
Baselines: `raw` (the same steps on residual dimensions), `similarity` (cosine of centered mean
residuals, domain vs target), `random` (the `act` formula on k random latents, averaged over seeds).
Any of act, act_sq, icl, raw and similarity can be the recipe's scorer (`sts.score`): the one the
solver reads. `mixopt validate --sweep` says which forecasts best on your data.
"""

from __future__ import annotations

import numpy as np
import torch

from mixopt.features import Reduction, SourceStats
from mixopt.files import text_digest


def shifted_latents(shift: Reduction, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, shift values) of the k latents that move most between ICL and zero-shot."""
    values, indices = torch.topk(shift.total, min(k, shift.total.numel()))
    return indices, values


def domain_score(reduction: Reduction, n_tokens: int, latents: torch.Tensor, variant: str) -> float:
    """STS of a source over latents S; `reduction` holds f (act, act_sq) or ICL squared shifts (icl)."""
    if variant == "act_sq":
        return float(reduction.total_sq[latents].mean() / n_tokens)
    return float(reduction.total[latents].sum() / n_tokens)  # act, and icl on the shift reduction


def latent_terms(reduction: Reduction, n_tokens: int, latents: torch.Tensor, variant: str) -> torch.Tensor:
    """(k,) each latent's term in `domain_score`, in the order of `latents`: they sum to the score (act,
    icl: mean over tokens of f_j; act_sq: mean over tokens of f_j^2, divided by k). What `explain` shows."""
    if variant == "act_sq":
        return reduction.total_sq[latents] / n_tokens / len(latents)
    return reduction.total[latents] / n_tokens


def example_scores(
    reduction: Reduction, example_tokens: torch.Tensor, latents: torch.Tensor, variant: str
) -> np.ndarray:
    """Each example's own score (same formula over its tokens); their token-weighted mean is the STS."""
    tokens = example_tokens.clamp(min=1).double()
    if variant == "act_sq":
        per = reduction.per_example_sq[:, latents].double().mean(1)
    else:
        per = reduction.per_example[:, latents].double().sum(1)
    return (per / tokens).numpy()


def mean_residual(stats: SourceStats) -> torch.Tensor:
    return stats.resid.total / max(stats.n_tokens, 1)


def centered_similarity(domain: torch.Tensor, target: torch.Tensor, grand_mean: torch.Tensor) -> float:
    """cos(mean_D - grand, mean_T - grand): without centering every text shares one big direction."""
    a, b = domain - grand_mean, target - grand_mean
    return float(torch.dot(a, b) / (a.norm() * b.norm()).clamp(min=1e-12))


def similarity_example_scores(stats: SourceStats, target: torch.Tensor, grand_mean: torch.Tensor) -> np.ndarray:
    """Each example's first-order share of `centered_similarity`: cos + g . (a_i - a), where a_i is the
    example's mean residual minus the grand mean, a the domain's, and g the gradient of cos(a, b) in a.
    Their token-weighted mean is the similarity exactly, so resampling them gives delta-method intervals."""
    a, b = (mean_residual(stats) - grand_mean).double(), (target - grand_mean).double()
    norm_a, norm_b = a.norm().clamp(min=1e-12), b.norm().clamp(min=1e-12)
    cos = torch.dot(a, b) / (norm_a * norm_b)
    gradient = b / (norm_a * norm_b) - cos * a / norm_a**2
    tokens = stats.example_tokens.clamp(min=1).double()
    a_i = stats.resid.per_example.double() / tokens[:, None] - grand_mean.double()  # (examples, d_model)
    return (cos + (a_i - a) @ gradient).numpy()


def random_latents(d_sae: int, k: int, seed: int) -> torch.Tensor:
    return torch.randperm(d_sae, generator=torch.Generator().manual_seed(seed))[:k]


def random_control(stats: SourceStats, k: int, seeds: int = 5) -> float:
    """`act` on k random latents, averaged over a few seeds: the floor any score must clear."""
    d_sae = stats.latents.total.numel()
    return float(
        np.mean([domain_score(stats.latents, stats.n_tokens, random_latents(d_sae, k, s), "act") for s in range(seeds)])
    )


def name_seed(seed: int, name: str) -> int:
    """A per-source seed from a content hash (the built-in string hash is salted per process)."""
    return int.from_bytes(text_digest(f"{seed}:{name}")[:4], "little")
