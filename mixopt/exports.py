"""Exports: the mixture as TRL, LLaMA-Factory, axolotl and Megatron-LM read it, each trained on exactly it.

Every export points at the files `mixopt.mixture.write_mixture` writes: one `OUT/parquet/domains/<domain>.parquet`
per part, each already holding its part's allocated rows (repeats included), and for chat mixtures the whole
mixture in TRL's prompt/completion form (`OUT/parquet/trl/`). So no trainer needs a mixing weight that
samples: reading every file once is the mixture. Where a trainer must be given weights (Megatron), each
file's weight is its number of tokens, which makes one pass over the blend one pass over every file.

Formats checked against the trainers' code (the versions `make test-trainers` ran are in README.md):
- LLaMA-Factory reads `dataset_info.json` in `dataset_dir` (that exact name); `file_name` joins `dataset_dir`;
  `num_samples` equal to the file's rows keeps every row once; `mix_strategy: concat` concatenates the files.
  `stage: sft` with `train_on_prompt: false` puts the loss on the assistant turn only.
- TRL `SFTTrainer` on conversational `prompt`/`completion` columns puts the loss on the completion only
  (`completion_only_loss`, on by default for that form), whatever the chat template.
- axolotl `datasets:` entries (`path`, `ds_type`, `type`, `split`); it concatenates them, with no weight.
- Megatron-LM `get_blend_from_list`: `--data-path w1 prefix1 w2 prefix2 ...` (weights are normalised; each
  prefix gets that share of the sampled sequences, i.e. of the tokens); `--per-split-data-args-path` reads
  JSON with "train", "valid" and "test" keys. `tools/preprocess_data.py --output-prefix P --json-keys text`
  writes `P_text_document.bin/.idx`; `P_text_document` is the prefix a blend names.

Example:
    >>> row_shares({"gsm8k": 1, "law": 1, "math": 1})
    {'gsm8k': '0.333334', 'law': '0.333333', 'math': '0.333333'}
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mixopt import megatron_data
from mixopt.errors import MixoptError

DECIMALS = 6
SCHEMAS = ("messages", "text")
TRL_FILES = "parquet/trl/*.parquet"  # relative to OUT: the mixture in TRL's prompt/completion form
LLAMAFACTORY_DIR = "exports/llamafactory"
MODEL_PLACEHOLDER = "<model>"  # the hub id or folder of the model you fine-tune; the README says so
# The trainer versions `make test-trainers` installs and the run README names (tests/trainers). megatron-core
# 0.17+ and axolotl 0.20+ need Python >= 3.12, and mixopt's machines have the CPU torch for 3.11 only: so
# megatron-core 0.16.1 (the same tokenizer, IndexedDatasetBuilder and BlendedMegatronDatasetBuilder APIs as
# 0.19) and axolotl 0.19.0.
TESTED_TRAINERS = {"trl": "1.16.0", "llamafactory": "0.9.5", "axolotl": "0.19.0", "megatron-core": "0.16.1"}


def row_shares(counts: Mapping[str, int], decimals: int = DECIMALS) -> dict[str, str]:
    """Each name's share of the rows as a decimal string; the strings sum to exactly 1.

    Largest remainder in units of 10^-decimals: every share is within one unit of count / total, none is
    negative, and the sum is exact (adjusting only the last share could push a tiny share below zero).
    """
    total = sum(counts.values())
    if total <= 0:
        raise MixoptError("the mixture has no rows; nothing to export (raise the budget)")
    scale = 10**decimals
    exact = np.array(list(counts.values()), dtype=float) * scale / total  # (n,) in units
    units = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - units), kind="stable")  # largest remainders first, ties by position
    units[order[: scale - int(units.sum())]] += 1
    return {name: f"{u // scale}.{u % scale:0{decimals}d}" for name, u in zip(counts, units, strict=True)}


def _domain_file(name: str, depth: int = 1) -> str:
    """The part's parquet file relative to a folder `depth` levels under OUT (exports/ is 1)."""
    return "../" * depth + f"parquet/domains/{name}.parquet"


def _epochs_note(counts: Mapping[str, int], epochs: Mapping[str, float]) -> list[str]:
    width = max(len(n) for n in counts)
    lines = []
    for name, count in counts.items():
        over = f"{epochs[name]:.2f} epochs over its source" if name in epochs else "epochs not given"
        lines.append(f"#   {name:<{width}}  {count:>10,} rows  ({over})")
    return lines


def _check(counts: Mapping[str, int], schema: str) -> dict[str, int]:
    if schema not in SCHEMAS:
        raise MixoptError(f"schema '{schema}' is not one of {', '.join(SCHEMAS)}")
    if bad := [f"{n}={c}" for n, c in counts.items() if int(c) != c or c < 0]:
        raise MixoptError(f"row counts must be whole numbers >= 0; got {', '.join(bad)}")
    kept = {name: int(count) for name, count in counts.items() if count > 0}  # a part with no rows has no file
    if not kept:
        raise MixoptError("the mixture has no rows; nothing to export (raise the budget)")
    return kept


# -------------------------------------------------------------------------------------------------- TRL


