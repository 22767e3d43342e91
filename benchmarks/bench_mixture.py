"""Mixture writer: rows/s of mixopt's `build_mixture` + `write_mixture` against `datasets.interleave_datasets`.

    python benchmarks/bench_mixture.py [--rows 1000000]

Five sources of short generated text rows (made in-process, untimed), drawn with probabilities
0.35 / 0.25 / 0.2 / 0.12 / 0.08 into a mixture of `--rows` rows, written to a temporary folder:
- mixopt: one `MixturePart` per source with count = its share, `build_mixture`, then `write_mixture` in the
  `arrow` format (a `save_to_disk` folder; mixopt's rows also carry `domain` and `source_index`);
- datasets: `interleave_datasets` with the same probabilities (`first_exhausted`; each source holds 10%
  more rows than its share so the mixture reaches `--rows`), cut to `--rows`, then `save_to_disk`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import datasets
import numpy as np
from common import Metric, check, report

from mixopt.mixture import MixturePart, build_mixture, write_mixture

SHARES = {"law": 0.35, "chem": 0.25, "code": 0.2, "math": 0.12, "news": 0.08}
T = TypeVar("T")
WORDS = np.array(["the", "a", "of", "to", "court", "water", "acid", "price", "river", "sum", "treaty", "cell", "tax"])


def counts(rows: int) -> dict[str, int]:
    """Rows per source, summing to `rows` (largest remainders)."""
    exact = {name: share * rows for name, share in SHARES.items()}
    out = {name: int(x) for name, x in exact.items()}
    for name in sorted(exact, key=lambda n: out[n] - exact[n])[: rows - sum(out.values())]:
        out[name] += 1
    return out


def source(name: str, n: int, seed: int) -> datasets.Dataset:
    """`n` short text rows ("law 17: the court ... ."), 4-12 words each."""
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=(n, 12)).tolist()
    lengths = rng.integers(4, 13, size=n).tolist()
    return datasets.Dataset.from_dict(
        {"text": [f"{name} {i}: {' '.join(w[:k])}." for i, (w, k) in enumerate(zip(words, lengths, strict=True))]}
    )


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the mixture")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    want = counts(args.rows)
    print(f"# mixture benchmark: {args.rows:,} rows from {len(SHARES)} sources")
    sources = {name: source(name, int(1.1 * n) + 100, seed) for seed, (name, n) in enumerate(want.items())}

    with tempfile.TemporaryDirectory() as tmp:
        parts = [MixturePart(name, sources[name], count=n, seed=i) for i, (name, n) in enumerate(want.items())]
        mix, build_s = timed(lambda: build_mixture(parts, seed=0))
        _, write_s = timed(lambda: write_mixture(mix, Path(tmp) / "mixopt", ["arrow"]))
        mixopt_rows, mixopt_s = len(mix), build_s + write_s
        print(f"mixopt     build {build_s:6.2f} s  write {write_s:6.2f} s  {mixopt_rows:,} rows")

        def interleave() -> datasets.Dataset:
            mixed = datasets.interleave_datasets(
                list(sources.values()), probabilities=list(SHARES.values()), seed=0, stopping_strategy="first_exhausted"
            )
            return mixed.select(range(min(args.rows, len(mixed))))

        mixed, build_s = timed(interleave)
        _, write_s = timed(lambda: mixed.save_to_disk(str(Path(tmp) / "interleave")))
        hf_rows, hf_s = len(mixed), build_s + write_s
        print(f"interleave build {build_s:6.2f} s  write {write_s:6.2f} s  {hf_rows:,} rows")

    mixopt_rate, hf_rate = mixopt_rows / mixopt_s, hf_rows / hf_s
    report(
        "mixture",
        [
            check("mixopt writer rows/s", mixopt_rate, "rows/s", ">=", 200_000),
            Metric("interleave_datasets rows/s", hf_rate, "rows/s"),
            check("mixopt writer vs interleave_datasets", mixopt_rate / hf_rate, "x", ">=", 1.0),
        ],
    )


if __name__ == "__main__":
    main()
