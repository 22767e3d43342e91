"""Scoring on torch.distributed: 2 gloo ranks on the CPU give the scores of one process, a rank that raises
fails the run in one line with nothing half-written.

The ranks are forked from the test process (modules already imported, so a run costs its compute, not
two interpreters' imports) and run the real command line, `mixopt score`, as torchrun would: RANK,
WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment, one thread each. `test_torchrun__...` (slow)
launches the command through torchrun itself."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mixopt.cli import cli


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(rank: int, world: int, port: int, cache: str, args: list[str], patch: Callable[[int], None]) -> None:
    """One rank: torchrun's environment, one thread, then `mixopt ARGS`; exits with the command's status."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    os.environ["MIXOPT_CACHE"] = cache
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1; a forked pool must not be reused
    patch(rank)
    try:
        cli.main(args, prog_name="mixopt")  # click exits with the command's status
    except SystemExit as done:
        os._exit(done.code if isinstance(done.code, int) else 1)
    os._exit(0)


def run_ranks(world: int, cache: Path, args: list[str], patch: Callable[[int], None] = lambda rank: None) -> list[int]:
    """Fork `world` ranks running `mixopt ARGS`; their exit codes, in rank order."""
    context = multiprocessing.get_context("fork")
    port = _free_port()
    ranks = [context.Process(target=_rank_main, args=(r, world, port, str(cache), args, patch)) for r in range(world)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(timeout=600)  # generous: a loaded 2-core machine runs a tiny plan for minutes
        if process.is_alive():  # a hang is a failure, not a stuck test run
            process.kill()
            process.join()
    return [process.exitcode if process.exitcode is not None else -9 for process in ranks]


def one_process(cache: Path, args: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """`mixopt ARGS` in this process with one thread and its own cache (the ranks' reference)."""
    monkeypatch.setenv("MIXOPT_CACHE", str(cache))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(cli, args)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output


def _numbers(node: object, path: str = "") -> dict[str, float]:
    """Every number in a JSON tree by its path (scores.json: scores, intervals, per-example values)."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _numbers(value, f"{path}.{key}").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in _numbers(value, f"{path}[{i}]").items()}
    if isinstance(node, bool) or not isinstance(node, int | float):
        return {}
    return {path: float(node)}


def assert_same_scores(a: Path, b: Path, skip: tuple[str, ...] = ("cost",)) -> None:
    """Same structure and strings; numbers equal to float64 summation tolerance (rtol 1e-9)."""
    left, right = (json.loads(p.read_text()) for p in (a, b))
    for name in skip:
        left.pop(name, None), right.pop(name, None)
    x, y = _numbers(left), _numbers(right)
    assert x.keys() == y.keys()
    keys = sorted(x)
    np.testing.assert_allclose([y[k] for k in keys], [x[k] for k in keys], rtol=1e-9, atol=1e-12)
    strip = lambda node: json.loads(json.dumps(node), parse_float=lambda _: 0.0, parse_int=lambda _: 0)  # noqa: E731
    assert strip(left) == strip(right)  # names, domains, order


def _recipe_with(workspace: Path, root: Path, sts: str) -> Path:
    """The workspace's recipe, with its own copy under `root` and `sts:` replaced by `sts`."""
    shutil.copytree(workspace.parent, root, dirs_exist_ok=True)
    recipe = root / workspace.name
    lines = [f"sts: {sts}" if line.startswith("sts:") else line for line in recipe.read_text().splitlines()]
    recipe.write_text("\n".join(lines) + "\n")
    return recipe


def test_two_ranks__give_the_scores_json_of_one_process(workspace: Path, tmp_path: Path, monkeypatch) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one_process(tmp_path / "cache-1", ["score", str(workspace), "--out", str(one)], monkeypatch)
    codes = run_ranks(2, tmp_path / "cache-2", ["score", str(workspace), "--out", str(two)])
    assert codes == [0, 0]
    assert_same_scores(one, two)
    # rank 0 wrote the cache the same entries as one process, and a second 2-rank run reads them
    entries = sorted(p.name for p in (tmp_path / "cache-1" / "features").iterdir())
    assert sorted(p.name for p in (tmp_path / "cache-2" / "features").iterdir()) == entries
    again = tmp_path / "again.json"
    assert run_ranks(2, tmp_path / "cache-2", ["score", str(workspace), "--out", str(again)]) == [0, 0]
    assert again.read_bytes() == two.read_bytes()


def test_two_ranks__plan_writes_the_mixture_of_one_process_and_only_rank_0_writes(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _recipe_with(
        workspace, tmp_path / "ws", "{top_k: 8, target_tokens: 300, domain_tokens: 200, bootstrap: 50}"
    )
    recipe.write_text(recipe.read_text().replace("formats: [arrow, parquet]}", "formats: [arrow]}"))  # no exports
    args = ["plan", str(recipe), "--budget", "60", "--out"]
    one_process(tmp_path / "cache-1", [*args, str(tmp_path / "one")], monkeypatch)
    assert run_ranks(2, tmp_path / "cache-2", [*args, str(tmp_path / "two")]) == [0, 0]
    manifests = [json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("one", "two")]
    assert manifests[1]["dataset"]["content_sha256"] == manifests[0]["dataset"]["content_sha256"]
    assert manifests[1]["allocation"] == manifests[0]["allocation"]
    assert_same_scores(tmp_path / "one" / "scores.json", tmp_path / "two" / "scores.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache-1", "cache-2", "one", "two", "ws"]  # no stray stage


@pytest.mark.parametrize("scorer", ["grad", "probe"])
def test_two_ranks__shard_the_look_ahead_scorers_too(
    scorer: str, workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grad = "grad: {batches: 2, batch_size: 4, blocks: 1, sketch: 4}"
    settings = f"{{score: {scorer}, top_k: 8, target_tokens: 200, domain_tokens: 120, batch_tokens: 128, "
    recipe = _recipe_with(workspace, tmp_path / "ws", settings + f"bootstrap: 20, probe: {{steps: 2}}, {grad}}}")
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one_process(tmp_path / "cache-1", ["score", str(recipe), "--out", str(one)], monkeypatch)
    assert run_ranks(2, tmp_path / "cache-2", ["score", str(recipe), "--out", str(two)]) == [0, 0]
    # grad: every rank computes u alike and its examples' alignments exactly; the domains' sketches (the
    # transfer matrix) are float32 sums added in another order. probe: rank 0 trains, the others take its weights
    assert json.loads(two.read_text())["score"] == scorer
    assert_same_scores(one, two, skip=("cost", "transfer"))
    if scorer == "grad":
        matrices = [json.loads(p.read_text())["transfer"]["matrix"] for p in (one, two)]
        np.testing.assert_allclose(matrices[1], matrices[0], atol=1e-5)


def _fail_in_rank_1(call: int) -> Callable[[int], None]:
    """A patch that makes rank 1 raise in its `call`-th forward batch (a stand-in for a crashing rank)."""

    def patch(rank: int) -> None:
        from mixopt import features

        if rank != 1:
            return
        real, calls = features._encode_counted, [0]

        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == call:
                raise RuntimeError("injected failure on rank 1")
            return real(*args, **kwargs)

        features._encode_counted = failing

    return patch


def test_a_rank_that_raises__fails_the_run_in_one_line_and_leaves_no_half_written_cache(
    workspace: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out, cache = tmp_path / "scores.json", tmp_path / "cache"
    codes = run_ranks(2, cache, ["score", str(workspace), "--out", str(out)], patch=_fail_in_rank_1(4))
    err = capfd.readouterr().err
    assert codes[1] == 2 and codes[0] != 0
    assert "error: rank 1 of 2 failed: RuntimeError: injected failure on rank 1; nothing was written" in err
    assert "error: rank 0 of 2: lost the other ranks during" in err  # the other rank says why it stopped too
    assert not out.exists()
    written = list((cache / "features").iterdir()) if (cache / "features").exists() else []
    assert not [p for p in written if p.suffix == ".tmp"]  # no half-written entry
    from safetensors.torch import load_file

    for entry in written:  # what is there is whole: the passes that finished before the failure
        assert load_file(entry)


@pytest.mark.slow
def test_torchrun__two_ranks_through_the_launcher_give_the_scores_of_one_process(workspace: Path, tmp_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    for cache, command in [
        ("cache-1", [sys.executable, "-m", "mixopt"]),
        ("cache-2", [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mixopt"]),
    ]:
        out = one if cache == "cache-1" else two
        run = subprocess.run(
            [*command, "score", str(workspace), "--out", str(out)],
            env={**env, "MIXOPT_CACHE": str(tmp_path / cache)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
    assert_same_scores(one, two)


# ------------------------------------------------------------------------------------------- streaming


def _streamed_workspace(workspace: Path, root: Path, cap: int) -> Path:
    """The workspace with domain `law` read as a stream of 1,000 rows, capped at `cap`."""
    recipe = _recipe_with(workspace, root, "{top_k: 8, target_tokens: 300, domain_tokens: 200, batch_tokens: 256}")
    (root / "data" / "law.jsonl").write_text(
        "".join(
            json.dumps({"text": f"The court held that clause {i} of the contract was void."}) + "\n"
            for i in range(1000)
        )
    )
    text = recipe.read_text().replace(
        "source: {path: data/law.jsonl}", f"source: {{path: data/law.jsonl, streaming: true}}, max_examples: {cap}"
    )
    recipe.write_text(text)
    return recipe


def test_a_streamed_source_with_a_cap__pulls_no_row_past_the_cap(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    from mixopt import sources

    recipe = _streamed_workspace(workspace, tmp_path / "ws", cap=12)
    pulls: list[int] = []  # rows pulled from each stream opened
    real = datasets.load_dataset

    def counted(*args, **kwargs):
        loaded = real(*args, **kwargs)
        if not kwargs.get("streaming"):
            return loaded
        pulls.append(0)

        def rows():
            for row in loaded:
                pulls[-1] += 1
                yield row

        return datasets.IterableDataset.from_generator(rows, features=loaded.features)

    monkeypatch.setattr(sources.datasets, "load_dataset", counted)
    monkeypatch.setenv("MIXOPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(cli, ["score", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pulls and all(n == 12 for n in pulls)  # `check` and the scoring pass each read the head, no further
    law = next(d for d in json.loads(out.read_text())["domains"] if d["name"] == "law")
    assert law["available"] == 12 and max(law["example_indices"]) < 12
    # the rows read are the file's first 12, in order
    from mixopt.recipe import load_recipe

    spec = load_recipe(recipe)
    rows = sources.rendered_rows(spec.domains[0], spec, "domains.0")
    assert rows["text"] == [f"The court held that clause {i} of the contract was void." for i in range(12)]


def test_a_streamed_source_without_max_examples__is_a_recipe_error_naming_the_field(tmp_path: Path) -> None:
    from mixopt.errors import RecipeError
    from mixopt.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: {path: m}\nsae: {path: s, layer: 0}\n"
        "target: {source: {path: t.jsonl}, prompt: '{q}', response: '{a}'}\n"
        "domains: [{name: law, source: {path: l.jsonl, streaming: true}, text: '{text}'}]\n"
    )
    with pytest.raises(RecipeError, match=r"domains\.0\.max_examples: source.streaming reads only the first"):
        load_recipe(recipe)


# ---------------------------------------------------------------------------------- materialize: never


def _planned(recipe: Path, out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(cli, ["plan", str(recipe), "--out", str(out), "--budget", "60", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())


def _blend_recipe(workspace: Path, root: Path, select: str) -> Path:
    recipe = _recipe_with(workspace, root, "{top_k: 8, target_tokens: 300, domain_tokens: 200, bootstrap: 50}")
    text = recipe.read_text().replace("stability: 5}", f"stability: 5, replay: {{select: {select}}}}}")
    recipe.write_text(text.replace("formats: [arrow, parquet]}", "formats: [arrow]}"))
    return recipe


def test_load_mixture__streams_the_rows_of_the_materialised_plan_in_the_same_order(
    workspace: Path, tmp_path: Path
) -> None:
    import datasets

    import mixopt

    recipe = _blend_recipe(workspace, tmp_path / "ws", "random")
    always = _planned(recipe, tmp_path / "always")
    recipe.write_text(recipe.read_text().replace("formats: [arrow]}", "formats: [arrow], materialize: never}"))
    never = _planned(recipe, tmp_path / "never")

    materialised = datasets.load_from_disk(str(tmp_path / "always" / "mixture")).to_list()
    streamed = list(mixopt.load_mixture(tmp_path / "never", batch_rows=7))  # 60 rows: 9 batches, the last short
    assert len(streamed) == 60 and streamed == materialised  # same rows, same order, same columns
    assert sorted(p.name for p in (tmp_path / "never").iterdir() if p.name in ("mixture", "parquet", "exports")) == []

    # the manifest is the same but for the hash (the blend's) and what was written
    from mixopt.blend import Blend

    assert never["dataset"]["content_sha256"] == Blend.load(tmp_path / "never").sha256()
    assert never["dataset"]["rows"] == always["dataset"]["rows"] == 60
    for key in ("allocation", "sts", "model", "sae"):
        assert never[key] == always[key], key
    untimed = [{k: v for k, v in m["solver"].items() if not k.endswith("seconds")} for m in (never, always)]
    assert untimed[0] == untimed[1]
    resolved = never["recipe"]["resolved"]
    assert resolved.pop("output") != always["recipe"]["resolved"].pop("output")  # materialize: never
    assert resolved == always["recipe"]["resolved"]


def test_load_mixture__of_a_forecast_ranked_replay__streams_the_rows_the_plan_would_write(
    workspace: Path, tmp_path: Path
) -> None:
    """`replay.select: forecast`: the blend re-ranks each domain's rows from the stored forecasts; the rows are
    those `plan` builds (`mixture_parts` of the plan's own scores and allocation, `build_mixture`)."""
    import mixopt
    from mixopt.mixture import build_mixture, mixture_parts
    from mixopt.recipe import load_recipe
    from mixopt.scores import Scores
    from mixopt.solver import Allocation

    recipe = _blend_recipe(workspace, tmp_path / "ws", "forecast")
    recipe.write_text(recipe.read_text().replace("formats: [arrow]}", "formats: [arrow], materialize: never}"))
    manifest = _planned(recipe, tmp_path / "never")
    assert any(d.get("replay", {}).get("select") == "forecast" for d in manifest["allocation"])
    spec = load_recipe(recipe)
    scores, allocation = (
        Scores.load(tmp_path / "never" / "scores.json"),
        Allocation.load(tmp_path / "never" / "allocation.json"),
    )
    expected = build_mixture(mixture_parts(spec, allocation, scores), spec.seed).to_list()
    assert list(mixopt.load_mixture(tmp_path / "never", batch_rows=8)) == expected


def test_load_mixture__refuses_a_source_whose_rows_changed_since_the_plan(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mixopt
    from mixopt.errors import SourceError

    recipe = _recipe_with(
        workspace, tmp_path / "ws", "{top_k: 8, target_tokens: 300, domain_tokens: 200, bootstrap: 50}"
    )
    recipe.write_text(recipe.read_text().replace("formats: [arrow, parquet]}", "materialize: never}"))
    _planned(recipe, tmp_path / "never")
    math = tmp_path / "ws" / "data" / "math.jsonl"  # the target: always drawn
    math.write_text(math.read_text().replace("What is 3 plus 6?", "What is 3 plus 7?"))
    with pytest.raises(SourceError, match=r"target \(math\): its rows changed since the plan .* re-run mixopt plan"):
        mixopt.load_mixture(tmp_path / "never")


def test_load_mixture__split_by_node_gives_each_rank_whole_batches_of_the_stream(tmp_path: Path) -> None:
    """datasets' split_dataset_by_node on the blend: the ranks' rows are disjoint and together the mixture."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    from mixopt.blend import write_blend
    from mixopt.mixture import MixturePart, build_mixture
    from mixopt.recipe import load_recipe

    (tmp_path / "law.jsonl").write_text("".join(json.dumps({"text": f"law {i}"}) + "\n" for i in range(30)))
    (tmp_path / "math.jsonl").write_text("".join(json.dumps({"q": f"q{i}", "a": f"a{i}"}) + "\n" for i in range(20)))
    (tmp_path / "r.yaml").write_text(
        "model: {path: m}\nsae: {path: s, layer: 0}\n"
        "target: {name: math, source: {path: math.jsonl}, prompt: '{q}', response: '{a}'}\n"
        "domains: [{name: law, source: {path: law.jsonl}, text: '{text}'}]\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml")
    from mixopt.sources import rendered_rows

    parts = [
        MixturePart("math", rendered_rows(recipe.target, recipe, "target"), 25, 1),
        MixturePart("law", rendered_rows(recipe.domains[0], recipe, "domains.0"), 15, 2),
    ]
    (tmp_path / "out").mkdir()
    write_blend(tmp_path / "out", recipe, parts)
    whole = build_mixture(parts, recipe.seed).to_list()
    from mixopt.blend import load_mixture

    stream = load_mixture(tmp_path / "out", batch_rows=5)  # 8 shards of 5 rows
    assert isinstance(stream, datasets.IterableDataset) and list(stream) == whole
    ranks = [list(split_dataset_by_node(stream, rank=r, world_size=2)) for r in range(2)]
    assert ranks[0] == whole[0:5] + whole[10:15] + whole[20:25] + whole[30:35]  # shards 0, 2, 4, 6
    assert ranks[1] == whole[5:10] + whole[15:20] + whole[25:30] + whole[35:40]
