"""Static recipe checks behind `mixopt check`: everything that can fail before a model is loaded.

YAML and schema (via `load_any_recipe`); every source loads (UTF-8, not empty) and every row a run would use
renders with the templates; the model's and SAE's config files agree on width and layer range (read without
weights or torch: `mixopt.artifacts`); no domain repeats the target's data; the allocation is feasible in
whole examples. Every problem is reported, not only the first: one RecipeError each, naming the file, the
field and, where known, the YAML line. `plan`, `score` and `validate` run the same checks first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mixopt.errors import MixoptError, RecipeError, SourceError
from mixopt.recipe import (
    Recipe,
    SAETrainRecipe,
    SourceSpec,
    TextTemplates,
    ValidateRecipe,
    load_any_recipe,
    parse_yaml,
    yaml_line,
)

AnyRecipe = Recipe | SAETrainRecipe | ValidateRecipe
Problem = tuple[str, str]  # (field as a dotted path, what is wrong and how to fix it)


@dataclass
class StaticReport:
    """What the checks counted on the way, by target/domain name (other recipe kinds: by field)."""

    available: dict[str, int] = field(default_factory=dict)  # rows a run uses (after max_examples, bad rows)
    skipped: dict[str, int] = field(default_factory=dict)  # rows left out by `on_bad_row: skip`


def recipe_files(paths: list[Path]) -> list[Path]:
    """Recipe files named, or found directly inside named folders (sorted; data folders are not searched)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"})
        else:
            files.append(path)  # a missing file is reported by check_recipe
    return files


def _sections(recipe: AnyRecipe) -> list[tuple[str, SourceSpec, Any, int | None]]:
    """(field of the source, the source, the section with its templates, its max_examples) of each source."""
    if isinstance(recipe, SAETrainRecipe):
        return [(f"data.{i}.source", d.source, d, d.max_examples) for i, d in enumerate(recipe.data)]
    if isinstance(recipe, ValidateRecipe):  # sources and domains carry their own templates (mcq or chat)
        sections: list[tuple[str, SourceSpec, Any, int | None]] = [
            (f"sources.{i}.source", s.source, s, s.max_examples) for i, s in enumerate(recipe.sources)
        ]
        return sections + [(f"domains.{i}.source", d.source, d, d.max_examples) for i, d in enumerate(recipe.domains)]
    sections = [("target.source", recipe.target.source, recipe.target, recipe.target.max_examples)]
    return sections + [(f"domains.{i}.source", d.source, d, d.max_examples) for i, d in enumerate(recipe.domains)]


def _templates(section: Any) -> list[str]:
    """Every template of a validate source or domain (an `mcq` block, or prompt + response)."""
    if (mcq := getattr(section, "mcq", None)) is not None:
        return [mcq.question, mcq.answer, *mcq.choices]
    return [t for t in (getattr(section, "prompt", None), getattr(section, "response", None)) if t]


def _rows(recipe: AnyRecipe, source: SourceSpec, section: Any, cap: int | None) -> tuple[Any, int, int]:
    """(the rows a run reads, how many it uses, how many it skips); SourceError for any problem with them.

    Streams every row through the templates, as the run will: a null, a missing key or a short list fails
    here, not after the model loaded.
    """
    from mixopt.sources import check_columns, describe, load_source, render, render_columns

    if source.hub is not None:
        return None, -1, 0  # a hub dataset may be large or offline: a run loads and checks it
    where = describe(source)
    ds = load_source(source, recipe.base_dir, cap)
    check_columns(ds, section, where)
    if cap is not None:
        ds = ds.select(range(min(len(ds), cap)))
    if not isinstance(section, TextTemplates):
        render_columns(ds, _templates(section), where)
        return ds, len(ds), 0
    rows = len(render(ds, section, where, recipe.on_bad_row if isinstance(recipe, Recipe) else None))
    if rows == 0:
        raise SourceError(f"{where}: none of its {len(ds)} rows renders (on_bad_row: skip left none); fix the data")
    return ds, rows, len(ds) - rows


