"""Recipe schema and `mixopt check`: every bad input gets one clear line and exit code 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from mixopt.cli import cli
from mixopt.errors import RecipeError
from mixopt.recipe import expand_env, load_recipe, recipe_json_schema, template_fields
from tests.helpers import write_config_only_model_and_sae

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def good(tmp_path: Path) -> dict:
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(20)))
    for name in ("law", "chem"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps({"text": f"{name} {i}"}) + "\n" for i in range(10)))
    write_config_only_model_and_sae(tmp_path)
    return {
        "model": {"path": "./model"},
        "sae": {"path": "sae", "layer": 1},
        "target": {"source": {"path": "t.jsonl"}, "prompt": "{q}", "response": "{a}"},
        "domains": [
            {"name": "law", "source": {"path": "law.jsonl"}, "text": "{text}"},
            {"name": "chem", "source": {"path": "chem.jsonl"}, "text": "{text}"},
        ],
        "allocation": {"budget": 20, "max_epochs": 1},
    }


def _check(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["check", *args])
    return result.exit_code, result.output


def test_check__good_recipe_prints_ok(tmp_path: Path, good: dict) -> None:
    code, out = _check(str(_write(tmp_path, good)))
    assert code == 0 and out.strip().endswith(": ok")


BAD = {
    "unknown key": (lambda r: r["allocation"].update(budgte=3), r"allocation\.budgte: unknown key"),
    "wrong type": (lambda r: r["allocation"].update(budget="many"), r"allocation\.budget: .*integer"),
    "missing required field": (lambda r: r.pop("target"), r"target: required field is missing"),
    "missing source file": (
        lambda r: r["domains"][0]["source"].update(path="nope.jsonl"),
        r"domains\.0\.source: .*source file not found.*nope\.jsonl",
    ),
    "template column the source lacks": (
        lambda r: r["domains"][1].update(text="{body}"),
        r"domains\.1\.source: .*column 'body'.*has text",
    ),
    "zero budget": (lambda r: r["allocation"].update(budget=0), r"allocation\.budget: .*greater than 0"),
    "negative budget": (lambda r: r["allocation"].update(budget=-5), r"allocation\.budget: .*greater than 0"),
    "min share above max share": (
        lambda r: r["domains"][0].update(min_share=0.6, max_share=0.4),
        r"domains\.0: min_share 0\.6 > max_share 0\.4",
    ),
    "min shares above one": (lambda r: [d.update(min_share=0.7) for d in r["domains"]], r"min_share sum to 1\.40 > 1"),
    "max shares below one": (lambda r: [d.update(max_share=0.3) for d in r["domains"]], r"max_share sum to 0\.60 < 1"),
    "budget beyond availability": (
        lambda r: r["allocation"].update(budget=30, target_fraction=0.2),  # replay 24 of 20 rows; target fits
        r"allocation: .*at most 20 examples.*",
    ),
    "duplicate domain": (lambda r: r["domains"][1].update(name="law"), r"unique; repeated: law"),
    "missing SAE": (lambda r: r["sae"].update(path="nosae"), r"sae\.path: .*no sae-lens SAE"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_check__bad_input_gets_one_line_and_exit_2(tmp_path: Path, good: dict, case: str) -> None:
    mutate, pattern = BAD[case]
    mutate(good)
    code, out = _check(str(_write(tmp_path, good)))
    assert code == 2
    assert len(out.strip().splitlines()) == 1, out
    assert re.search(pattern, out), out


def test_check__malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: x\n sae: [\n")
    code, out = _check(str(path))
    assert code == 2 and "invalid YAML at line" in out and len(out.strip().splitlines()) == 1


def test_check__nonexistent_recipe_path(tmp_path: Path) -> None:
    code, out = _check(str(tmp_path / "missing.yaml"))
    assert code == 2 and "recipe file not found" in out


def test_check__github_format_points_at_the_offending_line(tmp_path: Path, good: dict) -> None:
    good["allocation"]["budgte"] = 3
    path = _write(tmp_path, good)
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1) if "budgte" in text)
    code, out = _check("--format", "github", str(path))
    assert code == 2 and out.startswith(f"::error file={path},line={line}::")


def test_check__shipped_recipes_are_ok() -> None:
    """CI checks every recipe under recipes/ (they use the shared data through MIXOPT_DATA's default)."""
    code, out = _check(str(REPO / "recipes"))
    assert code == 0, out
    assert len(out.strip().splitlines()) >= 2


def test_recipe_hash__ignores_formatting_but_not_values(tmp_path: Path, good: dict) -> None:
    a = load_recipe(_write(tmp_path, good, "a.yaml"))
    b_path = tmp_path / "b.yaml"
    b_path.write_text("# a comment\n" + yaml.safe_dump(good, sort_keys=True, default_flow_style=True))
    assert load_recipe(b_path).sha256() == a.sha256()
    good["seed"] = 1
    assert load_recipe(_write(tmp_path, good, "c.yaml")).sha256() != a.sha256()


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path: Path, good: dict) -> None:
    recipe = load_recipe(_write(tmp_path, good))
    assert recipe.domains[0].source.paths(recipe.base_dir) == [tmp_path / "law.jsonl"]


def test_env_expansion__default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MIXOPT_TEST_ROOT", raising=False)
    assert expand_env("${MIXOPT_TEST_ROOT:-../data}/x") == "../data/x"
    monkeypatch.setenv("MIXOPT_TEST_ROOT", "/d")
    assert expand_env("${MIXOPT_TEST_ROOT:-../data}/x") == "/d/x"
    monkeypatch.delenv("MIXOPT_TEST_ROOT")
    with pytest.raises(ValueError, match="MIXOPT_TEST_ROOT is not set"):
        expand_env("${MIXOPT_TEST_ROOT}")


def test_template_fields__names_columns() -> None:
    assert template_fields("{question}\nA. {choices[0]} {answer}") == ["question", "choices", "answer"]


def test_library_callers_get_cross_field_checks() -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe("no/such/recipe.yaml")


def test_schema_file_matches_the_code() -> None:
    """recipe.schema.json (for editors) is regenerated with `mixopt schema > recipe.schema.json`."""
    shipped = json.loads((REPO / "recipe.schema.json").read_text())
    assert shipped == recipe_json_schema()


def test_cli__version_and_help_are_fast_and_work() -> None:
    out = subprocess.run([sys.executable, "-m", "mixopt", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("mixopt, version")
    for command in (["--help"], ["check", "--help"], ["score", "--help"], ["sae", "train", "--help"]):
        assert CliRunner().invoke(cli, command).exit_code == 0
