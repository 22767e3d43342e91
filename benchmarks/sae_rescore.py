"""Paired: does a new SAE move STS's forecast? Two validation.json files of the same fine-tunes and cells,
scored with two SAEs (e.g. docs/validation/validation.json with the v1 SAE and docs/validation/sae-v2/
validation.json with its replacement): for each STS scorer both record per cell, the within-source Spearman
with the signed change of the primary metric (worse positive; docs/validation.md, round 2, rule 1) under
each SAE, and new minus old with a paired 95% interval on the verdict's resamples of whole subjects
(`mixopt.validation.verdict.Resamples`, the recipe's bootstrap size and seed).

    python benchmarks/sae_rescore.py docs/validation/validation.json docs/validation/sae-v2/validation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixopt import stats  # noqa: E402
from mixopt.evaluate import HIGHER_IS_BETTER  # noqa: E402
from mixopt.validation.verdict import Resamples, within_spearman  # noqa: E402

STS_SCORERS = ("act", "act_sq")  # the scorers every validation.json records per cell


def grid(report: dict[str, Any], sources: list[str], domains: list[str], *path: str) -> np.ndarray:
    """(sources, domains) array of each cell's value at `path`, e.g. ("scores", "act")."""
    by_key = {(c["source"], c["domain"]): c for c in report["cells"]}

    def value(cell: dict[str, Any]) -> float:
        for key in path:
            cell = cell[key]
        return float(cell)  # type: ignore[arg-type]

    return np.array([[value(by_key[s, d]) for d in domains] for s in sources], dtype=float)


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    sources, domains = list(old["sources"]), list(old["domains"])
    if (list(new["sources"]), list(new["domains"])) != (sources, domains):
        raise SystemExit("the two reports do not cover the same sources and domains: not the same evidence")
    metric = old["primary_metric"]
    sign = -1.0 if HIGHER_IS_BETTER[metric] else 1.0
    changes = [grid(r, sources, domains, "change", metric, "delta") for r in (old, new)]
    if not np.allclose(changes[0], changes[1], equal_nan=True):
        raise SystemExit(f"the two reports measured different changes of {metric}: not the same fine-tunes")
    worse = sign * changes[0]  # worse positive
    recipe = old["recipe"]["resolved"]
    resamples = Resamples(len(sources), len(domains), recipe["evaluation"]["bootstrap"], recipe["seed"])
    rows = []
    for scorer in STS_SCORERS:
        before = grid(old, sources, domains, "scores", scorer)
        after = grid(new, sources, domains, "scores", scorer)
        d_old, d_new = resamples.draws(before, worse), resamples.draws(after, worse)
        r_old, r_new = within_spearman(before, worse), within_spearman(after, worse)
        rows.append(
            {
                "scorer": scorer,
                "metric": metric,
                "old": {"r": r_old, "ci": stats.percentile_interval(d_old)},
                "new": {"r": r_new, "ci": stats.percentile_interval(d_new)},
                "difference": {"r": r_new - r_old, "ci": stats.percentile_interval(d_new - d_old)},
                "scores_spearman": stats.spearman(before.ravel(), after.ravel()),  # how much the SAE changed them
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    args = parser.parse_args()
    old, new = (json.loads(p.read_text()) for p in (args.old, args.new))
    print(f"{'scorer':8s} {'old SAE':>24s} {'new SAE':>24s} {'new - old':>24s}  scores' Spearman")
    for row in compare(old, new):
        cells = [f"{row[k]['r']:+.2f} [{row[k]['ci'][0]:+.2f},{row[k]['ci'][1]:+.2f}]" for k in ("old", "new")]
        diff = f"{row['difference']['r']:+.2f} [{row['difference']['ci'][0]:+.2f},{row['difference']['ci'][1]:+.2f}]"
        print(f"{row['scorer']:8s} {cells[0]:>24s} {cells[1]:>24s} {diff:>24s}  {row['scores_spearman']:+.2f}")


if __name__ == "__main__":
    main()
