"""The run README's commands in the real trainers: each trains 2 steps on a tiny model, and what it would train
on in one epoch is exactly the manifest's mixture, with the loss where the README says (`make test-trainers`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainers.harness import run_measure

pytestmark = pytest.mark.trainers


def _report(name: str, measured: dict) -> None:
    print(f"\n{name} {measured.get('version')}: {measured}")


def test_trl__readme_snippet_trains_on_the_manifest_rows_with_loss_on_answers_only(
    run: Path, tiny_model: Path, tmp_path: Path, manifest_counts: dict[str, int]
) -> None:
    measured = run_measure("trl", run, tiny_model, tmp_path)
    _report("trl", measured)
    assert measured["steps"] == 2 and measured["num_train_epochs"] == 1
    assert measured["bf16"] is False  # no GPU here: the snippet must not ask for bf16
    assert measured["bad"] == 0, measured["bad_first"]
    assert measured["counts"] == manifest_counts
    assert measured["examples"] == sum(manifest_counts.values())


def test_megatron__token_weighted_blend_samples_each_file_once(
    run: Path, tiny_model: Path, tmp_path: Path, manifest_counts: dict[str, int]
) -> None:
    measured = run_measure("megatron", run, tiny_model, tmp_path)
    _report("megatron", measured)
    files, seq = measured["files"], measured["seq_length"]
    assert {n: f["documents"] for n, f in files.items()} == manifest_counts  # one document per allocated row
    # the exported weights are the tokens megatron-core wrote, and the command prints that same blend
    assert measured["weights"] == {n: float(f["tokens"]) for n, f in files.items()}
    assert measured["printed_blend"].split()[1::2] == [str(f["tokens"]) for f in files.values()]
    # one pass samples each file's tokens once: within a sample of each, for every part
    for name, f in files.items():
        assert abs(measured["sampled"][name] * seq - f["tokens"]) <= 2 * seq, name
        assert abs(measured["rows_worth"][name] - manifest_counts[name]) <= 2 * seq * f["documents"] / f["tokens"]
    # weights by rows (the old export) miss some part by more than that: the check can fail
    off = [abs(measured["rows_worth_if_weighted_by_rows"][n] - manifest_counts[n]) for n in files]
    assert max(off) > 2 * seq * max(f["documents"] / f["tokens"] for f in files.values())
    # GPT pretraining: a loss on every token of the sample, the chat template's system prompt included
    assert measured["loss_tokens"] == measured["sample_tokens"] == 50 * seq
    assert measured["system_prompt_trained"]
    # with a Megatron-LM checkout (MEGATRON_LM): its preprocess_data.py, as the README prints it, writes the same bytes
    assert measured["preprocess_data_identical"] in (None, True)


def test_llamafactory__readme_command_trains_on_the_manifest_rows_with_loss_on_answers_only(
    run: Path, tiny_model: Path, tmp_path: Path, manifest_counts: dict[str, int]
) -> None:
    measured = run_measure("llamafactory", run, tiny_model, tmp_path)
    _report("llamafactory", measured)
    assert "train_loss" in measured["trained_log_tail"] and measured["num_train_epochs"] == 1
    assert measured["bad"] == 0, measured["bad_first"]
    assert measured["counts"] == manifest_counts  # concat over the pre-sampled files: every row once
    assert measured["examples"] == sum(manifest_counts.values())


def test_axolotl__exported_block_trains_on_the_manifest_rows_with_loss_on_answers_only(
    run: Path, tiny_model: Path, tmp_path: Path, manifest_counts: dict[str, int]
) -> None:
    measured = run_measure("axolotl", run, tiny_model, tmp_path)
    _report("axolotl", measured)
    assert measured["bad"] == 0, measured["bad_first"]
    assert measured["counts"] == manifest_counts
    assert measured["examples"] == sum(manifest_counts.values())
