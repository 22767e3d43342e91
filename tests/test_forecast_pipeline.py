"""`grad`, `probe` and `probe_act` as the recipe's scorer: through `mixopt score` and `plan`, and inside
validation, where no evaluation item may reach a pilot fine-tune or a gradient."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from mixopt.cli import cli
from mixopt.scores import Scores, Transfer


def _recipe(workspace: Path, tmp_path: Path, sts: str) -> Path:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(workspace.read_text().replace("sts: {", f"sts: {{{sts}, "))
    for name in ("model", "sae", "data"):
        (tmp_path / name).symlink_to(workspace.parent / name)
    return recipe


@pytest.mark.parametrize("scorer", ["grad", "probe", "probe_act"])
def test_score_cli__forecast_is_what_the_solver_reads_with_its_examples_and_cost(
    workspace: Path, tmp_path: Path, scorer: str
) -> None:
    settings = "grad: {batches: 2, batch_size: 4, blocks: 1}, probe: {steps: 2, batch_size: 4, lr: 0.003}"
    recipe = _recipe(workspace, tmp_path, f"score: {scorer}, {settings}")
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(cli, ["score", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores = Scores.load(out)
    assert scores.score == scorer and scores.cost is not None
    for d in [*scores.domains, scores.target]:
        assert d.score == d.variants[scorer]
        mean = np.average(d.example_scores, weights=d.example_tokens)
        assert mean == pytest.approx(d.score, rel=1e-4, abs=1e-9)  # the bootstrap resamples these
        assert d.interval is not None and d.interval[0] <= d.score <= d.interval[1]
    if scorer == "grad":
        assert isinstance(scores.transfer, Transfer)
        assert scores.transfer.domains == [d.name for d in scores.domains]
        assert np.allclose(np.diag(scores.transfer.matrix), 1.0)
        assert scores.cost.backward_tokens > 0
    else:
        assert scores.transfer is None and scores.cost.train_steps == 2
        assert {"probe", "probe_act", "raw_probe_act"} <= set(scores.target.variants)  # one pilot, both read it
    if scorer in ("grad", "probe"):
        assert "positive = worse" in result.output
        assert scores.target.score < 0  # a step on the target lowers the target's own loss


def test_plan_cli__allocates_by_a_signed_forecast(workspace: Path, tmp_path: Path) -> None:
    recipe = _recipe(workspace, tmp_path, "score: grad, grad: {batches: 2, batch_size: 4, blocks: 1}")
    result = CliRunner().invoke(cli, ["plan", str(recipe), "--budget", "60", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "score(grad)" in result.output and "dry run" in result.output


def test_score_cli__grad_modules_matching_nothing_is_one_line_exit_2(workspace: Path, tmp_path: Path) -> None:
    recipe = _recipe(workspace, tmp_path, "score: grad, grad: {modules: ['nothing.*']}")
    result = CliRunner().invoke(cli, ["score", str(recipe)])
    assert result.exit_code == 2
    assert result.output.startswith("error: sts.grad.modules: ") and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("scorer", ["grad", "probe"])
def test_validation__no_evaluation_item_enters_a_probe_or_a_gradient(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scorer: str
) -> None:
    """Every forward pass while a source is scored (features, the target update, the pilot's training, the
    losses before and after it) sees only that source's own rows and the domains' scoring rows."""
    import mixopt.model
    from mixopt import evaluate as ev
    from mixopt.recipe import load_validate_recipe
    from mixopt.validation.data import load_domains, load_source_data
    from mixopt.validation.scoring import score_sources
    from tests.test_validate import write_validate_workspace

    recipe = load_validate_recipe(write_validate_workspace(tmp_path))
    settings = {"score": scorer, "grad": {"batches": 2, "batch_size": 4, "blocks": 1}, "probe": {"steps": 2}}
    recipe = recipe.model_copy(update={"sts": recipe.sts.model_validate(settings)})
    out = tmp_path / "run"
    domains = load_domains(recipe)
    sources = [load_source_data(recipe, i) for i in range(len(recipe.sources))]
    seen: list[list[int]] = []
    load_model = mixopt.model.load_model

    def recording(*args: Any, **kwargs: Any) -> Any:
        lm = load_model(*args, **kwargs)

        def record(_module: Any, _args: Any, inputs: dict[str, Any]) -> None:
            seen.extend(row.tolist() for row in inputs["input_ids"])

        lm.model.register_forward_pre_hook(record, with_kwargs=True)  # copied into the pilot with the model
        return lm

    monkeypatch.setattr(mixopt.model, "load_model", recording)  # validation loads through mixopt.model
    questions = {item.question for d in domains for item in d.evaluation}
    for source in sources:
        seen.clear()
        score_sources(recipe, [source], domains, out / "scores")  # the validation's own scoring of one source
        assert len(seen) > 50  # features, and the forecast's own passes
        tokenizer = load_model(recipe.model, recipe.base_dir).tokenizer
        texts = {tokenizer.decode(ids, skip_special_tokens=True) for ids in seen}
        # a question in the source's own data (law shares items with legal) is its to train on; validation
        # never judges the source on it (test_validate__no_evaluation_item_leaks_into_scoring_or_training)
        foreign = {q for q in questions if ev.normalized(q) not in source.seen}
        assert foreign and not {q for q in foreign if any(q in text for text in texts)}
        scoring = {item.question for d in domains for item in d.scoring}
        assert {q for q in scoring if any(q in text for text in texts)} == scoring  # the check sees questions
