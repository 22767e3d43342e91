"""Evaluation (`mixopt validate`'s measurements): items/s with the answer-text and letter queries sharing
their prompt in one branched forward, against each query run on its own.

    python benchmarks/bench_evaluate.py [--items 240]

Items: MMLU test questions from `${MIXOPT_DATA:-../shared/data}` (the first subjects alphabetically,
`--items` in all). Model: the embedded SmolLM2-135M-Instruct, fp32. Both engines run the same forward
code; the separate one reads the answer-text, cloze and letter queries from three forwards per item,
the branched one from two. The metrics of the two must agree: their largest difference is printed.
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np
from common import Metric, check, report

from mixopt import evaluate as ev

ROOT = Path(__file__).resolve().parent.parent
MAX_LENGTH, BATCH_TOKENS = 1024, 4096


def mmlu_items(data_dir: Path, n: int) -> list[ev.MCQItem]:
    items = []
    for path in sorted((data_dir / "mmlu" / "test").glob("*.csv")):
        with path.open(newline="") as f:
            for question, *choices, answer in (r for r in csv.reader(f) if len(r) == 6):
                items.append(ev.MCQItem(question, tuple(choices), "ABCD".index(answer)))
                if len(items) == n:
                    return items
    return items


def separate(lm: object, items: list[ev.MCQItem]) -> dict[str, np.ndarray]:
    """The three queries of each item in their own forwards (what `score_items` did before branching)."""
    queries = []
    for item in items:
        queries += [
            ev.reply_query(lm.tokenizer, item.prompt, item.answer_text, MAX_LENGTH),
            ev.reply_query(lm.tokenizer, item.question, item.answer_text, MAX_LENGTH),
            ev.letter_query(lm.tokenizer, item.prompt, len(item.choices), MAX_LENGTH),
        ]
    reads = ev.next_token_logprobs(lm, queries, BATCH_TOKENS, "separate")
    values: dict[str, list[float]] = {m: [] for m in ev.METRICS}
    for n, item in enumerate(items):
        answer, cloze, (letter,) = reads[3 * n : 3 * n + 3]
        values["answer_nll"].append(ev.reply_nll(answer))
        values["cloze_nll"].append(ev.reply_nll(cloze))
        for name, value in ev.letter_metrics(letter, item.answer).items():
            values[name].append(value)
    return {m: np.array(v) for m, v in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=240, help="MMLU items measured by each engine")
    args = parser.parse_args()
    from mixopt.model import load_model
    from mixopt.recipe import ModelSpec

    lm = load_model(ModelSpec(path="smollm2-135m-instruct"))
    items = mmlu_items(ROOT / os.environ.get("MIXOPT_DATA", "../shared/data"), args.items)
    ev.score_items(lm, items[:8], MAX_LENGTH, BATCH_TOKENS)  # warm-up, untimed
    seconds = {}
    start = time.perf_counter()
    branched = ev.score_items(lm, items, MAX_LENGTH, BATCH_TOKENS, desc="branched")
    seconds["branched"] = time.perf_counter() - start
    start = time.perf_counter()
    alone = separate(lm, items)
    seconds["separate"] = time.perf_counter() - start
    difference = max(
        float(np.nanmax(np.abs(branched[m] - alone[m]))) for m in ("answer_nll", "cloze_nll", "letter_mass")
    )
    for name, s in seconds.items():
        print(f"{name}: {len(items)} items in {s:.1f} s = {len(items) / s:.2f} items/s")
    report(
        "evaluate",
        [
            Metric("items", len(items)),
            check("branched vs separate speed-up", seconds["separate"] / seconds["branched"], "x", ">=", 1.3),
            check("largest metric difference", difference, "", "<", 1e-4),
        ],
    )


if __name__ == "__main__":
    main()
