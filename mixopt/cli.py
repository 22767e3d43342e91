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
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "github"]),
    default="text",
    show_default=True,
    help="github: print GitHub Actions annotations (::error file=...,line=...::message).",
)
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
    """STS of every domain of RECIPE: the shifted latents and a table of domains sorted by the recipe's
    scorer (`sts.score`). The forecasts `grad` and `probe` are signed: the change of each domain's loss
    the fine-tune is expected to cause, positive = worse; scores.json also holds their cost and, for
    `grad`, the domains' gradient cosines (`transfer`).

    Feature statistics and forecasts are cached under $MIXOPT_CACHE: a second run does no forward pass.

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


def _budget_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `plan` and `solve`: they override the recipe's allocation section."""
    options = [
        click.option("--budget", type=click.IntRange(min=1), help="Mixture size (overrides allocation.budget)."),
        click.option("--unit", type=click.Choice(["examples", "tokens"]), help="Budget unit."),
        click.option("--objective", type=click.Choice(["minimax", "utility", "proportional"]), help="Objective."),
        click.option("--alpha", type=click.FloatRange(min=0, min_open=True), help="Diminishing-returns exponent."),
        click.option("--lambda", "kl_weight", type=click.FloatRange(min=0), help="KL weight towards the prior."),
        click.option("--prior", type=click.Choice(["uniform", "natural"]), help="KL anchor of minimax."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@_budget_options
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default: the recipe's output.dir, else runs/<recipe name>).",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
@click.option("--seed", type=int, help="Override the recipe's seed (demonstrations, sampling, shuffling).")
@click.option("--dry-run", is_flag=True, help="Score and solve, print the allocation, write nothing.")
@user_errors
def plan(recipe: Path, out: Path | None, force: bool, seed: int | None, dry_run: bool, **allocation: Any) -> None:
    """The whole pipeline: score the domains of RECIPE, solve the allocation, write the mixture.

    Writes OUT/mixture (datasets save_to_disk), OUT/parquet, OUT/manifest.json, OUT/scores.json,
    OUT/allocation.json, OUT/exports (LLaMA-Factory, axolotl, Megatron), OUT/plots and OUT/README.md,
    all at once (a temp folder renamed into place).

    \b
    e.g. mixopt plan recipes/quickstart.yaml --budget 2000
         mixopt plan recipes/quickstart.yaml --budget 500000 --unit tokens --out runs/q --force
    """
    from mixopt.pipeline import plan_recipe
    from mixopt.recipe import load_recipe

    spec = load_recipe(recipe).with_overrides(seed=seed, **allocation)
    target = out or output_dir(spec)
    result = plan_recipe(spec, target, force=force, dry_run=dry_run)
    click.echo(result.scores.table())
    click.echo("")
    click.echo(result.allocation.table())
    _solver_notes(result.allocation)
    if result.out is None:
        click.echo("\ndry run: nothing written")
        return
    click.echo(f"\nmixture: {result.out / 'mixture'} ({result.rows:,} rows, sha256 {result.content_sha256[:16]})")
    click.echo(f"manifest: {result.out / 'manifest.json'}")
    click.echo(f"report: {result.out / 'README.md'}")


@cli.command()
@click.argument("scores", type=click.Path(dir_okay=False, path_type=Path))
@_budget_options
@click.option("--recipe", type=click.Path(path_type=Path), help="Take constraints (shares, groups, epochs) from it.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write allocation.json here.")
@user_errors
def solve(scores: Path, recipe: Path | None, out: Path | None, **allocation: Any) -> None:
    """Allocate a budget across the domains of SCORES (from `mixopt score`), no model needed.

    \b
    e.g. mixopt solve runs/quickstart/scores.json --budget 2000 --recipe recipes/quickstart.yaml
         mixopt solve scores.json --budget 1000000 --unit tokens --objective utility --out allocation.json
    """
    from mixopt.recipe import AllocationSpec, load_recipe
    from mixopt.scores import Scores
    from mixopt.solver import limits_from_domains, solve_allocation

    record = Scores.load(scores)
    if recipe is not None:
        spec = load_recipe(recipe).with_overrides(**allocation)
        settings, limits, seed = spec.allocation, limits_from_domains(spec.domains), spec.seed
    else:
        updates = {AllocationSpec.model_fields[k].alias or k: v for k, v in allocation.items() if v is not None}
        settings, limits, seed = AllocationSpec.model_validate(updates), None, 0
    result = solve_allocation(record, settings, limits, seed=seed)
    click.echo(result.table())
    _solver_notes(result)
    if out:
        result.save(out)
        click.echo(f"allocation written to {out}", err=True)


def _solver_notes(allocation: Any) -> None:
    click.echo(
        f"{allocation.objective}: {allocation.solver} {allocation.status} in {allocation.solve_seconds:.2f} s", err=True
    )
    for note in allocation.notes:
        click.echo(f"note: {note}", err=True)


def output_dir(recipe: Any) -> Path:
    if recipe.output.dir is not None:
        return (recipe.base_dir / recipe.output.dir).resolve()
    return Path("runs") / recipe.stem


@cli.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run folder (default: the recipe's output.dir, else runs/<recipe name>); a stopped run resumes in it.",
)
@click.option(
    "--compare-mixtures",
    is_flag=True,
    help="Also fine-tune at the same budget on target + uniform replay and on target + mixopt's allocation; "
    "reports every metric's per-domain change, worst domain and target gain, with paired differences.",
)
@click.option(
    "--sweep",
    is_flag=True,
    help="Also re-score under each open setting (top_k, demonstrations, the icl variant, which tokens count) "
    "and rank them; "
    "trains nothing more.",
)
@user_errors
def validate(recipe: Path, out: Path | None, compare_mixtures: bool, sweep: bool) -> None:
    """Fine-tune for real on each source of RECIPE and check which scores forecast the per-domain change.

    Splits each evaluation domain by content hash into a scoring part and held-out items, measures the
    held-out items before and after each fine-tune, scores every (source, domain) with STS and the
    baselines (raw, similarity, random latents) and correlates scores with the changes. Writes
    OUT/validation.json and OUT/plots, prints the tables. Slow (the recipe's schedule says how slow);
    a stopped run resumes from OUT.

    \b
    e.g. mixopt validate recipes/validate-mmlu.yaml
         mixopt validate recipes/validate-mmlu.yaml --out runs/v --compare-mixtures
         mixopt validate recipes/validate-mmlu.yaml --sweep      (after a run: which k, m, variant)
    """
    from mixopt.recipe import load_validate_recipe
    from mixopt.validate import run_validation

    spec = load_validate_recipe(recipe)
    result = run_validation(spec, out or output_dir(spec), compare=compare_mixtures, sweep=sweep)
    click.echo(result.table())
    click.echo(f"\nreport: {result.out / 'validation.json'}")
    click.echo(f"plots: {result.out / 'plots'}")


@cli.command()
def schema() -> None:
    """Print the JSON Schema of recipes, all kinds (for editors: `# yaml-language-server: $schema=...`).

    \b
    e.g. mixopt schema > recipe.schema.json
    """
    from mixopt.recipe import recipe_json_schema

    click.echo(json.dumps(recipe_json_schema(), indent=2))


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
