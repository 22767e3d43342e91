"""Recipe: the YAML file that says what to fine-tune on, which domains to protect and how to allocate.

One small pydantic model per YAML section, one top model (`Recipe`) with `load_recipe`. Unknown keys are
rejected everywhere so a typo never passes silently. Cross-field checks live in the models, so library
callers get them too. `recipes/README.md` documents every field.

Example:
    >>> from mixopt.recipe import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml")            # doctest: +SKIP
    >>> recipe.sts.top_k, recipe.allocation.objective              # doctest: +SKIP
    (100, 'minimax')
"""

from __future__ import annotations

import glob
import json
import os
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from mixopt.errors import RecipeError, SourceError

if TYPE_CHECKING:
    from pydantic_core import ErrorDetails
from mixopt.files import text_digest
from mixopt.scores import SCORERS, ScorerName

Share = Annotated[float, Field(ge=0.0, le=1.0)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


class FieldProblems(ValueError):
    """Cross-field problems found by a model validator, each at a field relative to that model, so every one
    is reported (one line each) at its own YAML line, not at the model's."""

    def __init__(self, problems: list[tuple[tuple[str | int, ...], str]]):
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _without_new_defaults(data: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """`data` without the fields of `defaults` that hold their default: fields added after recipes were hashed
    leave the dump, so every existing recipe keeps its sha256 (a `sae train` resumes, `diff` sees no change)."""
    return {k: v for k, v in data.items() if k not in defaults or v != defaults[k]}


class SourceSpec(Section):
    """Where rows come from: local file(s), a `save_to_disk` folder, or a hub dataset."""

    path: str | list[str] | None = None  # file(s) or folder, relative to the recipe file
    hub: str | None = None  # hub dataset id, e.g. "openai/gsm8k"
    config: str | None = None  # hub config name, e.g. "main"
    split: str | None = None  # hub split, or the split of a saved DatasetDict; default "train"
    format: Literal["auto", "json", "csv", "parquet", "arrow"] = "auto"
    columns: list[str] | None = None  # names for a header-less CSV (e.g. MMLU)
    streaming: bool = False  # read only the first `max_examples` rows (datasets' IterableDataset), never the rest

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_new_defaults(handler(self), {"streaming": False})

    @model_validator(mode="after")
    def _one_location(self) -> SourceSpec:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (local file or folder) or 'hub' (dataset id)")
        if self.hub is None and self.config is not None:
            raise ValueError("'config' applies to hub datasets only; remove it or use 'hub'")
        return self

    def paths(self, base_dir: Path) -> list[Path]:
        """The local paths, resolved against the recipe's folder (empty for hub sources)."""
        if self.path is None:
            return []
        raw = [self.path] if isinstance(self.path, str) else self.path
        paths: list[Path] = []
        for pattern in raw:
            full = base_dir / os.path.expanduser(pattern)
            if glob.has_magic(pattern):  # e.g. mmlu/test/*.csv; sorted, so row order is stable
                if not (matched := sorted(Path(p).resolve() for p in glob.glob(str(full)))):
                    message = f"source.path '{pattern}' matches no file (relative to the recipe); fix the pattern"
                    raise SourceError(message)
                paths += matched
            else:
                paths.append(full.resolve())
        return paths


def _capped(source: SourceSpec, max_examples: int | None) -> None:
    """A streamed source is read up to `max_examples` rows: without a cap a run would read all of it."""
    if source.streaming and max_examples is None:
        message = "source.streaming reads only the first max_examples rows; set max_examples (e.g. 10000)"
        raise FieldProblems([(("max_examples",), message)])


# A template field is a column, optionally indexed (`{choices[0]}`): str.format would also evaluate
# attribute access (`{question.__class__}`), keys, conversions and format specs, which read or call code.
_TEMPLATE_FIELD = re.compile(r"[^.\[\]{}!:]+(\[\d+\])*")


def template_fields(template: str) -> list[str]:
    """Column names a `str.format` template uses: ``"{question}\\n{answer}"`` -> ``["question", "answer"]``."""
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    return [name.split(".")[0].split("[")[0] for name in fields]


def _check_template(template: str | None, field: str) -> None:
    """Raise FieldProblems at `field` (dotted, e.g. ``choices.0``) if the template is not columns and indexes."""
    if template is None:
        return
    loc = tuple(int(p) if p.isdigit() else p for p in field.split("."))
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as err:  # unbalanced braces
        message = f"not a valid format string ({err}); escape braces as {{{{ }}}}"
        raise FieldProblems([(loc, message)]) from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        column = name.split(".")[0].split("[")[0]
        if column == "" or column.isdigit():
            raise FieldProblems([(loc, "a template must name columns, e.g. '{question}', not '{}' or '{0}'")])
        if spec or conversion or not _TEMPLATE_FIELD.fullmatch(name):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            message = (
                f"template field '{shown}' is not allowed: name a column, optionally with an index into it "
                "('{question}', '{choices[0]}'), without '.', keys, '!' conversions or ':' format specs"
            )
            raise FieldProblems([(loc, message)])


class TextTemplates(Section):
    """How a row becomes text: either `text`, or `prompt` + `response` (chat style)."""

    text: str | None = None
    prompt: str | None = None
    response: str | None = None

    @model_validator(mode="after")
    def _templates(self) -> TextTemplates:
        for field in ("text", "prompt", "response"):
            _check_template(getattr(self, field), field)
        chat = self.prompt is not None or self.response is not None
        if chat and (self.prompt is None or self.response is None):
            raise ValueError("give both 'prompt' and 'response' templates (or a single 'text' template)")
        if chat == (self.text is not None):
            raise ValueError("give either a 'text' template or 'prompt' + 'response' templates, not both")
        return self

    @property
    def is_chat(self) -> bool:
        return self.prompt is not None

    def columns(self) -> list[str]:
        templates = [self.text] if self.text is not None else [self.prompt, self.response]
        return sorted({name for t in templates for name in template_fields(t or "")})


class FormatSpec(Section):
    """How a `prompt` + `response` example becomes the model's text: the tokenizer's chat template, or plain
    text for a base model, which has none (`mixopt.encoding.PromptFormat`)."""

    # auto: the chat template when the tokenizer has one, else plain (a base model: nothing else to use)
    kind: Literal["auto", "chat", "plain"] = "auto"
    separator: str = "\n"  # plain: between an example's prompt and its response, e.g. "\nAnswer: "
    joiner: str = "\n\n"  # plain: after each in-context demonstration, before the next example

    @model_validator(mode="after")
    def _plain_only(self) -> FormatSpec:
        if self.kind == "chat" and (self.separator, self.joiner) != ("\n", "\n\n"):
            raise ValueError("separator and joiner apply to plain text; remove them, or set kind: plain (or auto)")
        return self


class ModelSpec(Section):
    path: str  # built-in alias, hub id, local folder, or .gguf file
    revision: str | None = None  # hub revision (branch, tag or commit)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"  # auto: CUDA when present, else CPU
    # Left out of the resolved recipe while it is the default, so the hash of a recipe that never set it stays
    # what it was (caches and run folders keyed by it).
    format: FormatSpec = Field(default=FormatSpec(), exclude_if=lambda spec: spec == FormatSpec())

    @model_validator(mode="after")
    def _device(self) -> ModelSpec:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device '{self.device}' is not one of auto, cpu, mps, cuda, cuda:N")
        return self


class SAESpec(Section):
    """The SAE and the layer it reads. With neither `path` nor `release` there is no SAE: the residual
    stream at `layer` alone, for a plan whose scorer reads no latents (`Scorer.sts` false: similarity, raw,
    grad, probe), e.g. on a model no SAE has been trained for yet."""

    path: str | None = None  # built-in alias or local folder in sae-lens format
    release: str | None = None  # sae-lens release, with `id`
    id: str | None = None
    layer: Annotated[int, Field(ge=0)]  # hook: residual stream after block `layer` (hidden_states[layer + 1])

    @model_validator(mode="after")
    def _one_location(self) -> SAESpec:
        if self.path is not None and self.release is not None:
            raise ValueError("give one of 'path' (local folder or built-in) or 'release' + 'id', not both")
        if (self.release is None) != (self.id is None):
            raise ValueError("'release' and 'id' go together (sae-lens pretrained SAE)")
        return self

    @property
    def present(self) -> bool:
        return self.path is not None or self.release is not None


class TargetSpec(TextTemplates):
    """The fine-tuning data whose effect we forecast."""

    name: Name = "target"
    source: SourceSpec
    max_examples: Annotated[int, Field(gt=0)] | None = None
    icl_demos: Annotated[int, Field(ge=0, le=16)] = 2  # m demonstrations per query for the shift
    seed: int | None = None  # demonstration choice; defaults to the recipe's seed

    @model_validator(mode="after")
    def _chat(self) -> TargetSpec:
        if not self.is_chat:
            raise ValueError("the target needs 'prompt' and 'response' templates (what the model is trained on)")
        _capped(self.source, self.max_examples)
        return self


class DomainSpec(TextTemplates):
    """A candidate domain: a capability the fine-tune may move, and replay data that protects it."""

    name: Name
    source: SourceSpec
    max_examples: Annotated[int, Field(gt=0)] | None = None
    min_share: Share = 0.0  # of the replay part of the mixture (the budget minus the target's part)
    max_share: Share = 1.0
    groups: list[Name] = []  # tags used by allocation.groups
    icl_demos: Annotated[int, Field(ge=0, le=16)] = 5  # worked examples per query, `icl` score only

    @model_validator(mode="after")
    def _shares(self) -> DomainSpec:
        if self.min_share > self.max_share:
            raise ValueError(
                f"min_share {self.min_share:g} > max_share {self.max_share:g}; lower min_share or raise max_share"
            )
        _capped(self.source, self.max_examples)
        return self


class ProbeSpec(Section):
    """`probe` and `probe_act`: a pilot fine-tune on the target with validation's trainer, short schedule."""

    steps: Annotated[int, Field(ge=0)] = 8  # optimizer steps (0: no training, every forecast is 0)
    batch_size: Annotated[int, Field(gt=0)] = 8  # examples per step
    lr: Annotated[float, Field(gt=0)] = 1e-4  # AdamW peak learning rate, no warmup, cosine to lr/10
    max_length: Annotated[int, Field(gt=0)] = 384  # training examples are truncated to this many tokens


class GradSpec(Section):
    """`grad`: the first-order change of each domain's loss under the target's first update, no training."""

    direction: Literal["plain", "adam"] = "plain"  # the target's update: mean gradient, or g / (sqrt(v) + eps)
    lr: Annotated[float, Field(gt=0)] = 1e-4  # step size: forecast = -lr <grad of the domain's loss, update>
    batches: Annotated[int, Field(gt=0)] = 8  # target batches the update is estimated from
    batch_size: Annotated[int, Field(gt=0)] = 8  # examples per target batch (the trainer's batch)
    eps: Annotated[float, Field(gt=0)] = 1e-8  # Adam's epsilon (`adam` only)
    blocks: Annotated[int, Field(ge=0)] = 4  # the last N decoder blocks' linear weights count (0: every block)
    modules: Annotated[list[str], Field(min_length=1)] = ["*"]  # name patterns inside a block, e.g. "mlp.*"
    sketch: Annotated[int, Field(gt=0)] = 32  # each weight's gradient is sketched to sketch x sketch (LoGra)


class STSSpec(Section):
    # the scorer the solver reads: an STS variant, a baseline or a forecast (DESIGN.md sections 3, 3b). The
    # default is the one forecast that beat STS act in docs/validation.md's sweep (paired interval excluding 0).
    score: ScorerName = "similarity"
    tokens: Literal["content", "response"] = "response"  # which tokens count: the response, or prompt + response
    top_k: Annotated[int, Field(gt=0)] = 100  # shifted latents kept
    target_tokens: Annotated[int, Field(gt=0)] = 20_000  # target tokens for the shift estimate
    domain_tokens: Annotated[int, Field(gt=0)] = 10_000  # tokens scored per domain
    max_length: Annotated[int, Field(gt=0)] = 512  # longer examples are truncated
    batch_tokens: Annotated[int, Field(gt=0)] = 4096  # padded tokens per forward batch
    bootstrap: Annotated[int, Field(ge=0)] = 1000  # resamples for each domain's 95% interval
    probe: ProbeSpec = ProbeSpec()  # `probe`, `probe_act`: the pilot fine-tune
    grad: GradSpec = GradSpec()  # `grad`: the update direction, which weights count, the sketch size


class GroupConstraint(Section):
    tag: Name
    min_share: Share = 0.0  # of the replay part, summed over the domains tagged `tag`
    max_share: Share = 1.0

    @model_validator(mode="after")
    def _shares(self) -> GroupConstraint:
        if self.min_share > self.max_share:
            raise ValueError(f"group '{self.tag}': min_share {self.min_share:g} > max_share {self.max_share:g}")
        return self


class ReplaySpec(Section):
    """Which rows of each domain are replayed (the allocation says how many)."""

    # random: seeded permutations; forecast: the rows with the highest per-example forecast first
    select: Literal["random", "forecast"] = "random"


class AllocationSpec(Section):
    budget: Annotated[int, Field(gt=0)] | None = None  # total mixture size; `--budget` overrides
    unit: Literal["examples", "tokens"] = "examples"
    objective: Literal["minimax", "protect", "utility", "proportional"] = "minimax"
    target_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.5  # the target's share of the budget
    max_epochs: Annotated[float, Field(gt=0)] = 1.0  # no domain repeated more than this
    prior: Literal["uniform", "natural"] = "uniform"  # KL anchor of `minimax`
    alpha: Annotated[float, Field(gt=0)] = 1.0  # diminishing-returns exponent of `minimax`
    kl_weight: Annotated[float, Field(ge=0, alias="lambda")] = 0.1  # lambda: pull towards the prior
    scale: Annotated[float, Field(gt=0)] | None = None  # c_i; default: replay budget / number of domains
    count: Literal["response", "all"] = "response"  # which tokens a token budget counts
    groups: list[GroupConstraint] = []
    stability: Annotated[int, Field(ge=0)] = 50  # bootstrap re-solves for share intervals (0: off)
    replay: ReplaySpec = ReplaySpec()


class OutputSpec(Section):
    dir: str | None = None  # default: runs/<recipe file stem>, relative to the current folder
    formats: list[Literal["arrow", "parquet"]] = ["arrow", "parquet"]  # trainer exports need parquet
    # never: write blend.json (sources, counts, seeds) instead of the rows; mixopt.load_mixture(OUT) streams them
    materialize: Literal["always", "never"] = "always"

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _without_new_defaults(handler(self), {"materialize": "always"})


class RecipeFile(Section):
    """What every recipe kind shares: where it was read from, and its content hash."""

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _file: Path | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths resolve against (the recipe file's folder)."""
        return self._base_dir

    @property
    def file(self) -> Path | None:
        return self._file

    @property
    def stem(self) -> str:
        return self._file.stem if self._file else "recipe"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def sha256(self) -> str:
        """Content hash of the validated recipe (defaults filled in, env vars expanded, keys sorted).

        Formatting, comments and key order do not change it; any value that changes the result does.
        """
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return text_digest(canonical).hex()


class Recipe(RecipeFile):
    """A whole plan recipe. Build with `load_recipe(path)` so relative paths and `${VAR:-default}` resolve."""

    kind: Literal["plan"] = "plan"
    description: str | None = None
    seed: int = 0
    model: ModelSpec
    sae: SAESpec
    target: TargetSpec
    domains: Annotated[list[DomainSpec], Field(min_length=1)]
    sts: STSSpec = STSSpec()
    allocation: AllocationSpec = AllocationSpec()
    output: OutputSpec = OutputSpec()

    on_bad_row: Literal["error", "skip"] = "error"  # a row a template cannot render: stop, or skip and count it

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        names = [d.name for d in self.domains]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append((("domains", i, "name"), f"domain names must be unique; repeated: {name}"))
        if self.target.name in names:
            problems.append((("target", "name"), f"target.name '{self.target.name}' is also a domain name; rename one"))
        if (total := sum(d.min_share for d in self.domains)) > 1 + 1e-9:
            problems.append((("domains",), f"domains' min_share sum to {total:.2f} > 1; lower some min_share"))
        if (total := sum(d.max_share for d in self.domains)) < 1 - 1e-9:
            message = f"domains' max_share sum to {total:.2f} < 1, so shares cannot sum to 1; raise some"
            problems.append((("domains",), message))
        if not self.sae.present and SCORERS[self.sts.score].sts:
            message = (
                f"sts.score '{self.sts.score}' reads SAE latents: give sae.path or sae.release + sae.id, or choose a "
                f"scorer that reads none ({', '.join(n for n, s in SCORERS.items() if not s.sts and s.selectable)})"
            )
            problems.append((("sae",), message))
        tags = {tag for d in self.domains for tag in d.groups}
        for i, group in enumerate(self.allocation.groups):
            if group.tag not in tags:
                message = f"allocation.groups tag '{group.tag}' is on no domain; add it to a domain's groups"
                problems.append((("allocation", "groups", i, "tag"), message))
        if problems:
            raise FieldProblems(problems)
        return self

    def input_paths(self) -> list[Path]:
        """Local files and folders the recipe reads (itself, sources, model, SAE): what `--force` must never
        replace. A glob stands for the folder it searches."""
        raw = [self.model.path, *([self.sae.path] if self.sae.path else [])]
        for source in [self.target.source, *(d.source for d in self.domains)]:
            raw += [] if source.path is None else [source.path] if isinstance(source.path, str) else source.path
        paths = [self._file] if self._file else []
        for pattern in raw:
            path = self.base_dir / os.path.expanduser(pattern)
            while glob.has_magic(str(path)):
                path = path.parent
            if path.exists():
                paths.append(path)
        return [p.resolve() for p in paths]

    @property
    def target_seed(self) -> int:
        return self.seed if self.target.seed is None else self.target.seed

    def with_overrides(self, seed: int | None = None, **allocation: Any) -> Recipe:
        """A copy with the seed and allocation fields replaced (e.g. from the command line); None skipped."""
        updates = {AllocationSpec.model_fields[k].alias or k: v for k, v in allocation.items() if v is not None}
        if seed is None and not updates:
            return self
        data = self.to_dict()
        data["allocation"].update(updates)
        if seed is not None:
            data["seed"] = seed
        return _validated(data, self._file, self._base_dir, yaml_root=None)


class CorpusSpec(TextTemplates):
    """Text an SAE is trained on."""

    source: SourceSpec
    max_examples: Annotated[int, Field(gt=0)] | None = None  # per file when `label_by_file`
    # Where each held-out token came from (quality.json's monosemanticity): tokens are labelled `name`,
    # or `name:<file stem>` per file of a multi-file source with `label_by_file` (e.g. one MMLU subject).
    name: Name | None = None  # default: the source's first file stem (or hub id)
    label_by_file: bool = False

    @model_validator(mode="after")
    def _streamed(self) -> CorpusSpec:
        _capped(self.source, self.max_examples)
        return self


class SAEArchitectureSpec(Section):
    architecture: Literal["topk", "standard"] = "topk"  # topk: L0 fixed at k, no L1 tuning, few dead latents
    d_sae: Annotated[int, Field(gt=0)] = 4608  # latents (8x the embedded model's width)
    k: Annotated[int, Field(gt=0)] = 32  # active latents per token (topk)
    l1_coefficient: Annotated[float, Field(gt=0)] = 5.0  # sparsity penalty (standard)
    # topk: weight of sae-lens's aux-k loss, where dead latents reconstruct the live ones' residual error
    # (Gao et al. 2024, appendix A.2); 0 turns it off
    aux_k_coefficient: Annotated[float, Field(ge=0)] = 1.0


class SAETrainingSpec(Section):
    tokens: Annotated[int, Field(gt=0)] = 2_000_000  # activations collected from the corpus
    epochs: Annotated[float, Field(gt=0)] = 3.0  # passes over the collected activations
    batch_size: Annotated[int, Field(gt=0)] = 4096  # activations per optimizer step
    lr: Annotated[float, Field(gt=0)] = 4e-4
    holdout: Annotated[float, Field(gt=0, lt=0.5)] = 0.05  # share of activations kept for the quality report
    max_length: Annotated[int, Field(gt=0)] = 512
    batch_tokens: Annotated[int, Field(gt=0)] = 4096  # padded tokens per forward batch
    checkpoints: Annotated[int, Field(ge=0)] = 4  # a stopped run resumes from the last one
    lr_end_fraction: Annotated[float, Field(gt=0, le=1)] = 0.1  # cosine decay ends at lr * this
    # a latent that has not fired for this many training tokens counts as dead (the aux-k loss then trains
    # it); None: a tenth of the run, as before
    dead_tokens: Annotated[int, Field(gt=0)] | None = None


class SAETrainRecipe(RecipeFile):
    """`mixopt sae train` recipe: which model, layer and text to train an SAE on, and where to put it."""

    kind: Literal["sae-train"]
    description: str | None = None
    seed: int = 0
    model: ModelSpec
    layer: Annotated[int, Field(ge=0)]  # residual stream after this block
    # more layers cached by the same truncated forward pass (it stops at the deepest), so an SAE recipe at
    # one of them with the same model and data trains without a forward pass of its own
    collect_layers: list[Annotated[int, Field(ge=0)]] = []
    data: Annotated[list[CorpusSpec], Field(min_length=1)]
    sae: SAEArchitectureSpec = SAEArchitectureSpec()
    training: SAETrainingSpec = SAETrainingSpec()
    output: str  # folder the SAE is saved to (sae-lens format), relative to the recipe file

    @property
    def layers(self) -> list[int]:
        """Every layer the activation collection caches (the recipe's own included), ascending."""
        return sorted({self.layer, *self.collect_layers})

    def with_knobs(self, knobs: dict[str, Any]) -> SAETrainRecipe:
        """A validated copy with dotted fields replaced, e.g. {"sae.aux_k_coefficient": 4, "output": "x"}."""
        data = self.to_dict()
        for dotted, value in knobs.items():
            *parents, name = dotted.split(".")
            section = data
            for parent in parents:
                section = section[parent]
            section[name] = value
        return _validated(data, self._file, self._base_dir, yaml_root=None)


class MCQTemplates(Section):
    """How a multiple-choice row becomes a question, its choices and the correct choice."""

    question: str = "{question}"
    choices: Annotated[list[str], Field(min_length=2, max_length=26)] = ["{A}", "{B}", "{C}", "{D}"]
    answer: str = "{answer}"  # renders to the correct choice's letter (A, B, ...) or its 0-based index

    @model_validator(mode="after")
    def _templates(self) -> MCQTemplates:
        for field, template in [("question", self.question), ("answer", self.answer)]:
            _check_template(template, field)
        for i, template in enumerate(self.choices):
            _check_template(template, f"choices.{i}")
        return self

    def columns(self) -> list[str]:
        return sorted({name for t in [self.question, self.answer, *self.choices] for name in template_fields(t)})


class FinetuneSourceSpec(Section):
    """A fine-tuning source of `mixopt validate`: `prompt` + `response` templates, or a multiple-choice
    source (`mcq`) trained as question -> the correct answer's text."""

    name: Name
    source: SourceSpec
    prompt: str | None = None
    response: str | None = None
    mcq: MCQTemplates | None = None
    max_examples: Annotated[int, Field(gt=0)] | None = None
    icl_demos: Annotated[int, Field(ge=0, le=16)] = 2  # m demonstrations for the STS shift estimate

    @model_validator(mode="after")
    def _one_format(self) -> FinetuneSourceSpec:
        _check_template(self.prompt, "prompt")
        _check_template(self.response, "response")
        chat = self.prompt is not None and self.response is not None
        if (self.prompt is None) != (self.response is None):
            raise ValueError("give both 'prompt' and 'response' templates (or an 'mcq' block)")
        if chat == (self.mcq is not None):
            raise ValueError("give either 'prompt' + 'response' templates or an 'mcq' block, not both")
        return self

    def columns(self) -> list[str]:
        if self.mcq is not None:
            return self.mcq.columns()
        return sorted({name for t in (self.prompt or "", self.response or "") for name in template_fields(t)})


class EvalDomainSpec(Section):
    """An evaluation domain of `mixopt validate`: multiple-choice items, split into a scoring part (STS)
    and a held-out evaluation part (measured before and after each fine-tune)."""

    name: Name
    source: SourceSpec
    mcq: MCQTemplates = MCQTemplates()
    max_examples: Annotated[int, Field(gt=0)] | None = None

    def columns(self) -> list[str]:
        return self.mcq.columns()


class SplitSpec(Section):
    eval_items: Annotated[int, Field(ge=4)] = 60  # held-out evaluation items per domain; the rest is scored
    min_scoring_items: Annotated[int, Field(ge=1)] = 20  # a domain needs at least this many left to score
    source_heldout: Annotated[int, Field(ge=2)] = 100  # items per source never trained on: its own gain


class ScheduleSpec(Section):
    steps: Annotated[int, Field(gt=0)] = 150  # optimizer steps per fine-tune
    batch_size: Annotated[int, Field(gt=0)] = 8  # examples per step; steps x batch_size is the budget
    lr: Annotated[float, Field(gt=0)] = 1e-4  # AdamW peak learning rate (linear warmup, cosine to lr/10)
    warmup_steps: Annotated[int, Field(ge=0)] = 10
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    max_length: Annotated[int, Field(gt=0)] = 384  # training examples are truncated to this many tokens
    checkpoint_every: Annotated[int, Field(gt=0)] = 25  # steps; a stopped run resumes from the last one

    @model_validator(mode="after")
    def _warmup(self) -> ScheduleSpec:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} >= steps {self.steps}; lower warmup_steps")
        return self

    @property
    def budget(self) -> int:
        """Training examples one fine-tune sees (repeats included)."""
        return self.steps * self.batch_size


class EvaluationSpec(Section):
    max_length: Annotated[int, Field(gt=0)] = 1024  # longer evaluation items are left out (and counted)
    batch_tokens: Annotated[int, Field(gt=0)] = 4096  # padded tokens per forward batch
    bootstrap: Annotated[int, Field(ge=0)] = 1000  # resamples for standard errors and 95% intervals
    split_halves: Annotated[int, Field(gt=0)] = 20  # random half splits averaged for reliability
    min_reliability: Annotated[float, Field(ge=0, le=1)] = 0.7  # a metric's change counts only above this


class CompareSpec(Section):
    """`--compare-mixtures`: mixtures at the same budget, each against uniform replay (`validation.compare`)."""

    target: Name | None = None  # which source is the fine-tuning target; default: the first source
    metric: Literal["answer_nll", "cloze_nll", "letter_mass", "accuracy", "letter_nll"] = (
        "letter_mass"  # leads the table and chart; every metric is reported
    )
    allocation: AllocationSpec = AllocationSpec()  # budget: the schedule's steps x batch_size
    # the arms: target only, uniform, size-proportional, plan's minimax / protect, protect + forecast rows
    mixtures: list[Literal["target", "uniform", "proportional", "minimax", "protect", "protect_forecast"]] = [
        "target",
        "uniform",
        "minimax",
    ]
    # candidate replay fractions: target and uniform train at each, the mixtures at the one the rule picks
    # (docs/validation.md); empty: 1 - allocation.target_fraction
    replay_fractions: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = []
    seeds: Annotated[int, Field(ge=1)] = 1  # training-order seeds per mixture (--seeds overrides)
    forecast: str | None = None  # a sweep setting the mixopt arms read, e.g. "score=grad,direction=adam"

    @model_validator(mode="after")
    def _no_budget(self) -> CompareSpec:
        if self.allocation.budget is not None or self.allocation.unit != "examples":
            raise ValueError("compare.allocation: leave out budget and unit; the budget is steps x batch_size examples")
        if "uniform" not in self.mixtures:
            raise ValueError("compare.mixtures: include uniform; every mixture is judged against it")
        return self


class ValidateOutputSpec(Section):
    dir: str | None = None  # run folder, relative to the recipe file; default runs/<recipe file stem>


class ValidateRecipe(RecipeFile):
    """`mixopt validate` recipe: fine-tune on each source for real and check which scores forecast the change."""

    kind: Literal["validate"]
    description: str | None = None
    seed: int = 0
    model: ModelSpec
    sae: SAESpec
    sources: Annotated[list[FinetuneSourceSpec], Field(min_length=1)]
    domains: Annotated[list[EvalDomainSpec], Field(min_length=3)]  # a correlation needs at least 3 points
    split: SplitSpec = SplitSpec()
    schedule: ScheduleSpec = ScheduleSpec()
    sts: STSSpec = STSSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    compare: CompareSpec = CompareSpec()
    output: ValidateOutputSpec = ValidateOutputSpec()

    @model_validator(mode="after")
    def _consistent(self) -> ValidateRecipe:
        problems: list[tuple[tuple[str | int, ...], str]] = []
        if not self.sae.present:  # validation reports every scorer, the STS variants among them
            problems.append((("sae",), "validation scores every scorer, STS among them: give sae.path or sae.release"))
        named = [("sources", i, s.name) for i, s in enumerate(self.sources)]
        named += [("domains", i, d.name) for i, d in enumerate(self.domains)]
        for j, (section, i, name) in enumerate(named):
            if name in [n for _, _, n in named[:j]]:
                problems.append(((section, i, "name"), f"source and domain names must be unique; repeated: {name}"))
        sources = [s.name for s in self.sources]
        if self.compare.target is not None and self.compare.target not in sources:
            message = f"compare.target '{self.compare.target}' is not a source; use one of {', '.join(sources)}"
            problems.append((("compare", "target"), message))
        if problems:
            raise FieldProblems(problems)
        return self

    @property
    def compare_target(self) -> str:
        return self.compare.target or self.sources[0].name


_ENV = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


def expand_env(value: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}`` (as in a shell); an unset VAR without default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match["name"], match["default"]
        if name in os.environ and (os.environ[name] or default is None):
            return os.environ[name]
        if default is None:
            raise ValueError(f"environment variable {name} is not set; set it or write ${{{name}:-default}}")
        return default

    return _ENV.sub(substitute, value)


def _expand_all(node: Any, loc: tuple[str | int, ...] = ()) -> Any:
    if isinstance(node, dict):
        return {k: _expand_all(v, (*loc, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_all(v, (*loc, i)) for i, v in enumerate(node)]
    if isinstance(node, str):
        try:
            return expand_env(node)
        except ValueError as err:
            raise RecipeError(str(err), field=".".join(map(str, loc))) from None
    return node


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML lets the last one win silently).

    Merge keys (`<<: *anchor`) may still be overridden: only a mapping's own keys are compared.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _refuse_duplicate_keys(node, set())
        return super().construct_document(node)


def _refuse_duplicate_keys(node: yaml.Node, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: the anchored node was checked where it was defined
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in lines:
                    raise yaml.constructor.ConstructorError(
                        problem=f"key '{key.value}' is given twice (lines {lines[key.value]} and "
                        f"{key.start_mark.line + 1}); keep one",
                        problem_mark=key.start_mark,
                    )
                lines[key.value] = key.start_mark.line + 1
            _refuse_duplicate_keys(value, seen)
    elif isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _refuse_duplicate_keys(child, seen)


def parse_yaml(text: str) -> tuple[Any, yaml.Node | None]:
    """(data, root node) of one YAML document, parsed once; the node keeps line numbers for messages.

    Raises yaml.YAMLError, also for a key given twice in one mapping.
    """
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
        return (loader.construct_document(root) if root is not None else None), root
    finally:
        loader.dispose()


def yaml_line(root: yaml.Node | None, loc: tuple[str | int, ...]) -> int | None:
    """1-based line of the YAML node at `loc` (the deepest node that exists), for editor annotations."""
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == key]
            if not match:
                break
            line = match[-1][0].start_mark.line + 1  # the last wins: a mapping's own key after merged ones
            node = match[-1][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line if line is not None else (root.start_mark.line + 1 if root is not None else None)


def _friendly(error: ErrorDetails) -> str:
    kind, msg = error["type"], error["msg"]
    if kind == "extra_forbidden":
        return "unknown key (check its spelling against recipes/README.md)"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return f"{msg} (got {error.get('input')!r})" if "input" in error and not isinstance(error["input"], dict) else msg


def _problems(err: ValidationError, file: Path | None, yaml_root: yaml.Node | None) -> list[RecipeError]:
    """Every problem pydantic found, one per field, each at its own YAML line."""
    found: dict[tuple[str | int, ...], RecipeError] = {}
    for error in err.errors():
        # Drop pydantic's union-branch labels (e.g. "list[str]") so the path reads as the YAML does.
        loc = tuple(p for p in error["loc"] if isinstance(p, int) or not re.search(r"[\[\]()]", str(p)))
        cause = error.get("ctx", {}).get("error")
        located = cause.problems if isinstance(cause, FieldProblems) else [((), _friendly(error))]
        for where, message in located:
            at = loc + where
            if at not in found:  # a union reports each branch's failure; one line per field is enough
                field = ".".join(map(str, at)) or "(root)"
                found[at] = RecipeError(message, str(file) if file else None, field, yaml_line(yaml_root, at))
    return list(found.values())


def _validated(data: Any, file: Path | None, base_dir: Path, yaml_root: yaml.Node | None) -> Any:
    kinds: dict[str, type[RecipeFile]] = {"sae-train": SAETrainRecipe, "validate": ValidateRecipe}
    schema = kinds.get(data.get("kind"), Recipe)
    try:
        recipe = schema.model_validate(data)
    except ValidationError as err:
        raise RecipeError.all_of(_problems(err, file, yaml_root)) from None
    recipe._base_dir = base_dir
    recipe._file = file
    return recipe


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Read, expand and validate a plan recipe. Raises RecipeError with the file, field and line."""
    recipe = load_any_recipe(path)
    if isinstance(recipe, ValidateRecipe):
        raise RecipeError("this is a validation recipe; run it with `mixopt validate`", file=str(path))
    if not isinstance(recipe, Recipe):
        raise RecipeError("this is an SAE training recipe; run it with `mixopt sae train`", file=str(path))
    return recipe


def load_sae_recipe(path: str | os.PathLike[str]) -> SAETrainRecipe:
    """Read, expand and validate an SAE training recipe (`kind: sae-train`)."""
    recipe = load_any_recipe(path)
    if not isinstance(recipe, SAETrainRecipe):
        raise RecipeError("not an SAE training recipe: add `kind: sae-train` (see recipes/README.md)", file=str(path))
    return recipe


def load_validate_recipe(path: str | os.PathLike[str]) -> ValidateRecipe:
    """Read, expand and validate a `mixopt validate` recipe (`kind: validate`)."""
    recipe = load_any_recipe(path)
    if not isinstance(recipe, ValidateRecipe):
        raise RecipeError("not a validation recipe: add `kind: validate` (see recipes/README.md)", file=str(path))
    return recipe


def load_any_recipe(path: str | os.PathLike[str]) -> Recipe | SAETrainRecipe | ValidateRecipe:
    """Read, expand and validate a recipe of any kind (plan, `kind: sae-train` or `kind: validate`)."""
    file = Path(path)
    if file.is_dir():
        raise RecipeError("is a folder, not a recipe file; give a .yaml file (`mixopt check` takes folders)", str(file))
    if not file.is_file():
        raise RecipeError("recipe file not found; check the path", file=str(file))
    try:
        text = file.read_bytes().decode("utf-8")
        if "\x00" in text:
            raise UnicodeError
    except (UnicodeError, OSError):
        raise RecipeError("cannot read it as text: a recipe is a UTF-8 YAML file; check the path", str(file)) from None
    try:
        data, root = parse_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        position = getattr(err, "position", None)  # a ReaderError (a control character) has no mark
        line = mark.line + 1 if mark else text[:position].count("\n") + 1 if position is not None else None
        problem = getattr(err, "problem", None) or getattr(err, "reason", None) or str(err).splitlines()[0]
        raise RecipeError(f"invalid YAML at line {line}: {problem}", file=str(file), line=line) from None
    if not isinstance(data, dict):
        raise RecipeError(f"YAML root must be a mapping, got {type(data).__name__}", file=str(file), line=1)
    try:
        data = _expand_all(data)
    except RecipeError as err:
        raise RecipeError(err.detail, file=str(file), field=err.field) from None
    return _validated(data, file, file.resolve().parent, root)


def recipe_json_schema() -> dict[str, Any]:
    """JSON Schema of every recipe kind (plan, sae-train, validate), for editors (`mixopt schema`)."""
    from pydantic import TypeAdapter

    return TypeAdapter(Recipe | SAETrainRecipe | ValidateRecipe).json_schema(by_alias=True)
