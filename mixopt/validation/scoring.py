"""Scores of every (source, domain) cell: each source taken as the target, the domains' scoring parts as the
domains, every scorer of the registry (`mixopt.scores.SCORERS`). The model and SAE load once for all sources;
the rows go to `pipeline.score_datasets` in memory (no plan recipe, no files to read back)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np

from mixopt.recipe import DomainSpec, ValidateRecipe
from mixopt.scores import SCORERS, Scores
from mixopt.validation.data import DomainData, SourceData, scoring_pair
from mixopt.validation.measure import note


def _rows(pairs: Sequence[tuple[str, str]]) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})


def score_sources(
    recipe: ValidateRecipe, sources: Sequence[SourceData], domains: Sequence[DomainData], folder: Path
) -> dict[str, Scores]:
    """source -> Scores against every domain (each also saved as `folder/<source>.json`)."""
    from mixopt.pipeline import ScoringModel, ScoringSource, Timings, score_datasets
    from mixopt.sae import check_sae, load_sae, sae_identity
    from mixopt.sts import name_seed
    from mixopt.validation.measure import load_validation_model

    lm = load_validation_model(recipe)
    sae = load_sae(recipe.sae, recipe.base_dir, lm.device)
    check_sae(sae, lm, recipe.sae.layer)
    model = ScoringModel(
        lm,
        sae,
        recipe.sae.layer,
        recipe.model.path,
        recipe.sae.path or f"{recipe.sae.release}/{recipe.sae.id}",
        sae_identity(recipe.sae, recipe.base_dir),
    )
    demos = DomainSpec.model_fields["icl_demos"].default  # each domain's own worked examples (`icl`), as in a plan
    scoring = [
        ScoringSource(d.name, _rows([scoring_pair(i) for i in d.scoring]), name_seed(recipe.seed, d.name), demos)
        for d in domains
    ]
    specs = {s.name: s for s in recipe.sources}
    scores: dict[str, Scores] = {}
    timings = Timings()
    for source in sources:
        note(f"scores: {source.name} as the target, {len(domains)} domains")
        target = ScoringSource(source.name, _rows(source.pool), recipe.seed, specs[source.name].icl_demos)
        scores[source.name] = score_datasets(model, target, scoring, recipe.sts, recipe.seed, timings)
        folder.mkdir(parents=True, exist_ok=True)
        scores[source.name].save(folder / f"{source.name}.json")
    return scores


def score_matrix(scores: dict[str, Scores], sources: Sequence[str], domains: Sequence[str]) -> dict[str, np.ndarray]:
    """scorer -> (sources, domains) array; scorers the scores lack (e.g. `icl` unless computed) are left out."""
    matrix: dict[str, np.ndarray] = {}
    for name, scorer in SCORERS.items():
        values = [
            [next(d for d in scores[s].domains if d.name == dom).variants.get(scorer.key, np.nan) for dom in domains]
            for s in sources
        ]
        if np.isfinite(values).any():
            matrix[name] = np.array(values, dtype=float)
    return matrix
