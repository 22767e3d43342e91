"""`mixopt sae train` on the tiny in-process model: sae-lens format out, quality.json, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mixopt.cli import cli


def _sae_recipe(workspace: Path, tmp_path: Path, tokens: int = 600) -> Path:
    root = workspace.parent
    recipe = tmp_path / "sae.yaml"
    recipe.write_text(f"""\
kind: sae-train
model: {{path: {root / "model"}}}
layer: 1
data:
  - source: {{path: {root / "data" / "math.jsonl"}}}
    prompt: "{{q}}"
    response: "{{a}}"
  - source: {{path: {root / "data" / "law.jsonl"}}}
    text: "{{text}}"
sae: {{d_sae: 64, k: 4}}
training: {{tokens: {tokens}, epochs: 2, batch_size: 64, checkpoints: 2, batch_tokens: 256}}
output: out/sae
""")
    return recipe


def test_sae_train__writes_an_sae_lens_folder_with_its_quality(workspace: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["sae", "train", str(_sae_recipe(workspace, tmp_path))])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "sae"
    quality = json.loads((out / "quality.json").read_text())
    assert quality["mean_l0"] == pytest.approx(4.0)
    assert quality["tokens_train"] + quality["tokens_heldout"] >= 600
    assert quality["d_in"] == 32 and quality["d_sae"] == 64 and quality["layer"] == 1

    from sae_lens import SAE

    sae = SAE.load_from_disk(out)
    assert sae.cfg.d_sae == 64 and "blocks.1." in sae.cfg.metadata.hook_name


def test_sae_train__a_second_run_reuses_activations_and_checkpoints(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _sae_recipe(workspace, tmp_path)
    assert CliRunner().invoke(cli, ["sae", "train", str(recipe)]).exit_code == 0

    import mixopt.sae_data

    def no_forward(*args, **kwargs):
        raise AssertionError("activations are cached: no forward pass")

    monkeypatch.setattr(mixopt.sae_data, "residual_streams", no_forward)
    again = CliRunner().invoke(cli, ["sae", "train", str(recipe)])
    assert again.exit_code == 0, again.output
    assert "resuming SAE training" in again.output


def test_sae_train__plan_recipe_is_refused_with_the_fix(workspace: Path) -> None:
    result = CliRunner().invoke(cli, ["sae", "train", str(workspace)])
    assert result.exit_code == 2 and "kind: sae-train" in result.output
