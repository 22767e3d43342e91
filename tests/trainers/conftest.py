"""Fixtures for `make test-trainers` (tests/trainers/harness.py installs and runs the trainers)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainers.harness import ROOT, trainers_dir


@pytest.fixture(scope="session")
def plan() -> Path:
    """The quickstart plan the README's commands run on (2,000 rows)."""
    if given := os.environ.get("MIXOPT_TRAINERS_PLAN"):
        return Path(given)
    out = trainers_dir() / "plan"
    subprocess.run(
        [sys.executable, "-m", "mixopt", "plan", str(ROOT / "recipes/quickstart.yaml"), "--budget", "2000"]
        + ["--out", str(out), "--force"],
        check=True,
    )
    return out


@pytest.fixture(scope="session")
def manifest_counts(plan: Path) -> dict[str, int]:
    """Rows per part as the manifest records them (the target under its own name), parts with rows only."""
    manifest = json.loads((plan / "manifest.json").read_text())
    counts = {manifest["recipe"]["resolved"]["target"]["name"]: manifest["solver"]["target_count"]}
    counts |= {d["name"]: d["count"] for d in manifest["allocation"]}
    return dict(sorted((n, c) for n, c in counts.items() if c))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """A 2-layer random Llama saved with the embedded SmolLM2 tokenizer (the one the plan counted tokens with)."""
    from transformers import AutoTokenizer

    from mixopt.model import resolve_model_source
    from mixopt.recipe import ModelSpec
    from tests.tiny import tiny_llama

    folder = trainers_dir() / "tiny-model"
    if (folder / "config.json").is_file():
        return folder
    source, _ = resolve_model_source(ModelSpec(path="smollm2-135m-instruct"), ROOT)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = tiny_llama(len(tokenizer))
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    staged = folder.with_suffix(".tmp")
    shutil.rmtree(staged, ignore_errors=True)
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    # readable by the transformers 4.x some trainers pin: the v5 tokenizer class and rope fields have v4 names
    for name, fields in {
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast"},
        "config.json": {"rope_theta": 10000.0},
    }.items():
        (staged / name).write_text(json.dumps(json.loads((staged / name).read_text()) | fields, indent=1))
    staged.rename(folder)
    return folder


@pytest.fixture
def run(plan: Path, tmp_path: Path) -> Path:
    """A copy of the plan for one trainer: what it writes (checkpoints, token files) stays in the copy."""
    copy = tmp_path / "run"
    shutil.copytree(plan, copy)
    return copy
