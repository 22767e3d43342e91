"""Small builders shared by the tests."""

from __future__ import annotations

from collections.abc import Sequence

from mixopt.scores import DomainScore, Scores

# ------------------------------------------------------------------------------------- solver helpers


def make_scores(
    sts: Sequence[float],
    available: int | Sequence[int] = 1_000,
    mean_tokens: float | Sequence[float] = 100.0,
    *,
    target_available: int = 100_000,
    target_mean_tokens: float = 100.0,
    example_scores: Sequence[Sequence[float]] | None = None,
) -> Scores:
    """A `Scores` with one domain per STS (named d0, d1, ...); mean_response_tokens = mean_tokens."""
    n = len(sts)
    avail = [available] * n if isinstance(available, int) else list(available)
    tokens = [float(mean_tokens)] * n if isinstance(mean_tokens, int | float) else [float(t) for t in mean_tokens]

    def domain(name: str, score: float, available: int, mean: float, examples: Sequence[float] = ()) -> DomainScore:
        return DomainScore(
            name=name, score=float(score), baseline=0.0, similarity=0.0, tokens=round(mean * available),
            examples=available, available=available, mean_tokens=mean, mean_response_tokens=mean,
            example_scores=[float(x) for x in examples], example_tokens=[round(mean)] * len(examples),
        )  # fmt: skip

    examples = example_scores or [()] * n
    return Scores(
        recipe_sha256="0" * 64, model="test", sae="test", layer=0, top_k=10, score="act", shifted_latents=[],
        target=domain("target", 1.0, target_available, target_mean_tokens),
        domains=[domain(f"d{j}", sts[j], avail[j], tokens[j], examples[j]) for j in range(n)],
    )  # fmt: skip
