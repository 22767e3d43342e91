"""The run's README: what the mixture holds, why, and how each trainer loads it.

Written next to the mixture (`OUT/README.md`) so the folder explains itself when copied to a training
machine. Paths in it are relative to OUT.

Example:
    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp())
    >>> write_run_readme(out, "| domain | STS |\\n| --- | --- |\\n| law | 0.8 |", {"gsm8k": 600, "law": 400},
    ...                  {"gsm8k": 0.5, "law": 2.0}, "messages", "gsm8k")
    >>> (out / "README.md").read_text().splitlines()[0]
    '# mixopt mixture: gsm8k + 1 replay domain'
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mixopt.exports import (
    MEGATRON_INDEXED,
    TESTED_TRAINERS,
    llamafactory_command,
    megatron_preprocess_commands,
    row_shares,
    trl_snippet,
)

if TYPE_CHECKING:
    from mixopt.scores import Scores
    from mixopt.solver import Allocation


def _epochs_table(counts: Mapping[str, int], epochs: Mapping[str, float], target_name: str) -> str:
    shares = row_shares(counts) if sum(counts.values()) > 0 else dict.fromkeys(counts, "0")
    lines = ["| part | rows | share of rows | epochs over its source |", "| --- | ---: | ---: | ---: |"]
    for name, count in counts.items():
        label = f"{name} (target)" if name == target_name else name
        over = f"{epochs[name]:.2f}" if name in epochs else "-"
        lines.append(f"| {label} | {count:,} | {float(shares[name]):.1%} | {over} |")
    return "\n".join(lines)


TRAINER_VERSIONS = ", ".join(f"{name} {version}" for name, version in TESTED_TRAINERS.items())


def _trained_on(schema: str) -> dict[str, str]:
    """What each trainer puts the loss on, as its section says it."""
    if schema == "text":
        every = "every token of `text`"
        return {"trl": every, "llamafactory": every + " (`stage: pt`)", "axolotl": every, "megatron": every}
    assistant = (
        "the assistant's answer (and the end-of-turn token the template closes it with); the question and "
        "any system prompt the chat template adds are masked"
    )
    return {
        "trl": assistant + " (TRL's `completion_only_loss`, on by default for prompt/completion data)",
        "llamafactory": assistant + " (`train_on_prompt: false`)",
        "axolotl": assistant + " (`roles_to_train: [assistant]`, `train_on_inputs: false` by default)",
        "megatron": (
            "every token: the system prompt the chat template adds, the question and the answer "
            "(Megatron's GPT pretraining has no prompt mask; `--eod-mask-loss` masks the EOD token only)"
        ),
    }


def _loading(schema: str, counts: Mapping[str, int]) -> str:
    names = [name for name, count in counts.items() if count > 0]
    total = sum(counts.values())
    column = "`messages` (user/assistant turns)" if schema == "messages" else "`text`"
    trained = {name: textwrap.fill(text, 108) for name, text in _trained_on(schema).items()}
    trl_form = (
        "`parquet/trl/` holds the mixture in TRL's conversational prompt/completion form (same rows, same\norder)"
        if schema == "messages"
        else "TRL reads the `text` column of the mixture's parquet shards (language modelling)"
    )
    megatron = "\n".join(megatron_preprocess_commands(names))
    return f"""## Training on it

Every row has {column}, `domain` (the part it came from) and `source_index` (its row in that part's
source). The rows are already drawn: each part's file holds exactly its allocated rows, so one pass over the
files (one epoch) trains on exactly the mixture; more epochs repeat every part alike. `<model>` below is the
hub id or folder of the model you fine-tune; commands run from this folder. `make test-trainers` in mixopt
runs these commands on a quickstart plan, 2 steps each on a tiny model, and checks the rows per part and
the loss mask; it passed with {TRAINER_VERSIONS} (torch 2.13.0, CPU).

### datasets

```python
from collections import Counter

from datasets import load_from_disk

mixture = load_from_disk("mixture")  # {total:,} rows
Counter(mixture["domain"])  # rows per part, as in the table above
```

### TRL

{trl_form}.
Loss on {trained["trl"]}.
On CPU or GPU as printed (bf16 only where the GPU has it):

```python
{trl_snippet(schema).strip()}
```

### LLaMA-Factory

`exports/llamafactory/dataset_info.json` declares one dataset per part, each reading
`parquet/domains/<part>.parquet` with `num_samples` = its rows; `exports/llamafactory/train_args.yaml`
lists them all with `mix_strategy: concat` (every row once: exactly the mixture). `template` is
LLaMA-Factory's name for your model's chat format.
Loss on {trained["llamafactory"]}.

```bash
{llamafactory_command()}
```

### axolotl

`exports/axolotl.yaml` is a `datasets:` block over the per-part parquet files: paste it into your axolotl
config. axolotl has no mixing weight: it concatenates the files, and each already holds its part's
allocated rows, so the shares come out exactly. It drops rows longer than `sequence_len`: set that above
your longest row. Paths are relative to `exports/`: launch from there or make them absolute.
Loss on {trained["axolotl"]}.

