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
    signed: bool = False  # a signed forecast of the change (positive = worse), not a magnitude
    looks_ahead: bool = False  # computed by a module of its own (gradients.py, probe.py), after the feature passes


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
        # forecasts (DESIGN.md 3b): a pilot fine-tune's loss change, the first-order loss change under the
        # target's update, and the `act` formula on the shift measured between the base and the pilot model
        Scorer("probe", "probe", "raw_act", sts=False, reads_shift=False, signed=True, looks_ahead=True),
        Scorer("grad", "grad", "raw_act", sts=False, reads_shift=False, signed=True, looks_ahead=True),
        Scorer("probe_act", "probe_act", "raw_probe_act", sts=True, reads_shift=False, looks_ahead=True),
    )
}
ScorerName = Literal["act", "act_sq", "icl", "raw", "similarity", "probe", "grad", "probe_act"]  # selectable
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
    example_indices: list[int] = field(default_factory=list)  # its row in the domain's source (`source_index`)
    variants: dict[str, float] = field(default_factory=dict)  # every score computed, by name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainScore:
        if "score" not in data and "sts" in data:  # scores.json version 1
            data = {**data, "score": data["sts"]}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Forecast:
    """What a forecasting scorer says about one source: its value, and each scored example's own value,
    whose mean weighted by `example_tokens` is `value` (the intervals and the solver's bootstrap resample them)."""

    value: float
    example_values: list[float]
    example_tokens: list[int]


@dataclass
class ScorerCost:
    """What a forecast cost, to weigh it against the fine-tune it forecasts (same machine)."""

    seconds: float = 0.0  # wall time the scorer's work took when computed (kept in the cache with its results)
    train_steps: int = 0  # optimizer steps of the pilot fine-tune (probe, probe_act)
    train_tokens: int = 0  # loss-bearing tokens the pilot trained on
    train_seconds: float = 0.0  # the pilot's training wall time (kept with its cached results)
    backward_tokens: int = 0  # response tokens whose loss went through backward (grad; the trainer's unit)


@dataclass
class ForecastResult:
    """A forecasting scorer's output: a Forecast per source (the domains and the target) and, where the
    scorer has one, the domains' transfer matrix."""

    sources: dict[str, Forecast]
    cost: ScorerCost
    transfer: Transfer | None = None


@dataclass
class Transfer:
    """Replay transfer between domains, read by the `protect` objective (mixopt.solver).

    matrix[i][j]: how much replay from domains[i] lowers domains[j]'s forecast change (e.g. inner products
    of the domains' loss gradients). Any scale: the solver divides by the mean diagonal, so only the ratios
    of cross-transfer to self-transfer count. Negative entries (replay that hurts another domain) are allowed.
    """

    domains: list[str]  # (n,) names, the matrix's row and column order
    matrix: list[list[float]]  # (n, n)
    source: str = ""  # how it was made, e.g. "grad: projected gradient inner products"


SIGNED_SCORERS = frozenset(n for n, s in SCORERS.items() if s.signed)  # the solver reads their sign


@dataclass
class Scores:
    recipe_sha256: str
    model: str
    sae: str
    layer: int
    top_k: int
    score: str  # the scorer in `DomainScore.score` (a key of SCORERS; signed for SIGNED_SCORERS)
    shifted_latents: list[dict[str, float]]  # [{index, shift}], largest shift first (probe_act: the measured shift)
    target: DomainScore  # the fine-tuning data itself (score = its own score)
    domains: list[DomainScore]
    transfer: Transfer | None = None  # absent in older files and for scorers that make none (identity); grad's
    cost: ScorerCost | None = None  # what the forecast cost (probe, grad, probe_act)
    version: int = SCORES_VERSION

    @property
    def signed(self) -> bool:
        return self.score in SIGNED_SCORERS

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
        from mixopt.tables import render_table

        top = ", ".join(f"{s['index']}({s['shift']:.3g})" for s in self.shifted_latents[:10])
        header = ["domain", f"score({self.score})", "95% interval", "raw", "similarity", "tokens", "examples"]
        rows = []
        for d in [*self.ranked(), self.target]:
            lo, hi = d.interval or [float("nan")] * 2
            name = f"{d.name} (target)" if d is self.target else d.name
            rows.append(
                [name, f"{d.score:.4g}", f"[{lo:.4g}, {hi:.4g}]", f"{d.baseline:.4g}", f"{d.similarity:.3f}"]
                + [f"{d.tokens:,}", f"{d.examples:,} of {d.available:,}"]
            )
        shifted = f"shifted latents (top {self.top_k} of layer {self.layer}; first 10 with shift): {top}"
        if self.sae == "none":  # a recipe without an SAE (`SAESpec.present`)
            shifted = f"no SAE: every score reads the residual stream after block {self.layer}"
        lines = [
            shifted,
            "",
            render_table(header, rows, right={1, 3, 4, 5, 6}),
        ]
        if self.signed:
            lines.append(f"\n{self.score}: forecast change of each domain's response-token loss (positive = worse)")
        if self.cost is not None:
            c = self.cost
            pilot = f"; pilot fine-tune {c.train_steps} steps, {c.train_tokens:,} tokens, {c.train_seconds:.1f} s"
            lines.append(
                f"cost of {self.score}: {c.seconds:.1f} s of compute (as first computed; the cache keeps it)"
                + (pilot if c.train_steps else "")
                + (f"; {c.backward_tokens:,} tokens through backward" if c.backward_tokens else "")
            )
        return "\n".join(lines)

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read and validate a scores file: every field of the right type, each domain once."""
        from pydantic import TypeAdapter, ValidationError

        from mixopt.errors import MixoptError

        try:
            data = _upgraded(json.loads(Path(path).read_text(encoding="utf-8")))
            scores = TypeAdapter(cls).validate_python(data)
        except ValidationError as err:  # e.g. `[]`, `"score": null`, `"score": "high"`
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


def _upgraded(data: Any) -> Any:
    """A version-1 scores file in the current form: each domain's `sts` is its `score`."""
    if isinstance(data, dict) and data.get("version", 1) == 1:
        for d in [data.get("target"), *(data.get("domains") or [])]:
            if isinstance(d, dict) and "score" not in d and "sts" in d:
                d["score"] = d.pop("sts")
    return data
