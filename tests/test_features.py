"""The streaming engine and STS maths, on a tiny real Llama and a tiny sae-lens SAE built in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mixopt.batching import length_batches
from mixopt.cli import cli
from mixopt.encoding import encode_chat, encode_demonstrations, encode_text
from mixopt.features import TopContexts, run_pass
from mixopt.model import LoadedModel, residual_stream
from mixopt.sts import (
    centered_similarity,
    domain_score,
    example_scores,
    mean_residual,
    shifted_latents,
    similarity_example_scores,
)
from tests.tiny import tiny_llama, tiny_sae, tiny_tokenizer

LAYER = 1


@pytest.fixture(scope="module")
def lm() -> LoadedModel:
    tok = tiny_tokenizer()
    return LoadedModel(tiny_llama(len(tok), layers=3), tok, "tiny", "tiny", torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def sae():
    return tiny_sae(layer=LAYER)


def _examples(lm: LoadedModel, n: int = 9):
    pairs = [
        (f"What is {i} plus {i * 7}?", f"{i} + {i * 7} = {8 * i}. #### {8 * i}" + " ok" * (i % 4)) for i in range(n)
    ]
    return [encode_chat(lm.tokenizer, p, r, 512) for p, r in pairs]


def test_truncated_forward__equals_the_full_models_hidden_state(lm: LoadedModel) -> None:
    ids = torch.tensor([_examples(lm, 1)[0].ids])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        full = lm.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    torch.testing.assert_close(residual_stream(lm.model, ids, mask, LAYER), full[LAYER + 1])


def test_truncated_forward__runs_no_block_after_the_hook(lm: LoadedModel) -> None:
    ran: list[int] = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, b in enumerate(lm.model.model.layers)]
    ids = torch.tensor([_examples(lm, 1)[0].ids])
    residual_stream(lm.model, ids, torch.ones_like(ids), LAYER)
    for h in hooks:
        h.remove()
    assert ran == [0, 1]


def test_counted_tokens__exclude_template_and_special_tokens(lm: LoadedModel) -> None:
    enc = encode_chat(lm.tokenizer, "What is 2 plus 2?", "4", 512)
    counted = lm.tokenizer.decode([t for t, c in zip(enc.ids, enc.counted, strict=True) if c])
    assert "im_start" not in counted and "assistant" not in counted
    assert counted.replace(" ", "") == "Whatis2plus2?4"
    response = lm.tokenizer.decode([t for t, r in zip(enc.ids, enc.response, strict=True) if r])
    assert response.strip() == "4"


def test_streaming_reductions__equal_brute_force_over_stored_features(lm: LoadedModel, sae) -> None:
    examples = _examples(lm)
    result = run_pass(lm, sae, LAYER, examples, [], batch_tokens=64, desc="t").stats
    feats, resid = [], []
    for e in examples:  # brute force: one example at a time, every token's features kept
        ids = torch.tensor([e.ids])
        h = residual_stream(lm.model, ids, torch.ones_like(ids), LAYER)[0][torch.tensor(e.counted)]
        resid.append(h)
        feats.append(sae.encode(h))
    f, h = torch.cat(feats).double(), torch.cat(resid).double()
    assert result.n_tokens == len(f)
    torch.testing.assert_close(result.latents.total, f.sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.latents.total_sq, f.square().sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.latents.active, (f > 0).sum(0).double())
    torch.testing.assert_close(result.resid.total, h.sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(result.latents.per_example[2].double(), feats[2].double().sum(0), rtol=1e-4, atol=1e-4)


def _peaks_by_sorting(acts: list[torch.Tensor], positions: list[torch.Tensor], n: int) -> list[list[tuple]]:
    """Brute force: per latent, every example's peak activation and where it is, sorted, the first n.
    acts[i]: (counted tokens, W) of example i; positions[i]: (counted tokens,) their positions in its ids."""
    out = []
    for j in range(acts[0].shape[1]):
        pairs = enumerate(zip(acts, positions, strict=True))
        peaks = [(float(a[:, j].max()), i, int(p[a[:, j].argmax()])) for i, (a, p) in pairs]
        out.append(sorted([x for x in peaks if x[0] > 0], key=lambda x: -x[0])[:n])
    return out


def _top_as_lists(top: TopContexts) -> list[list[tuple]]:
    return [
        [(v, e, p) for v, e, p in zip(vs, es, ps, strict=True) if e >= 0]
        for vs, es, ps in zip(top.values.tolist(), top.example.tolist(), top.position.tolist(), strict=True)
    ]


def test_top_contexts__merged_batches_equal_one_sort_of_every_examples_peak() -> None:
    lengths = [7, 3, 9, 1, 5, 8, 2, 6, 4, 7, 5, 3]  # 12 examples
    acts = [torch.relu(torch.randn(n, 10) - 1.0) for n in lengths]  # (tokens, latents), many zeros
    for a in acts:
        a[:, 4] = 0  # latent 4 never fires
    top = TopContexts.empty(10, n=5)
    for batch in ([0, 1, 2, 3], [4], [5, 6, 7, 8, 9, 10], [11]):  # batches smaller and larger than n
        mask = torch.zeros(len(batch), max(lengths[i] for i in batch), dtype=torch.bool)
        for b, i in enumerate(batch):
            mask[b, : lengths[i]] = True
        top.update(torch.cat([acts[i] for i in batch]), mask, torch.tensor(batch))
    positions = [torch.arange(n) for n in lengths]
    assert _top_as_lists(top) == _peaks_by_sorting(acts, positions, 5)  # random floats: no ties
    assert _top_as_lists(top)[4] == []  # nothing fired: no context, not five zeros


def test_top_contexts__of_a_pass_equal_a_sort_of_every_stored_activation(lm: LoadedModel, sae) -> None:
    examples = _examples(lm)
    stats = run_pass(lm, sae, LAYER, examples, [], batch_tokens=64, desc="t").stats  # several batches
    acts, positions = [], []
    for e in examples:  # brute force: one example at a time, every token's features stored
        ids, counted = torch.tensor([e.ids]), torch.tensor(e.counted)
        acts.append(sae.encode(residual_stream(lm.model, ids, torch.ones_like(ids), LAYER)[0][counted]).detach())
        positions.append(counted.nonzero()[:, 0])
    n = stats.top.values.shape[1]
    expected, got = _peaks_by_sorting(acts, positions, n), _top_as_lists(stats.top)
    assert sum(len(x) for x in expected) > 0 and [len(x) for x in got] == [len(x) for x in expected]
    for j, (g, e) in enumerate(zip(got, expected, strict=True)):
        # The same values; examples whose peaks tie (a shared prefix gives identical activations) may swap.
        torch.testing.assert_close(torch.tensor([x[0] for x in g]), torch.tensor([x[0] for x in e]))
        assert len({x[1] for x in g}) == len(g)  # one context per example
        for value, example, position in g:  # each is that example's peak, found where it says
            where = (positions[example] == position).nonzero()[0, 0]
            assert float(acts[example][where, j]) == pytest.approx(value, rel=1e-4, abs=1e-5)
            assert float(acts[example][:, j].max()) == pytest.approx(value, rel=1e-4, abs=1e-5)


def test_batch_size_1_and_8__give_the_same_statistics(lm: LoadedModel, sae) -> None:
    examples = _examples(lm)
    longest = max(len(e) for e in examples)
    one = run_pass(lm, sae, LAYER, examples, [], batch_tokens=longest, desc="t").stats
    eight = run_pass(lm, sae, LAYER, examples, [], batch_tokens=8 * longest, desc="t").stats
    assert len(list(length_batches([len(e) for e in examples], 8 * longest))) < len(examples)
    torch.testing.assert_close(one.latents.total, eight.latents.total, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one.latents.per_example, eight.latents.per_example, rtol=1e-4, atol=1e-4)


def test_zero_demonstrations__give_exactly_zero_shift(workspace: Path, tmp_path: Path) -> None:
    from mixopt.pipeline import score_recipe
    from mixopt.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    text = workspace.read_text().replace("./", f"{workspace.parent}/").replace("data/", f"{workspace.parent}/data/")
    recipe.write_text(text.replace('response: "{a}"', 'response: "{a}"\n  icl_demos: 0'))
    scores, _ = score_recipe(load_recipe(recipe))
    assert scores.shifted_latents and all(s["shift"] == 0.0 for s in scores.shifted_latents)


def test_icl_shift__compares_the_querys_own_ids_position_by_position(lm: LoadedModel, sae) -> None:
    examples = _examples(lm, 4)
    prefix = encode_demonstrations(lm.tokenizer, [("What is 1 plus 1?", "2")])
    result = run_pass(lm, sae, LAYER, examples, prefix, 512, "t")
    e = examples[1]
    ids0, ids1 = torch.tensor([e.ids]), torch.tensor([prefix + e.turn.ids])
    assert ids1[0, len(prefix) :].tolist() == e.ids[e.turn_start :]  # the turn's ids, with and without demos
    f0 = sae.encode(residual_stream(lm.model, ids0, torch.ones_like(ids0), LAYER)[0][torch.tensor(e.counted)])
    turn = residual_stream(lm.model, ids1, torch.ones_like(ids1), LAYER)[0, len(prefix) :]
    f1 = sae.encode(turn[torch.tensor(e.turn.counted)])
    torch.testing.assert_close(
        result.shift.latents.per_example[1].double(), (f1 - f0).square().sum(0).double(), rtol=1e-4, atol=1e-5
    )
    assert result.shift.latents.total.sum() > 0


def test_sts__act_is_mean_over_tokens_of_the_sum_over_shifted_latents(lm: LoadedModel, sae) -> None:
    stats = run_pass(lm, sae, LAYER, _examples(lm), [], 256, "t").stats
    shift = stats.latents  # any reduction serves to pick k latents here
    latents, _ = shifted_latents(shift, 5)
    assert latents.tolist() == torch.topk(shift.total, 5).indices.tolist()
    act = domain_score(stats.latents, stats.n_tokens, latents, "act")
    assert act == pytest.approx(float(stats.latents.total[latents].sum() / stats.n_tokens))
    per = example_scores(stats.latents, stats.example_tokens, latents, "act")
    weights = stats.example_tokens.double().numpy()
    assert (per * weights).sum() / weights.sum() == pytest.approx(act, rel=1e-5)
    act_sq = domain_score(stats.latents, stats.n_tokens, latents, "act_sq")
    assert act_sq == pytest.approx(float((stats.latents.total_sq[latents] / stats.n_tokens).mean()))


def test_similarity__per_example_shares_average_to_the_similarity(lm: LoadedModel, sae) -> None:
    stats = run_pass(lm, sae, LAYER, _examples(lm), [], 256, "t").stats
    target = run_pass(lm, sae, LAYER, _examples(lm, 4)[::-1], [], 256, "t").stats
    grand = (mean_residual(stats) + mean_residual(target)) / 2
    similarity = centered_similarity(mean_residual(stats), mean_residual(target), grand)
    per = similarity_example_scores(stats, mean_residual(target), grand)
    weights = stats.example_tokens.double().numpy()
    assert (per * weights).sum() / weights.sum() == pytest.approx(similarity, abs=1e-5)
    assert per.std() > 0  # examples differ, so a bootstrap over them has spread


@pytest.mark.parametrize("scorer", ["similarity", "raw", "act_sq"])
def test_score_cli__any_scorer_is_what_the_solver_reads(workspace: Path, tmp_path: Path, scorer: str) -> None:
    import json

    recipe = tmp_path / "r.yaml"
    recipe.write_text(workspace.read_text().replace("sts: {", f"sts: {{score: {scorer}, "))
    for name in ("model", "sae", "data"):
        (tmp_path / name).symlink_to(workspace.parent / name)
    out = tmp_path / "scores.json"
    result = CliRunner().invoke(cli, ["score", str(recipe), "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores = json.loads(out.read_text())
    key = {"raw": "raw_act"}.get(scorer, scorer)
    for d in scores["domains"]:
        assert d["score"] == d["variants"][key]
        weights = d["example_tokens"]
        mean = sum(s * w for s, w in zip(d["example_scores"], weights, strict=True)) / sum(weights)
        assert mean == pytest.approx(d["score"], abs=1e-4)


def test_sts_tokens_response__counts_only_response_tokens(workspace: Path, tmp_path: Path) -> None:
    import json

    from mixopt.pipeline import encode_row

    lm = LoadedModel(tiny_llama(len(tok := tiny_tokenizer())), tok, "tiny", "tiny", torch.device("cpu"), torch.float32)
    row = {"prompt": "What is 2 plus 5?", "response": "2 + 5 = 7"}
    content, response = encode_row(lm, row, 512), encode_row(lm, row, 512, tokens="response")
    assert content.ids == response.ids and response.counted == content.response
    assert 0 < response.n_counted < content.n_counted
    recipe = tmp_path / "r.yaml"
    recipe.write_text(workspace.read_text().replace("sts: {", "sts: {tokens: response, "))
    for name in ("model", "sae", "data"):
        (tmp_path / name).symlink_to(workspace.parent / name)
    out = tmp_path / "scores.json"
    assert CliRunner().invoke(cli, ["score", str(recipe), "--out", str(out)]).exit_code == 0
    target = json.loads(out.read_text())["target"]
    assert target["mean_response_tokens"] < target["mean_tokens"]
    assert sum(target["example_tokens"]) / len(target["example_tokens"]) == pytest.approx(
        target["mean_response_tokens"]
    )  # every counted token of the target is a response token


def test_plain_text__counts_every_non_special_token(lm: LoadedModel) -> None:
    enc = encode_text(lm.tokenizer, "The court held that the clause was void.", 512)
    assert enc.n_counted == len(enc.ids) and all(enc.response)


def test_score_cli__cached_second_run_does_no_forward_pass(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = workspace.parent / "scores.json"
    first = CliRunner().invoke(cli, ["score", str(workspace), "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert "domain" in first.output and out.exists()

    import mixopt.features

    def no_forward(*args, **kwargs):
        raise AssertionError("a cached run must not run the model")

    monkeypatch.setattr(mixopt.features, "run_pass", no_forward)
    second = CliRunner().invoke(cli, ["score", str(workspace), "--json"])
    assert second.exit_code == 0, second.output


def test_score_cli__sae_width_mismatch_is_one_line_exit_2(workspace: Path, tmp_path: Path) -> None:
    tiny_sae(d_in=16, layer=LAYER).save_model(tmp_path / "narrow")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        workspace.read_text()
        .replace("path: ./sae", f"path: {tmp_path / 'narrow'}")
        .replace("data/", f"{workspace.parent}/data/")
        .replace("./model", str(workspace.parent / "model"))
    )
    result = CliRunner().invoke(cli, ["score", str(recipe)])
    assert result.exit_code == 2
    assert "SAE input width 16 != model hidden size 32" in result.output


def test_score_cli__layer_out_of_range_is_one_line_exit_2(workspace: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        workspace.read_text()
        .replace("layer: 1", "layer: 7")
        .replace("./", f"{workspace.parent}/")
        .replace("data/", f"{workspace.parent}/data/")
    )
    result = CliRunner().invoke(cli, ["score", str(recipe)])
    assert result.exit_code == 2
    assert "sae.layer: layer 7 is out of range: the model has blocks 0..1" in result.output


def test_icl_input__is_one_conversation_with_the_system_block_once(lm: LoadedModel, sae) -> None:
    """DESIGN.md section 3, step 1: zero-shot = [system] + query turn, ICL = [system] + demos + the same
    query turn ids; the query's own turn must not restart the conversation after the demonstrations."""
    import copy
    import dataclasses

    from tests.tiny import CHATML_WITH_SYSTEM

    tokenizer = copy.deepcopy(lm.tokenizer)
    tokenizer.chat_template = CHATML_WITH_SYSTEM
    with_system = dataclasses.replace(lm, tokenizer=tokenizer)
    e = encode_chat(tokenizer, "What is 3 plus 4?", "7", 256)
    prefix = encode_demonstrations(tokenizer, [("What is 1 plus 1?", "2")])
    assert tokenizer.decode(e.ids).count("system") == 1 and e.turn_start > 0
    assert (
        e.ids
        == tokenizer(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": "What is 3 plus 4?"}, {"role": "assistant", "content": "7"}],
                tokenize=False,
            ),
            add_special_tokens=False,
        )["input_ids"]
    )  # splitting the head changes no id
    icl = tokenizer.decode(prefix + e.turn.ids)
    assert icl.count("system") == 1 and icl.index("What is 1 plus 1?") < icl.index("What is 3 plus 4?")
    assert sum(e.turn.counted) == sum(e.counted)  # the head holds no content token
    result = run_pass(with_system, sae, LAYER, [e], prefix, 512, "t")
    ids0, ids1 = torch.tensor([e.ids]), torch.tensor([prefix + e.turn.ids])
    f0 = sae.encode(residual_stream(lm.model, ids0, torch.ones_like(ids0), LAYER)[0][torch.tensor(e.counted)])
    turn = residual_stream(lm.model, ids1, torch.ones_like(ids1), LAYER)[0, len(prefix) :]
    f1 = sae.encode(turn[torch.tensor(e.turn.counted)])
    torch.testing.assert_close(
        result.shift.latents.per_example[0].double(), (f1 - f0).square().sum(0).double(), rtol=1e-4, atol=1e-5
    )
