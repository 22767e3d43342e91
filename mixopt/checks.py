"""Static recipe checks behind `mixopt check`: everything that can fail before a model is loaded.

YAML and schema (via `load_any_recipe`), source files exist and have the templates' columns, the model
and SAE can be found, and the allocation is statically feasible. Each problem is a RecipeError that
names the file, the field and, where known, the YAML line.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mixopt.errors import MixoptError, RecipeError
from mixopt.recipe import Recipe, SAETrainRecipe, SourceSpec, TextTemplates, ValidateRecipe, load_any_recipe, yaml_line
from mixopt.sources import check_columns, describe, load_source


def recipe_files(paths: list[Path]) -> list[Path]:
    """Recipe files named, or found directly inside named folders (sorted; data folders are not searched)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in {".yaml", ".yml"})
        else:
            files.append(path)  # a missing file is reported by check_recipe
    return files


def _located(err: MixoptError, file: Path, field: str) -> RecipeError:
    try:
        root = yaml.compose(file.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        root = None
    loc = tuple(int(p) if p.isdigit() else p for p in field.split("."))
    message = str(err).removeprefix(f"{field}: ")  # the field is said once, by RecipeError
    return RecipeError(message, file=str(file), field=field, line=yaml_line(root, loc))


def _check_source(source: SourceSpec, templates: TextTemplates, base_dir: Path, field: str) -> int:
    """Rows the source offers; raises SourceError if it is missing, unreadable, empty or lacks a column."""
    if source.hub is not None:
        return -1  # a hub dataset cannot be read offline; it is checked when a run loads it
    ds = load_source(source, base_dir)
    check_columns(ds, templates, describe(source))
    return len(ds)


def _sections(
    recipe: Recipe | SAETrainRecipe | ValidateRecipe,
) -> list[tuple[str, SourceSpec, TextTemplates, int | None]]:
    if isinstance(recipe, SAETrainRecipe):
        return [(f"data.{i}.source", d.source, d, d.max_examples) for i, d in enumerate(recipe.data)]
    if isinstance(recipe, ValidateRecipe):  # sources and domains carry their own `columns()` (duck-typed templates)
        sections = [(f"sources.{i}.source", s.source, s, s.max_examples) for i, s in enumerate(recipe.sources)]
        return sections + [
            (f"domains.{i}.source", d.source, d, d.max_examples)  # type: ignore[misc]
            for i, d in enumerate(recipe.domains)
        ]
    sections = [("target.source", recipe.target.source, recipe.target, recipe.target.max_examples)]
    return sections + [(f"domains.{i}.source", d.source, d, d.max_examples) for i, d in enumerate(recipe.domains)]


def _check_feasible(recipe: Recipe, available: dict[str, int]) -> None:
    from mixopt.solver import DomainLimits, static_conflicts

    spec = recipe.allocation
    if spec.budget is None or spec.unit != "examples" or min(available.values()) < 0:
        return  # token budgets need token counts, which need the tokenizer: `mixopt plan` checks them
    names = [d.name for d in recipe.domains]
    limits = {d.name: DomainLimits(d.min_share, d.max_share, list(d.groups)) for d in recipe.domains}
    conflicts = static_conflicts(
        names,
        [available[n] for n in names],
        [1.0] * len(names),
        spec,
        limits,
        spec.budget,
        target_available=available[recipe.target.name],
    )
    if conflicts:
        raise MixoptError(f"{conflicts[0]} (change allocation or the domains' shares)")


def _check_model_and_sae(recipe: Recipe | SAETrainRecipe | ValidateRecipe) -> tuple[str, MixoptError] | None:
    """Model and SAE can be found (nothing is loaded: a GGUF is not dequantized here)."""
    from mixopt.model import BUILTIN_MODELS, builtin_gguf

    path = recipe.model.path
    try:
        if path in BUILTIN_MODELS:
            builtin_gguf(path)
        elif (path.startswith((".", "/", "~")) or path.endswith(".gguf")) and not (
            recipe.base_dir / Path(path).expanduser()
        ).exists():
            raise MixoptError(f"model not found: {path} (relative paths resolve against the recipe file)")
    except MixoptError as err:
        return "model.path", err
    if isinstance(recipe, Recipe | ValidateRecipe):
        from mixopt.sae import resolve_sae_dir

        try:
            resolve_sae_dir(recipe.sae, recipe.base_dir)
        except MixoptError as err:
            return "sae.path", err
    return None


class _Located(MixoptError):
    """A problem found at a recipe field (dotted path)."""

    def __init__(self, field: str, error: MixoptError):
        super().__init__(str(error))
        self.field, self.error = field, error


def _check_sizes(recipe: ValidateRecipe, field: str, rows: int) -> None:
    """Enough rows to hold out evaluation items (domains) or held-out rows (sources) and still work."""
    kind, index = field.split(".")[:2]
    if rows < 0:
        return  # hub source: counted when a run loads it
    if kind == "domains" and rows < (need := recipe.split.eval_items + recipe.split.min_scoring_items):
        raise MixoptError(
            f"{rows} rows, but split.eval_items + split.min_scoring_items need {need}; lower them or drop the domain"
        )
    if kind == "sources" and rows < (need := recipe.split.source_heldout + recipe.schedule.batch_size):
        raise MixoptError(f"{rows} rows, but split.source_heldout + schedule.batch_size need {need}; lower them")


def _static_problems(recipe: Recipe | SAETrainRecipe | ValidateRecipe) -> None:
    """Raise _Located for the first problem: model/SAE, sources and columns, then feasibility."""
    if located := _check_model_and_sae(recipe):
        raise _Located(*located)
    available: dict[str, int] = {}
    for field, source, templates, cap in _sections(recipe):
        try:
            rows = _check_source(source, templates, recipe.base_dir, field)
        except MixoptError as err:
            raise _Located(field, err) from None
        if isinstance(recipe, ValidateRecipe):
            try:
                _check_sizes(recipe, field, min(rows, cap) if cap and rows >= 0 else rows)
            except MixoptError as err:
                raise _Located(field, err) from None
        name = field
        if isinstance(recipe, Recipe):
            name = recipe.target.name if field == "target.source" else recipe.domains[int(field.split(".")[1])].name
        available[name] = min(rows, cap) if cap and rows >= 0 else rows
    if isinstance(recipe, Recipe):
        try:
            _check_feasible(recipe, available)
        except MixoptError as err:
            raise _Located("allocation", err) from None


def check_static(recipe: Recipe | ValidateRecipe) -> None:
    """Everything `mixopt check` verifies, on an in-memory recipe (e.g. with --budget applied): raises
    the first problem as a MixoptError naming the field. `plan` calls it before loading the model."""
    try:
        _static_problems(recipe)
    except _Located as err:
        raise MixoptError(f"{err.field}: {err}") from None


def check_recipe(file: Path) -> RecipeError | None:
    """The first problem with a recipe file, or None if it is fine."""
    try:
        recipe = load_any_recipe(file)
        _static_problems(recipe)
    except RecipeError as err:
        return err
    except _Located as err:
        return _located(err.error, file, err.field)
    return None
