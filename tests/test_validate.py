"""`mixopt validate` on a tiny real model: the split, the metrics, the fine-tune loop, the report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mixopt import evaluate as ev
from mixopt.cli import cli
from mixopt.encoding import encode_chat
from mixopt.evaluate import MCQItem
from mixopt.recipe import ScheduleSpec, load_recipe, load_validate_recipe
from tests.tiny import tiny_llama, tiny_sae, tiny_tokenizer, write_jsonl

REPO = Path(__file__).resolve().parents[1]
DOMAINS = {  # name -> question pattern; `legal` shares items 20-29 with the `law` source
    "legal": "Is clause {i} of the contract void?",
    "chem": "Which compound boils at {i}0 degrees?",
    "code": "What does def f{i}(x) return?",
}


def _mcq_rows(pattern: str, ids: range) -> list[list[str]]:
    """Header-less MMLU-style rows: question, four choices, answer letter."""
    return [
        [pattern.format(i=i), f"answer {i}", f"option {i + 1}", f"choice {i + 2}", f"value {i + 3}", "ABCD"[i % 4]]
        for i in ids
    ]


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


def write_validate_workspace(root: Path, eval_items: int = 10) -> Path:
    tokenizer = tiny_tokenizer()
    tiny_llama(len(tokenizer)).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tiny_sae(layer=1).save_model(root / "sae")
    data = root / "data"
    data.mkdir()
    write_jsonl(
        data / "math.jsonl",
        [{"q": f"What is {a} plus {a + 3}?", "a": f"{a} + {a + 3} = {2 * a + 3}"} for a in range(40)],
    )
    _write_csv(data / "law.csv", _mcq_rows(DOMAINS["legal"], range(0, 30)))
    _write_csv(data / "legal.csv", _mcq_rows(DOMAINS["legal"], range(20, 50)))
    for name in ("chem", "code"):
        _write_csv(data / f"{name}.csv", _mcq_rows(DOMAINS[name], range(30)))
    columns = "[question, A, B, C, D, answer]"
    domains = "\n".join(f"  - {{name: {n}, source: {{path: data/{n}.csv, columns: {columns}}}}}" for n in DOMAINS)
    recipe = root / "validate.yaml"
    recipe.write_text(f"""\
kind: validate
seed: 0
model: {{path: ./model}}
sae: {{path: ./sae, layer: 1}}
sources:
  - {{name: math, source: {{path: data/math.jsonl}}, prompt: "{{q}}", response: "{{a}}"}}
  - {{name: law, source: {{path: data/law.csv, columns: {columns}}}, mcq: {{}}}}
domains:
{domains}
split: {{eval_items: {eval_items}, min_scoring_items: 5, source_heldout: 5}}
schedule: {{steps: 4, batch_size: 4, lr: 0.005, warmup_steps: 1, max_length: 96, checkpoint_every: 2}}
sts: {{top_k: 8, target_tokens: 300, domain_tokens: 200, batch_tokens: 256, bootstrap: 20}}
evaluation: {{batch_tokens: 1024, bootstrap: 30, split_halves: 3}}
compare: {{target: math, allocation: {{target_fraction: 0.5, max_epochs: 2, stability: 0}}}}
output: {{dir: out}}
""")
    return recipe


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe, run folder) of one end-to-end run with --compare-mixtures."""
    from mixopt.validation.run import run_validation

    recipe = write_validate_workspace(tmp_path_factory.mktemp("validate"))
    out = recipe.parent / "run"
    result = run_validation(load_validate_recipe(recipe), out, compare=True)
    print(result.table())
    return recipe, out


# ------------------------------------------------------------------------------------------- split


SPLIT_CODE = """
import json
from mixopt.evaluate import MCQItem
from mixopt.validation.data import split_items
items = [MCQItem(f"question {i}", ("a", "b", "c", "d"), i % 4) for i in range(50)]
evaluation, scoring, _ = split_items(items, 12, seed=3)
print(json.dumps([i.question for i in evaluation]))
"""


