"""The mixture comparison's arms, regime rule and seed-aware statistics (`mixopt.validation.compare`), checked
against independent computations (the `statistics` module, hand-made rows); no model is trained."""

from __future__ import annotations

import statistics
from collections import Counter

import numpy as np
import pytest

from mixopt.finetune import step_batches
from mixopt.recipe import load_validate_recipe
from mixopt.validation.compare import (
    Arm,
    arm_run,
    choose_replay_fraction,
    mixture_summary,
    pooled_seed_sd,
    replay_counts,
)
from tests.helpers import make_scores
from tests.test_validate import write_validate_workspace


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    from mixopt.validation.run import prepare

    recipe_path = write_validate_workspace(tmp_path_factory.mktemp("compare"))
    recipe = load_validate_recipe(recipe_path)
    run = prepare(recipe, recipe_path.parent / "run")
    return recipe, run


def forecast_for(run, values: dict[str, float], per_example: dict[str, list[float]] | None = None):
    """Scores over the run's domains: `values` as each domain's forecast, optional per-example forecasts on
    the domain's first rows (source indices 0..k-1)."""
    names = [d.name for d in run.domains]
    scores = make_scores([values[n] for n in names], available=[len(d.scoring) for d in run.domains])
    scores.score = "grad"
    for d, name in zip(scores.domains, names, strict=True):
        d.name = name
        if per_example and name in per_example:
            d.example_scores = per_example[name]
            d.example_indices = list(range(len(per_example[name])))
            d.example_tokens = [10] * len(per_example[name])
    return scores


def test_regime__the_largest_fraction_with_clear_forgetting_else_the_smallest() -> None:
    worst = {
        0.1: {"domain": "a", "value": -0.10, "ci": [-0.15, -0.05]},
        0.25: {"domain": "b", "value": -0.03, "ci": [-0.06, -0.01]},
        0.5: {"domain": "c", "value": -0.02, "ci": [-0.05, +0.01]},  # interval reaches 0: not clear
    }
    regime = choose_replay_fraction(worst, higher_is_better=True)
    assert regime.replay_fraction == 0.25
    assert [c["clear_forgetting"] for c in regime.candidates.values()] == [True, True, False]
    none_clear = {r: {**w, "value": 0.1, "ci": [0.05, 0.2]} for r, w in worst.items()}
    regime = choose_replay_fraction(none_clear, higher_is_better=True)
    assert regime.replay_fraction == 0.1 and "no clear" in regime.reason
    # lower is better (an NLL): forgetting is a rise
    nll = {0.1: {"domain": "a", "value": 0.2, "ci": [0.1, 0.3]}, 0.25: {"domain": "a", "value": 0.1, "ci": [-0.1, 0.3]}}
    assert choose_replay_fraction(nll, higher_is_better=False).replay_fraction == 0.1


def test_pooled_seed_sd__equals_the_pooled_variance_by_the_statistics_module() -> None:
    groups = [[1.0, 3.0], [2.0, 2.5, 5.0], [7.0]]  # the single-seed group adds nothing
    used = groups[:2]
    pooled = sum((len(g) - 1) * statistics.variance(g) for g in used) / sum(len(g) - 1 for g in used)
    assert pooled_seed_sd(groups) == pytest.approx(np.sqrt(pooled))
    assert pooled_seed_sd([[1.0], [2.0]]) is None


def _runs(values: dict[str, float]) -> dict:
    """Run records as compare_summary writes them, with one statistic value per run (the rest 0)."""
    return {
        n: {
            "per_domain": {"d": v},
            "mean_change": {"value": v},
            "worst_change": {"value": v},
            "target_gain_nll": {"value": 1.0},
        }
        for n, v in values.items()
    }


def test_mixture_summary__identical_runs_give_a_zero_interval() -> None:
    arms = [Arm("uniform", 0.1, 0), Arm("uniform", 0.1, 1), Arm("protect", 0.1, 0), Arm("protect", 0.1, 1)]
    runs = _runs(dict.fromkeys(["u0", "u1", "p0", "p1"], -0.2))
    draws = {k: np.tile(np.linspace(-0.3, -0.1, 50)[:, None], (1, 4)) for k in runs["u0"] if k != "per_domain"}
    summary = mixture_summary(runs, draws, arms, 1.0, ["d"], seed=0)
    diff = summary["versus_uniform"]["protect"]["worst_change"]
    assert diff["difference"] == 0.0 and diff["ci"] == [0.0, 0.0] and diff["seed_sd"] == 0.0
    assert summary["mixtures"]["protect"]["seeds"] == 2


def test_mixture_summary__adds_the_pooled_seed_noise_to_the_paired_item_draws() -> None:
    """Items cancel exactly (the paired item draws differ by the constant d); the seeds of each mixture differ
    by c, so the pooled seed sd is c / sqrt(2) and the difference of two 2-seed means has sd c / sqrt(2)."""
    c, d, n_boot = 0.04, 0.05, 20_000
    arms = [Arm("uniform", 0.1, 0), Arm("uniform", 0.1, 1), Arm("protect", 0.1, 0), Arm("protect", 0.1, 1)]
    values = {"u0": -0.2, "u1": -0.2 + c, "p0": -0.2 + d, "p1": -0.2 + d + c}
    runs = _runs(values)
    base = np.random.default_rng(1).normal(size=(n_boot, 1)) * 0.01
    offsets = np.array([0.0, c, d, d + c])
    draws = {k: base + offsets - 0.2 for k in ("mean_change", "worst_change", "target_gain_nll")}
    summary = mixture_summary(runs, draws, arms, 1.0, ["d"], seed=0)
    assert summary["seed_noise"]["worst_change"] == pytest.approx(c / np.sqrt(2))
    diff = summary["versus_uniform"]["protect"]["worst_change"]
    assert diff["difference"] == pytest.approx(d)
    assert diff["seed_sd"] == pytest.approx(c / np.sqrt(2))
    lo, hi = diff["ci"]
    half = 1.96 * c / np.sqrt(2)
    assert lo == pytest.approx(d - half, abs=0.003) and hi == pytest.approx(d + half, abs=0.003)
    assert diff["item_sd"] == pytest.approx(0.0, abs=1e-12)


