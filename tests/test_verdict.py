"""Round 2's rule (mixopt.validation.verdict) against scipy and hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from mixopt import evaluate as ev
from mixopt.validation.analysis import Cells
from mixopt.validation.verdict import CostShare, judge, reference_setting, worse

SOURCES, DOMAINS = 3, 12


def cells_with(change: np.ndarray) -> Cells:
    """Cells whose every metric's change is `change` (letter_mass is higher-is-better: its worse is -change)."""
    shape = change.shape
    delta = {m: change.copy() for m in ev.METRICS}
    zeros = {m: np.zeros(shape) for m in ev.METRICS}
    return Cells(
        [f"s{i}" for i in range(shape[0])],
        [f"d{j}" for j in range(shape[1])],
        zeros,
        delta,
        delta,
        zeros,
        np.full(shape, 50),
        {},
    )


def zscored(a: np.ndarray) -> np.ndarray:
    return (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)


@pytest.fixture
def setup() -> tuple[Cells, dict[tuple[str, str], np.ndarray]]:
    rng = np.random.default_rng(0)
    change = rng.normal(size=(SOURCES, DOMAINS))
    matrices = {
        ("tokens=response", "similarity"): rng.normal(size=change.shape),  # the default: unrelated to the change
        ("score=probe,steps=8", "probe"): change + 0.05 * rng.normal(size=change.shape),  # forecasts it
        ("score=probe,steps=2", "probe"): change + 0.10 * rng.normal(size=change.shape),  # forecasts it, cheaper
        ("score=grad,direction=plain", "grad"): change + 0.05 * rng.normal(size=change.shape),  # but too costly
        ("recipe", "random"): change.copy(),  # perfect, but never selectable
    }
    return cells_with(change), matrices


def test_signed_criterion_equals_scipy_on_within_source_standardised_cells(setup):
    cells, matrices = setup
    costs = {"score=probe,steps=8": CostShare(0.05, 0.05), "score=probe,steps=2": CostShare(0.01, 0.02)}
    verdict = judge(cells, matrices, costs, ("tokens=response", "similarity"), "cloze_nll", [], 200, 0)
    rows = {(r.setting, r.scorer): r for r in verdict.rows}
    for key, scores in matrices.items():
        expected = sps.spearmanr(zscored(scores).ravel(), zscored(cells.delta["cloze_nll"]).ravel()).statistic
        assert rows[key].signed.r == pytest.approx(expected)
        magnitude = sps.spearmanr(zscored(scores).ravel(), zscored(np.abs(cells.delta["cloze_nll"])).ravel())
        assert rows[key].absolute.r == pytest.approx(magnitude.statistic)
    reference = rows["tokens=response", "similarity"]
    assert reference.versus.r == 0 and reference.versus.ci == [0.0, 0.0]  # paired: the same resamples
    assert not reference.passes


def test_rule_picks_the_cheapest_probe_that_passes_and_never_a_costly_or_unselectable_row(setup):
    cells, matrices = setup
    costs = {
        "score=probe,steps=8": CostShare(0.08, 0.09),
        "score=probe,steps=2": CostShare(0.02, 0.03),
        "score=grad,direction=plain": CostShare(0.5, 0.02),  # over 10% in training tokens
    }
    verdict = judge(cells, matrices, costs, ("tokens=response", "similarity"), "cloze_nll", [], 200, 0)
    rows = {(r.setting, r.scorer): r for r in verdict.rows}
    assert rows["score=probe,steps=8", "probe"].passes and rows["score=probe,steps=2", "probe"].passes
    assert not rows["score=grad,direction=plain", "grad"].passes  # its interval is above 0, its cost is not
    assert rows["score=grad,direction=plain", "grad"].versus.ci[0] > 0
    assert not rows["recipe", "random"].passes
    assert verdict.default is not None and verdict.default.setting == "score=probe,steps=2"


