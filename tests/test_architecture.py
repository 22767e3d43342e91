"""The package's shape, checked from the source (no imports, so it is fast): the core never imports the
validation sub-product, no module imports another's private names, and the import graph (module-level and
in-function imports alike) has no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mixopt"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported mixopt module, names taken from it) for every import statement, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("mixopt")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mixopt") and not node.level:
            names = [a.name for a in node.names]
            submodules = [f"{node.module}.{n}" for n in names if f"{node.module}.{n}" in MODULES]
            found += [(m, []) for m in submodules]
            found.append((node.module, [n for n in names if f"{node.module}.{n}" not in MODULES]))
    return found


GRAPH = {name: {m for m, _ in _imports(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def test_core_never_imports_validation() -> None:
    core = [m for m in MODULES if not m.startswith("mixopt.validation") and m not in ("mixopt.cli", "mixopt.__main__")]
    offenders = {m: sorted(d for d in GRAPH[m] if d.startswith("mixopt.validation")) for m in core}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_private_name_crosses_a_module() -> None:
    crossing = [
        (name, module, n)
        for name, path in MODULES.items()
        for module, names in _imports(path)
        for n in names
        if n.startswith("_") and not n.startswith("__") and module != name
    ]
    assert not crossing


def test_the_import_graph_has_no_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                pytest.fail("import cycle: " + " -> ".join([*path[path.index(dep) :], dep]))
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path: Path) -> None:
    """The checks above cannot pass vacuously: the same parser finds what they look for."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from mixopt.scores import _hidden, SCORERS\n    import mixopt.stats\n")
    assert ("mixopt.scores", ["_hidden", "SCORERS"]) in _imports(source)
    assert ("mixopt.stats", []) in _imports(source)
    assert "mixopt.validation.run" in MODULES and "mixopt.stats" in GRAPH["mixopt.validation.analysis"]