def _model_problems(recipe: AnyRecipe) -> list[Problem]:
    """The model and SAE can be found, and fit: layer in range, SAE width = model width, SAE hook at the layer."""
    from mixopt.artifacts import fit_problems, model_shape, sae_shape

    try:
        model = model_shape(recipe.model, recipe.base_dir)
    except MixoptError as err:
        return [("model.path", str(err))]
    sae = None
    if not isinstance(recipe, SAETrainRecipe):
        try:
            sae = sae_shape(recipe.sae, recipe.base_dir)
        except MixoptError as err:
            return [("sae.path", str(err))]
    if model is None:  # a config that names its shape otherwise: the run checks the loaded model
        return []
    if isinstance(recipe, SAETrainRecipe):  # every layer the activation cache collects must exist
        fields = {layer: "layer" if layer == recipe.layer else "collect_layers" for layer in recipe.layers}
        return [problem for layer, field in fields.items() for problem in fit_problems(model, None, layer, field)]
    return fit_problems(model, sae, recipe.sae.layer, "sae.layer")


def _overlap_problems(recipe: Recipe, loaded: dict[str, Any]) -> list[Problem]:
    """A domain must not repeat the target's data: the same file, the same hub dataset, or rows of the same
    content. Only sources that loaded are compared (the others are reported already)."""
    from mixopt.sources import row_digests

    def identity(source: SourceSpec) -> set[Any]:
        if source.hub is not None:
            return {(source.hub, source.config, source.split)}
        try:
            return set(source.paths(recipe.base_dir))
        except MixoptError:  # a glob that matches nothing: reported with the source
            return set()

    target = identity(recipe.target.source)
    target_rows = set(row_digests(loaded[recipe.target.name])) if loaded.get(recipe.target.name) else set()
    fix = "replay must not repeat the fine-tuning data: drop the domain or point it at other data"
    problems = []
    for i, domain in enumerate(recipe.domains):
        where, rows = f"domains.{i}.source", loaded.get(domain.name)
        if shared := sorted(map(str, identity(domain.source) & target)):
            problems.append((where, f"domain '{domain.name}' reads the target's own data ({shared[0]}); {fix}"))
        elif rows is not None and (repeated := sum(digest in target_rows for digest in row_digests(rows))):
            message = f"{repeated} of the {len(rows)} rows of domain '{domain.name}' are also target rows"
            problems.append((where, f"{message} (same content); {fix}"))
    return problems


def _feasibility(recipe: Recipe, available: dict[str, int]) -> list[str]:
    from mixopt.solver import limits_from_domains, static_conflicts

    spec = recipe.allocation
    if spec.budget is None or spec.unit != "examples" or min(available.values()) < 0:
        return []  # token budgets need token counts, which need the tokenizer: `mixopt plan` checks them
    names = [d.name for d in recipe.domains]
    conflicts = static_conflicts(
        names,
        [available[n] for n in names],
        [1.0] * len(names),
        spec,
        limits_from_domains(recipe.domains),
        spec.budget,
        target_available=available[recipe.target.name],
    )
    return [f"{conflict} (change allocation or the domains' shares)" for conflict in conflicts]


def _size_problem(recipe: ValidateRecipe, field: str, rows: int) -> str | None:
    """Enough rows to hold out evaluation items (domains) or held-out rows (sources) and still work."""
    kind = field.split(".")[0]
    if rows < 0:
        return None  # hub source: counted when a run loads it
    if kind == "domains" and rows < (need := recipe.split.eval_items + recipe.split.min_scoring_items):
        return f"{rows} rows, but split.eval_items + split.min_scoring_items need {need}; lower them or drop the domain"
    if kind == "sources" and rows < (need := recipe.split.source_heldout + recipe.schedule.batch_size):
        return f"{rows} rows, but split.source_heldout + schedule.batch_size need {need}; lower them"
    return None


CHECKS_CACHE_VERSION = 1  # bump when a data check changes what it reports


def _data_key(recipe: AnyRecipe) -> str | None:
    """The key of what the data checks read: the recipe's content, mixopt's version and each local data
    file's path, size and modification time (as make decides). None (no caching) when a path does not
    resolve or a file is missing: the checks report that."""
    from mixopt import __version__
    from mixopt.files import Digest

    files = []
    for _, source, _, _ in _sections(recipe):
        try:
            paths = source.paths(recipe.base_dir)
        except MixoptError:
            return None
        for path in paths:
            try:
                stat = path.stat()
            except OSError:
                return None
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
    setting = {"v": CHECKS_CACHE_VERSION, "mixopt": __version__, "recipe": recipe.model_dump(mode="json")}
    return Digest().add(setting).add(files).hex(24)


