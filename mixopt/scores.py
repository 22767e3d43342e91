"""Scores: the record `mixopt score` writes (`scores.json`) and `mixopt solve` reads.

A plain dataclass with no torch import, so the solver and recipe checks stay fast.

Example:
    >>> scores = Scores.load("runs/quickstart/scores.json")             # doctest: +SKIP
    >>> [(d.name, round(d.score, 3)) for d in scores.ranked()][:3]       # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

from mixopt.files import write_json

SCORES_VERSION = 2  # 2: DomainScore.sts renamed `score` (it holds the recipe's scorer); 1 is still read


@dataclass(frozen=True)
class Scorer:
    """One forecast of how much a fine-tune moves a domain (DESIGN.md sections 3 and 3b)."""

    name: str  # recipe `sts.score` and the name in every report
    key: str  # its value's key in `DomainScore.variants`
    baseline: str  # the `variants` key of the same steps on raw residual dimensions (the tables' raw column)
    sts: bool  # an STS variant: validation reports its partial correlation given `similarity`
    reads_shift: bool  # depends on the shifted latents, so k and m move it (the validation sweep)
    selectable: bool = True  # a recipe may allocate by it (`random` is a control, never a forecast)


# THE list of scorers: recipes, pipeline, validation and sweep all read it.
SCORERS: dict[str, Scorer] = {
    s.name: s
    for s in (
        Scorer("act", "act", "raw_act", sts=True, reads_shift=True),
        Scorer("act_sq", "act_sq", "raw_act_sq", sts=True, reads_shift=True),
        Scorer("icl", "icl", "raw_icl", sts=True, reads_shift=True),
        Scorer("raw", "raw_act", "raw_act", sts=False, reads_shift=True),
        Scorer("similarity", "similarity", "raw_act", sts=False, reads_shift=False),
        Scorer("random", "random", "raw_act", sts=False, reads_shift=False, selectable=False),
    )
}
ScorerName = Literal["act", "act_sq", "icl", "raw", "similarity"]  # the selectable ones, for the recipe schema
assert set(get_args(ScorerName)) == {s.name for s in SCORERS.values() if s.selectable}


@dataclass
class DomainScore:
    name: str
    score: float  # the recipe's scorer (`Scores.score`: an STS variant or a baseline)
    baseline: float  # the same steps on raw residual dimensions
    similarity: float  # centered representation similarity, domain vs target
    tokens: int  # tokens scored
    examples: int  # examples scored
    available: int  # examples the source offers (after max_examples)
    mean_tokens: float  # mean tokens per example, everything the trainer sees
    mean_response_tokens: float  # mean loss-bearing tokens per example (response only; = mean_tokens for text)
    stderr: float | None = None  # standard error of `score` over examples
    interval: list[float] | None = None  # bootstrap 95% interval of `score`
    example_scores: list[float] = field(default_factory=list)  # each scored example's own score
    example_tokens: list[int] = field(default_factory=list)  # its token count (weights for the mean)
    variants: dict[str, float] = field(default_factory=dict)  # every score computed, by name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainScore:
        if "score" not in data and "sts" in data:  # scores.json version 1
            data = {**data, "score": data["sts"]}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Scores:
    recipe_sha256: str
    model: str
    sae: str
    layer: int
    top_k: int
    score: str  # the scorer in `DomainScore.score` (a key of SCORERS)
    shifted_latents: list[dict[str, float]]  # [{index, shift}], largest shift first
    target: DomainScore  # the fine-tuning data itself (sts = its own score)
    domains: list[DomainScore]
    version: int = SCORES_VERSION

    def ranked(self) -> list[DomainScore]:
        """Domains by score, most exposed first."""
        return sorted(self.domains, key=lambda d: d.score, reverse=True)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scores:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["version"] = SCORES_VERSION  # read in the current form
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
                f"{name:<24} {d.score:>{width}.4g} [{lo:>9.4g},{hi:>9.4g}] {d.baseline:>10.4g} "
                f"{d.similarity:>10.3f} {d.tokens:>8} {d.examples:>8} {d.available:>9}"
            )
        return "\n".join(lines)

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        from mixopt.errors import MixoptError

        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MixoptError(f"{path}: not a mixopt scores file ({err}); make one with `mixopt score`") from None
