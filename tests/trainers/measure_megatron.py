"""In the Megatron venv, from a copy of the run folder: run the README's Megatron command (megatron-core's
builder), then build the blend with megatron-core's BlendedMegatronDatasetBuilder on CPU and measure what one
pass samples from each prefix, and which tokens carry a loss. argv: model folder, result JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from labels import readme_block, save, substitute  # noqa: E402

SEQ = 64  # tokens per Megatron sample (--seq-length)

model, result = sys.argv[1], Path(sys.argv[2])
run = Path.cwd()
command = substitute(readme_block(run, "Megatron-LM", "bash"), "<model>", model).strip()
printed = subprocess.run(command, shell=True, check=True, capture_output=True, text=True).stdout.strip()


def preprocess_route_identical() -> bool | None:
    """With MEGATRON_LM (a Megatron-LM checkout) set: the README's other route (JSONL, then preprocess_data.py)
    writes the same bytes as megatron-core's builder did. None without a checkout (not on PyPI)."""
    if not os.environ.get("MEGATRON_LM"):
        return None
    written = {
        p: (run / p).read_bytes()
        for p in sorted(str(q.relative_to(run)) for q in run.glob("parquet/domains/*_text_document.*"))
    }
    for p in written:
        (run / p).unlink()
    env = os.environ | {"PYTHONPATH": os.environ["MEGATRON_LM"]}  # its megatron.training; tools/ imports it
    lines = substitute(readme_block(run, "Megatron-LM", "bash", index=1), "<model>", model)
    subprocess.run(["bash", "-e", "-c", lines], check=True, capture_output=True, text=True, env=env)
    return all((run / p).read_bytes() == data for p, data in written.items())


identical = preprocess_route_identical()

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder  # noqa: E402
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.datasets.utils import get_blend_from_list  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizer  # noqa: E402

blend_list = json.loads((run / "exports/megatron_blend.json").read_text())["train"]
prefixes, weights = get_blend_from_list(blend_list)  # Megatron's own parse of --data-path
tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=model, metadata_path={"library": "huggingface"})

files = {}
for prefix in prefixes:
    indexed = IndexedDataset(str(run / prefix))
    files[prefix] = {"documents": len(indexed), "tokens": int(np.sum(indexed.sequence_lengths))}
total = sum(f["tokens"] for f in files.values())
samples = total // SEQ  # one pass: --train-samples = total tokens / --seq-length


def sampled(blend_weights: list[float]) -> tuple[dict[str, int], GPTDataset]:
    """Samples per prefix in the blended train split Megatron builds for `samples` samples, and that split."""
    config = GPTDatasetConfig(
        random_seed=0,
        sequence_length=SEQ,
        blend=([str(run / p) for p in prefixes], blend_weights),
        split="1,0,0",
        path_to_cache=None,  # in memory: a cache folder needs torch.distributed initialised
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [samples, 0, 0], lambda: True, config).build()
    picked = Counter(train.dataset_index.tolist())
    return {p: picked[i] for i, p in enumerate(prefixes)}, train


by_tokens, train = sampled(weights)
by_rows, _ = sampled([float(f["documents"]) for f in files.values()])  # the old export's row shares
# the loss mask over the first samples: how many of their tokens carry a loss, and whether the chat
# template's system prompt is among them (the first words of SmolLM2's default system message)
first = [train[i] for i in range(50)]
loss_tokens = sum(int(s["loss_mask"].sum()) for s in first)
system_trained = any("helpful AI assistant" in tokenizer.detokenize(s["tokens"].tolist()) for s in first)


def rows_worth(picked: dict[str, int]) -> dict[str, float]:
    """Rows of each file that its sampled tokens amount to: sampled tokens / the file's tokens x its rows."""
    return {p: round(picked[p] * SEQ / files[p]["tokens"] * files[p]["documents"], 1) for p in prefixes}


def name(prefix: str) -> str:
    return prefix.split("/")[-1].removesuffix("_text_document")


save(
    result,
    {
        "printed_blend": printed,
        "files": {name(p): f for p, f in files.items()},
        "weights": {name(p): w for p, w in zip(prefixes, weights, strict=True)},
        "seq_length": SEQ,
        "samples": samples,
        "sampled": {name(p): n for p, n in by_tokens.items()},
        "rows_worth": {name(p): r for p, r in rows_worth(by_tokens).items()},
        "rows_worth_if_weighted_by_rows": {name(p): r for p, r in rows_worth(by_rows).items()},
        "loss_tokens": loss_tokens,
        "sample_tokens": sum(int(s["loss_mask"].numel()) for s in first),
        "system_prompt_trained": system_trained,
        "preprocess_data_identical": identical,
        "version": __import__("megatron.core", fromlist=["package_info"]).package_info.__version__,
    },
)
