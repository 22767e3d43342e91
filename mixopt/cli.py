"""The `mixopt` command line: thin wiring over the library. Heavy imports live inside commands so
`--help` is instant; every MixoptError becomes one stderr line and exit code 2."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from mixopt import __version__
from mixopt.errors import MixoptError, Terminated


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated  # unwinds: staged output and temp files are removed on the way out


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MixoptError into `error: <message>` on stderr (one line per problem) and exit code 2, with no
    traceback; SIGTERM unwinds like an exception (partial output removed) and exits 143."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            previous = signal.signal(signal.SIGTERM, _terminate)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            return command(*args, **kwargs)
        except MixoptError as err:
            for line in str(err).splitlines():
                click.echo(f"error: {line}", err=True)
            sys.exit(2)
        except Terminated:
            click.echo("error: stopped by SIGTERM; partial output removed", err=True)
            raise
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mixopt")
def cli() -> None:
    """Forecast which capabilities a fine-tune will move (SAE Transferability Score), and build the
    training mixture that protects them.

    \b
    mixopt check recipes/                        validate recipe files
    mixopt plan recipes/quickstart.yaml --budget 2000
    mixopt explain runs/quickstart               why each domain got its share
    mixopt diff runs/a runs/b                    what changed between two plans
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
    """Validate recipe files: YAML, schema, sources (every row renders, UTF-8), model and SAE configs (width,
    layer), target/domain overlap, feasibility after rounding. Nothing is loaded but config files and rows.

    PATHS are recipe files or folders (default: recipes/). Prints `FILE: ok` on stdout, or each problem on
    stderr as FILE: field.path: what is wrong (how to fix). With --format github the problems are
    annotations on stdout (where GitHub reads them). Exit 0 if all are ok, 2 otherwise.

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
        for each in problem.problems:
            if fmt == "github":
                line = f",line={each.line}" if each.line else ""
                click.echo(f"::error file={file}{line}::{each}")
            else:
                click.echo(str(each) if str(each).startswith(str(file)) else f"{file}: {each}", err=True)
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

    Under torchrun (or accelerate launch) every rank scores its share of each pass's batches and rank 0
    writes: the scores equal one process's (README, "Scale").

    \b
    e.g. mixopt score recipes/quickstart.yaml --out runs/quickstart-scores.json
         torchrun --nproc-per-node 8 -m mixopt score recipe.yaml --out scores.json
    """
    from mixopt import distributed
    from mixopt.checks import check_static
    from mixopt.manifest import check_writable
    from mixopt.pipeline import score_recipe
    from mixopt.recipe import load_recipe

    with distributed.process_group():  # under torchrun: every rank scores its shard, rank 0 writes
        spec = load_recipe(recipe)
        if out:
            check_writable(out, "scores file", folder=False)  # before the model work, not after
        check_static(spec)  # what `mixopt check` sees (sources, rows, configs) fails before any model loads
        scores, _ = score_recipe(spec)
        if not distributed.is_main():
            return
        click.echo(json.dumps(scores.to_dict(), indent=1) if as_json else scores.table())
        if out:
            scores.save(out)
            click.echo(f"scores written to {out}", err=True)


