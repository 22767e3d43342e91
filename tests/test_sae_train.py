"""`mixopt sae train` on the tiny in-process model: sae-lens format out, quality.json, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mixopt.cli import cli


def _sae_recipe(workspace: Path, tmp_path: Path, tokens: int = 600) -> Path:
    root = workspace.parent
    recipe = tmp_path / "sae.yaml"
    recipe.write_text(f"""\
kind: sae-train
model: {{path: {root / "model"}}}
layer: 1
data:
  - source: {{path: {root / "data" / "math.jsonl"}}}
    prompt: "{{q}}"
    response: "{{a}}"
  - source: {{path: {root / "data" / "law.jsonl"}}}
    text: "{{text}}"
sae: {{d_sae: 64, k: 4}}
training: {{tokens: {tokens}, epochs: 2, batch_size: 64, checkpoints: 2, batch_tokens: 256}}
output: out/sae
""")
    return recipe


def test_sae_train__writes_an_sae_lens_folder_with_its_quality(workspace: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["sae", "train", str(_sae_recipe(workspace, tmp_path))])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "sae"
    quality = json.loads((out / "quality.json").read_text())
    assert quality["mean_l0"] == pytest.approx(4.0)
    assert quality["tokens_train"] + quality["tokens_heldout"] >= 600
    assert quality["d_in"] == 32 and quality["d_sae"] == 64 and quality["layer"] == 1

    from sae_lens import SAE

    sae = SAE.load_from_disk(out)
    assert sae.cfg.d_sae == 64 and "blocks.1." in sae.cfg.metadata.hook_name


def test_sae_train__a_second_run_reuses_activations_and_checkpoints(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = _sae_recipe(workspace, tmp_path)
    assert CliRunner().invoke(cli, ["sae", "train", str(recipe)]).exit_code == 0

    import mixopt.sae
    import mixopt.sae_data

    def no_forward(*args, **kwargs):
        raise AssertionError("activations are cached: no forward pass")

    monkeypatch.setattr(mixopt.sae_data, "residual_streams", no_forward)
    monkeypatch.setattr(mixopt.sae, "load_model", no_forward)  # nor a model load: the cache key needs none
    again = CliRunner().invoke(cli, ["sae", "train", str(recipe)])
    assert again.exit_code == 0, again.output
    assert "resuming SAE training" in again.output


def test_sae_train__plan_recipe_is_refused_with_the_fix(workspace: Path) -> None:
    result = CliRunner().invoke(cli, ["sae", "train", str(workspace)])
    assert result.exit_code == 2 and "kind: sae-train" in result.output


# ------------------------------------------------------------- activation cache, resume, quality


def _train_recipe(workspace: Path, tmp_path: Path, tokens: int, layers: str = "[0]", layer: int = 1):
    from mixopt.recipe import load_sae_recipe

    path = _sae_recipe(workspace, tmp_path, tokens)
    path.write_text(path.read_text().replace("layer: 1\n", f"layer: {layer}\ncollect_layers: {layers}\n"))
    return load_sae_recipe(path)


def _store(recipe, lm):
    from mixopt.artifacts import cache_dir
    from mixopt.sae_data import ActivationStore, activation_key

    return ActivationStore(cache_dir() / "activations" / activation_key(recipe, lm.identity))


@pytest.fixture
def small_shards(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Shards of 8 examples (many shards from the tiny corpus) in a cache of this test's own."""
    import mixopt.sae_data

    monkeypatch.setattr(mixopt.sae_data, "CHUNK", 8)
    monkeypatch.setenv("MIXOPT_CACHE", str(tmp_path / "cache"))