def trl_snippet(schema: str) -> str:
    """The Python that trains on the mixture with TRL's SFTTrainer, run from OUT, on CPU or GPU as printed.

    Chat mixtures: the prompt/completion files, so the loss covers the completions only. Text mixtures: the
    `text` column, language modelling on every token. bf16 only where the GPU has it (TRL's default asks
    for it, and a machine without a GPU refuses). One epoch: one pass over the rows as allocated.
    """
    files = TRL_FILES if schema == "messages" else "parquet/mixture-*.parquet"
    return f"""import torch
from datasets import load_dataset
from trl import SFTConfig, SFTTrainer

train = load_dataset("parquet", data_files="{files}", split="train")
args = SFTConfig(
    output_dir="sft",
    num_train_epochs=1,  # one pass over the mixture: every part's allocated rows once
    bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
)
trainer = SFTTrainer(model="{MODEL_PLACEHOLDER}", train_dataset=train, args=args)
trainer.train()
"""


# ------------------------------------------------------------------------------------------ LLaMA-Factory


def _llamafactory_entry(name: str, count: int, schema: str) -> dict:
    # exports/llamafactory is two levels under OUT
    if schema == "messages":
        return {
            "file_name": _domain_file(name, depth=2),
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
            "num_samples": count,  # the file's rows: every row once
        }
    # alpaca with only `prompt`: LLaMA-Factory's pre-training (stage: pt) form for plain text
    return {"file_name": _domain_file(name, depth=2), "columns": {"prompt": "text"}, "num_samples": count}


def llamafactory_command() -> str:
    """The launch line, from OUT; `template` is LLaMA-Factory's name for the model's chat format."""
    args = f"model_name_or_path={MODEL_PLACEHOLDER} template=<template>"
    return f"llamafactory-cli train {LLAMAFACTORY_DIR}/train_args.yaml {args}"


def _llamafactory_args(counts: Mapping[str, int], schema: str, dropped: list[str]) -> str:
    stage = "sft" if schema == "messages" else "pt"
    lines = [
        "# LLaMA-Factory training arguments written by mixopt. From OUT (the run folder):",
        f"#   {llamafactory_command()}",
        "# (or merge these keys into your own training YAML; dataset_dir is relative to where you launch).",
        "# Each file already holds its part's allocated rows, so concat trains on exactly the mixture;",
        "# interleave_* would sample the files instead and leave rows out.",
    ]
    if dropped:
        lines.append(f"# Left out (no rows allocated): {', '.join(dropped)}")
    data = {
        "stage": stage,
        "do_train": True,
        "finetuning_type": "full",
        "dataset_dir": LLAMAFACTORY_DIR,
        "dataset": ",".join(counts),
        "mix_strategy": "concat",
        "cutoff_len": 2048,  # longer rows are truncated, not dropped
        "num_train_epochs": 1.0,  # one pass: every part's allocated rows once
        "output_dir": "sft",
    }
    if schema == "messages":
        data["train_on_prompt"] = False  # loss on the assistant turn only (LLaMA-Factory's default, stated)
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False)


# ------------------------------------------------------------------------------------------------ axolotl


def _axolotl_entry(name: str, schema: str) -> dict:
    entry: dict = {"path": _domain_file(name), "ds_type": "parquet"}
    if schema == "messages":
        entry |= {"type": "chat_template", "field_messages": "messages", "roles_to_train": ["assistant"]}
    else:
        entry |= {"type": "completion", "field": "text"}
    return entry | {"split": "train"}


def _axolotl(counts: Mapping[str, int], epochs: Mapping[str, float], schema: str, dropped: list[str]) -> str:
    trained = (
        "# Loss: the assistant turns only (roles_to_train; with train_on_inputs: false, axolotl's default)."
        if schema == "messages"
        else "# Loss: every token of `text` (type: completion)."
    )
    header = [
        "# axolotl `datasets:` block written by mixopt: paste it into your axolotl config.",
        "# axolotl has no mixing weight per dataset: it concatenates the files below. So each file already",
        "# holds its domain's allocated rows (repeated sources included), and the mixture's shares come out",
        "# exactly; more `num_epochs` repeat every file alike. axolotl drops rows longer than sequence_len:",
        "# set it above your longest row. Paths are relative to OUT/exports: launch axolotl from that folder",
        "# or make them absolute.",
        trained,
        "# Rows per file:",
        *_epochs_note(counts, epochs),
    ]
    if dropped:
        header.append(f"# Left out (no rows allocated): {', '.join(dropped)}")
    body = yaml.safe_dump({"datasets": [_axolotl_entry(n, schema) for n in counts]}, sort_keys=False)
    return "\n".join(header) + "\n" + body


# ----------------------------------------------------------------------------------------------- Megatron


def _megatron_prefix(name: str) -> str:
    # what `preprocess_data.py --output-prefix parquet/domains/<name> --json-keys text` writes, relative to OUT
    return f"parquet/domains/{name}{megatron_data.SUFFIX}"


MEGATRON_INDEXED = f"python exports/megatron_data.py indexed --tokenizer {MODEL_PLACEHOLDER}"


