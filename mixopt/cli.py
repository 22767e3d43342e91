"""The `mixopt` command line: thin wiring over the library. Heavy imports live inside commands so
`--help` is instant; every MixoptError becomes one stderr line and exit code 2."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mixopt import __version__
from mixopt.errors import MixoptError


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MixoptError into `error: <message>` on stderr and exit code 2 (no traceback)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MixoptError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mixopt")
def cli() -> None:
    """Forecast which capabilities a fine-tune will move (SAE Transferability Score), and build the
    training mixture that protects them.

    \b
    mixopt check recipes/                        validate recipe files
    mixopt plan recipes/quickstart.yaml --budget 2000
    mixopt sae train recipes/sae-smollm2-135m-instruct.yaml
    """


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["text", "github"]), default="text", show_default=True,
              help="github: print GitHub Actions annotations (::error file=...,line=...::message).")
def check(paths: tuple[Path, ...], fmt: str) -> None:
    """Validate recipe files: YAML, schema, sources and columns, feasibility.

    PATHS are recipe files or folders (default: recipes/). Prints one line per recipe, `ok` or the first
    error as FILE: field.path: what is wrong (how to fix). Exit 0 if all are ok, 2 otherwise.

    \b
    e.g. mixopt check recipes/
         mixopt check --format github recipes/my.yaml
    """
    from mixopt.checks import check_recipe, recipe_files

    files = recipe_files(list(paths) or [Path("recipes")])
    if not files:
        click.echo(f"error: no recipe files (*.yaml, *.yml) in {', '.join(map(str, paths or ['recipes']))}", err=True)
        sys.exit(2)
    failed = 0
    for file in files:
        problem = check_recipe(file)
        if problem is None:
            click.echo(f"{file}: ok")
            continue
        failed += 1
        if fmt == "github":
            line = f",line={problem.line}" if problem.line else ""
            click.echo(f"::error file={file}{line}::{problem}")
        else:
            click.echo(str(problem) if str(problem).startswith(str(file)) else f"{file}: {problem}")
    sys.exit(2 if failed else 0)


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write scores.json here.")
@click.option("--json", "as_json", is_flag=True, help="Print the scores as JSON instead of the table.")
@user_errors
def score(recipe: Path, out: Path | None, as_json: bool) -> None:
    """STS of every domain of RECIPE: the shifted latents and a table of domains sorted by STS.

    Feature statistics are cached under $MIXOPT_CACHE: a second run does no forward pass.

    \b
    e.g. mixopt score recipes/quickstart.yaml --out runs/quickstart-scores.json
    """
    from mixopt.pipeline import score_recipe
    from mixopt.recipe import load_recipe

    scores, _ = score_recipe(load_recipe(recipe))
    click.echo(json.dumps(scores.to_dict(), indent=1) if as_json else scores.table())
    if out:
        scores.save(out)
        click.echo(f"scores written to {out}", err=True)


@cli.command()
def schema() -> None:
    """Print the recipe JSON Schema (for editors: `# yaml-language-server: $schema=recipe.schema.json`)."""
    from mixopt.recipe import Recipe

    click.echo(json.dumps(Recipe.model_json_schema(by_alias=True), indent=2))


@cli.group()
def sae() -> None:
    """Sparse autoencoders: train one for a model that has none."""


@sae.command("train")
@click.argument("recipe", type=click.Path(path_type=Path))
@user_errors
def sae_train(recipe: Path) -> None:
    """Train an SAE from an SAE training RECIPE (`kind: sae-train`) and save it in sae-lens format.

    Activations are cached under $MIXOPT_CACHE and training checkpoints as it goes, so a stopped run
    resumes. Writes cfg.json, sae_weights.safetensors (fp16) and quality.json.

    \b
    e.g. mixopt sae train recipes/sae-smollm2-135m-instruct.yaml
    """
    from mixopt.recipe import load_sae_recipe
    from mixopt.sae import train_sae

    spec = load_sae_recipe(recipe)
    quality = train_sae(spec)
    click.echo(json.dumps(quality.__dict__, indent=1))
    click.echo(f"SAE written to {(spec.base_dir / spec.output).resolve()}")


def main() -> None:
    cli()