def test_split__identical_in_two_processes_with_different_hash_salts() -> None:
    from mixopt.validation.data import split_items

    processes = [  # started together: two cold imports in parallel
        subprocess.Popen(
            [sys.executable, "-c", SPLIT_CODE],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONHASHSEED": salt, "OMP_NUM_THREADS": "1"},
        )
        for salt in ("1", "2")
    ]
    runs = []
    for process in processes:
        stdout, _ = process.communicate(timeout=120)
        assert process.returncode == 0
        runs.append(json.loads(stdout.strip().splitlines()[-1]))
    here, _, _ = split_items([MCQItem(f"question {i}", ("a", "b", "c", "d"), i % 4) for i in range(50)], 12, seed=3)
    assert runs[0] == runs[1] == [i.question for i in here]


def test_split__drops_repeats_and_another_seed_holds_out_other_items() -> None:
    from mixopt.validation.data import split_items

    items = [MCQItem(f"q{i}", ("a", "b"), 0) for i in range(30)]
    evaluation, scoring, duplicates = split_items(items + items[:5], 10, seed=0)
    assert duplicates == 5 and len(evaluation) == 10 and len(scoring) == 20
    assert not {i.text for i in evaluation} & {i.text for i in scoring}
    other, _, _ = split_items(items, 10, seed=1)
    assert {i.text for i in other} != {i.text for i in evaluation}


def test_validate__no_evaluation_item_leaks_into_scoring_or_training(validated: tuple[Path, Path]) -> None:
    _, out = validated

    def questions(folder: str, field: str) -> dict[str, set[str]]:
        return {
            p.stem: {json.loads(line)[field].split("\n")[0] for line in p.read_text().splitlines()}
            for p in (out / "data" / folder).glob("*.jsonl")
        }

    evaluation, scoring = questions("eval", "question"), questions("scoring", "prompt")
    train, heldout = questions("train", "prompt"), questions("heldout", "prompt")
    held = set().union(*evaluation.values())
    assert not held & set().union(*scoring.values())
    report = json.loads((out / "validation.json").read_text())
    for source, pool in train.items():
        own = pool | heldout[source]
        for domain, items in evaluation.items():
            measured = report["sources"][source]["items_measured"][domain]
            assert measured == len(items - own)  # the source's own items are never its evaluation items
    assert report["sources"]["law"]["items_measured"]["legal"] < 10  # the overlap really was excluded
    assert report["sources"]["math"]["items_measured"]["legal"] == 10


# ----------------------------------------------------------------------------------------- metrics


