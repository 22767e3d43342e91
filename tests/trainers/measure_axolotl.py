"""In the axolotl venv, from a copy of the run folder: paste the exported `datasets:` block into a minimal config
(a tiny model, 2 steps), run the README's `axolotl train` line, then load axolotl's own training set from that
config and measure it (rows per domain, loss mask). argv: model folder, result JSON."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from labels import answers, measure, readme_block, save, substitute  # noqa: E402

os.environ |= {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}  # offline: no telemetry, here or in the CLI
model, result = sys.argv[1], Path(sys.argv[2])
run = Path.cwd()
block = yaml.safe_load((run / "exports/axolotl.yaml").read_text())  # the export, as a user pastes it
config = {
    "base_model": model,
    "chat_template": "tokenizer_default",  # the model's own template, as the other trainers use
    "sequence_len": 2048,  # above the longest row: axolotl drops longer ones (the README says so)
    "micro_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "num_epochs": 1,
    "max_steps": 2,
    "learning_rate": 1e-4,
    "optimizer": "adamw_torch",
    "val_set_size": 0,
    "output_dir": "./axolotl-out",
    "dataset_prepared_path": "./axolotl-prepared",
    "save_strategy": "no",
    "bf16": False,  # CPU
    "fp16": False,
} | block
(run / "exports/run.yml").write_text(yaml.safe_dump(config, sort_keys=False))
command = substitute(readme_block(run, "axolotl", "bash").split("#")[0].strip(), "<your config>.yml", "run.yml")
trained = subprocess.run(command, shell=True, capture_output=True, text=True)
if trained.returncode != 0:
    sys.exit(f"{command}\n{trained.stdout[-4000:]}\n{trained.stderr[-8000:]}")

os.chdir(run / "exports")  # the block's paths are relative to exports/
from axolotl.cli.config import load_cfg  # noqa: E402
from axolotl.common.datasets import load_datasets  # noqa: E402
from axolotl.loaders import load_tokenizer  # noqa: E402

cfg = load_cfg("run.yml")
train = load_datasets(cfg=cfg).train_dataset
tokenizer = load_tokenizer(cfg)
out = measure(((row["input_ids"], row["labels"]) for row in train), tokenizer, answers(run))
out |= {"trained_log_tail": (trained.stdout + trained.stderr)[-600:], "version": __import__("axolotl").__version__}
save(result, out)
