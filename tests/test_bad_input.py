"""Bad input tried as a new user would (issue 21), one class per test group, at the command line.

The contract for each: exit code 2, exactly one line on stderr naming the file, the field and the fix,
nothing written and no temp folder left. Runs capture file descriptors, so a library's own log line printed
beside mixopt's (to the real stderr) breaks "one line" too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner, Result

from mixopt.cli import cli
from mixopt.solver import round_to_budget
from tests.helpers import make_scores, write_config_only_model_and_sae

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args: str | Path) -> Result:
    return CliRunner(capture="fd").invoke(cli, [str(a) for a in args])


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(result: Result, *patterns: str) -> str:
    """Exit 2 and one stderr line, starting `error: `, matching every pattern; returns the line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


@pytest.fixture
def ws(workspace: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny workspace (real model, SAE, sources); returns its recipe."""
    shutil.copytree(workspace.parent, tmp_path / "ws")
    return tmp_path / "ws" / "recipe.yaml"


def _edit(recipe: Path, change: Any, name: str = "recipe.yaml") -> Path:
    data = yaml.safe_load(recipe.read_text())
    change(data)
    path = recipe.parent / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _plan_refused(recipe: Path, out: Path, *patterns: str, extra: tuple[str, ...] = ()) -> str:
    """`plan` refuses with one line, and nothing appears anywhere under the recipe's or OUT's folder."""
    roots = {recipe.parent, out.parent}
    before = {root: _tree(root) for root in roots}
    line = _refused(_invoke("plan", recipe, "--out", out, "--budget", "60", *extra), *patterns)
    assert {root: _tree(root) for root in roots} == before
    return line


# ------------------------------------------------------------------------------- --force and OUT


def test_force__never_replaces_the_recipes_own_folder(ws: Path) -> None:
    line = _plan_refused(ws, ws.parent, r"--force would replace .*ws.*holds .*recipe\.yaml", extra=("--force",))
    assert "choose another --out" in line


def test_force__never_replaces_a_folder_holding_a_source(ws: Path) -> None:
    _plan_refused(ws, ws.parent / "data", r"holds .*data.*jsonl.*that the recipe reads", extra=("--force",))


def test_force__never_replaces_a_folder_mixopt_did_not_write(ws: Path, tmp_path: Path) -> None:
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    _plan_refused(ws, mine, r"replaces only an empty folder or an earlier mixopt run", extra=("--force",))
    assert (mine / "thesis.tex").read_text() == "years of work"


def test_force__out_dot_is_refused_without_a_crash_or_temp_folder(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ws.parent)
    _plan_refused(ws, Path("."), r"--force would replace", extra=("--force",))
    assert not [p for p in ws.parent.parent.iterdir() if p.name.startswith(".")]


def test_force__may_replace_an_empty_folder_or_an_earlier_run(ws: Path, tmp_path: Path) -> None:
    from mixopt.manifest import check_output
    from mixopt.recipe import load_recipe

    inputs = load_recipe(ws).input_paths()
    empty, run = tmp_path / "empty", tmp_path / "run"
    empty.mkdir()
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"mixopt_manifest_version": 1}))
    check_output(empty, True, inputs)  # no error
    check_output(run, True, inputs)
    assert {ws.resolve(), (ws.parent / "data" / "math.jsonl").resolve(), (ws.parent / "model").resolve()} <= set(inputs)


def test_out_under_a_regular_file_fails_before_any_model_work(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    _plan_refused(ws, tmp_path / "afile" / "run", r"afile is a file, not a folder; choose another --out")
    result = _invoke("score", ws, "--out", tmp_path / "afile" / "scores.json")
    _refused(result, r"cannot write scores file .*afile is a file")


# ---------------------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "template",
    ["{q.__class__}", "{q.__doc__}", "{q.__class__.__init__.__globals__}", "{q:{a.__class__}}", "{q!r}", "{q[x]}"],
)
def test_template__attribute_access_conversions_and_specs_are_refused(ws: Path, template: str) -> None:
    recipe = _edit(ws, lambda r: r["target"].update(prompt=template))
    check = _invoke("check", recipe)
    assert check.exit_code == 2 and check.stdout == ""
    assert re.search(r"target\.prompt: template field .* is not allowed", check.stderr), check.stderr
    _plan_refused(recipe, ws.parent / "run", r"target\.prompt: template field '\{.*\}' is not allowed")


def test_template__a_column_and_an_index_into_it_are_allowed(ws: Path) -> None:
    data = ws.parent / "data"
    rows = [{"question": f"q{i}", "choices": [f"a{i}", f"b{i}"]} for i in range(30)]
    (data / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = _edit(
        ws, lambda r: r["domains"][0].update(source={"path": "data/mcq.jsonl"}, text="{question} A. {choices[0]}")
    )
    result = _invoke("check", recipe)
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------ rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize(
    ("row", "template", "pattern"),
    [
        ({"text": None}, "{text}", r"row 4: \{text\} is null or missing"),
        ({"other": "x"}, "{text}", r"row 4: \{text\} is null or missing"),
        ({"text": "t", "choices": ["a"]}, "{text} {choices[2]}", r"row 4: column 'choices' has 1 items .*choices\[2\]"),
    ],
)
def test_rows__a_row_that_cannot_render_names_file_row_and_column(
    ws: Path, row: dict[str, Any], template: str, pattern: str
) -> None:
    good = {"text": "fine", "choices": ["a", "b", "c"]}
    _write_rows(ws.parent / "data" / "bad.jsonl", [good] * 3 + [row] + [good] * 26)
    recipe = _edit(ws, lambda r: r["domains"][0].update(source={"path": "data/bad.jsonl"}, text=template))
    check = _invoke("check", recipe)
    assert check.exit_code == 2 and re.search(r"domains\.0\.source: data/bad\.jsonl: " + pattern, check.stderr)
    _plan_refused(recipe, ws.parent / "run", r"data/bad\.jsonl", pattern, r"on_bad_row: skip")


def test_check__reads_rows_once_until_the_recipe_or_a_data_file_changes(
    ws: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The data checks are cached by the recipe's content and each file's size and mtime: a second check
    reads no row, and an edited file is read again (and its bad row found)."""
    import mixopt.checks

    good = {"text": "fine"}
    data = ws.parent / "data" / "edited.jsonl"
    _write_rows(data, [good] * 30)
    recipe = _edit(ws, lambda r: r["domains"][0].update(source={"path": "data/edited.jsonl"}, text="{text}"))
    assert _invoke("check", recipe).exit_code == 0
    read = mixopt.checks._read_data
    calls: list[object] = []
    monkeypatch.setattr(mixopt.checks, "_read_data", lambda r: calls.append(r) or read(r))
    assert _invoke("check", recipe).exit_code == 0 and calls == []  # nothing changed: no row read
    _write_rows(data, [good] * 3 + [{"text": None}] + [good] * 26)
    check = _invoke("check", recipe)
    assert len(calls) == 1 and check.exit_code == 2 and "row 4: {text} is null or missing" in check.stderr
    assert _invoke("check", recipe).exit_code == 2 and len(calls) == 1  # the problem itself is remembered


def test_rows__on_bad_row_skip_leaves_them_out_counts_them_and_a_later_run_cleans_stale_stages(ws: Path) -> None:
    """One real plan run checks two classes: skipped bad rows (never 'None' in the mixture, counted in the
    manifest) and temp folders of killed runs (dead pid: removed; live pid: kept)."""
    import datasets

    rows = [{"text": f"law {i}"} for i in range(30)]
    for i in (3, 7):
        rows[i] = {"text": None}
    _write_rows(ws.parent / "data" / "law.jsonl", rows)
    recipe = _edit(ws, lambda r: r.update(on_bad_row="skip"))
    out = ws.parent / "run"
    dead = [_dead_pid(), _dead_pid()]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stale = [ws.parent / f".run.tmp-{dead[0]}", ws.parent / f".run.old-{dead[1]}"]
        kept = ws.parent / f".run.tmp-{live.pid}"
        for folder in [*stale, kept]:
            folder.mkdir()
            (folder / "half.arrow").write_text("half")
        result = _invoke("plan", recipe, "--out", out, "--budget", "60")
        assert result.exit_code == 0, result.output
        assert not any(p.exists() for p in stale) and kept.exists()
    finally:
        live.kill()
        live.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["skipped_rows"] == {"law": 2}
    texts = datasets.load_from_disk(str(out / "mixture"))["text"]
    assert not any("None" in t for t in texts)
    assert {t for t in texts if t.startswith("law")} <= {f"law {i}" for i in range(30) if i not in (3, 7)}


def _dead_pid() -> int:
    """The pid of a process that has exited."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_stale_stages__a_run_killed_between_its_two_renames_is_finished_not_lost(tmp_path: Path) -> None:
    """kill -9 after the old OUT moved aside and before the new one moved in: OUT is missing, both folders stay.
    The next run moves the complete new one in and removes the old one."""
    from mixopt.manifest import remove_stale_stages

    pid = _dead_pid()
    new, old = tmp_path / f".run.tmp-{pid}", tmp_path / f".run.old-{pid}"
    for folder, label in [(new, "new"), (old, "old")]:
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"mixopt_manifest_version": 1, "run": label}))
    assert remove_stale_stages(tmp_path / "run") == [old]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["run"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


# ------------------------------------------------------------------------------------------ SIGTERM


def test_sigterm_while_plan_writes__cleans_up_and_exits_143(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGTERM to this process in the middle of writing: exit 143, no OUT, no temp folder."""
    import mixopt.exports

    def killed(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(mixopt.exports, "write_exports", killed)
    before = _tree(ws.parent)
    result = _invoke("plan", ws, "--out", ws.parent / "run", "--budget", "60")
    assert result.exit_code == 128 + signal.SIGTERM, result.output
    assert result.stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM; partial output removed"
    assert _tree(ws.parent) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is mixopt's only while it runs


@pytest.mark.slow
def test_sigterm_while_plan_writes__a_real_process_exits_143(ws: Path) -> None:
    """The same in a process of its own: the exit status the shell sees, and no traceback."""
    code = (
        "import os, signal, sys\n"
        "import mixopt.exports\n"
        "def killed(*a, **k):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "mixopt.exports.write_exports = killed\n"
        "from mixopt.cli import main\n"
        "sys.argv = ['mixopt', 'plan', sys.argv[1], '--out', sys.argv[2], '--budget', '60']\n"
        "main()\n"
    )
    before = _tree(ws.parent)
    done = subprocess.run(
        [sys.executable, "-c", code, str(ws), str(ws.parent / "run")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM; partial output removed"
    assert _tree(ws.parent) == before


# ---------------------------------------------------------------------------------- silent wrong output


def _six_domains(tmp_path: Path, min_share: float) -> Path:
    write_config_only_model_and_sae(tmp_path)
    _write_rows(tmp_path / "t.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(20)])
    for j in range(6):
        _write_rows(tmp_path / f"d{j}.jsonl", [{"text": f"d{j} {i}"} for i in range(10)])
    recipe = {
        "model": {"path": "./model"},
        "sae": {"path": "sae", "layer": 1},
        "target": {"source": {"path": "t.jsonl"}, "prompt": "{q}", "response": "{a}"},
        "domains": [
            {"name": f"d{j}", "source": {"path": f"d{j}.jsonl"}, "text": "{text}", "min_share": min_share}
            for j in range(6)
        ],
        "allocation": {"budget": 4, "stability": 0},
    }
    path = tmp_path / "six.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_min_share_that_cannot_survive_rounding_is_an_error_in_check_and_solve(tmp_path: Path) -> None:
    recipe = _six_domains(tmp_path, 0.1)  # budget 4: 2 replay examples for 6 domains that each need one
    check = _invoke("check", recipe)
    assert check.exit_code == 2
    assert re.search(
        r"allocation: min_share of 6 domains .* at least 6 examples .* replay budget holds 2", check.stderr
    )
    scores = tmp_path / "scores.json"
    record = make_scores([1, 2, 3, 4, 5, 6], available=10)
    scores.write_text(json.dumps(record.to_dict()))
    before = _tree(tmp_path)
    solved = _invoke("solve", scores, "--recipe", recipe, "--out", tmp_path / "allocation.json")
    _refused(solved, r"min_share of 6 domains \(d0, d1, d2, d3, \.\.\.\) cannot survive rounding", r"raise the budget")
    assert _tree(tmp_path) == before


def test_round_to_budget__a_positive_floor_keeps_one_example_where_one_fits() -> None:
    """Floors 1.5, 1.5, 0.5, 6.5 of 10: the bounds inside the floors (2+2+1+7 = 12) cannot meet 10, so they
    widen; before, the 0.5 floor widened to 0 and got nothing. Brute force: the assignments that give every
    floor at least one example and sum to 10 exist, and the rounding returns one of them."""
    floors = np.array([1.5, 1.5, 0.5, 6.5])
    counts = round_to_budget(floors, 10, floors=floors)
    grid = np.stack(np.meshgrid(*[np.arange(0, 11)] * 4, indexing="ij"), -1).reshape(-1, 4)
    feasible = {tuple(c) for c in grid if c.sum() == 10 and (c >= np.maximum(np.floor(floors), 1)).all()}
    assert feasible and tuple(counts) in feasible


def test_overlap__a_domain_that_is_the_targets_own_file_is_refused(ws: Path) -> None:
    recipe = _edit(ws, lambda r: r["domains"][0].update(source={"path": "data/math.jsonl"}, text="{q} {a}"))
    check = _invoke("check", recipe)
    assert check.exit_code == 2 and re.search(r"domains\.0\.source: domain 'law' reads the target's own", check.stderr)
    _plan_refused(recipe, ws.parent / "run", r"domains\.0\.source: .*math\.jsonl.*replay must not repeat")


def test_overlap__a_domain_with_rows_of_the_same_content_is_refused_with_the_count(ws: Path) -> None:
    data = ws.parent / "data"
    target_rows = [json.loads(line) for line in (data / "math.jsonl").read_text().splitlines()]
    _write_rows(data / "copied.jsonl", target_rows[:12] + [{"q": f"new {i}", "a": "x"} for i in range(18)])
    recipe = _edit(ws, lambda r: r["domains"][0].update(source={"path": "data/copied.jsonl"}, text="{q} {a}"))
    _plan_refused(recipe, ws.parent / "run", r"12 of the 30 rows of domain 'law' are also target rows")


def test_duplicate_yaml_keys_are_refused_with_both_lines(ws: Path) -> None:
    text = ws.read_text().replace("allocation: {budget: 60,", "allocation: {budget: 2000, budget: 60,")
    recipe = ws.parent / "dup.yaml"
    recipe.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "budget: 2000" in t)
    _plan_refused(recipe, ws.parent / "run", rf"dup\.yaml: invalid YAML at line {line}: key 'budget' is given twice")


def test_duplicate_yaml_keys__a_merged_key_may_still_be_overridden(ws: Path) -> None:
    text = ws.read_text().replace("  - {name: chem,", "  - {<<: {name: law, groups: [x]}, name: chem,")
    assert text != ws.read_text()
    recipe = ws.parent / "merged.yaml"
    recipe.write_text(text)
    from mixopt.recipe import load_recipe

    assert [d.name for d in load_recipe(recipe).domains] == ["law", "chem", "code"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ([], r"\(root\): Input should be a dictionary"),
        ("a string", r"\(root\): Input should be a dictionary"),
        ({"score": None}, r"domains\.0\.score: Input should be a valid number"),
        ({"score": "high"}, r"domains\.0\.score: Input should be a valid number"),
        ({"name": "d1"}, r"domain 'd1' is listed 2 times"),
    ],
)
def test_solve__refuses_malformed_scores(tmp_path: Path, content: Any, pattern: str) -> None:
    data: Any = make_scores([1.0, 2.0, 3.0]).to_dict()
    if isinstance(content, dict):
        data["domains"][0].update(content)
    else:
        data = content
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps(data))
    before = _tree(tmp_path)
    _refused(_invoke("solve", scores, "--budget", "100", "--out", tmp_path / "a.json"), r"scores\.json: ", pattern)
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------------- one clear line, not a traceback


def _bad_source(ws: Path, name: str, content: bytes, **source: Any) -> Path:
    (ws.parent / "data" / name).write_bytes(content)
    return _edit(ws, lambda r: r["domains"][0].update(source={"path": f"data/{name}", **source}))


LAW = [json.dumps({"text": f"law {i}"}).encode() + b"\n" for i in range(40)]
SOURCES = {
    "non-UTF-8 JSONL": (
        "bad.jsonl",
        b"".join([LAW[0], b'{"text": "caf\xe9"}\n', *LAW[1:]]),
        {},
        r"bad\.jsonl: line 2 is not UTF-8",
    ),
    "latin-1 CSV": ("lat.csv", b"text\nfine\ncaf\xe9\n", {}, r"lat\.csv: line 3 is not UTF-8 .*iconv -f latin1"),
    "empty JSONL": ("empty.jsonl", b"\n", {}, r"empty\.jsonl: the file is empty"),
    "CSV with a header only": ("head.csv", b"text\n", {}, r"head\.csv: a header but no rows"),
    "corrupt JSONL line": (
        "corrupt.jsonl",
        b"".join(LAW[:29]) + b'{"text": broken\n',
        {},
        r"corrupt\.jsonl: line 30 is not valid JSON",
    ),
    "a glob that matches no file": (
        "unused.jsonl",
        b"",
        {"path": "data/none/*.jsonl"},
        r"'data/none/\*\.jsonl' matches no",
    ),
    "a folder that is not a saved dataset": ("folder", b"", {"path": "data"}, r"cannot read .*data as a saved dataset"),
}


@pytest.mark.parametrize("case", sorted(SOURCES))
def test_sources__bad_files_get_one_line_naming_the_file_and_fix(ws: Path, case: str) -> None:
    name, content, source, pattern = SOURCES[case]
    if name == "folder":
        recipe = _edit(ws, lambda r: r["domains"][0].update(source=source))
    else:
        recipe = _bad_source(ws, name, content, **source)
    check = _invoke("check", recipe)
    assert check.exit_code == 2 and check.stdout == "" and re.search(pattern, check.stderr), check.stderr
    _plan_refused(recipe, ws.parent / "run", r"domains\.0\.source: ", pattern)


def test_recipe_path__binary_file_folder_and_missing_file(ws: Path) -> None:
    binary = ws.parent / "model" / "model.safetensors"
    _plan_refused(binary, ws.parent / "run", r"cannot read it as text: a recipe is a UTF-8 YAML file")
    _plan_refused(ws.parent / "data", ws.parent / "run", r"data: is a folder, not a recipe file")
    control = ws.parent / "ctl.yaml"
    control.write_text("seed: 0\nmodel: \x07\n")
    _plan_refused(control, ws.parent / "run", r"ctl\.yaml: invalid YAML at line 2")


def _sae_cfg(ws: Path, **changes: Any) -> None:
    cfg_path = ws.parent / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def test_sae_cfg_that_disagrees_with_its_weights_gets_the_whole_message(ws: Path) -> None:
    _sae_cfg(ws, d_in=48)
    line = _plan_refused(ws, ws.parent / "run", r"sae\.path: .*cfg\.json says d_in 48 but the weights' W_enc has shape")
    assert line.endswith("fix d_in or re-save the SAE")


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        (
            lambda ws: _sae_cfg(ws, metadata={"hook_name": "blocks.0.hook_resid_post"}),
            r"sae\.layer: SAE was trained at",
        ),
        (lambda ws: None, r"sae\.layer: layer 5 is out of range: the model has blocks 0\.\.1"),
    ],
)
def test_check__catches_what_plan_rejects_from_config_files(ws: Path, change: Any, pattern: str) -> None:
    change(ws)
    recipe = _edit(ws, lambda r: r["sae"].update(layer=5)) if "range" in pattern else ws
    check = _invoke("check", recipe)
    assert check.exit_code == 2 and re.search(pattern, check.stderr), check.stderr