class FixedLogits(torch.nn.Module):
    """A stand-in LM whose logits depend only on the position: logits[t] = table[position t]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        logits_to_keep: torch.Tensor,
        use_cache: bool = False,
    ) -> object:
        return type("Out", (), {"logits": self.table[position_ids][logits_to_keep]})()


def test_metrics__equal_a_hand_computation_on_fixed_logits() -> None:
    from mixopt.model import LoadedModel

    tok = tiny_tokenizer()
    table = torch.randn(400, len(tok), generator=torch.Generator().manual_seed(0))
    lm = LoadedModel(FixedLogits(table), tok, "fixed", "fixed", torch.device("cpu"), torch.float32)
    item = MCQItem("Which compound boils first?", ("water", "salt water", "oil", "sand"), 2)
    got = ev.score_items(lm, [item], max_length=400, batch_tokens=4096)

    logp = table.log_softmax(-1)

    def nll(prompt: str, reply: str) -> float:
        enc = encode_chat(tok, prompt, reply, 10**6)
        where = [t for t, r in enumerate(enc.response) if r]
        return float(-torch.stack([logp[t - 1, enc.ids[t]] for t in where]).mean())

    a = encode_chat(tok, item.prompt, "Answer: A", 10**6).ids
    d = encode_chat(tok, item.prompt, "Answer: D", 10**6).ids
    at = next(t for t in range(len(a)) if a[t] != d[t])  # first position where the letter differs
    letters = [encode_chat(tok, item.prompt, f"Answer: {x}", 10**6).ids[at] for x in "ABCD"]
    probs = logp[at - 1, letters].exp()
    expected = {
        "answer_nll": nll(item.prompt, "oil"),
        "cloze_nll": nll(item.question, "oil"),
        "letter_mass": float(probs.sum()),
        "accuracy": float(int(probs.argmax()) == 2),
        "letter_nll": float(-logp[at - 1, letters[2]]),
    }
    for metric, value in expected.items():
        assert got[metric][0] == pytest.approx(value, rel=1e-5), metric


def test_branched_query__reads_what_each_query_reads_alone() -> None:
    """The answer-text and letter queries share the prompt and run as one forward; on a real (tiny) Llama
    every log-prob must equal the one from its own forward (mask and positions both right)."""
    from mixopt.model import LoadedModel

    tok = tiny_tokenizer()
    lm = LoadedModel(tiny_llama(len(tok)), tok, "tiny", "tiny", torch.device("cpu"), torch.float32)
    items = [
        MCQItem("Which compound boils first?", ("water", "salt water", "oil", "sand"), 2),
        MCQItem("Pick the largest planet of the solar system, please.", ("Mars", "Jupiter", "Venus", "Earth"), 1),
    ]
    alone, both = [], []
    for item in items:
        answer = ev.reply_query(tok, item.prompt, item.answer_text, 400)
        letters = ev.letter_query(tok, item.prompt, 4, 400)
        alone += [answer, letters]
        both.append(ev.branched(answer, letters))
        assert len(both[-1].ids) < len(answer.ids) + len(letters.ids)  # the prompt really is shared
    separate = ev.next_token_logprobs(lm, alone, batch_tokens=4096, desc="alone")
    together = ev.next_token_logprobs(lm, both, batch_tokens=4096, desc="branched")  # one padded batch
    for n in range(len(items)):
        expected = np.concatenate(separate[2 * n] + separate[2 * n + 1])
        assert np.concatenate(together[n]) == pytest.approx(expected, abs=1e-5)


def test_letter_metrics__on_a_toy_distribution() -> None:
    lp = np.log(np.array([0.1, 0.2, 0.4, 0.1]))  # 0.2 of the mass is off the letters
    out = ev.letter_metrics(lp, answer=1)
    assert out == pytest.approx({"letter_mass": 0.8, "accuracy": 0.0, "letter_nll": -np.log(0.2)})


def test_compare__paired_intervals_cancel_the_noise_runs_share() -> None:
    """Two runs measured on the same items: one is the other plus 0.1 on every item. Paired resampling
    gives that difference with a zero-width interval, while each run's own interval stays wide."""
    from mixopt.stats import paired_mean_draws
    from mixopt.validation.analysis import Cells
    from mixopt.validation.compare import compare_summary
    from mixopt.validation.measure import Measurement

    rng = np.random.default_rng(0)
    first = [rng.normal(size=30) for _ in range(3)]  # 3 domains x 30 items: per-item changes of run "a"
    draws = paired_mean_draws([np.stack([x, x + 0.1]) for x in first], n_boot=200, seed=0)
    assert draws.shape == (200, 2, 3)
    assert draws[:, 1] - draws[:, 0] == pytest.approx(np.full((200, 3), 0.1))
    first_resample = np.random.default_rng(0).integers(0, 30, (200, 30))[0]  # the first domain's first resample
    assert draws[0, 0, 0] == pytest.approx(first[0][first_resample].mean())

    deltas = np.array([[x.mean() for x in first], [x.mean() + 0.1 for x in first]])
    stderr = {"letter_mass": np.full((2, 3), 0.2)}
    cells = Cells(["a", "b"], ["d0", "d1", "d2"], {}, {}, {"letter_mass": deltas}, stderr, np.full((2, 3), 30), {})
    cells.item_deltas["letter_mass"] = [first, [x + 0.1 for x in first]]
    own = {"a": [1.0, 2.0, 3.0, 4.0], "b": [0.5, 1.5, 2.5, 3.5]}
    from mixopt.validation.compare import Arm

    summary = compare_summary(
        cells,
        "letter_mass",
        Measurement({}, {"t": np.full(4, 2.0)}),
        {r: Measurement({}, {"t": np.array(v)}) for r, v in own.items()},
        "t",
        200,
        0,
        {"a": Arm("uniform", 0.5), "b": Arm("protect", 0.5)},
    )
    a, b = summary["runs"]["a"], summary["runs"]["b"]
    worst = int(np.argmin(deltas[0]))  # letter mass: higher is better, the worst domain loses the most
    assert a["worst"] == {"domain": f"d{worst}", "change": pytest.approx(deltas[0, worst])}
    assert b["mean_change"]["value"] == pytest.approx(deltas[1].mean())
    assert a["target_gain_nll"]["value"] == pytest.approx(2.0 - 2.5) and b["target_gain_nll"]["value"] == pytest.approx(
        0.0
    )
    lo, hi = a["mean_change"]["ci"]
    assert hi - lo > 0.1  # 30 noisy items per domain: each run alone is uncertain
    diff = summary["versus_uniform"]["protect"]  # b - a, one seed each: item noise only
    for key, expected in (("mean_change", 0.1), ("worst_change", 0.1), ("target_gain_nll", 0.5)):
        assert diff[key]["difference"] == pytest.approx(expected)
        assert diff[key]["ci"] == pytest.approx([expected, expected]), key