def _budget_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `plan` and `solve`: they override the recipe's allocation section."""
    options = [
        click.option("--budget", type=click.IntRange(min=1), help="Mixture size (overrides allocation.budget)."),
        click.option("--unit", type=click.Choice(["examples", "tokens"]), help="Budget unit."),
        click.option(
            "--objective",
            type=click.Choice(["minimax", "protect", "utility", "proportional"]),
            help="Objective; protect: transfer-aware, reads signed forecasts and scores.json's transfer matrix.",
        ),
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
@click.option(
    "--force",
    is_flag=True,
    help="Replace an existing output folder: only an empty one or an earlier mixopt run, never one holding the "
    "recipe or its data.",
)
@click.option("--seed", type=int, help="Override the recipe's seed (demonstrations, sampling, shuffling).")
@click.option("--dry-run", is_flag=True, help="Score and solve, print the allocation, write nothing.")
@user_errors
def plan(recipe: Path, out: Path | None, force: bool, seed: int | None, dry_run: bool, **allocation: Any) -> None:
    """The whole pipeline: score the domains of RECIPE, solve the allocation, write the mixture.

    Writes OUT/mixture (datasets save_to_disk), OUT/parquet, OUT/manifest.json, OUT/scores.json,
    OUT/allocation.json, OUT/exports (LLaMA-Factory, axolotl, Megatron), OUT/plots, OUT/README.md,
    OUT/explain.json and OUT/report.html (one self-contained page), all at once (a temp folder renamed
    into place).

    With output.materialize: never, OUT/blend.json replaces the rows; mixopt.load_mixture(OUT) streams them.

    \b
    e.g. mixopt plan recipes/quickstart.yaml --budget 2000
         mixopt plan recipes/quickstart.yaml --budget 500000 --unit tokens --out runs/q --force
         torchrun --nproc-per-node 8 -m mixopt plan recipe.yaml --budget 100000   (rank 0 writes OUT)
    """
    from mixopt import distributed
    from mixopt.pipeline import plan_recipe
    from mixopt.recipe import load_recipe

    with distributed.process_group():  # under torchrun: every rank scores its shard, rank 0 writes OUT
        spec = load_recipe(recipe).with_overrides(seed=seed, **allocation)
        target = out or output_dir(spec)
        result = plan_recipe(spec, target, force=force, dry_run=dry_run or not distributed.is_main())
        if distributed.is_main():
            _print_plan(result)


def _print_plan(result: Any) -> None:
    click.echo(result.scores.table())
    click.echo("")
    click.echo(result.allocation.table())
    _solver_notes(result.allocation)
    if result.out is None:
        click.echo("\ndry run: nothing written")
        return
    if result.blended:  # output.materialize: never
        where, what = result.out / "blend.json", f"{result.rows:,} rows, blend sha256 {result.content_sha256[:16]}"
        click.echo(f"\nblend: {where} ({what}); stream the rows with mixopt.load_mixture('{result.out}')")
    else:
        click.echo(f"\nmixture: {result.out / 'mixture'} ({result.rows:,} rows, sha256 {result.content_sha256[:16]})")
    click.echo(f"manifest: {result.out / 'manifest.json'}")
    click.echo(f"report: {result.out / 'README.md'}, {result.out / 'report.html'} (why: mixopt explain {result.out})")


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
         mixopt solve scores.json --budget 2000 --objective protect    (T: scores.json's transfer, else identity)
    """
    from mixopt.manifest import check_writable
    from mixopt.recipe import AllocationSpec, load_recipe
    from mixopt.scores import Scores
    from mixopt.solver import limits_from_domains, solve_allocation

    if out:
        check_writable(out, "allocation file", folder=False)
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
    help="Also fine-tune the recipe's compare.mixtures at the same budget (target only, uniform, size-"
    "proportional, mixopt minimax / protect / protect + forecast rows): target and uniform at each of "
    "compare.replay_fractions first, the mixtures at the fraction the pre-set rule picks; reports every metric's "
    "per-domain change, worst domain and target gain, each mixture minus uniform (paired, seed noise counted).",
)
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    help="Training-order seeds per mixture (default: the recipe's compare.seeds); 2 or more measure seed noise.",
)
@click.option(
    "--sweep",
    is_flag=True,
    help="Also re-score under each open setting (top_k, demonstrations, the icl variant, which tokens count, "
    "grad's update direction, probe's pilot steps, each other shipped SAE of the model at its layer), rank them "
    "and apply docs/validation.md's round-2 rule (which forecast becomes the default); fine-tunes nothing but "
    "probe's short pilots.",
)
@click.option(
    "--sweep-only",
    metavar="GLOB",
    multiple=True,
    help="Sweep only the settings whose names match this glob (repeatable; the recipe's own setting always "
    "runs), e.g. --sweep-only 'tokens=*' --sweep-only 'score=*'; names: recipe, top_k=K, demos=M, score=icl, "
    "tokens=T, score=grad,direction=D, score=probe,steps=N, and for each other shipped built-in SAE of the "
    "model (another layer): sae=ALIAS, sae=ALIAS,score=icl, sae=ALIAS,score=probe,steps=1.",
)
@click.option(
    "--rescore",
    is_flag=True,
    help="Score again and recompute every correlation from the recorded measurements; train and measure "
    "nothing (an error if a measurement is missing). Judges a new scorer on the same fine-tunes.",
)
@click.option(
    "--from",
    "evidence_from",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Kept evidence (e.g. docs/validation): its measurements are copied into OUT first, where OUT has none.",
)
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="After the run, copy its measurements (gzipped) and validation.json into this folder (e.g. docs/validation).",
)
@user_errors
def validate(
    recipe: Path,
    out: Path | None,
    compare_mixtures: bool,
    seeds: int | None,
    sweep: bool,
    sweep_only: tuple[str, ...],
    rescore: bool,
    evidence_from: Path | None,
    keep: Path | None,
) -> None:
    """Fine-tune for real on each source of RECIPE and check which scores forecast the per-domain change.

    Splits each evaluation domain by content hash into a scoring part and held-out items, measures the
    held-out items before and after each fine-tune, scores every (source, domain) with STS and the
    baselines (raw, similarity, random latents) and correlates scores with the changes. Writes
    OUT/validation.json and OUT/plots, prints the tables. Slow (the recipe's schedule says how slow);
    a stopped run resumes from OUT.

    \b
    e.g. mixopt validate recipes/validate-mmlu.yaml
         mixopt validate recipes/validate-mmlu.yaml --out runs/v --compare-mixtures --seeds 2
         mixopt validate recipes/validate-mmlu.yaml --sweep      (after a run: which k, m, variant, forecast)
         mixopt validate recipes/validate-mmlu.yaml --rescore --from docs/validation   (no fine-tune)
    """
    from mixopt.recipe import load_validate_recipe
    from mixopt.validation import evidence
    from mixopt.validation.run import run_validation

    spec = load_validate_recipe(recipe)
    folder = out or output_dir(spec)
    if evidence_from is not None:
        restored = evidence.restore(evidence_from, folder)
        click.echo(
            f"restored {len(restored)} measurements from {evidence_from}: {', '.join(restored) or '-'}", err=True
        )
    sweep = sweep or bool(sweep_only)
    result = run_validation(
        spec, folder, compare=compare_mixtures, sweep=sweep, rescore=rescore, only=sweep_only, seeds=seeds
    )
    if keep is not None:
        kept = evidence.keep(folder, keep)
        click.echo(f"kept {len(kept)} files in {keep}", err=True)
    click.echo(result.table())
    click.echo(f"\nreport: {result.out / 'validation.json'}")
    click.echo(f"plots: {result.out / 'plots'}")


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--domain", help="Explain this domain: its numbers, the latents that carry it, its top examples.")
@click.option("--latent", type=int, help="Explain this shifted latent: where it fires, and its top snippets.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@user_errors
def explain(run: Path, domain: str | None, latent: int | None, fmt: str) -> None:
    """Why the plan in RUN (a `mixopt plan` output folder) scored and allocated each domain as it did.

    Per domain: the score and its interval, the allocation and the constraint that binds it, the
    examples whose own scores are highest (with their text) and the shifted SAE latents that carry the
    score (for SAE scorers; otherwise the shifted latents most active there). Per shifted latent: its
    shift, how often it fires, its mean activation on each source and its top snippets, firing token
    marked. Read from OUT/scores.json, allocation.json and explain.json: no model, no forward pass.
    JSON numbers are those of scores.json and allocation.json.

    \b
    e.g. mixopt explain runs/quickstart
         mixopt explain runs/quickstart --domain law
         mixopt explain runs/quickstart --latent 3786 --format json
    """
    from mixopt.explain import Explanation

    explanation = Explanation.from_run(run)
    if fmt == "json":
        from mixopt.files import finite

        selected = explanation.select(domain, latent)  # NaN (no interval) -> null: strict JSON
        click.echo(json.dumps(finite(selected.to_dict()), indent=1, ensure_ascii=False))
        return
    from mixopt.explain_text import print_explanation

    print_explanation(_console(), explanation, domain, latent)


@cli.command()
@click.argument("a", type=click.Path(path_type=Path))
@click.argument("b", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown", "github"]),
    default="table",
    show_default=True,
    help="markdown: for a pull-request comment; github: GitHub Actions annotations (::notice ...).",
)
@user_errors
def diff(a: Path, b: Path, fmt: str) -> None:
    """What changed between two plans A and B (output folders of `mixopt plan`, or their manifest.json):
    recipe fields, scorer, model and SAE, each domain's score, rank and rows, the mixture's content hash.

    Exit 0 when identical, 1 when different (like `diff`), 2 on bad input.

    \b
    e.g. mixopt diff runs/main runs/pr
         mixopt diff runs/main/manifest.json runs/pr/manifest.json --format markdown > comment.md
    """
    from mixopt.diff import diff_runs, load_run

    result = diff_runs(load_run(a), load_run(b))
    if fmt == "markdown":
        click.echo(result.markdown())
    elif fmt == "github":
        click.echo(result.github())
    else:
        console = _console()
        console.print(result.summary(), markup=False, highlight=False)
        for table in result.rich_tables():
            console.print(table)
    sys.exit(0 if result.identical else 1)


def _console() -> Any:
    """A rich console on stdout: the terminal's width, or 120 columns when piped (rich's 80 cuts tables)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


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


@sae.command("collect")
@click.argument("recipe", type=click.Path(path_type=Path))
@user_errors
def sae_collect(recipe: Path) -> None:
    """Only cache the activations an SAE training RECIPE needs (`training.tokens` at `layer` and
    `collect_layers`, from one forward pass), without training. Resumes; a larger `tokens` extends.

    \b
    e.g. mixopt sae collect recipes/sae-smollm2-135m-instruct.yaml
    """
    from mixopt.recipe import load_sae_recipe
    from mixopt.sae import cached_activations

    spec = load_sae_recipe(recipe)
    store = cached_activations(spec)
    click.echo(f"activations cached in {store.folder}")


def main() -> None:
    cli()
