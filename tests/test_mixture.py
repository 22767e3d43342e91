"""Mixture, plots and the run README, on tiny in-memory datasets (exports: test_exports.py)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mixopt.errors import MixoptError
from mixopt.mixture import (
    MixturePart,
    build_mixture,
    common_schema,
    epoch_indices,
    select_examples,
    write_mixture,
)
from mixopt.plots import plot_allocation, plot_scores
from mixopt.report import write_run_readme
from mixopt.sources import content_hash


@pytest.fixture(autouse=True)
def _quiet() -> None:
    datasets.disable_progress_bars()


def chat(name: str, n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"prompt": [f"{name} question {i}" for i in range(n)], "response": [f"{name} answer {i}" for i in range(n)]}
    )


def plain(name: str, n: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"text": [f"{name} text {i}" for i in range(n)]})


def chat_parts(counts: dict[str, int], sizes: dict[str, int] | None = None) -> list[MixturePart]:
    sizes = sizes or {}
    return [MixturePart(n, chat(n, sizes.get(n, 10)), c, seed=100 + j) for j, (n, c) in enumerate(counts.items())]


# ------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("n, count", [(10, 0), (10, 4), (10, 10), (7, 23), (3, 300)])
def test_epoch_indices__every_row_appears_floor_or_ceil_of_count_over_n_times(n: int, count: int) -> None:
    seen = np.bincount(epoch_indices(n, count, seed=5), minlength=n)
    assert seen.sum() == count
    assert set(seen.tolist()) <= {count // n, -(-count // n)}


def test_epoch_indices__each_whole_epoch_is_a_fresh_permutation_of_the_source() -> None:
    idx = epoch_indices(6, 20, seed=1)
    epochs = [idx[i : i + 6] for i in range(0, 18, 6)]
    assert all(sorted(e.tolist()) == list(range(6)) for e in epochs)
    assert len({tuple(e.tolist()) for e in epochs}) > 1  # not one permutation repeated
    assert set(idx[18:].tolist()) <= set(range(6)) and len(set(idx[18:].tolist())) == 2  # partial: distinct rows


def test_epoch_indices__a_smaller_count_is_a_prefix_of_a_larger_one() -> None:
    np.testing.assert_array_equal(epoch_indices(9, 13, seed=2), epoch_indices(9, 40, seed=2)[:13])


def test_epoch_indices__drawing_from_an_empty_source_says_so() -> None:
    with pytest.raises(MixoptError, match="empty source"):
        epoch_indices(0, 3, seed=0)


def test_select_examples__returns_the_rows_at_the_returned_source_indices() -> None:
    rows = plain("law", 5)
    picked, idx = select_examples(rows, 12, seed=3)
    assert idx.dtype == np.int64 and len(picked) == 12
    assert picked["text"] == [f"law text {i}" for i in idx]


# --------------------------------------------------------------------------------------------- mixture


def test_build_mixture__holds_exactly_each_parts_count_with_source_indices_in_range() -> None:
    counts = {"target": 25, "law": 7, "math": 31}
    mix = build_mixture(chat_parts(counts, sizes={"math": 4}), seed=0)
    assert Counter(mix["domain"]) == counts
    source = np.array(mix["source_index"])
    math_rows = source[np.array(mix["domain"]) == "math"]
    assert set(np.bincount(math_rows).tolist()) <= {7, 8}  # 31 rows over 4: whole epochs, then a partial one
    assert mix.features["source_index"] == datasets.Value("int64")


def test_build_mixture__same_parts_and_seed_give_identical_rows_and_another_seed_reorders_them() -> None:
    counts = {"target": 20, "law": 15, "math": 12}
    first = build_mixture(chat_parts(counts), seed=11)
    again = build_mixture(chat_parts(counts), seed=11)
    other = build_mixture(chat_parts(counts), seed=12)
    assert content_hash(first) == content_hash(again)
    assert content_hash(first) != content_hash(other)
    assert sorted(zip(first["domain"], first["source_index"], strict=True)) == sorted(
        zip(other["domain"], other["source_index"], strict=True)
    )  # same rows, different order


def test_build_mixture__chat_parts_become_user_assistant_messages() -> None:
    mix = build_mixture(chat_parts({"law": 3}), seed=0)
    assert mix.column_names == ["messages", "domain", "source_index"]
    row = mix[0]
    i = row["source_index"]
    assert row["messages"] == [
        {"role": "user", "content": f"law question {i}"},
        {"role": "assistant", "content": f"law answer {i}"},
    ]


def test_build_mixture__one_text_part_turns_every_part_into_prompt_newline_response_text() -> None:
    parts = [MixturePart("target", chat("target", 4), 4, 0), MixturePart("wiki", plain("wiki", 4), 3, 1)]
    assert common_schema(parts) == "text"
    mix = build_mixture(parts, seed=0)
    assert mix.column_names == ["text", "domain", "source_index"]
    for row in mix:
        i = row["source_index"]
        expected = f"target question {i}\ntarget answer {i}" if row["domain"] == "target" else f"wiki text {i}"
        assert row["text"] == expected


def test_build_mixture__parts_with_no_rows_are_left_out() -> None:
    mix = build_mixture(chat_parts({"target": 5, "law": 0}), seed=0)
    assert Counter(mix["domain"]) == {"target": 5}


def test_build_mixture__rows_of_a_selected_shuffled_or_on_disk_source_are_the_rows_at_source_index(
    tmp_path: Path,
) -> None:
    datasets.concatenate_datasets([chat("law", 30), chat("law", 30)]).save_to_disk(str(tmp_path), max_shard_size=500)
    on_disk = datasets.load_from_disk(str(tmp_path))  # several Arrow chunks, memory-mapped
    sources = {
        "picked": chat("picked", 20).shuffle(seed=1).select([3, 3, 7, 0, 19]),  # an indices mapping
        "disk": on_disk,
        "shuffled": on_disk.shuffle(seed=2),
    }
    parts = [
        MixturePart("picked", sources["picked"], 12, seed=0),
        MixturePart("disk", on_disk, 70, seed=1),
        MixturePart("shuffled", sources["shuffled"], 33, seed=2),
    ]
    mix = build_mixture(parts, seed=3)
    assert Counter(mix["domain"]) == {"picked": 12, "disk": 70, "shuffled": 33}
    for row in mix:
        source = sources[row["domain"]][row["source_index"]]
        assert [m["content"] for m in row["messages"]] == [source["prompt"], source["response"]]


def test_build_mixture__large_string_and_null_text_become_plain_string_columns() -> None:
    wide = datasets.Dataset(pa.table({"text": pa.array(["w0", None, "w2"], type=pa.large_string())}))
    parts = [MixturePart("wide", wide, 5, 0), MixturePart("target", chat("target", 4), 4, 1)]
    mix = build_mixture(parts, seed=0)
    assert mix.features["text"] == datasets.Value("string")
    for row in mix:
        i = row["source_index"]
        expected = wide[i]["text"] if row["domain"] == "wide" else f"target question {i}\ntarget answer {i}"
        assert row["text"] == expected


@pytest.mark.parametrize("schema", ["messages", "text"])
def test_build_mixture__gathering_in_small_pieces_gives_the_same_rows(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def parts() -> list[MixturePart]:
        extra = [MixturePart("wiki", plain("wiki", 9), 14, 7)] if schema == "text" else []
        return [*chat_parts({"target": 25, "law": 40}, sizes={"law": 6}), *extra]

    whole = build_mixture(parts(), seed=5)
    monkeypatch.setattr("mixopt.mixture._PIECE_BYTES", 64)  # long documents: under 2 GiB of text per Arrow array
    pieces = build_mixture(parts(), seed=5)
    assert pieces.data.table.column(schema).num_chunks > 1
    assert whole.data.table.column(schema).num_chunks == 1
    assert content_hash(pieces) == content_hash(whole) and pieces.features == whole.features


def test_common_schema__a_part_without_text_or_chat_columns_names_its_columns() -> None:
    bad = MixturePart("law", datasets.Dataset.from_dict({"question": ["q"]}), 1, 0)
    with pytest.raises(MixoptError, match="part 'law' has columns question"):
        common_schema([bad])


# ---------------------------------------------------------------------------------------------- output


def test_write_mixture__round_trips_through_load_from_disk_and_writes_per_domain_parquet(tmp_path: Path) -> None:
    counts = {"target": 30, "law": 9, "math": 14}
    mix = build_mixture(chat_parts(counts), seed=4)
    batch_rows = datasets.config.DEFAULT_MAX_BATCH_SIZE
    written = write_mixture(mix, tmp_path, ["arrow", "parquet"])

    loaded = datasets.load_from_disk(str(tmp_path / written["arrow"]))
    assert len(loaded) == len(mix) and loaded.column_names == mix.column_names
    assert loaded.to_dict() == mix.to_dict()  # same rows, same order
    assert loaded.features == mix.features and content_hash(loaded) == content_hash(mix)
    assert batch_rows == datasets.config.DEFAULT_MAX_BATCH_SIZE  # bigger record batches for this write only

    assert written["parquet:00000"] == "parquet/mixture-00000-of-00001.parquet"
    assert pq.read_table(tmp_path / written["parquet:00000"]).num_rows == len(mix)
    for name, count in counts.items():
        table = pq.read_table(tmp_path / written[f"domain:{name}"])
        assert table.num_rows == count
        assert set(table.column("domain").to_pylist()) == {name}


def test_write_mixture__shards_of_at_most_100k_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mixopt.mixture.ROWS_PER_SHARD", 10)  # same rule, smaller numbers
    mix = build_mixture(chat_parts({"law": 25}), seed=0)
    written = write_mixture(mix, tmp_path, ["parquet"])
    shards = sorted(v for k, v in written.items() if k.startswith("parquet:"))
    assert shards == [f"parquet/mixture-0000{i}-of-00003.parquet" for i in range(3)]
    assert sum(pq.read_table(tmp_path / s).num_rows for s in shards) == 25
    assert not (tmp_path / "mixture").exists()


def test_write_mixture__an_unknown_format_is_named(tmp_path: Path) -> None:
    with pytest.raises(MixoptError, match="unknown output format.*jsonl"):
        write_mixture(build_mixture(chat_parts({"law": 2}), seed=0), tmp_path, ["jsonl"])


# ---------------------------------------------------------------------------------------- plots, README


def test_plots__write_non_empty_pngs_with_the_same_bytes_each_time(tmp_path: Path) -> None:
    names = ["law", "math", "code"]
    plot_scores(names, [0.8, 0.2, float("nan")], [0.1, 0.3, 0.2], tmp_path / "sts.png", "similarity")
    plot_allocation(["target", *names], [0.5, 0.3, 0.15, 0.05], tmp_path / "allocation.png", target="target")
    plot_allocation(["target", *names], [0.5, 0.3, 0.15, 0.05], tmp_path / "again.png", target="target")
    for name in ("sts.png", "allocation.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "allocation.png").read_bytes() == (tmp_path / "again.png").read_bytes()


def test_plot_scores__mismatched_lengths_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="raw has 1 values for 2 names"):
        plot_scores(["law", "math"], [0.1, 0.2], [0.1], tmp_path / "sts.png", "act")


def test_write_run_readme__embeds_plots_table_and_epochs_per_part(tmp_path: Path) -> None:
    table = "| domain | STS |\n| --- | --- |\n| law | 0.8 |"
    write_run_readme(tmp_path, table, {"gsm8k": 600, "law": 400}, {"gsm8k": 0.5, "law": 2.0}, "messages", "gsm8k")
    text = (tmp_path / "README.md").read_text()
    assert "![STS per domain" in text and "(plots/sts.png)" in text and "(plots/allocation.png)" in text
    assert table in text
    assert "| gsm8k (target) | 600 | 60.0% | 0.50 |" in text and "| law | 400 | 40.0% | 2.00 |" in text
    for trainer in ("### datasets", "### TRL", "### LLaMA-Factory", "### axolotl", "### Megatron-LM"):
        assert trainer in text
    assert 'load_from_disk("mixture")' in text
