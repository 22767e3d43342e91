"""Exports: the formulas each trainer's files rest on, checked with no trainer installed.

The real trainers run the same files in `make test-trainers` (tests/trainers)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from mixopt import megatron_data
from mixopt.errors import MixoptError
from mixopt.exports import row_shares, trl_snippet, write_exports
from mixopt.mixture import MixturePart, build_mixture, write_mixture
from mixopt.report import write_run_readme
from tests.tiny import tiny_tokenizer

COUNTS = {"target": 50, "law": 20, "math": 29, "empty": 0, "code": 1}
KEPT = {n: c for n, c in COUNTS.items() if c}


@pytest.fixture(autouse=True)
def _quiet() -> None:
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def chat(name: str, n: int, words: int) -> datasets.Dataset:
    """`n` rows whose answers are `words` words long: parts with longer rows have more tokens per row."""
    return datasets.Dataset.from_dict(
        {
            "prompt": [f"{name} question {i}" for i in range(n)],
            "response": [f"{name} answer {i} " + "the court ruled " * words for i in range(n)],
        }
    )


def planned(out: Path, tokenizer, counts: dict[str, int] = COUNTS) -> Path:
    """A mixture written as `plan` writes it (per-part parquet files), then the exports over it."""
    words = {"target": 2, "law": 40, "math": 10, "empty": 1, "code": 5}
    parts = [MixturePart(n, chat(n, 12, words.get(n, 3)), c, seed=j) for j, (n, c) in enumerate(counts.items())]
    write_mixture(build_mixture(parts, seed=0), out, ["parquet"])
    write_exports(out, counts, {"law": 1.7}, "messages", tokenizer)
    return out


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_row_shares__sum_to_exactly_one_and_match_count_over_total() -> None:
    shares = row_shares({"a": 1, "b": 1, "c": 1, "d": 4})
    assert sum(int(s.replace(".", "")) for s in shares.values()) == 1_000_000
    for name, count in {"a": 1, "b": 1, "c": 1, "d": 4}.items():
        assert abs(float(shares[name]) - count / 7) <= 1e-6


# ----------------------------------------------------------------------------------------------- LLaMA-Factory


def test_llamafactory__dataset_info_json_in_dataset_dir_and_concat_keeps_every_row(tmp_path: Path, tokenizer) -> None:
    out = planned(tmp_path, tokenizer)
    args = yaml.safe_load((out / "exports/llamafactory/train_args.yaml").read_text())
    assert args["mix_strategy"] == "concat" and "interleave_probs" not in args
    assert args["stage"] == "sft" and args["train_on_prompt"] is False and args["num_train_epochs"] == 1
    # LLaMA-Factory reads exactly `<dataset_dir>/dataset_info.json`
    info = json.loads((out / args["dataset_dir"] / "dataset_info.json").read_text())
    assert args["dataset"].split(",") == list(info) == list(KEPT)  # the part with no rows is left out
    for name, entry in info.items():
        file_rows = rows(out / args["dataset_dir"] / entry["file_name"])
        # num_samples = the file's rows: LLaMA-Factory keeps each row once; concat adds them up
        assert entry["num_samples"] == len(file_rows) == KEPT[name]
        assert {r["domain"] for r in file_rows} == {name}
        assert entry["formatting"] == "sharegpt" and entry["tags"]["assistant_tag"] == "assistant"


# --------------------------------------------------------------------------------------------------------- TRL


def test_trl__prompt_completion_files_hold_the_mixture_in_order(tmp_path: Path, tokenizer) -> None:
    out = planned(tmp_path, tokenizer)
    trl = datasets.load_dataset("parquet", data_files=str(out / "parquet/trl/*.parquet"), split="train")
    mixture = datasets.load_dataset("parquet", data_files=str(out / "parquet/mixture-*.parquet"), split="train")
    assert trl.column_names == ["prompt", "completion", "domain", "source_index"]
    assert trl["prompt"] == [[m[0]] for m in mixture["messages"]]  # [user turn]
    assert trl["completion"] == [[m[1]] for m in mixture["messages"]]  # [assistant turn]
    assert {m[0]["role"] for m in trl["prompt"]} == {"user"}
    assert {m[0]["role"] for m in trl["completion"]} == {"assistant"}
    assert Counter(trl["domain"]) == KEPT


def test_trl__snippet_reads_those_files_for_one_epoch_without_forcing_bf16() -> None:
    snippet = trl_snippet("messages")
    compile(snippet, "snippet", "exec")  # valid Python as printed
    assert 'data_files="parquet/trl/*.parquet"' in snippet and "num_train_epochs=1," in snippet
    assert "bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported()" in snippet


# -------------------------------------------------------------------------------------------------------- axolotl


def test_axolotl__datasets_block_lists_every_part_file_with_answers_trained(tmp_path: Path, tokenizer) -> None:
    out = planned(tmp_path, tokenizer)
    text = (out / "exports/axolotl.yaml").read_text()
    assert "no mixing weight" in text
    entries = yaml.safe_load(text)["datasets"]
    assert [len(rows(out / "exports" / e["path"])) for e in entries] == list(KEPT.values())
    assert all(e["type"] == "chat_template" and e["roles_to_train"] == ["assistant"] for e in entries)


# ------------------------------------------------------------------------------------------------------- Megatron


def megatron_blend(out: Path) -> tuple[list[str], list[float]]:
    blend = json.loads((out / "exports/megatron_blend.json").read_text())["train"]
    line = [s for s in (out / "exports/megatron_blend.txt").read_text().splitlines() if not s.startswith("#")]
    assert line == ["--data-path " + " ".join(blend)]
    return blend[1::2], [float(w) for w in blend[::2]]


def blending_indices(weights: list[float], size: int) -> np.ndarray:
    """Megatron-LM's `build_blending_indices` (megatron/core/datasets/helpers.cpp): each sample goes to the
    dataset furthest below its weight's share so far. Returns (size,) dataset ids."""
    w = np.asarray(weights) / np.sum(weights)
    current = np.zeros(len(w))
    picked = np.zeros(size, dtype=np.int64)
    for i in range(size):
        error = w * max(i, 1.0) - current
        picked[i] = int(np.argmax(error))  # first maximum, as the C++ loop's strict '>'
        current[picked[i]] += 1
    return picked


