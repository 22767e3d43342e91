"""Evidence: everything a validation run has split, scored and measured, in one place (`ValidationRun`), so
the analysis, the mixture comparison and the sweep take one argument instead of a dozen."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixopt.evaluate import MCQItem
from mixopt.recipe import ValidateRecipe
from mixopt.scores import Scores
from mixopt.validation.data import DomainData, SourceData
from mixopt.validation.measure import Measurement


@dataclass
class ValidationRun:
    recipe: ValidateRecipe
    out: Path  # the run folder
    domains: list[DomainData]
    sources: list[SourceData]
    items: list[MCQItem]  # every domain's evaluation items, flat, domain after domain
    spans: dict[str, slice]  # domain -> its items in `items`
    masks: dict[str, np.ndarray]  # source -> (items,) bool: the items that source may judge (not its own text)
    identity: str  # model weights, device and dtype: what a stored measurement depends on
    scores: dict[str, Scores] = field(default_factory=dict)  # source -> its Scores against the domains
    matrix: dict[str, np.ndarray] = field(default_factory=dict)  # scorer -> (sources, domains)
    base: Measurement | None = None
    after: dict[str, Measurement] = field(default_factory=dict)  # source -> its fine-tune's measurement
    timings: dict[str, float] = field(default_factory=dict)

    def source(self, name: str) -> SourceData:
        return next(s for s in self.sources if s.name == name)

    @property
    def measured_base(self) -> Measurement:
        if self.base is None:
            raise RuntimeError("the base model is not measured yet")  # a programming error, not user input
        return self.base


def spans_of(domains: list[DomainData]) -> dict[str, slice]:
    spans, start = {}, 0
    for d in domains:
        spans[d.name] = slice(start, start + len(d.evaluation))
        start += len(d.evaluation)
    return spans
