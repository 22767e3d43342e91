"""Which rows a trainer trains on, and on which of their tokens: measured from its own tokenised examples.

Runs inside each trainer's virtual environment (needs only pyarrow and transformers). A trainer's example
is (input_ids, labels) with -100 where there is no loss. The tokens with a loss, decoded, must be exactly
one row's assistant answer (so the loss mask is "responses only"), and the question must sit in the tokens
without one; the answer names the row, and so the part (domain) it came from: counting them per part gives
the mixture the trainer actually trains on, independent of how the trainer loaded or ordered the files.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow.parquet as pq

IGNORE = -100


def answers(run: Path) -> dict[str, set[tuple[str, str]]]:
    """answer text -> the (domain, question) rows with that answer, over `run/parquet/domains/*.parquet`."""
    found: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for path in sorted((run / "parquet" / "domains").glob("*.parquet")):
        for chat in pq.read_table(path, columns=["messages"]).column("messages").to_pylist():
            found[chat[-1]["content"].strip()].add((path.stem, chat[0]["content"].strip()))
    return found


def measure(
    examples: Iterable[tuple[Sequence[int], Sequence[int]]], tokenizer, by_answer: dict[str, set[tuple[str, str]]]
) -> dict:
    """Rows per domain, and how many examples break "loss on the answer only" (with the first few).

    The trained tokens must decode to exactly one row's answer and the masked tokens must hold that row's
    question; an example that fits rows of two domains is counted as bad, never guessed.
    """
    counts: Counter[str] = Counter()
    bad: list[str] = []
    n = 0
    for input_ids, labels in examples:
        n += 1
        trained = [t for t, lab in zip(input_ids, labels, strict=True) if lab != IGNORE]
        masked = tokenizer.decode([t for t, lab in zip(input_ids, labels, strict=True) if lab == IGNORE])
        text = tokenizer.decode(trained, skip_special_tokens=True).strip()
        domains = {domain for domain, question in by_answer.get(text, ()) if question in masked}
        if len(domains) != 1:
            bad.append(f"loss on {text[:80]!r}: fits {len(domains)} domains' rows (answer, question masked)")
            continue
        counts[domains.pop()] += 1
    return {"examples": n, "counts": dict(sorted(counts.items())), "bad": len(bad), "bad_first": bad[:5]}


def save(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1) + "\n")


def readme_block(run: Path, section: str, lang: str, index: int = 0) -> str:
    """The `index`-th ```lang block under `### section` in the run's README.md: the commands a user follows."""
    text = (run / "README.md").read_text()
    start = text.index(f"\n### {section}\n")
    end = text.find("\n### ", start + 1)
    body = text[start : end if end > 0 else len(text)]
    blocks = body.split(f"```{lang}\n")[1:]
    return blocks[index].split("```")[0]


def substitute(text: str, old: str, new: str) -> str:
    """`text` with `old` replaced; `old` must be there (a README that changed must fail the test, not skip it)."""
    if old not in text:
        raise ValueError(f"{old!r} is not in the README's command; the test and the README disagree")
    return text.replace(old, new)