def test_megatron__weights_are_each_files_tokens_with_eod(tmp_path: Path, tokenizer) -> None:
    out = planned(tmp_path, tokenizer)
    prefixes, weights = megatron_blend(out)
    assert prefixes == [f"parquet/domains/{n}_text_document" for n in KEPT]
    for name, weight in zip(KEPT, weights, strict=True):
        chats = [r["messages"] for r in rows(out / f"parquet/domains/{name}.parquet")]
        # independent of megatron_data's text route: the chat template tokenised directly, plus the EOD token
        expected = sum(len(tokenizer.apply_chat_template(c, return_dict=True)["input_ids"]) + 1 for c in chats)
        assert weight == expected, name


def test_megatron__token_weighted_blend_reproduces_the_counts_and_row_weights_do_not(tmp_path: Path, tokenizer) -> None:
    out = planned(tmp_path, tokenizer)
    _, tokens = megatron_blend(out)
    seq = 16
    samples = int(sum(tokens)) // seq  # one pass: --train-samples = total tokens / --seq-length

    def rows_worth(weights: list[float]) -> np.ndarray:
        sampled = np.bincount(blending_indices(weights, samples), minlength=len(tokens))
        return sampled * seq / np.asarray(tokens) * np.asarray(list(KEPT.values()))

    counts = np.asarray(list(KEPT.values()), dtype=float)
    by_tokens = rows_worth(tokens)
    slack = 2 * seq * counts / np.asarray(tokens)  # two samples' worth of rows: rounding of the sample count
    assert np.all(np.abs(by_tokens - counts) <= slack), by_tokens
    by_rows = rows_worth(list(counts))  # law's rows are longest: row weights under-sample it
    assert by_rows[list(KEPT).index("law")] < counts[list(KEPT).index("law")] - slack[list(KEPT).index("law")]


