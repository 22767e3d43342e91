"""Train variants of an SAE recipe on its cached activations and record how each knob moves the quality.

    python benchmarks/sae_knobs.py recipes/sae-smollm2-135m-instruct.yaml --name lr1e-3 \\
        --set training.lr=0.001 --set training.tokens=1000000 --out docs/sae/knobs.json

Each variant is `mixopt sae train` with the recipe's fields replaced (`--set dotted.field=value`, values
parsed as YAML, validated by the recipe schema) and its SAE written under --work (not into the package). Its
quality.json (explained variance, dead and dense latents, monosemanticity, and the knobs themselves) is added
to --out under --name; a name already there is skipped, so a stopped sweep resumes (training itself resumes
from its checkpoints under $MIXOPT_CACHE).

    python benchmarks/sae_knobs.py RECIPE --name shipped --measure mixopt/assets/sae/smollm2-135m-instruct-res-l22

measures an existing SAE on the recipe's held-out activations instead (no training): a baseline.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixopt.files import write_json  # noqa: E402
from mixopt.recipe import SAETrainRecipe, load_sae_recipe  # noqa: E402
from mixopt.sae import cached_activations, train_sae  # noqa: E402
from mixopt.sae_quality import measure_quality  # noqa: E402


def measure(recipe: SAETrainRecipe, folder: Path) -> dict[str, Any]:
    """quality.json's measures of the SAE in `folder` on `recipe`'s held-out activations."""
    from sae_lens import SAE

    store = cached_activations(recipe)
    _, heldout = store.load(recipe.layer, recipe.training.tokens, recipe.training.holdout)
    sae = SAE.load_from_disk(folder, dtype="float32")
    reconstruction, mono = measure_quality(sae, heldout)
    trained = json.loads((folder / "quality.json").read_text()) if (folder / "quality.json").exists() else {}
    return asdict(reconstruction) | asdict(mono) | {"tokens_heldout": len(heldout), "as_trained": trained}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--name", required=True, help="the variant's name in --out")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="e.g. training.lr=0.001")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "sae" / "knobs.json")
    parser.add_argument("--measure", type=Path, help="an SAE folder to measure instead of training one")
    parser.add_argument("--work", type=Path, default=Path("/tmp/mixopt-sae-knobs"), help="SAE folders go here")
    args = parser.parse_args()
    recorded = json.loads(args.out.read_text()) if args.out.exists() else {"variants": {}}
    if args.name in recorded["variants"]:
        print(f"{args.name}: already in {args.out}", file=sys.stderr)
        return
    knobs = {field: yaml.safe_load(value) for field, value in (item.split("=", 1) for item in args.set)}
    base = load_sae_recipe(args.recipe)
    recipe = base.with_knobs(knobs | {"output": str((args.work / args.name).resolve())})
    quality = measure(recipe, args.measure) if args.measure else asdict(train_sae(recipe))
    recorded = json.loads(args.out.read_text()) if args.out.exists() else {"variants": {}}  # others may have added
    recorded["variants"][args.name] = {"recipe": args.recipe.name, "set": knobs, "quality": quality}
    write_json(args.out, recorded)
    print(json.dumps(recorded["variants"][args.name], indent=1))


if __name__ == "__main__":
    main()
