"""Output conventions shared by the benchmarks: each script ends with one summary table (metric, value,
target, met) and one machine-readable line, `BENCH_RESULT {json}`, that `run_all.py` collects.

Targets are printed, never asserted: a missed target is a finding, not a failure.
"""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass

RESULT_PREFIX = "BENCH_RESULT "
_COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt}


@dataclass
class Metric:
    name: str
    value: float
    unit: str = ""
    target: str = ""  # e.g. ">= 2.5x"; empty: informational
    met: bool | None = None


def check(name: str, value: float, unit: str, op: str, threshold: float) -> Metric:
    """A metric with the target `value <op> threshold`, e.g. check("speedup", 3.1, "x", ">=", 2.5)."""
    shown = f"{format_value(threshold)}{'' if unit in ('x', '%') else ' '}{unit}".rstrip()
    return Metric(name, value, unit, f"{op} {shown}", bool(_COMPARE[op](value, threshold)))


def format_value(value: float) -> str:
    if value != value:  # NaN: not measured
        return "n/a"
    if abs(value) >= 1000 or value == int(value):
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _cells(bench: str, m: Metric) -> list[str]:
    unit = m.unit if m.unit in ("x", "%") else f" {m.unit}"
    met = {True: "yes", False: "no", None: "-"}[m.met]
    return [bench, m.name, f"{format_value(m.value)}{unit}".rstrip(), m.target or "-", met]


def table(rows: list[tuple[str, Metric]]) -> str:
    """(bench, metric) rows as an aligned text table."""
    cells = [["bench", "metric", "value", "target", "met"], *(_cells(bench, m) for bench, m in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(5)]

    def line(row: list[str]) -> str:  # values right-aligned, text left-aligned
        return "  ".join(c.rjust(w) if i == 2 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    lines = [line(row) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def report(bench: str, metrics: list[Metric]) -> None:
    """Print the summary table, then the line `run_all.py` parses. Call once, last."""
    print(f"\n## summary: {bench}")
    print(table([(bench, m) for m in metrics]))
    print(RESULT_PREFIX + json.dumps({"bench": bench, "metrics": [asdict(m) for m in metrics]}), flush=True)


def parse_result(line: str) -> tuple[str, list[Metric]] | None:
    """(bench, metrics) from a `BENCH_RESULT` line, None for any other line."""
    if not line.startswith(RESULT_PREFIX):
        return None
    payload = json.loads(line.removeprefix(RESULT_PREFIX))
    return payload["bench"], [Metric(**m) for m in payload["metrics"]]