def test_check__catches_an_sae_narrower_than_the_model(tmp_path: Path) -> None:
    write_config_only_model_and_sae(tmp_path, width=32, sae_width=48)
    _write_rows(tmp_path / "t.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(20)])
    _write_rows(tmp_path / "d.jsonl", [{"text": f"d {i}"} for i in range(20)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {path: ./model}\nsae: {path: sae, layer: 1}\n"
        "target: {source: {path: t.jsonl}, prompt: '{q}', response: '{a}'}\n"
        "domains: [{name: d, source: {path: d.jsonl}, text: '{text}'}]\n"
    )
    check = _invoke("check", recipe)
    assert check.exit_code == 2 and "sae.path: SAE input width 48 != model hidden size 32" in check.stderr


def test_hub_model_offline_fails_fast_in_one_line(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = _edit(ws, lambda r: r["model"].update(path="nobody-here/no-such-model"))
    _plan_refused(recipe, ws.parent / "run", r"model\.path: .*not .* in the Hugging Face cache, and HF_HUB_OFFLINE")


def test_hub_model_unreachable_fails_fast_in_one_line(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused
    recipe = _edit(ws, lambda r: r["model"].update(path="nobody-here/no-such-model"))
    _plan_refused(recipe, ws.parent / "run", r"needs the Hugging Face hub, but 127\.0\.0\.1 cannot be reached")


# ----------------------------------------------------------------------------------- check's own output


def test_check__reports_every_problem_at_once_on_stderr(ws: Path) -> None:
    def many(r: dict[str, Any]) -> None:
        r["allocation"].update(budgte=3, budget=0)
        r["domains"][1]["text"] = "{text.upper}"

    result = _invoke("check", _edit(ws, many))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and result.stdout == ""
    assert len(lines) == 3, lines
    assert [re.search(r"recipe\.yaml: ([\w.]+):", line)[1] for line in lines] == [  # type: ignore[index]
        "domains.1.text",
        "allocation.budget",
        "allocation.budgte",
    ]
    plan = _invoke("plan", ws.parent / "recipe.yaml", "--budget", "60", "--out", ws.parent / "run")
    assert plan.exit_code == 2 and len(plan.stderr.strip().splitlines()) == 3


def test_check__reports_every_static_problem_at_once(ws: Path) -> None:
    def two(r: dict[str, Any]) -> None:
        r["domains"][0]["source"]["path"] = "data/nope.jsonl"
        r["domains"][2]["text"] = "{body}"

    result = _invoke("check", _edit(ws, two))
    assert result.exit_code == 2
    assert [line.split(": ")[1] for line in result.stderr.strip().splitlines()] == [
        "domains.0.source",
        "domains.2.source",
    ]


@pytest.mark.parametrize(
    ("change", "key", "which"),
    [
        (lambda r: r["domains"][2].update(name="law"), "name: law", -1),  # the repeated domain name
        (lambda r: r["target"].update(name="chem"), "name: chem", 0),  # the target's name, before the domains
    ],
)
def test_check__github_format_points_root_level_errors_at_the_key(ws: Path, change: Any, key: str, which: int) -> None:
    recipe = _edit(ws, change)
    lines = recipe.read_text().splitlines()
    expected = [i for i, text in enumerate(lines, 1) if text.strip().lstrip("- ") == key][which]
    result = _invoke("check", "--format", "github", recipe)
    assert result.exit_code == 2
    assert result.stdout.startswith(f"::error file={recipe},line={expected}::"), (result.stdout, lines)
