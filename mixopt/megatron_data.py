"""Megatron data for a mixopt run: the per-domain parquet files as the token files a Megatron blend names.

mixopt copies this file to `OUT/exports/megatron_data.py`, so it runs on a training machine without mixopt:
it needs only pyarrow and transformers, and megatron-core for `indexed`. Run it from OUT (the run folder):

    python exports/megatron_data.py jsonl --tokenizer MODEL
        -> parquet/domains/<domain>.jsonl, one {"text": ...} per row: the input of Megatron-LM's
           tools/preprocess_data.py (--json-keys text --append-eod, HuggingFaceTokenizer)
    python exports/megatron_data.py indexed --tokenizer MODEL
        -> parquet/domains/<domain>_text_document.{bin,idx} written by megatron-core's IndexedDatasetBuilder,
           tokenised as preprocess_data.py does; prints the `--data-path` blend of the tokens it wrote

A chat row (`messages`) is rendered with the tokenizer's chat template (the whole conversation, so the
prompt and any default system prompt are in the text); a `text` row is its text. Each document is
`tokenizer(text).input_ids` and then the EOS token: what preprocess_data.py's HuggingFaceTokenizer
(`text_to_ids`, special tokens included) and `--append-eod` write.

The domains are the prefixes of `exports/megatron_blend.json` (`parquet/domains/<domain>_text_document`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLEND = Path("exports/megatron_blend.json")
SUFFIX = "_text_document"  # what preprocess_data.py appends for --json-keys text at document level
BATCH_ROWS = 1_000  # rows rendered and tokenised at a time


def prefixes(blend: list[str]) -> list[str]:
    """The prefixes of a Megatron blend list [w1, p1, w2, p2, ...]."""
    return blend[1::2]


def source_of(prefix: str) -> str:
    """`parquet/domains/law_text_document` -> `parquet/domains/law.parquet`."""
    return prefix.removesuffix(SUFFIX) + ".parquet"


def texts(path: Path, tokenizer: Any) -> Iterator[list[str]]:
    """The rows of a per-domain parquet file as documents, `BATCH_ROWS` at a time (file order)."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
        if "messages" in batch.schema.names:
            chats = batch.column("messages").to_pylist()
            yield [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
        else:
            yield batch.column("text").to_pylist()


def documents(path: Path, tokenizer: Any) -> Iterator[list[int]]:
    """Each row's token ids with the EOS token appended (preprocess_data.py --append-eod)."""
    for batch in texts(path, tokenizer):
        for ids in tokenizer(batch).input_ids:
            yield [*ids, tokenizer.eos_token_id]


def _rows(out: Path, prefix_list: list[str]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(out / source_of(p)).metadata.num_rows for p in prefix_list)


def count_tokens(out: Path, prefix_list: list[str], tokenizer: Any) -> dict[str, int]:
    """Tokens per prefix (EOS included) that preprocess_data.py writes for its parquet file under `out`."""
    from tqdm import tqdm  # a transformers dependency

    tokens = {}
    with tqdm(total=_rows(out, prefix_list), desc="megatron tokens", unit="row", file=sys.stderr) as bar:
        for prefix in prefix_list:
            tokens[prefix] = 0
            for doc in documents(out / source_of(prefix), tokenizer):
                tokens[prefix] += len(doc)
                bar.update()
    return tokens


def blend_line(tokens: dict[str, int]) -> str:
    """`--data-path` with each prefix weighted by its tokens: Megatron gives each prefix that share of the
    sampled tokens, so every file is read once per pass and holds its domain's allocated rows."""
    return "--data-path " + " ".join(f"{n} {p}" for p, n in tokens.items())


def write_jsonl(out: Path, prefix_list: list[str], tokenizer: Any) -> list[Path]:
    """`parquet/domains/<domain>.jsonl` with a `text` field per row, for tools/preprocess_data.py."""
    written = []
    for prefix in prefix_list:
        path = (out / source_of(prefix)).with_suffix(".jsonl")
        with path.open("w") as f:
            for batch in texts(out / source_of(prefix), tokenizer):
                f.writelines(json.dumps({"text": text}) + "\n" for text in batch)
        written.append(path)
    return written


def write_indexed(out: Path, prefix_list: list[str], tokenizer_model: str) -> dict[str, int]:
    """`<prefix>.bin/.idx` for each prefix with megatron-core's builder and tokenizer; returns tokens per prefix."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from megatron.core.tokenizers import MegatronTokenizer
    from transformers import AutoTokenizer

    # preprocess_data.py's build_tokenizer for --tokenizer-type HuggingFaceTokenizer, defaults otherwise
    library = {"library": "huggingface"}
    megatron = MegatronTokenizer.from_pretrained(tokenizer_path=tokenizer_model, metadata_path=library)
    hf = AutoTokenizer.from_pretrained(tokenizer_model)  # the same files: its chat template renders the rows
    from tqdm import tqdm

    tokens = {}
    with tqdm(total=_rows(out, prefix_list), desc="megatron .bin/.idx", unit="row", file=sys.stderr) as bar:
        for prefix in prefix_list:
            builder = IndexedDatasetBuilder(str(out / f"{prefix}.bin"), dtype=DType.optimal_dtype(megatron.vocab_size))
            tokens[prefix] = 0
            for batch in texts(out / source_of(prefix), hf):
                for text in batch:
                    ids = [*megatron.tokenize(text), megatron.eod]
                    builder.add_document(ids, [len(ids)])
                    tokens[prefix] += len(ids)
                bar.update(len(batch))
            builder.finalize(str(out / f"{prefix}.idx"))
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["jsonl", "indexed"])
    parser.add_argument("--tokenizer", required=True, help="the model's hub id or folder (its tokenizer)")
    parser.add_argument("--out", type=Path, default=Path("."), help="the run folder (default: here)")
    args = parser.parse_args(argv)
    blend_path = args.out / BLEND
    if not blend_path.is_file():
        print(f"error: {blend_path} not found; run from the mixopt run folder or pass --out", file=sys.stderr)
        return 2
    blend = json.loads(blend_path.read_text())["train"]
    prefix_list = prefixes(blend)
    if args.command == "jsonl":
        from transformers import AutoTokenizer

        for path in write_jsonl(args.out, prefix_list, AutoTokenizer.from_pretrained(args.tokenizer)):
            print(path)
        return 0
    tokens = write_indexed(args.out, prefix_list, args.tokenizer)
    if [float(w) for w in blend[::2]] != [float(n) for n in tokens.values()]:
        print(
            f"note: these token counts differ from {blend_path} (counted with the recipe's tokenizer); "
            "train with the blend below",
            file=sys.stderr,
        )
    print(blend_line(tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
