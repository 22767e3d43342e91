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

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from mixopt.exports import row_shares

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


def _loading(schema: str, total: int) -> str:
    column = "`messages` (user/assistant turns)" if schema == "messages" else "`text`"
    trl_kind = (
        "conversational: TRL applies the model's chat template"
        if schema == "messages"
        else "plain text: TRL trains on the `text` column (language modelling)"
    )
    stage = "sft" if schema == "messages" else "pt"
    return f"""## Loading it

Every row has {column}, `domain` (the part it came from) and `source_index` (its row in that part's
source). The rows are already mixed and shuffled: one pass over them trains on exactly the allocated counts.

### datasets

```python
from collections import Counter

from datasets import load_from_disk

mixture = load_from_disk("mixture")  # {total:,} rows
Counter(mixture["domain"])  # rows per part, as in the table above
```

### TRL

```python
from datasets import load_from_disk
from trl import SFTConfig, SFTTrainer

train = load_from_disk("mixture").remove_columns(["domain", "source_index"])
trainer = SFTTrainer(model="<model id or folder>", train_dataset=train, args=SFTConfig(output_dir="sft"))
trainer.train()
```

The dataset is {trl_kind}. `num_train_epochs=1` trains once on the mixture as allocated; more epochs
repeat every part alike, so the shares stay the same.

### LLaMA-Factory

`exports/llamafactory_dataset_info.json` declares one dataset per part, each reading
`parquet/domains/<part>.parquet` with `num_samples` = its allocated rows. Merge
`exports/llamafactory_train_args.yaml` into your training YAML (use `stage: {stage}`) and launch from
this folder: it sets `dataset_dir: exports`, `dataset: <all parts>`, `mix_strategy: interleave_under`
and `interleave_probs` = each part's share of the rows. `interleave_under` stops when the first part
runs out, so a few rows of the others go unused; `mix_strategy: concat` trains on exactly the
allocated rows, since each file already holds its part's count.

### axolotl

`exports/axolotl.yaml` is a `datasets:` block over the per-part parquet files. axolotl has no mixing
weight: it concatenates the files, and each already holds its part's allocated rows (a source smaller
than its allocation appears more than once), so the shares come out exactly. `num_epochs` repeats every
file alike. Paths are relative to `exports/`: launch from there or make them absolute.

### Megatron-LM

`exports/megatron_blend.txt` holds `--data-path w1 prefix1 w2 prefix2 ...` and
`exports/megatron_blend.json` the same blend for `--per-split-data-args-path`. The weights are each
part's share of the rows (Megatron normalises them). Megatron reads tokenised `.bin/.idx` files: the
comments in `megatron_blend.txt` give the `tools/preprocess_data.py` command that turns each parquet
file into the prefix the blend names. Megatron samples fixed-length token sequences, so a part with
longer rows gets more tokens than its row share.

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
) -> None:
    """Write `out/README.md`: the plots, the domain table, rows and epochs per part, and loading recipes.

    `table_md`: the domain table as markdown (STS, baselines, allocation). `counts`: rows per part, the
    target included under `target_name`. `epochs`: passes over each part's source. `schema`: "messages"
    or "text".
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

{_loading(schema, total)}"""
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.md").write_text(text)


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