```bash
cd exports && axolotl train <your config>.yml  # your config, with the datasets: block of axolotl.yaml pasted in
```

### Megatron-LM

Megatron reads token files (`.bin/.idx`). Write them with megatron-core's own builder and tokenizer
(`exports/megatron_data.py`, copied here from mixopt; it needs pyarrow and transformers):

```bash
{MEGATRON_INDEXED}
```

or render JSONL with a `text` field and run Megatron-LM's `tools/preprocess_data.py` (`$MEGATRON_LM` is
your checkout):

```bash
{megatron}
```

Then train with `exports/megatron_blend.txt`'s `--data-path` line (or `--per-split-data-args-path
exports/megatron_blend.json`). Each prefix's weight is its number of tokens: Megatron gives each prefix
that share of the sampled sequences, so `--train-samples` = total tokens / `--seq-length` reads every
file once, and each file holds its part's allocated rows.
Loss on {trained["megatron"]}.

The parquet files and exports are written when the recipe's `output.formats` includes `parquet`;
`mixture/` when it includes `arrow`.
"""


def write_run_readme(
    out: Path,
    table_md: str,
    counts: Mapping[str, int],
    epochs: Mapping[str, float],
    schema: str,
    target_name: str,
    blended: bool = False,
) -> None:
    """Write `out/README.md`: the plots, the domain table, rows and epochs per part, and loading recipes.

    `table_md`: the domain table as markdown (STS, baselines, allocation). `counts`: rows per part, the
    target included under `target_name`. `epochs`: passes over each part's source. `schema`: "messages"
    or "text". `blended`: `output.materialize: never`, the rows are streamed by `mixopt.load_mixture`.
    """
    replay = [name for name in counts if name != target_name]
    total = sum(counts.values())
    plural = "domain" if len(replay) == 1 else "domains"
    text = f"""# mixopt mixture: {target_name} + {len(replay)} replay {plural}

A fine-tuning mixture of {total:,} rows: the target data `{target_name}` ({counts.get(target_name, 0):,} rows)
plus replay rows from the domains it is forecast to move most, so that the fine-tune keeps them.
Each domain's score (the recipe's `sts.score`: an STS variant, the SAE Transferability Score, or a
baseline such as centered similarity) forecasts how strongly training on the target moves it; the solver
gives more replay to the domains most exposed. The numbers behind this run are in `manifest.json`. The
forecast is a hypothesis until checked on your model and data (`mixopt validate`): on the embedded
SmolLM2-135M, STS did not rank domains by how far real fine-tunes moved them, centered similarity over
response tokens did weakly (Spearman +0.22), and neither an STS nor a similarity allocation protected
better than uniform replay at the same budget; replay itself helped, in the format of its rows (mixopt's
docs/validation.md).

![STS per domain, with the raw-activation baseline](plots/sts.png)

![Share of the mixture per part](plots/allocation.png)

## Domains

{table_md.strip()}

## Rows and epochs

Epochs over its source = rows in the mixture / rows the source has. Below 1, a seeded sample of the
source; above 1, whole passes over the source (each a fresh seeded shuffle) and then part of one more,
so every source row appears floor or ceil of that many times.

{_epochs_table(counts, epochs, target_name)}

{_blend_loading(schema) if blended else _loading(schema, counts)}"""
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text)


def _blend_loading(schema: str) -> str:
    """How to read a `materialize: never` plan: its rows are not in this folder."""
    column = "messages" if schema == "messages" else "text"
    return f"""## Loading

This plan wrote no rows (`output.materialize: never`): `blend.json` says how to draw them (each part's
source and templates, count and seed; the shuffle seed), and `mixopt.load_mixture` streams them, the
same rows in the same order as a materialised plan of the same recipe and seed would hold (it refuses a
source whose rows changed since). Columns: `{column}`, `domain`, `source_index`.

```python
import mixopt
ds = mixopt.load_mixture("path/to/this/folder")          # datasets.IterableDataset
from datasets.distributed import split_dataset_by_node  # one part per rank of a distributed trainer
ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
```
The trainer exports (`exports/`) need the rows as files: plan with `output.materialize: always` for them.
"""


def allocation_markdown(scores: Scores, allocation: Allocation) -> str:
    """The domain table (the recipe's score, baseline, allocation) as markdown, target first."""
    by_name = {d.name: d for d in scores.domains}
    lines = [
        f"| domain | {scores.score} | 95% interval | raw baseline | count | share | epochs |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        f"| {scores.target.name} (target) | | | | {allocation.target_count} | {allocation.target_fraction:.1%} | |",
    ]
    for d in sorted(allocation.domains, key=lambda a: by_name[a.name].score, reverse=True):
        s = by_name[d.name]
        lo, hi = s.interval or [float("nan")] * 2
        lines.append(
            f"| {d.name} | {s.score:.4g} | [{lo:.4g}, {hi:.4g}] | {s.baseline:.4g} | {d.count} | "
            f"{d.share:.1%} | {d.epochs:.2f} |"
        )
    return "\n".join(lines)
