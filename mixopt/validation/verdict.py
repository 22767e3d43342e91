"""Verdict: which forecast becomes the default, by the rule docs/validation.md wrote before the results
(round 2, "rules, written before any of its results"). Reads the sweep's score matrices and the measured
changes; trains and scores nothing.

The rule, as code:
1. Primary criterion: the within-source Spearman correlation of a forecast with the *signed* change of the
   primary metric oriented so that worse is positive (a higher-is-better metric's change is negated), over
   every (source, domain) cell; |change| is reported beside it.
2. A (setting, scorer) row replaces the current default (`STSSpec`'s default scorer and tokens) only when its
   paired bootstrap 95% interval against the default (the same resamples of whole domains) lies above 0, and
   its cost is at most `MAX_COST_SHARE` of the fine-tune it forecasts in training tokens and in wall time.
   A row whose correlation has the opposite sign on another reliable metric is flagged and not chosen.
3. Among the rows that pass, a `probe` setting with fewer pilot steps wins over one with more (the cheapest
   step count that passes); otherwise the highest primary correlation wins.
4. Out of sample: the same sweep on a source that played no part in choosing
   (recipes/validate-mmlu-psychology.yaml) reports the chosen row there with its interval, whatever it shows.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mixopt import evaluate as ev
from mixopt import stats
from mixopt.recipe import STSSpec
from mixopt.scores import SCORERS, Scores
from mixopt.validation.analysis import Cells, Record
from mixopt.validation.measure import Measurement

MAX_COST_SHARE = 0.10  # rule 2: a forecast may cost at most 10% of the fine-tune it forecasts


def worse(cells: Cells, metric: str) -> np.ndarray:
    """(sources, domains) change of `metric` oriented so that a worse model is positive."""
    return -cells.delta[metric] if ev.HIGHER_IS_BETTER[metric] else cells.delta[metric]


def within_spearman(scores: np.ndarray, target: np.ndarray) -> float:
    """Spearman over every cell after standardising scores and target within each source (row)."""
    return stats.spearman(stats.zscored_rows(scores).ravel(), stats.zscored_rows(target).ravel())


class Resamples:
    """The bootstrap of whole domains (all sources' cells of a domain move together), drawn once, so that
    every row's draws are paired with the reference's (`analysis.correlations` draws the same indices)."""

    def __init__(self, n_sources: int, n_domains: int, n_boot: int, seed: int):
        self.idx = stats.bootstrap_indices(np.tile(np.arange(n_domains), n_sources), n_boot, seed)

    def draws(self, scores: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(n_boot,) within-source Spearman of `scores` with `target` on each resample."""
        x = stats.resampled(stats.zscored_rows(scores).ravel(), self.idx)
        y = stats.resampled(stats.zscored_rows(target).ravel(), self.idx)
        return stats.spearman_rows(x, y)


@dataclass
class Interval:
    r: float
    ci: list[float]


@dataclass
class CostShare:
    """A forecast's cost as a share of the fine-tune it forecasts (mean over sources; same machine)."""

    tokens: float  # training tokens (pilot) or tokens through a backward pass (grad) / the fine-tune's
    seconds: float  # the scorer's own compute (pilot + its loss passes; the gradient passes) / the fine-tune's


@dataclass
class Row:
    setting: str
    scorer: str
    signed: Interval  # primary: within-source Spearman with the worse-positive change
    absolute: Interval  # beside it: with |change|
    versus: Interval  # signed minus the reference's, paired (the same resamples)
    cost: CostShare | None  # None: forward passes only, as the default's own
    checks: dict[str, float]  # within-source signed Spearman on every other reliable metric
    reverses: bool  # the sign of the correlation flips on some other reliable metric
    passes: bool  # rule 2


@dataclass
class Verdict:
    metric: str
    reference: tuple[str, str]  # (setting, scorer) of the current default
    rows: list[Row]
    default: Row | None  # the row rule 3 picks among those that pass; None: the default stays
    max_cost_share: float = MAX_COST_SHARE

    def to_record(self) -> Record:
        return asdict(self)


def reference_setting(recipe_tokens: str) -> tuple[str, str]:
    """The current default as a sweep row: STSSpec's default scorer, under its default tokens."""
    tokens = STSSpec.model_fields["tokens"].default
    setting = "recipe" if recipe_tokens == tokens else f"tokens={tokens}"
    return setting, STSSpec.model_fields["score"].default


def cost_share(scores: dict[str, Scores], after: dict[str, Measurement]) -> CostShare | None:
    """Each source's forecast cost over its fine-tune's (training tokens, seconds), averaged over sources;
    None for a scorer without a cost record (forward passes only)."""
    tokens, seconds = [], []
    for source, s in scores.items():
        finetune = after[source].finetune or {}
        if s.cost is None or not finetune.get("tokens") or not finetune.get("seconds"):
            return None
        trained = s.cost.train_tokens + s.cost.backward_tokens
        tokens.append(trained / finetune["tokens"])
        seconds.append(s.cost.seconds / finetune["seconds"])
    return CostShare(float(np.mean(tokens)), float(np.mean(seconds))) if tokens else None


def _probe_steps(setting: str) -> int | None:
    found = re.search(r"steps=(\d+)", setting)
    return int(found.group(1)) if found and "probe" in setting else None


def judge(
    cells: Cells,
    matrices: dict[tuple[str, str], np.ndarray],
    costs: dict[str, CostShare | None],
    reference: tuple[str, str],
    metric: str,
    check_metrics: Sequence[str],
    n_boot: int,
    seed: int,
) -> Verdict:
    """Rules 1-3 over every (setting, scorer) row of `matrices` ((sources, domains) scores each; `costs` by
    setting). The scorers that cannot be a default (`random`, and `raw`'s residual baselines) are reported
    but never chosen."""
    resamples = Resamples(len(cells.sources), len(cells.domains), n_boot, seed)
    target, magnitude = worse(cells, metric), np.abs(cells.delta[metric])
    ref_scores = matrices[reference]
    ref_r, ref_draws = within_spearman(ref_scores, target), resamples.draws(ref_scores, target)
    rows = []
    for (setting, scorer), scores in matrices.items():
        r, draws = within_spearman(scores, target), resamples.draws(scores, target)
        checks = {m: within_spearman(scores, worse(cells, m)) for m in check_metrics if m != metric}
        reverses = bool(np.isfinite(r) and any(np.sign(c) == -np.sign(r) and c != 0 for c in checks.values()))
        cost = costs.get(setting) if SCORERS[scorer].looks_ahead else None
        versus = Interval(r - ref_r, stats.percentile_interval(draws - ref_draws))
        cheap = cost is None or (cost.tokens <= MAX_COST_SHARE and cost.seconds <= MAX_COST_SHARE)
        eligible = SCORERS[scorer].selectable and scorer != "raw"
        above = bool(np.isfinite(versus.ci[0]) and versus.ci[0] > 0)
        rows.append(
            Row(
                setting,
                scorer,
                Interval(r, stats.percentile_interval(draws)),
                Interval(
                    within_spearman(scores, magnitude),
                    stats.percentile_interval(resamples.draws(scores, magnitude)),
                ),
                versus,
                cost,
                checks,
                reverses,
                passes=bool(above and cheap and eligible and not reverses),
            )
        )
    passing = [row for row in rows if row.passes]
    probes = [row for row in passing if _probe_steps(row.setting) is not None]
    default: Row | None = max(passing, key=lambda row: row.signed.r, default=None)
    if probes:  # the cheapest step count that passes
        default = min(probes, key=lambda row: (_probe_steps(row.setting) or 0, -row.signed.r))
    return Verdict(metric, reference, rows, default)