def test_worse_is_positive_and_a_sign_flip_on_another_metric_blocks_the_win(setup):
    cells, matrices = setup
    assert np.array_equal(worse(cells, "letter_mass"), -cells.delta["letter_mass"])  # higher is better
    assert np.array_equal(worse(cells, "cloze_nll"), cells.delta["cloze_nll"])
    costs = {"score=probe,steps=8": CostShare(0.05, 0.05), "score=probe,steps=2": CostShare(0.01, 0.02)}
    # the same raw change on letter_mass means the opposite direction of harm: every forecast reverses there
    verdict = judge(cells, matrices, costs, ("tokens=response", "similarity"), "cloze_nll", ["letter_mass"], 200, 0)
    probe = next(r for r in verdict.rows if r.setting == "score=probe,steps=2")
    assert probe.checks["letter_mass"] == pytest.approx(-probe.signed.r)
    assert probe.reverses and not probe.passes
    assert verdict.default is None


def test_reference_is_the_shipped_default_under_its_own_tokens():
    assert reference_setting("content") == ("tokens=response", "similarity")
    assert reference_setting("response") == ("recipe", "similarity")


def test_sweep_only_keeps_the_recipe_setting_and_the_matching_ones():
    from pathlib import Path

    from mixopt.recipe import load_validate_recipe
    from mixopt.validation.sweep import FORECAST_DOMAIN_TOKENS, PROBE_STEPS, settings

    recipe = load_validate_recipe(Path(__file__).parents[1] / "recipes" / "validate-mmlu.yaml")
    every = [s.name for s in settings(recipe)]
    assert every[0] == "recipe" and len(every) == len(set(every))
    chosen = [s.name for s in settings(recipe, ["score=probe*", "tokens=*"])]
    assert chosen == ["recipe", "tokens=response", *(f"score=probe,steps={n}" for n in PROBE_STEPS)]
    probe = next(s for s in settings(recipe, ["score=probe,steps=2"]) if s.name != "recipe")
    from mixopt.validation.sweep import with_setting

    spec = with_setting(recipe, probe).sts  # nested sections merged and validated, the rest kept
    assert (spec.score, spec.probe.steps, spec.probe.lr, spec.domain_tokens) == (
        "probe",
        2,
        recipe.sts.probe.lr,
        FORECAST_DOMAIN_TOKENS,
    )


def test_sweep__each_other_shipped_sae_of_the_model_is_a_setting_at_the_layer_its_hook_names():
    from pathlib import Path

    from mixopt.artifacts import BUILTIN_SAES, builtin_sae_dir
    from mixopt.recipe import SAESpec, load_validate_recipe
    from mixopt.validation.sweep import settings, sibling_saes, with_setting

    recipe = load_validate_recipe(Path(__file__).parents[1] / "recipes" / "validate-mmlu.yaml")
    shipped = [a for a in BUILTIN_SAES if (builtin_sae_dir(a) / "cfg.json").is_file()]
    siblings = sibling_saes(recipe.sae, recipe.base_dir)
    assert [s.path for s in siblings] == sorted(a for a in shipped if a != recipe.sae.path)
    for sae in siblings:  # the aliases say their layer ("-res-l15"); the sweep reads it from the SAE's hook
        assert sae.path is not None and sae.path.endswith(f"-res-l{sae.layer}")
    chosen = [s for s in settings(recipe, ["sae=*"]) if s.name != "recipe"]
    assert [s.name for s in chosen] == [
        f"sae={sae.path}{suffix}" for sae in siblings for suffix in ("", ",score=icl", ",score=probe,steps=1")
    ]
    for setting in chosen:
        scored = with_setting(recipe, setting)
        assert scored.sae == setting.sae and scored.sae != recipe.sae
        assert (
            scored.sts.score
            == {"": recipe.sts.score, "icl": "icl", "probe": "probe"}[
                setting.name.partition(",score=")[2].partition(",")[0]
            ]
        )
    assert sibling_saes(SAESpec(path="some/local/folder", layer=3), recipe.base_dir) == []
