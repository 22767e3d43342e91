"""Exports: the mixture described for the trainers people use (LLaMA-Factory, axolotl, Megatron-LM).

Every export points at the per-domain parquet files that `mixopt.mixture.write_mixture` writes
(`OUT/parquet/domains/<domain>.parquet`), each already holding its domain's allocated rows. Shares are
shares of rows, rounded to 6 decimals by largest remainder so they sum to exactly 1.

Formats checked against the trainers' code:
- LLaMA-Factory `data/dataset_info.json`: `file_name` joins `dataset_dir`; `num_samples` draws that many rows
  of the file; `mix_strategy: interleave_under` is `datasets.interleave_datasets(probabilities=interleave_probs,
  stopping_strategy="first_exhausted")`; `interleave_probs` is a comma-separated string.
- axolotl `datasets:` entries (`path`, `ds_type`, `type`, `split`); it concatenates them, with no weight.
- Megatron-LM `get_blend_and_blend_per_split`: `--data-path w1 prefix1 w2 prefix2 ...`; the file given to
  `--per-split-data-args-path` is JSON with "train", "valid" and "test" keys, each a list such as
  ["0.3", "prefix1", "0.7", "prefix2"] or null; `tools/preprocess_data.py --output-prefix P --json-keys text`
  writes `P_text_document.bin/.idx`, and `P_text_document` is the prefix a blend names.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> write_exports(out, {"gsm8k": 600, "law": 300, "math": 100}, {"law": 1.5, "math": 0.2}, "messages")[0]
    'exports/llamafactory_dataset_info.json'
    >>> row_shares({"gsm8k": 1, "law": 1, "math": 1})
    {'gsm8k': '0.333334', 'law': '0.333333', 'math': '0.333333'}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml

from mixopt.errors import MixoptError

DECIMALS = 6
SCHEMAS = ("messages", "text")


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


def _domain_file(name: str) -> str:
    return f"../parquet/domains/{name}.parquet"  # relative to OUT/exports, where the export files live


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
    # A domain with no rows has no file; LLaMA-Factory's interleave_under would stop at once on it.
    kept = {name: int(count) for name, count in counts.items() if count > 0}
    if not kept:
        raise MixoptError("the mixture has no rows; nothing to export (raise the budget)")
    return kept


# ------------------------------------------------------------------------------------------ LLaMA-Factory


def _llamafactory_entry(name: str, count: int, schema: str) -> dict:
    if schema == "messages":
        return {
            "file_name": _domain_file(name),
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
            "num_samples": count,
        }
    # alpaca with only `prompt`: LLaMA-Factory's pre-training (stage: pt) form for plain text
    return {"file_name": _domain_file(name), "columns": {"prompt": "text"}, "num_samples": count}


def _llamafactory_args(counts: Mapping[str, int], schema: str, dropped: list[str]) -> str:
    probs = row_shares(counts)
    stage = "sft" if schema == "messages" else "pt"
    lines = [
        "# LLaMA-Factory training arguments written by mixopt: merge these keys into your training YAML.",
        "# dataset_dir is relative to the folder you launch from (OUT here); use an absolute path otherwise.",
        f"# The files are in {'sharegpt' if schema == 'messages' else 'alpaca prompt-only'} form: use stage: {stage}.",
        "# interleave_probs are shares of rows (num_samples / total). interleave_under stops when the first",
        "# domain runs out, so a few rows of the others go unused; mix_strategy: concat trains on exactly the",
        "# allocated rows (each file already holds its domain's count), shuffled by the trainer's sampler.",
    ]
    if dropped:
        lines.append(f"# Left out (no rows allocated): {', '.join(dropped)}")
    lines += [
        "dataset_dir: exports",
        f"dataset: {json.dumps(','.join(counts))}",
        "mix_strategy: interleave_under",
        f"interleave_probs: {json.dumps(','.join(probs.values()))}",
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ axolotl


def _axolotl_entry(name: str, schema: str) -> dict:
    entry: dict = {"path": _domain_file(name), "ds_type": "parquet"}
    if schema == "messages":
        entry |= {"type": "chat_template", "field_messages": "messages"}
    else:
        entry |= {"type": "completion", "field": "text"}
    return entry | {"split": "train"}


def _axolotl(counts: Mapping[str, int], epochs: Mapping[str, float], schema: str, dropped: list[str]) -> str:
    header = [
        "# axolotl `datasets:` block written by mixopt: paste it into your axolotl config.",
        "# axolotl has no mixing weight per dataset: it concatenates the files below. So each file already",
        "# holds its domain's allocated rows (repeated sources included), and the mixture's shares come out",
        "# exactly; more `num_epochs` repeat every file alike. Paths are relative to OUT/exports: launch",
        "# axolotl from that folder or make them absolute.",
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
    return f"parquet/domains/{name}_text_document"


def _megatron_blend(counts: Mapping[str, int]) -> list[str]:
    shares = row_shares(counts)
    return [item for name in counts for item in (shares[name], _megatron_prefix(name))]


def _megatron_txt(counts: Mapping[str, int], epochs: Mapping[str, float], schema: str, dropped: list[str]) -> str:
    field = "`text` field" if schema == "text" else "`text` field (render `messages` with your chat template)"
    lines = [
        "# Megatron-LM data blend written by mixopt: weights are each domain's share of the training samples",
        "# (rows); Megatron normalises them. Megatron reads token files, not parquet. For each domain, from OUT:",
        f"#   1. write parquet/domains/<domain>.parquet as JSON lines with a {field}",
        "#   2. python tools/preprocess_data.py --input <domain>.jsonl --json-keys text \\",
        "#        --output-prefix parquet/domains/<domain> --tokenizer-type HuggingFaceTokenizer \\",
        "#        --tokenizer-model <model> --append-eod",
        "#      which writes parquet/domains/<domain>_text_document.{bin,idx}: the prefixes below.",
        "# Megatron's samples are fixed-length token sequences, not rows: a domain with longer rows gets more",
        "# tokens than its row share, and --train-samples counts sequences.",
        "# Rows per domain:",
        *_epochs_note(counts, epochs),
    ]
    if dropped:
        lines.append(f"# Left out (no rows allocated): {', '.join(dropped)}")
    lines.append("--data-path " + " ".join(_megatron_blend(counts)))
    return "\n".join(lines) + "\n"


def _megatron_json(counts: Mapping[str, int]) -> str:
    # --per-split-data-args-path reads all three keys; null builds no dataset for that split.
    return json.dumps({"train": _megatron_blend(counts), "valid": None, "test": None}, indent=1) + "\n"


# ---------------------------------------------------------------------------------------------- entry point


def write_exports(out: Path, counts: Mapping[str, int], epochs: Mapping[str, float], schema: str) -> list[str]:
    """Write `OUT/exports/*` for LLaMA-Factory, axolotl and Megatron-LM; returns the paths relative to `out`.

    `counts`: rows per part in the mixture, the target included under its own name, in the order the
    trainers should list them. `epochs`: passes over each part's source (for the comments). `schema`:
    "messages" or "text", as `mixopt.mixture.common_schema` chose. Parts with no rows are left out.
    """
    kept = _check(counts, schema)
    dropped = [name for name in counts if name not in kept]
    info = {name: _llamafactory_entry(name, count, schema) for name, count in kept.items()}
    files = {
        "llamafactory_dataset_info.json": json.dumps(info, indent=1) + "\n",
        "llamafactory_train_args.yaml": _llamafactory_args(kept, schema, dropped),
        "axolotl.yaml": _axolotl(kept, epochs, schema, dropped),
        "megatron_blend.txt": _megatron_txt(kept, epochs, schema, dropped),
        "megatron_blend.json": _megatron_json(kept),
    }
    (out / "exports").mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / "exports" / name).write_text(text)
    return [f"exports/{name}" for name in files]
