"""Which rows are replayed: `allocation.replay.select: forecast` ranks each domain's rows by their
per-example forecast; each domain's rows keep its own templates; `plan --objective protect` end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from mixopt.cli import cli
from mixopt.errors import MixoptError
from mixopt.mixture import MixturePart, build_mixture, forecast_selection, ranked_indices
from mixopt.sources import content_hash


def plain(name: str, n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"{name} text {i}" for i in range(n)]})


def top_by_forecast(indices: list[int], forecasts: list[float], k: int) -> list[int]:
    """The brute-force answer: sort (forecast descending, source index ascending) in plain Python."""
    return [i for _, i in sorted(zip((-f for f in forecasts), indices, strict=True))][:k]


@pytest.mark.parametrize("seed", range(4))
def test_forecast_selection__draws_exactly_the_top_forecast_rows_first(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 50
    indices = rng.choice(n, 30, replace=False).tolist()  # 30 of 50 rows were scored
    forecasts = np.round(rng.normal(size=30), 1).tolist()  # rounded: ties happen and break by source index
    part = MixturePart("law", plain("law", n), 12, seed=7, selection=forecast_selection(n, indices, forecasts, 7))
    assert part.draw().tolist() == top_by_forecast(indices, forecasts, 12)


def test_forecast_selection__is_deterministic_and_fills_with_unscored_rows_then_repeats_the_ranking() -> None:
    n, indices, forecasts = 8, [5, 2, 7], [0.1, 0.9, 0.5]
    selection = forecast_selection(n, indices, forecasts, seed=3)
    again = forecast_selection(n, indices, forecasts, seed=3)
    np.testing.assert_array_equal(selection.ranking, again.ranking)
    assert selection.ranking[:3].tolist() == [2, 7, 5]
    assert sorted(selection.ranking[3:].tolist()) == [0, 1, 3, 4, 6]  # every other row once, seeded order
    drawn = ranked_indices(selection.ranking, 19)  # two whole rankings, then the top 3 again
    assert drawn.tolist() == [*selection.ranking, *selection.ranking, 2, 7, 5]


def test_forecast_selection__in_a_mixture_replays_the_top_rows_and_records_them() -> None:
    n, indices, forecasts = 20, [4, 9, 13, 0, 17], [0.3, 0.8, 0.3, -0.2, 0.5]
    selection = forecast_selection(n, indices, forecasts, seed=1, scorer="probe")
    parts = [MixturePart("law", plain("law", n), 3, seed=1, selection=selection), MixturePart("t", plain("t", 5), 4, 2)]
    mix = build_mixture(parts, seed=0)
    law = [row for row in mix if row["domain"] == "law"]
    assert sorted(row["source_index"] for row in law) == [4, 9, 17]
    assert all(row["text"] == f"law text {row['source_index']}" for row in law)
    assert content_hash(build_mixture(parts, seed=0)) == content_hash(mix)
    assert parts[0].record() == {
        "select": "forecast",
        "scorer": "probe",
        "rows_with_forecast": [[9, 0.8], [17, 0.5], [4, 0.3]],
        "rows_without_forecast": 0,
    }
    assert parts[1].record() == {"select": "random", "seed": 2}


@pytest.mark.parametrize(
    "indices, forecasts, message",
    [([1, 2], [0.5], "2 source indices for 1 per-example forecasts"), ([1, 1], [0.5, 0.2], "or twice")],
)
def test_forecast_selection__bad_per_example_forecasts_are_named(indices, forecasts, message) -> None:
    with pytest.raises(MixoptError, match=message):
        forecast_selection(5, indices, forecasts, seed=0)


# ------------------------------------------------------------------------------- plan, end to end


def _variant(workspace: Path, name: str, allocation: dict, law_templates: dict | None = None) -> Path:
    """The tiny workspace recipe with other allocation fields (and law's templates), beside it."""
    recipe = yaml.safe_load(workspace.read_text())
    recipe["allocation"].update(allocation)
    if law_templates is not None:
        law = next(d for d in recipe["domains"] if d["name"] == "law")
        del law["text"]
        law.update(law_templates)
    path = workspace.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def protected(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`plan --objective protect` with replay.select: forecast and law in chat templates of its own."""
    templates = {"prompt": "Court record: {text}", "response": "(law replay)"}
    recipe = _variant(workspace, "protect-forecast", {"replay": {"select": "forecast"}}, templates)
    out = tmp_path_factory.mktemp("protect") / "run"
    result = CliRunner().invoke(cli, ["plan", str(recipe), "--out", str(out), "--objective", "protect"])
    assert result.exit_code == 0, result.output
    assert "T = identity" in result.output and "protected" in result.output
    return out


def test_plan_protect__solver_record_says_where_f_and_t_came_from(protected: Path) -> None:
    manifest = json.loads((protected / "manifest.json").read_text())
    solver = manifest["solver"]
    assert solver["objective"] == "protect" and solver["settings"]["transfer"] == "identity"
    assert any("no signed forecast" in note for note in solver["notes"])
    allocation = json.loads((protected / "allocation.json").read_text())
    assert all("protected_change" in d for d in allocation["domains"])


def test_plan_forecast_select__replays_each_domains_highest_forecast_rows_and_records_them(protected: Path) -> None:
    manifest = json.loads((protected / "manifest.json").read_text())
    scores = {d["name"]: d for d in json.loads((protected / "scores.json").read_text())["domains"]}
    mixture = datasets.load_from_disk(str(protected / "mixture"))
    drawn = Counter(zip(mixture["domain"], mixture["source_index"], strict=True))
    for entry in manifest["allocation"]:
        name, count, replay = entry["name"], entry["count"], entry["replay"]
        score = scores[name]
        assert replay["select"] == "forecast" and len(score["example_indices"]) == len(score["example_scores"]) > 0
        top = top_by_forecast(score["example_indices"], score["example_scores"], count)
        assert [row[0] for row in replay["rows_with_forecast"]] == top
        assert {i for (domain, i) in drawn if domain == name} >= set(top)  # the mixture holds them
        assert replay["rows_without_forecast"] == min(count, score["available"]) - len(top)


def test_plan__each_domains_replay_rows_use_its_own_templates(protected: Path, workspace: Path) -> None:
    mixture = datasets.load_from_disk(str(protected / "mixture"))
    sources = {
        name: [json.loads(line)["text"] for line in (workspace.parent / "data" / f"{name}.jsonl").open()]
        for name in ("law", "chem", "code")
    }
    for row in mixture:
        i = row["source_index"]
        if row["domain"] == "law":  # chat templates of its own; joined as text because the others are text
            assert row["text"] == f"Court record: {sources['law'][i]}\n(law replay)"
        elif row["domain"] in sources:
            assert row["text"] == sources[row["domain"]][i]


def test_score__each_per_example_forecast_belongs_to_the_source_row_it_names(protected: Path, workspace: Path) -> None:
    """Independent of the ranking: each scored example's token count is its named source row's."""
    from transformers import AutoTokenizer

    from mixopt.encoding import encode_text

    tokenizer = AutoTokenizer.from_pretrained(workspace.parent / "model")
    for domain in json.loads((protected / "scores.json").read_text())["domains"]:
        if domain["name"] == "law":  # chat: only the fixed response counts, the same for every row
            continue
        rows = [json.loads(line)["text"] for line in (workspace.parent / "data" / f"{domain['name']}.jsonl").open()]
        counted = [encode_text(tokenizer, rows[i], 512).n_counted for i in domain["example_indices"]]
        assert counted == domain["example_tokens"] and len(set(counted)) > 1
