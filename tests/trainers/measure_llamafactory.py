"""In the LLaMA-Factory venv, from a copy of the run folder: run the README's `llamafactory-cli train` line for
2 steps, then build LLaMA-Factory's own training set from the same arguments and measure it (rows per domain,
loss mask). argv: model folder, result JSON."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from labels import answers, measure, readme_block, save, substitute  # noqa: E402

TEMPLATE = "smollm2"  # LLaMA-Factory's name for SmolLM2's chat format (the tiny model has its tokenizer)

model, result = sys.argv[1], Path(sys.argv[2])
run = Path.cwd()
command = readme_block(run, "LLaMA-Factory", "bash").strip()
command = substitute(substitute(command, "<model>", model), "<template>", TEMPLATE)
command += " max_steps=2 report_to=none"
trained = subprocess.run(command, shell=True, capture_output=True, text=True)
if trained.returncode != 0:
    sys.exit(f"{command}\n{trained.stdout[-3000:]}\n{trained.stderr[-6000:]}")

from llamafactory.data import get_dataset, get_template_and_fix_tokenizer  # noqa: E402
from llamafactory.hparams import get_train_args  # noqa: E402
from llamafactory.model import load_tokenizer  # noqa: E402

words = shlex.split(command)
args = yaml.safe_load(Path(words[2]).read_text())  # the YAML, then the command line's key=value overrides
args |= {k: yaml.safe_load(v) for k, v in (w.split("=", 1) for w in words[3:])}
args["output_dir"] = "measure"  # the training run's folder holds its model now; LLaMA-Factory would refuse it
model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
tokenizer_module = load_tokenizer(model_args)
tokenizer = tokenizer_module["tokenizer"]
template = get_template_and_fix_tokenizer(tokenizer, data_args)
train = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)["train_dataset"]
examples = ((row["input_ids"], row["labels"]) for row in train)
out = measure(examples, tokenizer, answers(run))
out |= {
    "trained_log_tail": trained.stdout[-400:],
    "num_train_epochs": training_args.num_train_epochs,
    "version": __import__("llamafactory").__version__,
}
save(result, out)
