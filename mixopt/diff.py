"""`mixopt diff A B`: what changed between two plans, reviewed like a Terraform plan.

A and B are `mixopt plan` output folders or their manifest.json files. Compared: the resolved recipe
field by field (defaults filled in, so an edit that restates a default is no change), the scorer, model
and SAE identity, the rows of the target, and per domain its score, its rank by score and its rows, and
the mixture's rows and content sha256. Scores count as changed beyond a relative difference of
SCORE_RTOL (float noise of summation order is not a change); everything else must be equal.

Example:
    >>> d = diff_runs(load_run(Path("runs/a")), load_run(Path("runs/b")))   # doctest: +SKIP
    >>> print(d.markdown())                                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixopt.errors import MixoptError

SCORE_RTOL = 1e-9


@dataclass
class DomainRecord:
    score: float  # the recipe's scorer
    rank: int  # 1 = highest score
    rows: int  # rows in the mixture


@dataclass
class RunRecord:
    """What `diff` compares of one plan, read from its manifest."""

    path: Path
    fields: dict[str, str]  # "recipe: allocation.budget" or "scorer" -> the value as JSON text
    domains: dict[str, DomainRecord]


@dataclass
class FieldChange:
    name: str
    before: str | None  # None: absent in A
    after: str | None


@dataclass
class DomainChange:
    name: str
    before: DomainRecord | None  # None: not a domain of A
    after: DomainRecord | None
    changed: list[str]  # "score", "rank", "rows", or "added" / "removed"


@dataclass
class RunDiff:
    a: Path
    b: Path
    fields: list[FieldChange] = field(default_factory=list)
    domains: list[DomainChange] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.fields and not self.domains

    def summary(self) -> str:
        if self.identical:
            return f"{self.a} and {self.b}: identical plans"
        return f"{self.a} -> {self.b}: {len(self.fields)} fields and {len(self.domains)} domains changed"

    def _domain_cells(self, change: DomainChange) -> list[str]:
        def side(record: DomainRecord | None, attr: str, fmt: str) -> str:
            return "-" if record is None else format(getattr(record, attr), fmt)

        return [
            change.name,
            ", ".join(change.changed),
            *(f"{side(change.before, a, f)} -> {side(change.after, a, f)}" for a, f in _DOMAIN_COLUMNS),
        ]

    def rich_tables(self) -> list[Any]:
        """The terminal view: a table of changed fields and one of changed domains."""
        from rich.table import Table

        tables = []
        if self.fields:
            table = Table(title="changed fields")
            for name in ("field", "A", "B"):
                table.add_column(name, overflow="fold")
            for f in self.fields:
                table.add_row(f.name, _show(f.before), _show(f.after))
            tables.append(table)
        if self.domains:
            table = Table(title="changed domains (A -> B)")
            for name in ("domain", "changed", "score", "rank", "rows"):
                table.add_column(name, justify="left" if name in ("domain", "changed") else "right")
            for change in self.domains:
                table.add_row(*self._domain_cells(change))
            tables.append(table)
        return tables

    def markdown(self) -> str:
        """For a pull-request comment."""
        lines = [f"**mixopt diff**: {_md(self.summary())}"]
        if self.fields:
            lines += ["", "| field | A | B |", "| --- | --- | --- |"]
            lines += [f"| {_md(f.name)} | {_md(_show(f.before))} | {_md(_show(f.after))} |" for f in self.fields]
        if self.domains:
            lines += ["", "| domain | changed | score | rank | rows |", "| --- | --- | ---: | ---: | ---: |"]
            lines += ["| " + " | ".join(_md(c) for c in self._domain_cells(ch)) + " |" for ch in self.domains]
        return "\n".join(lines)

    def github(self) -> str:
        """GitHub Actions workflow commands: one `::notice` annotation per change."""
        lines = [
            f"::notice title={_gh_property('mixopt diff: ' + f.name)}::"
            f"{_gh_message(f'{_show(f.before)} -> {_show(f.after)}')}"
            for f in self.fields
        ]
        for change in self.domains:
            name, changed, *values = self._domain_cells(change)
            detail = "; ".join(f"{col} {v}" for (col, _), v in zip(_DOMAIN_COLUMNS, values, strict=True))
            lines.append(
                f"::notice title={_gh_property('mixopt diff: domain ' + name)}::{_gh_message(f'{changed}: {detail}')}"
            )
        return "\n".join(lines or [f"::notice title=mixopt diff::{_gh_message(self.summary())}"])


_DOMAIN_COLUMNS = [("score", ".4g"), ("rank", "d"), ("rows", ",")]


def _show(value: str | None) -> str:
    return "(absent)" if value is None else value


def _md(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _gh_message(text: str) -> str:
    """Escape as GitHub's workflow-command format requires (toolkit `escapeData`)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_property(text: str) -> str:
    """Escape a property value (toolkit `escapeProperty`)."""
    return _gh_message(text).replace(":", "%3A").replace(",", "%2C")


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    """Dotted field -> JSON text of each leaf; a list of named items is keyed by name (domains[law]), so
    inserting a domain does not shift every other domain's fields."""
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(node, list) and node and all(isinstance(v, dict) and "name" in v for v in node):
        out = {}
        for value in node:
            out |= _flatten({k: v for k, v in value.items() if k != "name"}, f"{prefix}[{value['name']}]")
        return out
    return {prefix: json.dumps(node, sort_keys=True)}


