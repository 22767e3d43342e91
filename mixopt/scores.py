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


@dataclass
class Scores:
    recipe_sha256: str
    model: str
    sae: str
    layer: int
    top_k: int
    score: str  # the STS variant in `DomainScore.sts`
    shifted_latents: list[dict[str, float]]  # [{index, shift}], largest shift first
    target: DomainScore  # the fine-tuning data itself (sts = its own score)
    domains: list[DomainScore]

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
        return "\n".join(lines)

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read and validate a scores file: every field of the right type, each domain once."""
        from pydantic import TypeAdapter, ValidationError

        from mixopt.errors import MixoptError

        try:
            scores = TypeAdapter(cls).validate_python(json.loads(Path(path).read_text(encoding="utf-8")))
        except ValidationError as err:  # e.g. `[]`, `"sts": null`, `"sts": "high"`
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"])) or "(root)"
            message = f"{where}: {first['msg']}"
            raise MixoptError(f"{path}: not a mixopt scores file ({message}); make one with `mixopt score`") from None
        except (OSError, ValueError) as err:
            raise MixoptError(f"{path}: not a mixopt scores file ({err}); make one with `mixopt score`") from None
        names = [d.name for d in scores.domains]
        if repeated := next((n for n in names if names.count(n) > 1), None):
            raise MixoptError(
                f"{path}: domain '{repeated}' is listed {names.count(repeated)} times; each domain may appear once "
                "(re-run `mixopt score`)"
            )
        return scores
