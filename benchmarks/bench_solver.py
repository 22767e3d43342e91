"""Solver time for 10 to 10,000 domains, each objective (stability off). DESIGN.md section 7, "Speed".

    python benchmarks/bench_solver.py [--sizes 10 100 1000 10000] [--repeats 3]

Synthetic scores: lognormal STS, 1-200 examples available per domain, a budget of 20 examples per domain
(so max_epochs binds for some). `solve` is the main problem (build + compile + solve, as
`Allocation.solve_seconds` reports it); `total` is the whole `solve_allocation` call, which adds the
sensitivity re-solves (up to 2,000 domains) and the rounding. Each cell is the median over the repeats.
Ends with the summary table: each objective's total at the largest size (target: minimax, 10,000 domains < 5 s).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
from common import Metric, check, report

from mixopt.recipe import AllocationSpec
from mixopt.scores import DomainScore, Scores
from mixopt.solver import solve_allocation

OBJECTIVES = ("minimax", "utility", "proportional")


def synthetic_scores(n: int, seed: int = 0) -> Scores:
    rng = np.random.default_rng(seed)
    sts, available = rng.lognormal(size=n), rng.integers(1, 200, size=n)

    def domain(name: str, score: float, count: int) -> DomainScore:
        return DomainScore(
            name=name, score=float(score), baseline=0.0, similarity=0.0, tokens=100 * count, examples=count,
            available=count, mean_tokens=100.0, mean_response_tokens=60.0,
        )  # fmt: skip

    return Scores(
        recipe_sha256="bench", model="none", sae="none", layer=0, top_k=0, score="act", shifted_latents=[],
        target=domain("target", 1.0, 100 * n), domains=[domain(f"d{j}", sts[j], available[j]) for j in range(n)],
    )  # fmt: skip


def time_one(scores: Scores, objective: str, repeats: int) -> tuple[float, float, str]:
    """(median main solve seconds, median total seconds, solver/status of the last run)."""
    spec = AllocationSpec(objective=objective, stability=0)
    solves, totals = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        allocation = solve_allocation(scores, spec, budget=20 * len(scores.domains))
        totals.append(time.perf_counter() - start)
        solves.append(allocation.solve_seconds)
    return statistics.median(solves), statistics.median(totals), f"{allocation.solver}/{allocation.status}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1_000, 10_000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"# solver benchmark on {platform.processor() or platform.machine()}, python {platform.python_version()}")
    print(f"{'domains':>8}  {'objective':<13}{'solve s':>9}{'total s':>9}  solver/status")
    totals: dict[tuple[int, str], float] = {}
    for n in args.sizes:
        scores = synthetic_scores(n)
        repeats = args.repeats if n < 10_000 else 1
        for objective in OBJECTIVES:
            solve, totals[n, objective], how = time_one(scores, objective, repeats)
            print(f"{n:>8,}  {objective:<13}{solve:>9.3f}{totals[n, objective]:>9.3f}  {how}", flush=True)
    largest = max(args.sizes)
    metrics = [Metric(f"{o} {largest:,} domains (total)", totals[largest, o], "s") for o in OBJECTIVES]
    if largest == 10_000:
        metrics[0] = check(metrics[0].name, metrics[0].value, "s", "<", 5)
    report("solver", metrics)


if __name__ == "__main__":
    main()
