"""Typed errors. Every error a user can fix is a MixoptError; `cli.py` alone turns it into one stderr line
and exit code 2."""

from __future__ import annotations


class MixoptError(Exception):
    """An error in the user's input (recipe, data, model, SAE, budget) with a message that says the fix."""


class RecipeError(MixoptError):
    """A recipe file is malformed or inconsistent.

    `file`, `field` (dotted path such as ``domains.2.max_share``) and `line` (1-based, when known) let
    `mixopt check --format github` point at the offending YAML line.
    """

    def __init__(self, message: str, file: str | None = None, field: str | None = None, line: int | None = None):
        self.file, self.field, self.line, self.detail = file, field, line, message
        self.problems: list[RecipeError] = [self]  # every problem found, one line each
        where = ": ".join(part for part in (file, field) if part)
        super().__init__(f"{where}: {message}" if where else message)

    @classmethod
    def all_of(cls, problems: list[RecipeError]) -> RecipeError:
        """One error reporting several problems at once, one line each (as torchtune's ConfigError does)."""
        if len(problems) == 1:
            return problems[0]
        first = problems[0]
        combined = cls("\n".join(str(p) for p in problems))
        combined.file, combined.field, combined.line = first.file, first.field, first.line
        combined.problems = problems
        return combined


class SourceError(MixoptError):
    """A data source is missing, unreadable, empty, or lacks a column that a template uses."""


class ModelError(MixoptError):
    """A model cannot be loaded or does not fit the recipe (e.g. the hook layer is out of range)."""


class SAEError(MixoptError):
    """An SAE cannot be loaded or does not fit the model (width, layer)."""


class InfeasibleError(MixoptError):
    """The allocation's constraints cannot all hold; the message names the conflict with numbers."""


class OutputExistsError(MixoptError):
    """The output folder exists and `--force` was not given, or `--force` would replace what mixopt did not
    write (the recipe, a source, an unrelated folder), or the output cannot be written there."""


class DistributedError(MixoptError):
    """A distributed run (torchrun, accelerate launch) cannot form its process group, or one of its ranks
    failed; the message names the rank and what stopped it."""


class Terminated(SystemExit):
    """SIGTERM arrived: unwinds like an exception (so staged output is removed), then exits 143 (128 + 15)."""

    def __init__(self) -> None:
        super().__init__(143)