def _manifest_path(path: Path) -> Path:
    manifest = path / "manifest.json" if path.is_dir() else path
    if not manifest.is_file():
        raise MixoptError(f"{path}: no manifest.json there; pass a `mixopt plan` output folder or its manifest.json")
    return manifest


def load_run(path: Path) -> RunRecord:
    """Read a plan's manifest (`path`: its output folder or manifest.json)."""
    manifest_path = _manifest_path(path)
    try:
        manifest = json.loads(manifest_path.read_text())
        if not isinstance(manifest, dict) or "mixopt_manifest_version" not in manifest:
            raise ValueError("no mixopt_manifest_version")
        scores = {d["name"]: float(d["score"] if "score" in d else d["sts"]) for d in manifest["sts"]["domains"]}
        rows = {d["name"]: int(d["count"]) for d in manifest["allocation"]}
        fields = {f"recipe: {k}": v for k, v in _flatten(manifest["recipe"]["resolved"]).items()}
        fields |= {
            "scorer": manifest["sts"]["score"],
            "model identity": manifest["model"]["identity"],
            "SAE identity": manifest["sae"]["identity"],
            "target rows": str(manifest["solver"]["target_count"]),
            "mixture rows": str(manifest["dataset"]["rows"]),
            "mixture content sha256": manifest["dataset"]["content_sha256"],
        }
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MixoptError(f"{manifest_path}: not a mixopt plan manifest ({err}); make one with `mixopt plan`") from None
    ranked = sorted(scores, key=lambda name: (-scores[name], name))
    domains = {name: DomainRecord(scores[name], ranked.index(name) + 1, rows.get(name, 0)) for name in scores}
    return RunRecord(path, {k: str(v) for k, v in fields.items()}, domains)


def _domain_change(name: str, a: DomainRecord | None, b: DomainRecord | None) -> DomainChange | None:
    if a is None or b is None:
        return DomainChange(name, a, b, ["added" if a is None else "removed"])
    changed = [
        label
        for label, differs in (
            ("score", not math.isclose(a.score, b.score, rel_tol=SCORE_RTOL, abs_tol=0.0)),
            ("rank", a.rank != b.rank),
            ("rows", a.rows != b.rows),
        )
        if differs
    ]
    return DomainChange(name, a, b, changed) if changed else None


def diff_runs(a: RunRecord, b: RunRecord) -> RunDiff:
    """Every field and domain that differs between A and B, in A's order (then what only B has)."""
    result = RunDiff(a.path, b.path)
    for name in [*a.fields, *(k for k in b.fields if k not in a.fields)]:
        before, after = a.fields.get(name), b.fields.get(name)
        if before != after:
            result.fields.append(FieldChange(name, before, after))
    for name in [*a.domains, *(k for k in b.domains if k not in a.domains)]:
        change = _domain_change(name, a.domains.get(name), b.domains.get(name))
        if change is not None:
            result.domains.append(change)
    return result