def megatron_preprocess_commands(names: list[str]) -> list[str]:
    """The other route, from OUT: JSONL with a `text` field, then Megatron-LM's preprocess_data.py per part.

    Every flag preprocess_data.py requires (`--input`, `--output-prefix`, `--workers`, the tokenizer's) is
    given; `--append-eod` ends each row with the EOS token, as `megatron_data.py indexed` does.
    """
    lines = [f"python exports/megatron_data.py jsonl --tokenizer {MODEL_PLACEHOLDER}"]
    for name in names:
        prefix = f"parquet/domains/{name}"
        lines.append(
            f"python $MEGATRON_LM/tools/preprocess_data.py --input {prefix}.jsonl --output-prefix {prefix} "
            f"--tokenizer-type HuggingFaceTokenizer --tokenizer-model {MODEL_PLACEHOLDER} --json-keys text "
            "--append-eod --workers 1"
        )
    return lines


def _megatron_blend(tokens: Mapping[str, int]) -> list[str]:
    return [item for name, n in tokens.items() for item in (str(n), _megatron_prefix(name))]


def _megatron_txt(counts: Mapping[str, int], tokens: Mapping[str, int], model: str, dropped: list[str]) -> str:
    width = max(len(n) for n in counts)
    lines = [
        "# Megatron-LM data blend written by mixopt. Each prefix's weight is its number of tokens (EOD",
        f"# included, counted with the recipe's tokenizer, {model}): Megatron gives each prefix that share of",
        "# the sampled sequences, so one pass over the blend (--train-samples = total tokens / --seq-length)",
        "# reads every file once, and each file holds its part's allocated rows: the mixture exactly. Weights",
        "# by rows would under-sample the parts with longer rows. Megatron's GPT pretraining trains on every",
        "# token: the chat template's system prompt, the question and the answer (--eod-mask-loss masks the",
        "# EOD token only). Write the token files from OUT with megatron-core's builder:",
        f"#   {MEGATRON_INDEXED}",
        "# or with a Megatron-LM checkout ($MEGATRON_LM): JSONL with a `text` field, then preprocess_data.py:",
        *(f"#   {line}" for line in megatron_preprocess_commands(list(counts))),
        "# megatron_data.py prints the blend of the tokens it wrote (use that if your tokenizer differs).",
        "# Rows and tokens per part:",
        *(f"#   {n:<{width}}  {counts[n]:>10,} rows  {tokens[n]:>12,} tokens" for n in counts),
    ]
    if dropped:
        lines.append(f"# Left out (no rows allocated): {', '.join(dropped)}")
    lines.append("--data-path " + " ".join(_megatron_blend(tokens)))
    return "\n".join(lines) + "\n"


def _megatron_json(tokens: Mapping[str, int]) -> str:
    # --per-split-data-args-path reads all three keys; null builds no dataset for that split.
    return json.dumps({"train": _megatron_blend(tokens), "valid": None, "test": None}, indent=1) + "\n"


# ---------------------------------------------------------------------------------------------- entry point


def write_exports(
    out: Path, counts: Mapping[str, int], epochs: Mapping[str, float], schema: str, tokenizer: Any
) -> list[str]:
    """Write `OUT/exports/*` for LLaMA-Factory, axolotl and Megatron-LM; returns the paths relative to `out`.

    `counts`: rows per part in the mixture, the target included under its own name, in the order the
    trainers should list them; `OUT/parquet/domains/<part>.parquet` must hold them (`write_mixture`).
    `epochs`: passes over each part's source (for the comments). `schema`: "messages" or "text", as
    `mixopt.mixture.common_schema` chose. `tokenizer`: the recipe's (transformers) tokenizer, which counts
    each file's Megatron tokens. Parts with no rows are left out.
    """
    kept = _check(counts, schema)
    dropped = [name for name in counts if name not in kept]
    if missing := [n for n in kept if not (out / _domain_file(n, depth=0)).is_file()]:
        raise MixoptError(f"no parquet file for part(s) {', '.join(missing)} under {out}/parquet/domains")
    tokens = megatron_data.count_tokens(out, [_megatron_prefix(n) for n in kept], tokenizer)
    tokens = {name: tokens[_megatron_prefix(name)] for name in kept}
    info = {name: _llamafactory_entry(name, count, schema) for name, count in kept.items()}
    model = getattr(tokenizer, "name_or_path", "") or "the recipe's model"
    files = {
        "llamafactory/dataset_info.json": json.dumps(info, indent=1) + "\n",
        "llamafactory/train_args.yaml": _llamafactory_args(kept, schema, dropped),
        "axolotl.yaml": _axolotl(kept, epochs, schema, dropped),
        "megatron_blend.txt": _megatron_txt(kept, tokens, model, dropped),
        "megatron_blend.json": _megatron_json(tokens),
    }
    (out / LLAMAFACTORY_DIR).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / "exports" / name).write_text(text)
    # the Megatron tool travels with the run folder: a training machine may not have mixopt
    shutil.copyfile(Path(megatron_data.__file__), out / "exports" / "megatron_data.py")
    return [f"exports/{name}" for name in [*files, "megatron_data.py"]]