def _data_problems(recipe: AnyRecipe) -> tuple[list[Problem], StaticReport]:
    """The checks that read every row (sources load, rows render, sizes, overlap, feasibility), read back
    from mixopt's cache when neither the recipe nor a data file changed since they last ran: reading ~60
    files row by row takes seconds, and `check recipes/` runs in CI and before every plan."""
    import json

    from mixopt.artifacts import cache_dir
    from mixopt.files import write_json

    key = _data_key(recipe)
    path = cache_dir() / "checks" / f"{key}.json"
    if key is not None and path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        problems = [(where, message) for where, message in stored["problems"]]
        return problems, StaticReport(stored["available"], stored["skipped"])
    problems, report = _read_data(recipe)
    if key is not None:
        record = {"problems": problems, "available": report.available, "skipped": report.skipped}
        write_json(path, record)
    return problems, report


def static_problems(recipe: AnyRecipe) -> tuple[list[Problem], StaticReport]:
    """Every problem `mixopt check` finds in a validated recipe, and what it counted on the way."""
    from mixopt.manifest import check_writable

    problems = _model_problems(recipe)
    data_problems, report = _data_problems(recipe)
    problems += data_problems
    if isinstance(recipe, Recipe) and recipe.output.dir is not None:
        try:
            check_writable(recipe.base_dir / recipe.output.dir, "output folder", folder=True)
        except MixoptError as err:
            problems.append(("output.dir", str(err)))
    return problems, report


def _read_data(recipe: AnyRecipe) -> tuple[list[Problem], StaticReport]:
    problems: list[Problem] = []
    report = StaticReport()
    loaded: dict[str, Any] = {}
    for where, source, section, cap in _sections(recipe):
        name = getattr(section, "name", where) if isinstance(recipe, Recipe) else where
        try:
            rows, used, skipped = _rows(recipe, source, section, cap)
        except MixoptError as err:
            problems.append((where, str(err)))
            continue
        if isinstance(recipe, ValidateRecipe) and (problem := _size_problem(recipe, where, used)):
            problems.append((where, problem))
        loaded[name], report.available[name] = rows, used
        if skipped:
            report.skipped[name] = skipped
    if isinstance(recipe, Recipe):
        problems += _overlap_problems(recipe, loaded)
        if len(report.available) == 1 + len(recipe.domains):  # every source counted
            problems += [("allocation", conflict) for conflict in _feasibility(recipe, report.available)]
    return problems, report


def _located(recipe: AnyRecipe, problems: list[Problem]) -> RecipeError:
    """The problems as one RecipeError (a line each), each at its field's YAML line in the recipe file."""
    root = None
    if recipe.file is not None:
        try:
            _, root = parse_yaml(recipe.file.read_text(encoding="utf-8"))
        except (OSError, ValueError, yaml.YAMLError):  # changed since it loaded: the fields still say where
            root = None
    errors = []
    for where, message in problems:
        loc = tuple(int(p) if p.isdigit() else p for p in where.split("."))
        detail = message.removeprefix(f"{where}: ")  # the field is said once, by RecipeError
        errors.append(RecipeError(detail, str(recipe.file) if recipe.file else None, where, yaml_line(root, loc)))
    return RecipeError.all_of(errors)


def check_static(recipe: AnyRecipe) -> StaticReport:
    """Everything `mixopt check` verifies, on an in-memory recipe (e.g. with --budget applied): raises every
    problem at once as a RecipeError (one line each). `plan`, `score` and `validate` call it before loading
    the model. Returns the counts it made (rows used, bad rows skipped) for the manifest."""
    problems, report = static_problems(recipe)
    if problems:
        raise _located(recipe, problems)
    return report


def check_recipe(file: Path) -> RecipeError | None:
    """Every problem with a recipe file (one RecipeError, a line each), or None if it is fine."""
    try:
        recipe = load_any_recipe(file)
    except RecipeError as err:
        return err
    problems, _ = static_problems(recipe)
    return _located(recipe, problems) if problems else None