def test_random_control__is_act_on_seeded_random_latents_averaged_over_seeds() -> None:
    from mixopt import sts
    from mixopt.features import Reduction, SourceStats

    stats = SourceStats(torch.full((6,), 5), Reduction.empty(6, 64), Reduction.empty(6, 32))
    stats.latents.update(torch.rand(30, 64), torch.arange(30) // 5)
    by_hand = [  # act = mean over tokens of the sum over the chosen latents, on 5 seeded draws of 8 latents
        stats.latents.total[torch.randperm(64, generator=torch.Generator().manual_seed(s))[:8]].sum().item() / 30
        for s in range(5)
    ]
    assert sts.random_control(stats, k=8) == pytest.approx(np.mean(by_hand))
    assert torch.equal(sts.random_latents(64, 8, seed=3), sts.random_latents(64, 8, seed=3))
    assert not torch.equal(sts.random_latents(64, 8, seed=3), sts.random_latents(64, 8, seed=4))


# ----------------------------------------------------------------------------------------- fine-tune


def test_finetune__lowers_the_training_loss_and_resumes_where_it_stopped(tmp_path: Path) -> None:
    from mixopt.finetune import CHECKPOINT, finetune

    tok = tiny_tokenizer()
    examples = [encode_chat(tok, f"What is {a} plus 3?", f"{a} + 3 = {a + 3}", 64) for a in range(16)]
    schedule = ScheduleSpec(steps=12, batch_size=4, lr=5e-3, warmup_steps=1, checkpoint_every=4)

    whole = tiny_llama(len(tok))
    straight = finetune(whole, examples, schedule, seed=0, folder=tmp_path / "a", pad_id=0)
    assert straight.steps == 12 and np.mean(straight.losses[-3:]) < straight.losses[0]

    resumed_model = tiny_llama(len(tok))
    stopped = finetune(resumed_model, examples, schedule, seed=0, folder=tmp_path / "b", pad_id=0, max_steps=5)
    assert stopped.steps == 5 and (tmp_path / "b" / CHECKPOINT).exists()
    fresh = tiny_llama(len(tok))  # a new process would start from the base weights again
    resumed = finetune(fresh, examples, schedule, seed=0, folder=tmp_path / "b", pad_id=0)
    assert resumed.steps == 12 and resumed.losses == straight.losses
    for (name, p), q in zip(whole.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


# ------------------------------------------------------------------------------------ recipe, check


def test_check__validate_recipe_prints_ok(tmp_path: Path) -> None:
    recipe = write_validate_workspace(tmp_path)
    result = CliRunner().invoke(cli, ["check", str(recipe)])
    assert result.exit_code == 0 and result.output.strip().endswith(": ok"), result.output


def test_check__validate_domain_too_small_for_the_split_names_the_domain(tmp_path: Path) -> None:
    recipe = write_validate_workspace(tmp_path, eval_items=28)
    result = CliRunner().invoke(cli, ["check", str(recipe)])
    assert result.exit_code == 2
    assert "domains.0.source: 30 rows, but split.eval_items + split.min_scoring_items need 33" in result.output


def test_recipe__validate_kind_is_rejected_by_plan_and_unknown_keys_by_its_schema(tmp_path: Path) -> None:
    from mixopt.errors import RecipeError

    recipe = write_validate_workspace(tmp_path)
    with pytest.raises(RecipeError, match="run it with `mixopt validate`"):
        load_recipe(recipe)
    recipe.write_text(recipe.read_text().replace("split: {", "split: {eval_itemz: 3, "))
    with pytest.raises(RecipeError, match=r"split\.eval_itemz: unknown key"):
        load_validate_recipe(recipe)


# ------------------------------------------------------------------------------------- end to end


def test_validate__end_to_end_writes_correlations_plots_and_the_comparison(validated: tuple[Path, Path]) -> None:
    _, out = validated
    report = json.loads((out / "validation.json").read_text())
    assert len(report["cells"]) == 2 * 3 and report["domains"] == ["legal", "chem", "code"]
    pooled = report["correlations"]["answer_nll"]["pooled"]
    assert set(pooled["scores"]) == {"act", "act_sq", "raw", "similarity", "random"}
    assert pooled["scores"]["similarity"]["abs"]["n"] == 6
    # the reported correlations equal scipy on the report's own cells (pooled, and standardised within source)
    from scipy import stats as sps

    act = np.array([c["scores"]["act"] for c in report["cells"]])
    change = np.array([c["change"]["answer_nll"]["delta"] for c in report["cells"]])
    assert pooled["scores"]["act"]["abs"]["pearson"]["r"] == pytest.approx(sps.pearsonr(act, np.abs(change))[0])
    assert pooled["scores"]["act"]["signed"]["spearman"]["r"] == pytest.approx(sps.spearmanr(act, change)[0])
    within = report["correlations"]["answer_nll"]["within"]["scores"]["act"]["abs"]["pearson"]["r"]
    z = lambda a: sps.zscore(a.reshape(2, 3), axis=1).ravel()  # noqa: E731  (2 sources x 3 domains, row-major)
    assert within == pytest.approx(sps.pearsonr(z(act), z(np.abs(change)))[0])
    assert set(pooled["partial_given_similarity"]) == {"act", "act_sq"}
    assert set(report["correlations"]["letter_mass"]["by_source"]) == {"math", "law"}
    for m in ev.METRICS:
        assert set(report["metrics"][m]["reliability"]) == {"level", "change_pooled", "change_by_source"}
    assert report["sources"]["math"]["finetune"]["steps"] == 4
    assert report["compare"]["metric"] == "letter_mass" and set(report["compare"]["by_metric"]) == set(ev.METRICS)
    runs = report["compare"]["by_metric"]["letter_mass"]["runs"]
    assert list(runs) == ["math", "math+uniform-r50", "math+minimax-r50"]
    assert sum(runs["math+uniform-r50"]["mixture"].values()) == sum(runs["math+minimax-r50"]["mixture"].values()) == 16
    assert report["compare"]["regime"]["replay_fraction"] == 0.5  # one candidate: it is the regime
    versus = report["compare"]["by_metric"]["letter_mass"]["versus_uniform"]
    assert list(versus) == ["target", "minimax"]
    assert report["compare"]["by_metric"]["letter_mass"]["seed_noise"]["worst_change"] is None  # one seed each
    mixtures = report["compare"]["by_metric"]["letter_mass"]["mixtures"]
    for name, diff in versus.items():  # one seed: the paired difference of two runs, item noise only
        assert diff["worst_change"]["difference"] == pytest.approx(
            mixtures[name]["worst_change"]["value"] - mixtures["uniform"]["worst_change"]["value"]
        )
        assert diff["worst_change"]["seed_sd"] is None
    for run in runs.values():
        lo, hi = run["mean_change"]["ci"]
        assert lo <= run["mean_change"]["value"] <= hi
        assert all(np.isfinite(se) for se in run["per_domain_stderr"].values())
    for name in ("correlations.png", "scatter_math.png", "scatter_law.png", "compare.png"):
        assert (out / "plots" / name).stat().st_size > 0, name
    assert not list((out / "finetune").glob("*/checkpoint.pt"))  # dropped once measured


@pytest.fixture
def trains_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any validation fine-tune started under this fixture fails the test (the `probe` scorer's pilot, a few
    steps the sweep's probe settings train by design, is let through)."""
    import mixopt.finetune

    real = mixopt.finetune.finetune

    def no_training(*args: object, **kwargs: object) -> object:
        if str(kwargs.get("desc", "")).startswith("probe"):
            return real(*args, **kwargs)  # type: ignore[arg-type]
        raise AssertionError("a fine-tune ran")

    monkeypatch.setattr(mixopt.finetune, "finetune", no_training)


def test_validate__rerun_reuses_finished_fine_tunes(validated: tuple[Path, Path], trains_nothing: None) -> None:
    from mixopt.validation.run import run_validation

    recipe, out = validated
    before = json.loads((out / "validation.json").read_text())
    again = run_validation(load_validate_recipe(recipe), out, compare=True)
    for metric, change in before["cells"][0]["change"].items():
        assert again.report["cells"][0]["change"][metric]["delta"] == pytest.approx(change["delta"])


def test_compare__rescore_reports_the_recorded_arms_and_names_the_rest(
    validated: tuple[Path, Path], trains_nothing: None
) -> None:
    """--rescore with 2 seeds: the seed-1 arms were never trained; nothing trains, the recorded arms are
    summarised and the others are listed."""
    from mixopt.validation.report import compare_table
    from mixopt.validation.run import run_validation

    recipe, out = validated
    compare = run_validation(load_validate_recipe(recipe), out, compare=True, rescore=True, seeds=2).report["compare"]
    assert compare["not_run"] == ["math-s1", "math+uniform-r50-s1", "math+minimax-r50-s1"]
    mixtures = compare["by_metric"]["letter_mass"]["mixtures"]
    assert {m: v["seeds"] for m, v in mixtures.items()} == {"target": 1, "uniform": 1, "minimax": 1}
    assert "not run yet: math-s1" in compare_table(compare)


def test_cli__validate_command_prints_the_report(validated: tuple[Path, Path]) -> None:
    from mixopt.validation.run import ValidationResult

    _, out = validated
    table = ValidationResult(out, json.loads((out / "validation.json").read_text())).table()
    assert table.startswith("validation: 2 sources x 3 domains")
    assert "mixture comparison at the same budget" in table


def test_sweep__rescores_every_setting_without_training_and_agrees_with_the_report(
    validated: tuple[Path, Path], trains_nothing: None
) -> None:
    from mixopt.validation.report import sweep_table
    from mixopt.validation.run import run_validation
    from mixopt.validation.sweep import PROBE_STEPS, TOP_K, best_row

    recipe, out = validated
    report = run_validation(load_validate_recipe(recipe), out, compare=True, sweep=True).report
    sweep = report["sweep"]
    rows = {(r["setting"], r["scorer"]): r for r in sweep["rows"]}
    expected = {f"top_k={k}" for k in TOP_K if k != 8}
    expected |= {"recipe", "demos=1", "demos=4", "score=icl", "tokens=content"}  # the default counts responses
    expected |= {"score=grad,direction=plain", "score=grad,direction=adam"}
    expected |= {f"score=probe,steps={n}" for n in PROBE_STEPS}
    assert {s for s, _ in rows} == expected
    assert ("score=probe,steps=2", "probe_act") in rows and ("score=grad,direction=adam", "grad") in rows
    assert ("score=icl", "icl") in rows and ("recipe", "similarity") in rows
    pooled = report["correlations"][sweep["metric"]]["pooled"]["scores"]
    for scorer in ("act", "similarity", "random"):  # the recipe's own setting is the main report's numbers
        assert rows["recipe", scorer]["pooled"]["abs"]["pearson"]["r"] == pytest.approx(
            pooled[scorer]["abs"]["pearson"]["r"], nan_ok=True
        )
    reference = rows["recipe", sweep["reference"]]["within"]["abs"]["spearman"]["r"]
    for row in rows.values():  # each row against the recipe's scorer, paired on the same resamples
        r = row["within"]["abs"]["spearman"]["r"]
        assert row["versus_reference"]["difference"] == pytest.approx(r - reference, nan_ok=True)
    assert rows["recipe", sweep["reference"]]["versus_reference"]["ci"] == [0.0, 0.0]
    saved = json.loads((out / "sweep" / "sweep.json").read_text())  # kept setting by setting
    assert [(r["setting"], r["scorer"]) for r in saved["rows"]] == [(r["setting"], r["scorer"]) for r in sweep["rows"]]
    k = json.loads((out / "sweep" / "top_k=30" / "math.json").read_text())["top_k"]
    assert k == 30  # the tiny SAE has 64 latents: k=30 is a real setting, k=100+ saturate at 64
    assert "best within-source forecaster" in sweep_table(sweep)
    best = best_row(sweep)  # checked on every reliable metric; on the primary it is the row's own number
    across = sweep["best_across_metrics"]
    assert list(across) == [m for m, info in report["metrics"].items() if info["reliable"]]
    primary = across[sweep["metric"]]  # the tiny run's primary metric is reliable
    assert primary["r"] == pytest.approx(best["within"]["abs"]["spearman"]["r"], nan_ok=True)
    assert primary["difference"] == pytest.approx(best["versus_reference"]["difference"], nan_ok=True)
    verdict = sweep["verdict"]  # round 2's rule over the same rows: the tiny recipe counts responses already
    assert tuple(verdict["reference"]) == ("recipe", "similarity") and len(verdict["rows"]) == len(sweep["rows"])
    costs = {(r["setting"], r["scorer"]): r["cost"] for r in verdict["rows"]}
    assert costs["recipe", "similarity"] is None and costs["score=probe,steps=1", "probe"]["tokens"] > 0
    assert costs["score=probe,steps=1", "probe"]["tokens"] < costs["score=probe,steps=4", "probe"]["tokens"]
    assert "verdict (docs/validation.md, round 2)" in sweep_table(sweep)


def test_rescore__from_kept_evidence_reproduces_the_correlations_without_training(
    validated: tuple[Path, Path], trains_nothing: None, tmp_path: Path
) -> None:
    """`--keep` then `--rescore --from` in a fresh run folder: the same numbers, nothing trained or measured."""
    from mixopt.errors import MixoptError
    from mixopt.validation import evidence
    from mixopt.validation.run import run_validation

    recipe, out = validated
    kept = evidence.keep(out, tmp_path / "evidence")
    assert {p.name for p in kept} >= {"base.json.gz", "math.json.gz", "law.json.gz", "validation.json"}
    fresh = tmp_path / "fresh"
    assert sorted(evidence.restore(tmp_path / "evidence", fresh))[:2] == ["base", "law"]
    again = run_validation(load_validate_recipe(recipe), fresh, rescore=True).report
    before = json.loads((out / "validation.json").read_text())
    from mixopt.files import finite

    assert json.loads(json.dumps(finite(again["correlations"]))) == before["correlations"]  # exactly
    assert again["cells"][0]["change"]["letter_mass"]["delta"] == before["cells"][0]["change"]["letter_mass"]["delta"]
    with pytest.raises(MixoptError, match="--rescore trains and measures nothing"):
        run_validation(load_validate_recipe(recipe), tmp_path / "empty", rescore=True)