def test_activation_cache__extends_and_caches_two_layers_from_one_forward_pass(
    workspace: Path, tmp_path: Path, small_shards: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    import mixopt.sae_data
    from mixopt.model import load_model
    from mixopt.sae import cached_activations

    small = _train_recipe(workspace, tmp_path, tokens=300)
    lm = load_model(small.model, small.base_dir)
    calls: list[list[int]] = []
    real = mixopt.sae_data.residual_streams

    def counted(model, ids, mask, layers):
        calls.append(list(layers))
        return real(model, ids, mask, layers)

    monkeypatch.setattr(mixopt.sae_data, "residual_streams", counted)
    store = cached_activations(small, lm)
    first = [store.folder / f"layer_{layer}" / "shard_00000.npy" for layer in (0, 1)]
    before = [p.read_bytes() for p in first]
    n_small = store.layer_shards(1)
    assert all(c == [0, 1] for c in calls)  # both layers from each forward pass
    assert sum(store.shard_tokens()) >= 300

    calls.clear()
    large = _train_recipe(workspace, tmp_path, tokens=900)
    assert _store(large, lm).folder == store.folder  # `tokens` is not part of the key: the cache extends
    cached_activations(large, lm)
    assert [p.read_bytes() for p in first] == before  # earlier shards are kept, not recomputed
    assert store.layer_shards(1) > n_small and store.layer_shards(0) == store.layer_shards(1)
    forwards_after = len(calls)

    # the cached activations equal the model's hidden states (an independent forward: all layers, no hook)
    from mixopt.sae_data import corpus_encodings

    corpus = corpus_encodings(large, lm)
    train, held = store.load(1, 900, 0.05)
    every = np.concatenate([train.examples, held.examples])
    i = int(held.examples[0])
    enc = corpus.encoded[i]
    with torch.no_grad():
        hidden = lm.model(torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
    from mixopt.model import residual_stream

    ids = torch.tensor([enc.ids])
    expected = {  # the last block's hidden state has the final norm applied: read it with the one-layer hook
        0: hidden[1][0],
        1: residual_stream(lm.model, ids, torch.ones_like(ids), 1)[0],
    }
    for layer in (0, 1):
        _, held_layer = store.load(layer, 900, 0.05)
        cached = held_layer.acts[held_layer.examples == i].float()
        assert torch.allclose(cached, expected[layer][torch.tensor(enc.counted)], atol=1e-2, rtol=1e-2)  # fp16
    assert corpus.label_names[int(held.labels[0])] == corpus.label_names[int(corpus.labels[i])]
    assert set(train.examples).isdisjoint(held.examples) and all(e % 20 == 19 for e in held.examples)
    assert len(every) == sum(store.shard_tokens()[: store.shards_for(900)])
    assert forwards_after > 0

    def no_forward(*args, **kwargs):
        raise AssertionError("complete cache: no forward pass")

    monkeypatch.setattr(mixopt.sae_data, "residual_streams", no_forward)
    cached_activations(_train_recipe(workspace, tmp_path, tokens=900, layers="[]"), lm)  # a subset of layers


def test_activation_cache__a_later_layer_catches_up_without_redoing_the_first(
    workspace: Path, tmp_path: Path, small_shards: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mixopt.sae_data
    from mixopt.model import load_model
    from mixopt.sae import cached_activations

    only_one = _train_recipe(workspace, tmp_path, tokens=300, layers="[]")
    lm = load_model(only_one.model, only_one.base_dir)
    store = cached_activations(only_one, lm)
    assert store.layer_shards(0) == 0 and store.layer_shards(1) > 0
    calls: list[list[int]] = []
    real = mixopt.sae_data.residual_streams
    monkeypatch.setattr(
        mixopt.sae_data, "residual_streams", lambda m, i, k, layers: calls.append(list(layers)) or real(m, i, k, layers)
    )
    cached_activations(_train_recipe(workspace, tmp_path, tokens=300, layers="[0]"), lm)
    assert calls and all(c == [0] for c in calls)  # only the missing layer, up to where layer 1 is
    assert store.layer_shards(0) == store.layer_shards(1)


def test_corpus__label_by_file_names_each_file_without_the_shared_suffix(tmp_path: Path) -> None:
    from mixopt.recipe import CorpusSpec
    from mixopt.sae_data import labelled_sources

    for stem in ("anatomy_test", "college_biology_test", "law_test"):
        (tmp_path / f"{stem}.csv").write_text("q,a\nx,y\n")
    spec = CorpusSpec(name="mmlu", label_by_file=True, source={"path": "*.csv"}, text="{q} {a}")
    labels = [label for label, _ in labelled_sources(spec, tmp_path)]
    assert labels == ["mmlu:anatomy", "mmlu:college_biology", "mmlu:law"]
    whole = CorpusSpec(source={"path": "anatomy_test.csv"}, text="{q}")
    assert [label for label, _ in labelled_sources(whole, tmp_path)] == ["anatomy_test"]


def test_fit_sae__resumes_from_a_checkpoint_with_identical_weights(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from mixopt.sae import fit_sae, latest_checkpoint

    recipe = _train_recipe(workspace, tmp_path, tokens=600)
    acts = torch.randn(700, 32, generator=torch.Generator().manual_seed(1)).half()
    whole = fit_sae(recipe, acts, tmp_path / "a")
    checkpoints = sorted((tmp_path / "a" / "checkpoints").iterdir(), key=lambda p: int(p.name.rsplit("_", 1)[-1]))
    assert len(checkpoints) >= 2
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoints[0], tmp_path / "b" / "checkpoints" / checkpoints[0].name)  # stopped early
    assert latest_checkpoint(tmp_path / "b" / "checkpoints") == tmp_path / "b" / "checkpoints" / checkpoints[0].name
    torch.manual_seed(123)  # the resumed run must not depend on the global RNG
    resumed = fit_sae(recipe, acts, tmp_path / "b")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_sae_train__quality_json_carries_dense_and_monosemanticity(workspace: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["sae", "train", str(_sae_recipe(workspace, tmp_path))])
    assert result.exit_code == 0, result.output
    quality = json.loads((tmp_path / "out" / "sae" / "quality.json").read_text())
    for field in ("dense_fraction", "monosemanticity_chance", "monosemanticity_latents", "aux_k_coefficient"):
        assert field in quality
    assert 0 <= quality["dense_fraction"] <= 1 and 0 < quality["monosemanticity_chance"] <= 1


# --------------------------------------------------------------- quality measures, against brute force


class _FixedSAE:
    """encode: relu(x @ W); decode: codes @ W.T (enough of sae_lens.SAE's interface for the measures)."""

    def __init__(self, weights: torch.Tensor) -> None:
        self.W = weights

        class Cfg:
            d_sae = weights.shape[1]

        self.cfg = Cfg()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes @ self.W.T


def test_reconstruction__matches_a_direct_computation() -> None:
    from mixopt.sae_quality import DENSE_RATE, reconstruction

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 6, generator=g), torch.randn(6, 10, generator=g)
    w[:, 0] = 0  # a dead latent
    sae = _FixedSAE(w)
    got = reconstruction(sae, x, batch=64)
    codes = sae.encode(x)
    err = ((x - sae.decode(codes)) ** 2).sum()
    assert got.explained_variance == pytest.approx(1 - (err / ((x - x.mean(0)) ** 2).sum()).item(), rel=1e-5)
    assert got.normalized_mse == pytest.approx((err / (x**2).sum()).item(), rel=1e-5)
    rate = (codes > 0).float().mean(0)
    assert got.dead_fraction == pytest.approx(1 / 10)
    assert got.dense_fraction == pytest.approx((rate > DENSE_RATE).float().mean().item())
    assert got.mean_l0 == pytest.approx((codes > 0).sum(1).float().mean().item())


def test_monosemanticity__matches_a_brute_force_count() -> None:
    import numpy as np

    from mixopt.sae_quality import TOP_EXAMPLES, monosemanticity

    rng = np.random.default_rng(0)
    tokens, n_examples, n_latents = 2000, 120, 9
    examples = np.sort(rng.integers(0, n_examples, tokens)).astype(np.int32)
    example_label = rng.integers(0, 4, n_examples)
    labels = example_label[examples].astype(np.int16)
    rows = []
    for latent in range(n_latents):  # latent 0 fires only on label-0 tokens; the last fires on 5 tokens only
        pool = np.flatnonzero(labels == 0) if latent == 0 else np.arange(tokens)
        fired = rng.choice(pool, 5 if latent == n_latents - 1 else 300, replace=False)
        rows += [(t, latent, rng.random()) for t in fired]
    got = monosemanticity(np.array(rows, dtype=float), examples, labels)

    shares = []
    for latent in range(n_latents):  # brute force: best activation per example, top examples, label counts
        best: dict[int, float] = {}
        for t, lat, v in rows:
            if lat == latent:
                best[examples[t]] = max(best.get(examples[t], -1.0), v)
        if len(best) < TOP_EXAMPLES:
            continue
        top = sorted(best, key=lambda e: -best[e])[:TOP_EXAMPLES]
        shares.append(max(np.bincount(example_label[top])) / TOP_EXAMPLES)
    assert got.monosemanticity_latents == len(shares) == n_latents - 1
    assert got.monosemanticity == pytest.approx(np.mean(shares))
    assert shares[0] == 1.0 and got.monosemanticity_chance < 0.6  # the label-0 latent is monosemantic


def test_with_knobs__replaces_dotted_fields_and_validates(workspace: Path, tmp_path: Path) -> None:
    from mixopt.errors import RecipeError

    recipe = _train_recipe(workspace, tmp_path, tokens=600)
    changed = recipe.with_knobs({"sae.aux_k_coefficient": 4.0, "training.dead_tokens": 512, "output": "x"})
    assert (changed.sae.aux_k_coefficient, changed.training.dead_tokens, changed.output) == (4.0, 512, "x")
    assert changed.base_dir == recipe.base_dir and changed.sha256() != recipe.sha256()
    with pytest.raises(RecipeError, match="aux_k_coefficient"):
        recipe.with_knobs({"sae.aux_k_coefficient": -1})


def test_check__refuses_a_collect_layer_the_model_does_not_have(workspace: Path, tmp_path: Path) -> None:
    recipe = _sae_recipe(workspace, tmp_path)
    recipe.write_text(recipe.read_text().replace("layer: 1\n", "layer: 1\ncollect_layers: [0, 7]\n"))
    result = CliRunner().invoke(cli, ["check", str(recipe)])
    assert result.exit_code == 2 and "collect_layers" in result.output and "0..1" in result.output
