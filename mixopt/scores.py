"""Scores: the record `mixopt score` writes (`scores.json`) and `mixopt solve` reads.

A plain dataclass with no torch import, so the solver and recipe checks stay fast.

Example:
    >>> scores = Scores.load("runs/quickstart/scores.json")             # doctest: +SKIP
    >>> [(d.name, round(d.sts, 3)) for d in scores.ranked()][:3]       # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mixopt.files import write_json


@dataclass
class DomainScore:
    name: str
    sts: float  # the recipe's STS variant (`score`)
    baseline: float  # the same steps on raw residual dimensions
    similarity: float  # centered representation similarity, domain vs target
    tokens: int  # tokens scored
    examples: int  # examples scored
    available: int  # examples the source offers (after max_examples)
    mean_tokens: float  # mean tokens per example, everything the trainer sees
    mean_response_tokens: float  # mean loss-bearing tokens per example (response only; = mean_tokens for text)
    stderr: float | None = None  # standard error of `sts` over examples
    interval: list[float] | None = None  # bootstrap 95% interval of `sts`
    example_scores: list[float] = field(default_factory=list)  # each scored example's own score
    example_tokens: list[int] = field(default_factory=list)  # its token count (weights for the mean)
    variants: dict[str, float] = field(default_factory=dict)  # every score computed, by name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainScore:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


SIGNED_SCORERS = ("probe", "grad")  # forecasts of a signed loss change (positive = worse); the rest are magnitudes


@dataclass
class Forecast:
    """What a forecasting scorer says about one source: its value, and each scored example's own value,
    whose mean weighted by `example_tokens` is `value` (the intervals and the solver's bootstrap resample them)."""

    value: float
    example_values: list[float]
    example_tokens: list[int]


@dataclass
class Transfer:
    """Domain x domain matrix of normalised inner products (cosines) of the domains' loss gradients: how
    much a step on domain i's data moves domain j's loss (the `protect` objective's T). Rows and columns
    follow `domains`."""

    domains: list[str]
    matrix: list[list[float]]


@dataclass
class ScorerCost:
    """What a forecast cost, to weigh it against the fine-tune it forecasts (same machine)."""

    seconds: float = 0.0  # wall time of this run's scorer work (near 0 when it came from the cache)
    train_steps: int = 0  # optimizer steps of the pilot fine-tune (probe, probe_act)
    train_tokens: int = 0  # loss-bearing tokens the pilot trained on
    train_seconds: float = 0.0  # the pilot's training wall time (kept with its cached results)
    backward_tokens: int = 0  # tokens through a forward and backward pass (grad)


@dataclass
class ForecastResult:
    """A forecasting scorer's output: a Forecast per source (the domains and the target) and, where the
    scorer has one, the domains' transfer matrix."""

    sources: dict[str, Forecast]
    cost: ScorerCost
    transfer: Transfer | None = None


@dataclass
class Scores:
    recipe_sha256: str
    model: str
    sae: str
    layer: int
    top_k: int
    score: str  # the scorer in `DomainScore.sts` (signed for SIGNED_SCORERS)
    shifted_latents: list[dict[str, float]]  # [{index, shift}], largest shift first (probe_act: the measured shift)
    target: DomainScore  # the fine-tuning data itself (sts = its own score)
    domains: list[DomainScore]
    transfer: Transfer | None = None  # gradient cosines between domains (`grad`)
    cost: ScorerCost | None = None  # what the forecast cost (probe, grad, probe_act)

    @property
    def signed(self) -> bool:
        return self.score in SIGNED_SCORERS

    def ranked(self) -> list[DomainScore]:
        """Domains by STS, most exposed first."""
        return sorted(self.domains, key=lambda d: d.sts, reverse=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scores:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["target"] = DomainScore.from_dict(data["target"])
        data["domains"] = [DomainScore.from_dict(d) for d in data["domains"]]
        if data.get("transfer") is not None:
            data["transfer"] = Transfer(**data["transfer"])
        if data.get("cost") is not None:
            data["cost"] = ScorerCost(**data["cost"])
        return cls(**data)

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (a temp file renamed into place)."""
        write_json(Path(path), self.to_dict())

    def table(self) -> str:
        """Shifted latents, then domains by the recipe's score with baselines and uncertainty, as plain text."""
        label = f"score({self.score})"
        width = max(12, len(label))
        top = ", ".join(f"{s['index']}({s['shift']:.3g})" for s in self.shifted_latents[:10])
        lines = [
            f"shifted latents (top {self.top_k} of layer {self.layer}; first 10 with shift): {top}",
            "",
            f"{'domain':<24} {label:>{width}} {'95% interval':>21} {'raw':>10} "
            f"{'similarity':>10} {'tokens':>8} {'examples':>8} {'available':>9}",
        ]
        for d in [*self.ranked(), self.target]:
            lo, hi = d.interval or [float("nan")] * 2
            name = f"{d.name} (target)" if d is self.target else d.name
            lines.append(
                f"{name:<24} {d.sts:>{width}.4g} [{lo:>9.4g},{hi:>9.4g}] {d.baseline:>10.4g} "
                f"{d.similarity:>10.3f} {d.tokens:>8} {d.examples:>8} {d.available:>9}"
            )
        if self.signed:
            lines.append(f"\n{self.score}: forecast change of each domain's response-token loss (positive = worse)")
        if self.cost is not None:
            c = self.cost
            pilot = f"; pilot fine-tune {c.train_steps} steps, {c.train_tokens:,} tokens, {c.train_seconds:.1f} s"
            lines.append(
                f"cost of {self.score}: {c.seconds:.1f} s this run"
                + (pilot if c.train_steps else "")
                + (f"; {c.backward_tokens:,} tokens through backward" if c.backward_tokens else "")
            )
        return "\n".join(lines)

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        from mixopt.errors import MixoptError

        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MixoptError(f"{path}: not a mixopt scores file ({err}); make one with `mixopt score`") from None