def test_megatron_data__jsonl_is_the_chat_template_text_of_each_row(tmp_path: Path, tokenizer) -> None:
    out = planned(tmp_path, tokenizer)
    prefixes, _ = megatron_blend(out)
    written = megatron_data.write_jsonl(out, prefixes, tokenizer)
    assert [p.name for p in written] == [f"{n}.jsonl" for n in KEPT]
    for path, name in zip(written, KEPT, strict=True):
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        chats = [r["messages"] for r in rows(out / f"parquet/domains/{name}.parquet")]
        assert texts == [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]


def test_megatron_data__the_copy_in_the_run_folder_is_the_module(tmp_path: Path, tokenizer) -> None:
    out = planned(tmp_path, tokenizer)
    assert (out / "exports/megatron_data.py").read_text() == Path(megatron_data.__file__).read_text()
    assert megatron_data.main(["jsonl", "--tokenizer", "x", "--out", str(tmp_path / "nowhere")]) == 2


# ------------------------------------------------------------------------------------------------- errors, README


def test_write_exports__a_mixture_without_rows_says_so(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(MixoptError, match="no rows"):
        write_exports(tmp_path, {"target": 0}, {}, "messages", tokenizer)


def test_write_exports__parts_without_their_file_are_named(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(MixoptError, match="no parquet file for part.*law"):
        write_exports(tmp_path, {"law": 3}, {}, "messages", tokenizer)


def test_write_exports__text_mixture_trains_every_token(tmp_path: Path, tokenizer) -> None:
    parts = [MixturePart(n, datasets.Dataset.from_dict({"text": [f"{n} {i}" for i in range(4)]}), 3, 0) for n in "ab"]
    write_mixture(build_mixture(parts, seed=0), tmp_path, ["parquet"])
    write_exports(tmp_path, {"a": 3, "b": 3}, {}, "text", tokenizer)
    info = json.loads((tmp_path / "exports/llamafactory/dataset_info.json").read_text())
    assert info["a"]["columns"] == {"prompt": "text"}
    assert yaml.safe_load((tmp_path / "exports/llamafactory/train_args.yaml").read_text())["stage"] == "pt"
    entries = yaml.safe_load((tmp_path / "exports/axolotl.yaml").read_text())["datasets"]
    assert {e["type"] for e in entries} == {"completion"}
    assert not (tmp_path / "parquet/trl").exists()  # no chat, no prompt/completion form
    _, weights = megatron_blend(tmp_path)
    files = [rows(tmp_path / f"parquet/domains/{n}.parquet") for n in "ab"]
    assert weights == [sum(len(tokenizer(r["text"]).input_ids) + 1 for r in f) for f in files]


def test_run_readme__says_what_each_trainer_trains_on(tmp_path: Path) -> None:
    write_run_readme(tmp_path, "| t |", {"gsm8k": 600, "law": 400, "none": 0}, {}, "messages", "gsm8k")
    text = (tmp_path / "README.md").read_text()
    sections = {s.split("\n")[0]: s for s in text.split("\n### ")[1:]}
    assert trl_snippet("messages").strip() in sections["TRL"]
    assert "completion" in sections["TRL"] and "masked" in sections["TRL"]
    assert "llamafactory-cli train exports/llamafactory/train_args.yaml" in sections["LLaMA-Factory"]
    assert "train_on_prompt: false" in sections["LLaMA-Factory"]
    assert "every token" in sections["Megatron-LM"] and "--workers 1" in sections["Megatron-LM"]
    assert "parquet/domains/law.jsonl" in sections["Megatron-LM"] and "none.jsonl" not in sections["Megatron-LM"]
    assert "trl 1.16.0" in text and "megatron-core 0.16.1" in text