def test_bar__needs_30pct_less_forgetting_an_interval_off_zero_and_the_target_gain() -> None:
    from mixopt.validation.compare import bar_verdict

    def record(worst: float, gain: float) -> dict:
        return {"worst_change": {"value": worst}, "target_gain_nll": {"value": gain}}

    uniform = record(-0.10, 0.50)
    assert bar_verdict(record(-0.06, 0.50), uniform, {"ci": [0.01, 0.07]}, 1.0)["passes"]
    assert not bar_verdict(record(-0.08, 0.50), uniform, {"ci": [0.01, 0.03]}, 1.0)["passes"]  # 20% less
    assert not bar_verdict(record(-0.06, 0.50), uniform, {"ci": [-0.01, 0.07]}, 1.0)["passes"]  # reaches 0
    assert not bar_verdict(record(-0.06, 0.40), uniform, {"ci": [0.01, 0.07]}, 1.0)["passes"]  # gain -20%
    no_forgetting = bar_verdict(record(0.02, 0.5), record(0.01, 0.5), {"ci": [0.0, 0.02]}, 1.0)
    assert no_forgetting["reduction"] is None and not no_forgetting["passes"]


def test_arms__seeds_change_the_training_order_only(prepared) -> None:
    recipe, run = prepared
    target = run.source("math")
    budget = recipe.schedule.budget
    seed0 = arm_run(Arm("target", 0.0, 0), recipe, target, run.domains, None)
    seed1 = arm_run(Arm("target", 0.0, 1), recipe, target, run.domains, None)
    schedule = recipe.schedule
    batches = step_batches(len(seed0.rows), schedule.steps, schedule.batch_size, recipe.seed)
    trained0 = [seed0.rows[i] for batch in batches for i in batch]
    assert Counter(trained0) == Counter(seed1.rows) and len(seed1.rows) == budget  # the rows seed 0 trained on
    assert seed1.order_seed != seed0.order_seed == recipe.seed
    u0 = arm_run(Arm("uniform", 0.5, 0), recipe, target, run.domains, None)
    u1 = arm_run(Arm("uniform", 0.5, 1), recipe, target, run.domains, None)
    assert u0.rows == u1.rows and u0.mixture == u1.mixture and u0.order_seed != u1.order_seed
    assert (u0.name, u1.name, seed1.name) == ("math+uniform-r50", "math+uniform-r50-s1", "math-s1")


def test_arms__uniform_and_proportional_counts(prepared) -> None:
    recipe, run = prepared
    budget = recipe.schedule.budget
    target_count, counts = replay_counts(Arm("uniform", 0.5), recipe, run.domains, None)
    assert target_count + sum(counts.values()) == budget and max(counts.values()) - min(counts.values()) <= 1
    target_count, counts = replay_counts(Arm("proportional", 0.5), recipe, run.domains, None)
    sizes = np.array([len(d.scoring) for d in run.domains], float)
    expected = (budget - target_count) * sizes / sizes.sum()
    assert np.abs(np.array(list(counts.values())) - expected).max() < 1.0


def test_arms__protect_forecast_replays_each_domains_most_hurt_rows_deterministically(prepared) -> None:
    recipe, run = prepared
    target = run.source("math")
    names = [d.name for d in run.domains]
    per_example = {n: [0.1, 0.9, 0.5, -0.2] for n in names}  # rows 1, 2, 0, 3 in that order
    scores = forecast_for(run, {n: float(i) for i, n in enumerate(names)}, per_example)
    arm = Arm("protect_forecast", 0.5)
    one, two = (arm_run(arm, recipe, target, run.domains, scores) for _ in range(2))
    assert one.rows == two.rows
    _, counts = replay_counts(Arm("protect", 0.5), recipe, run.domains, scores)
    assert {k: v for k, v in one.mixture.items() if k != "math"} == counts  # protect's counts
    from mixopt.validation.data import scoring_pair

    start = one.mixture["math"]
    for d in run.domains:
        k = counts[d.name]
        rows = one.rows[start : start + k]
        start += k
        ranked = [1, 2, 0, 3][:k] if k <= 4 else None
        if ranked is not None:
            assert rows == [scoring_pair(d.scoring[i]) for i in ranked], d.name


def test_compare_forecast__a_setting_that_does_not_exist_fails_before_any_work(prepared, tmp_path) -> None:
    from click.testing import CliRunner

    from mixopt.cli import cli

    recipe, run = prepared
    text = recipe.file.read_text().replace("compare: {", "compare: {forecast: 'score=grad,direction=sideways', ")
    bad = recipe.file.parent / "bad.yaml"
    bad.write_text(text)
    result = CliRunner().invoke(cli, ["validate", str(bad), "--out", str(tmp_path / "v"), "--compare-mixtures"])
    assert result.exit_code == 2
    assert "bad.yaml: compare.forecast: no sweep setting 'score=grad,direction=sideways'" in result.output
    assert "score=grad,direction=adam" in result.output and not (tmp_path / "v").exists()
