"""Run every benchmark and print one summary table: what `make bench` runs (~15-20 min on 2 cores).

    python benchmarks/run_all.py [--quick]

Each script runs as a subprocess with its output passed through; its final `BENCH_RESULT {json}` line is
collected into the table. Targets are printed, never asserted: the exit status is 1 only if a script fails.
`--quick` gives each script its smallest setting (about 2 min): a smoke run for CI.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common import Metric, parse_result, table

HERE = Path(__file__).resolve().parent
# script -> (full arguments, --quick arguments)
SCRIPTS: dict[str, tuple[list[str], list[str]]] = {
    "bench_extract.py": ([], ["--quick"]),
    "bench_mixture.py": ([], ["--rows", "100000"]),
    "bench_solver.py": ([], ["--sizes", "10", "100", "1000", "--repeats", "1"]),
    "bench_evaluate.py": ([], ["--items", "16"]),
    "bench_distributed.py": ([], ["--quick"]),
}


def run(script: str, args: list[str]) -> tuple[list[tuple[str, Metric]], int]:
    """Run one script, echoing its output; its metrics and exit status."""
    proc = subprocess.Popen([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True)
    rows: list[tuple[str, Metric]] = []
    for line in proc.stdout or ():
        if parsed := parse_result(line):
            bench, metrics = parsed
            rows += [(bench, m) for m in metrics]
        else:
            print(line, end="", flush=True)
    return rows, proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each script's smallest setting (CI smoke run)")
    args = parser.parse_args()
    rows: list[tuple[str, Metric]] = []
    times: list[str] = []
    failed = False
    for script, (full, quick) in SCRIPTS.items():
        print(f"\n### {script} {' '.join(quick if args.quick else full)}".rstrip(), flush=True)
        start = time.perf_counter()
        metrics, code = run(script, quick if args.quick else full)
        times.append(f"{script} {time.perf_counter() - start:.0f} s")
        rows += metrics
        if code != 0 or not metrics:
            failed = True
            rows.append((Path(script).stem, Metric(f"{script} exited with status {code}", float("nan"), met=False)))
    print("\n## benchmark summary (targets are printed, not asserted)")
    print(table(rows))
    print(f"wall time: {', '.join(times)}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
