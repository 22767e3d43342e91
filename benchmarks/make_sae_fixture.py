"""Write tests/fixtures/sae_heldout_acts.safetensors: real held-out residual activations for the fast SAE tests.

    nice -n 19 python benchmarks/make_sae_fixture.py            (writes the fixture, then measures)
    python benchmarks/make_sae_fixture.py --measure             (measures the shipped SAEs on it only)

The real SmolLM2-135M-Instruct reads the first held-out examples of the SAE corpus
(recipes/sae-smollm2-135m-instruct.yaml: every 20th example of its seeded order, which no built-in SAE trains
on), layers 15 and 22 from one forward pass; TOKENS counted tokens drawn with a fixed seed are kept (the same
positions at both layers) in fp16. Then prints the explained variance of every shipped built-in SAE on the
fixture: tests/test_sae_builtin.py records those numbers, and fails if a shipped SAE drifts from them.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixopt.artifacts import BUILTIN_SAES, builtin_sae_dir, sae_shape  # noqa: E402
from mixopt.model import load_model, residual_streams  # noqa: E402
from mixopt.recipe import SAESpec, load_sae_recipe  # noqa: E402
from mixopt.sae import load_sae  # noqa: E402
from mixopt.sae_data import corpus_encodings  # noqa: E402
from mixopt.sae_quality import reconstruction  # noqa: E402

TOKENS = 256
EXAMPLES = 48  # held-out examples read; TOKENS of their counted tokens are kept
LAYERS = [15, 22]
OUT = ROOT / "tests" / "fixtures" / "sae_heldout_acts.safetensors"


def write_fixture() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    recipe = load_sae_recipe(ROOT / "recipes" / "sae-smollm2-135m-instruct.yaml")
    lm = load_model(recipe.model, recipe.base_dir)
    corpus = corpus_encodings(recipe, lm)
    period = max(2, round(1 / recipe.training.holdout))  # the held-out rule of ActivationStore.load
    heldout = [i for i in range(len(corpus.encoded)) if i % period == period - 1][:EXAMPLES]
    acts: dict[int, list[torch.Tensor]] = {layer: [] for layer in LAYERS}
    for i in heldout:
        enc = corpus.encoded[i]
        ids = torch.tensor([enc.ids])
        resid = residual_streams(lm.model, ids, torch.ones_like(ids), LAYERS)  # {layer: (1, seq, 576)}
        for layer in LAYERS:
            acts[layer].append(resid[layer][0][torch.tensor(enc.counted)])
    stacked = {layer: torch.cat(a) for layer, a in acts.items()}  # (counted tokens, 576)
    keep = torch.randperm(len(stacked[LAYERS[0]]), generator=torch.Generator().manual_seed(0))[:TOKENS]
    tensors = {f"layer_{layer}": a[keep].half().contiguous() for layer, a in stacked.items()}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, OUT, metadata={"examples": json.dumps(heldout), "made_by": "benchmarks/make_sae_fixture.py"})
    print(f"wrote {OUT.relative_to(ROOT)}: {TOKENS} tokens from {len(heldout)} held-out examples", file=sys.stderr)
    return tensors


def shipped_evs(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """alias -> explained variance and L0 of each shipped built-in SAE on the fixture's tokens at its layer."""
    evs = {}
    for alias in BUILTIN_SAES:
        if not (builtin_sae_dir(alias) / "cfg.json").exists():
            continue
        shape = sae_shape(SAESpec(path=alias, layer=0), ROOT)
        assert shape is not None and shape.layer is not None, alias
        sae, layer = load_sae(SAESpec(path=alias, layer=shape.layer), ROOT, torch.device("cpu")), shape.layer
        quality = reconstruction(sae, tensors[f"layer_{layer}"].float())
        assert math.isfinite(quality.explained_variance)
        evs[alias] = {"explained_variance": round(quality.explained_variance, 4), "mean_l0": quality.mean_l0}
    return evs


def main() -> None:
    # --measure: the fixture as it is (no model loaded), e.g. after a built-in SAE is retrained
    tensors = load_file(OUT) if "--measure" in sys.argv[1:] else write_fixture()
    print(json.dumps(shipped_evs(tensors), indent=1))


if __name__ == "__main__":
    main()
