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
    recorded_only: bool = False  # --rescore: read every measurement back, train and measure nothing

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


# ------------------------------------------------------------------------------------- kept evidence
#
# A validation's fine-tunes cost hours; its measurements are small. `keep` copies them (gzipped, with their
# content keys) and validation.json into a folder that lives in the repository (docs/validation/), and
# `restore` puts them back into a run folder, where `cached_measurement` reads them as if just made: a new
# scorer is then judged on the same fine-tunes (`mixopt validate --rescore --from docs/validation`).

METRICS_DIR = "metrics"


def keep(out: Path, evidence: Path) -> list[Path]:
    """Copy every measurement of the run folder `out` (and validation.json, if written) into `evidence`."""
    import gzip
    import shutil

    kept = []
    for path in sorted((out / METRICS_DIR).glob("*.json")):
        target = evidence / METRICS_DIR / f"{path.name}.gz"
        target.parent.mkdir(parents=True, exist_ok=True)
        with path.open("rb") as src, gzip.GzipFile(target, "wb", mtime=0) as dst:  # mtime 0: same bytes, same file
            shutil.copyfileobj(src, dst)
        kept.append(target)
    if (out / "validation.json").exists():
        shutil.copyfile(out / "validation.json", evidence / "validation.json")
        kept.append(evidence / "validation.json")
    return kept


def restore(evidence: Path, out: Path) -> list[str]:
    """Put the kept measurements back into `out/metrics` where it has none of that name; returns their names."""
    import gzip

    from mixopt.files import write_text

    restored = []
    for path in sorted((evidence / METRICS_DIR).glob("*.json.gz")):
        target = out / METRICS_DIR / path.name.removesuffix(".gz")
        if not target.exists():
            write_text(target, gzip.decompress(path.read_bytes()).decode("utf-8"))
            restored.append(target.stem)
    return restored
