"""`mixopt plan` end to end on a tiny real model, SAE and sources: mixture, manifest, atomicity."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixopt.cli import cli


def _plan(recipe: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["plan", str(recipe), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def planned(workspace: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "run"
    result = _plan(workspace, out, "--budget", "60")
    assert result.exit_code == 0, result.output
    return out


def test_plan__mixture_loads_in_a_fresh_process_with_the_budgeted_rows(planned: Path) -> None:
    code = (
        "import datasets, json, sys; ds = datasets.load_from_disk(sys.argv[1]); "
        "print(json.dumps({'rows': len(ds), 'columns': ds.column_names, 'domains': list(ds['domain'])}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(planned / "mixture")], capture_output=True, text=True, check=True
    )
    loaded = json.loads(out.stdout)
    assert loaded["rows"] == 60
    assert set(loaded["columns"]) == {"text", "domain", "source_index"}  # text: the domains are plain text
    manifest = json.loads((planned / "manifest.json").read_text())
    counts = Counter(loaded["domains"])
    allocated = {d["name"]: d["count"] for d in manifest["allocation"]}
    assert {k: v for k, v in allocated.items() if v} == {k: v for k, v in counts.items() if k != "math"}
    assert counts["math"] == 30  # target_fraction 0.5 of 60
    assert manifest["dataset"]["rows"] == 60


def test_plan__manifest_records_how_the_mixture_was_made(planned: Path) -> None:
    manifest = json.loads((planned / "manifest.json").read_text())
    assert len(manifest["recipe"]["sha256"]) == 64
    assert manifest["sae"]["checksums"]["sae_weights.safetensors"]
    assert manifest["model"]["checksums"]["config.json"]
    assert len(manifest["sts"]["shifted_latents"]) == 8
    assert manifest["solver"]["status"] in {"optimal", "optimal_inaccurate"}
    assert set(manifest["versions"]) >= {"mixopt", "torch", "transformers", "sae-lens", "datasets", "cvxpy"}
    for name in (
        "scores.json",
        "allocation.json",
        "README.md",
        "plots/sts.png",
        "plots/allocation.png",
        "exports/llamafactory/dataset_info.json",
        "exports/megatron_data.py",
        "exports/axolotl.yaml",
        "exports/megatron_blend.txt",
    ):
        assert (planned / name).stat().st_size > 0, name


def test_plan__rerun_gives_the_same_rows_in_the_same_order(workspace: Path, planned: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert _plan(workspace, again, "--budget", "60").exit_code == 0
    first = json.loads((planned / "manifest.json").read_text())["dataset"]["content_sha256"]
    assert json.loads((again / "manifest.json").read_text())["dataset"]["content_sha256"] == first


def test_plan__dry_run_writes_nothing(workspace: Path, tmp_path: Path) -> None:
    result = _plan(workspace, tmp_path / "dry", "--budget", "60", "--dry-run")
    assert result.exit_code == 0 and "dry run" in result.output
    assert list(tmp_path.iterdir()) == []


def test_plan__existing_output_needs_force(workspace: Path, planned: Path) -> None:
    before = (planned / "manifest.json").read_bytes()
    result = _plan(workspace, planned, "--budget", "60")
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    assert (planned / "manifest.json").read_bytes() == before


def test_plan__interrupted_while_writing_leaves_no_output_and_no_temp_folder(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mixopt.exports

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mixopt.exports, "write_exports", crash)
    with pytest.raises(KeyboardInterrupt):
        from mixopt.pipeline import plan_recipe
        from mixopt.recipe import load_recipe

        plan_recipe(load_recipe(workspace).with_overrides(budget=60), tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


def test_plan__infeasible_budget_is_one_line_exit_2(workspace: Path, tmp_path: Path) -> None:
    result = _plan(workspace, tmp_path / "run", "--budget", "170")  # the target's 85 > 2 epochs of 40 rows
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
