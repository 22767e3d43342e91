"""The embedded default: the real SmolLM2-135M-Instruct and the SAE shipped in the package.

The fast test dequantizes the model once into the test cache (~25 s cold) and checks the shipped SAE on
held-out text (GSM8K test, which the SAE never saw). The slow test runs the quickstart end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mixopt.artifacts import builtin_sae_dir
from mixopt.cli import cli
from mixopt.encoding import encode_chat
from mixopt.model import load_model, residual_stream
from mixopt.recipe import ModelSpec, SAESpec
from mixopt.sae import check_sae, load_sae
from mixopt.sae_quality import reconstruction

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MIXOPT_DATA", REPO.parent / "shared" / "data"))
SAE_ALIAS, LAYER = "smollm2-135m-instruct-res-l22", 22


def _heldout_texts(n: int = 40) -> list[tuple[str, str]]:
    path = DATA / "gsm8k" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"shared data not found at {DATA} (set MIXOPT_DATA)")
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [(r["question"], r["answer"]) for r in rows]


@pytest.mark.slow  # loads the real model (minutes on 2 loaded cores)
def test_shipped_sae__fits_the_model_and_reconstructs_heldout_text_at_its_recorded_quality() -> None:
    lm = load_model(ModelSpec(path="smollm2-135m-instruct"))
    assert (lm.n_layers, lm.hidden_size) == (30, 576)
    sae = load_sae(SAESpec(path=SAE_ALIAS, layer=LAYER), REPO, lm.device)
    check_sae(sae, lm, LAYER)
    recorded = json.loads((builtin_sae_dir(SAE_ALIAS) / "quality.json").read_text())
    acts = []
    for prompt, response in _heldout_texts():
        enc = encode_chat(lm.tokenizer, prompt, response, 512)
        ids = torch.tensor([enc.ids])
        acts.append(residual_stream(lm.model, ids, torch.ones_like(ids), LAYER)[0][torch.tensor(enc.counted)])
    quality = reconstruction(sae, torch.cat(acts))
    assert quality.explained_variance >= recorded["explained_variance"] - 0.05
    assert quality.mean_l0 <= recorded["mean_l0"] + 1e-6


@pytest.mark.slow
def test_quickstart__plans_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "quickstart"
    result = CliRunner().invoke(
        cli, ["plan", str(REPO / "recipes" / "quickstart.yaml"), "--budget", "2000", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["rows"] == 2000
    assert len(manifest["sts"]["shifted_latents"]) == 100
