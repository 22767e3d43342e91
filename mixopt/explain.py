"""Explain: why each domain got its score and its share, from what the scoring pass already kept.

Two records:
- `Evidence` (`OUT/explain.json`), collected once while scoring, when the tokenizer and the scored
  examples are at hand: for each shifted latent its shift, mean activation and firing frequency per source
  and its top snippets (token windows around its largest activations, decoded from
  `features.TopContexts`); for each domain the shifted latents' terms in its score and the examples whose
  own scores are highest, with their text.
- `Explanation`: the Evidence joined with `scores.json` and `allocation.json` (their numbers are read from
  those files, never copied into explain.json), which `mixopt explain` prints and `report.html` shows.
  No model is loaded and no forward pass runs.

Example:
    >>> explanation = Explanation.from_run("runs/quickstart")               # doctest: +SKIP
    >>> [(d.name, d.rank, d.count) for d in explanation.domains][:2]        # doctest: +SKIP
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixopt.errors import MixoptError
from mixopt.files import write_json

if TYPE_CHECKING:  # types only: `mixopt explain` loads no torch and no solver
    import torch

    from mixopt.encoding import Encoded
    from mixopt.features import PassResult
    from mixopt.scores import DomainScore, Scores
    from mixopt.solver import Allocation

EVIDENCE_VERSION = 1
SNIPPETS = 5  # per latent and source (of features.TOP_CONTEXTS kept)
BEFORE, AFTER = 12, 4  # tokens of context around the firing token: the model reads left to right
TOP_EXAMPLES = 3  # per domain, the examples whose own scores are highest
LATENTS_PER_DOMAIN = 5  # latents listed under each domain
MAX_TEXT = 600  # characters of an example's text

# What validation found for each scorer on the embedded model (docs/validation.md); the report repeats it
# beside the allocation so nobody reads the forecast as established.
CAVEATS = {
    "act": "On the embedded SmolLM2-135M, STS act did not forecast which subjects a fine-tune moves most: "
    "within-source Spearman with the change of letter mass -0.06 [-0.16, +0.03]. It does see the direction of "
    "a fine-tune's push (-0.71 to +0.56 by source), but that direction depends on what the source teaches.",
    "act_sq": "On the embedded SmolLM2-135M, STS act_sq did not forecast which subjects a fine-tune moves "
    "most: within-source Spearman with the change of letter mass -0.04 [-0.16, +0.07].",
    "icl": "On the embedded SmolLM2-135M, STS icl (the paper's STS_ICL) did not forecast which subjects a "
    "fine-tune moves most: within-source Spearman with the change of letter mass -0.06 [-0.24, +0.12].",
    "raw": "raw (shifted residual dimensions, no SAE) is a baseline: on the embedded SmolLM2-135M its "
    "within-source Spearman with the change of letter mass is -0.02 [-0.21, +0.17].",
    "similarity": "Centered similarity over response tokens was the one forecast that beat STS on the embedded "
    "SmolLM2-135M: within-source Spearman with the change of letter mass +0.22 [+0.01, +0.35], weak evidence "
    "(one of 29 settings tried). An allocation by it protected no better than uniform replay at the same "
    "budget; the replay rows' format mattered more.",
    "similarity/content": "Centered similarity over all content tokens did not forecast which subjects a "
    "fine-tune moves most on the embedded SmolLM2-135M (-0.10 [-0.27, +0.04]); over response tokens it did, "
    "weakly (+0.22).",
}
CHECK_IT = "Check the scorer on your own model and data with `mixopt validate` before relying on the mixture."


def caveat(scorer: str, tokens: str) -> str:
    key = f"{scorer}/content" if scorer == "similarity" and tokens != "response" else scorer
    return f"{CAVEATS.get(key, 'This scorer has not been validated by fine-tuning.')} {CHECK_IT}"


# ------------------------------------------------------------------------------------------ evidence


@dataclass
class Snippet:
    """A window of tokens around one of a latent's largest activations."""

    source: str
    activation: float
    example: int  # index among the source's scored examples
    position: int  # the firing token's position in that example's token ids
    before: str
    token: str  # the firing token
    after: str


@dataclass
class LatentTerm:
    index: int  # SAE latent
    value: float  # its term in the domain's score (or its mean activation there, for other scorers)


@dataclass
class TopExample:
    example: int  # index among the domain's scored examples
    score: float  # its own score (`DomainScore.example_scores`)
    tokens: int  # its counted tokens (the weight of its score in the domain's)
    text: str  # its counted text (runs of counted tokens, one per line), cut at MAX_TEXT characters


@dataclass
class LatentEvidence:
    index: int
    shift: float  # sum of squared ICL vs zero-shot changes on the target (what made it "shifted")
    mean_activation: dict[str, float]  # per source (target first): mean over its scored tokens
    frequency: dict[str, float]  # per source: share of its scored tokens where the latent fires
    snippets: dict[str, list[Snippet]]  # per source: its largest activations, largest first

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatentEvidence:
        snippets = {k: [Snippet(**s) for s in v] for k, v in data["snippets"].items()}
        return cls(**{**data, "snippets": snippets})

    def top_snippets(self, n: int) -> list[Snippet]:
        """The n largest activations over every source."""
        return sorted((s for v in self.snippets.values() for s in v), key=lambda s: -s.activation)[:n]


@dataclass
class DomainEvidence:
    name: str
    terms: list[LatentTerm]  # every shifted latent's term, largest first
    top_examples: list[TopExample]


@dataclass
class Evidence:
    """What the scoring pass knew that scores.json does not hold: `OUT/explain.json`."""

    scorer: str
    tokens: str  # which tokens were scored: "content" or "response"
    target: str
    latents: list[LatentEvidence]  # in the order of scores.json's shifted_latents (largest shift first)
    domains: list[DomainEvidence]
    version: int = EVIDENCE_VERSION

    @property
    def terms_are_score(self) -> bool:
        """Whether the domains' latent terms sum to their score (an STS variant), or only describe them."""
        from mixopt.scores import SCORERS

        return self.scorer in SCORERS and SCORERS[self.scorer].sts

    def save(self, path: Path) -> None:
        write_json(path, asdict(self), strict=True)

    @classmethod
    def load(cls, path: Path) -> Evidence:
        data = json.loads(path.read_text())
        if data.get("version") != EVIDENCE_VERSION:
            raise ValueError(f"explain.json version {data.get('version')} != {EVIDENCE_VERSION}")
        domains = [
            DomainEvidence(
                d["name"], [LatentTerm(**t) for t in d["terms"]], [TopExample(**e) for e in d["top_examples"]]
            )
            for d in data["domains"]
        ]
        latents = [LatentEvidence.from_dict(latent) for latent in data["latents"]]
        return cls(**{**data, "latents": latents, "domains": domains})


@dataclass
class ScoredSource:
    """One source as the scoring pass holds it (`pipeline.score_recipe`)."""

    name: str
    examples: list[Encoded]  # the zero-shot pass's examples (TopContexts index them)
    result: PassResult  # the zero-shot pass (its stats carry `top`)
    score: DomainScore
    icl: PassResult | None = None  # the domain's ICL pass (scorer `icl`)
    icl_examples: list[Encoded] | None = None  # its examples: `score.example_scores` are over them for `icl`


def _round(value: float) -> float:
    return float(f"{value:.6g}")  # float32 sums: more digits are noise, and they bloat the JSON


def _snippet(tokenizer: Any, source: str, encoded: Encoded, activation: float, example: int, position: int) -> Snippet:
    ids = encoded.ids

    def text(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=True)

    return Snippet(
        source,
        _round(activation),
        example,
        position,
        text(ids[max(0, position - BEFORE) : position]),
        text([ids[position]]),
        text(ids[position + 1 : position + 1 + AFTER]),
    )


def _counted_text(tokenizer: Any, encoded: Encoded) -> str:
    """The example's counted tokens decoded, each run of consecutive counted tokens on its own line."""
    runs: list[list[int]] = []
    previous = False
    for token, counted in zip(encoded.ids, encoded.counted, strict=True):
        if counted and not previous:
            runs.append([])
        if counted:
            runs[-1].append(token)
        previous = counted
    text = "\n".join(tokenizer.decode(run, skip_special_tokens=True).strip() for run in runs)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _terms(source: ScoredSource, scorer: str, latents: torch.Tensor) -> list[LatentTerm]:
    from mixopt import sts

    stats = source.result.stats
    if scorer == "icl" and source.icl is not None and source.icl.shift is not None:
        values = sts.latent_terms(source.icl.shift.latents, source.icl.shift.n_tokens, latents, "icl")
    else:  # act_sq's own terms; every other scorer: each latent's mean activation (act's terms)
        values = sts.latent_terms(stats.latents, stats.n_tokens, latents, "act_sq" if scorer == "act_sq" else "act")
    terms = [LatentTerm(int(j), _round(float(v))) for j, v in zip(latents.tolist(), values.tolist(), strict=True)]
    return sorted(terms, key=lambda t: -t.value)


def _top_examples(tokenizer: Any, source: ScoredSource, scorer: str) -> list[TopExample]:
    examples = source.icl_examples if scorer == "icl" and source.icl_examples is not None else source.examples
    per_example = source.score.example_scores
    order = sorted(range(len(per_example)), key=lambda i: (-per_example[i], i))[:TOP_EXAMPLES]
    return [
        TopExample(i, per_example[i], source.score.example_tokens[i], _counted_text(tokenizer, examples[i]))
        for i in order
    ]


def _latent(tokenizer: Any, index: int, shift: float, sources: list[ScoredSource]) -> LatentEvidence:
    mean, frequency, snippets = {}, {}, {}
    for source in sources:
        stats = source.result.stats
        n = max(stats.n_tokens, 1)
        mean[source.name] = _round(float(stats.latents.total[index]) / n)
        frequency[source.name] = _round(float(stats.latents.active[index]) / n)
        top = stats.top
        found: list[Snippet] = []
        seen: set[tuple[str, str, str]] = set()  # examples sharing a prefix give the same window: show it once
        if top is not None:
            for value, example, position in zip(
                top.values[index].tolist(), top.example[index].tolist(), top.position[index].tolist(), strict=True
            ):
                if example < 0 or len(found) == SNIPPETS:
                    continue
                snippet = _snippet(tokenizer, source.name, source.examples[example], value, example, position)
                if (key := (snippet.before, snippet.token, snippet.after)) not in seen:
                    seen.add(key)
                    found.append(snippet)
        snippets[source.name] = found
    return LatentEvidence(index, shift, mean, frequency, snippets)


def collect_evidence(tokenizer: Any, scores: Scores, tokens: str, sources: list[ScoredSource]) -> Evidence:
    """Evidence for `scores` from its scored sources, the target first (`tokenizer`: the model's).

    `tokens`: which tokens were scored (recipe `sts.tokens`), for the scorer's caveat."""
    import torch

    latents = torch.tensor([int(s["index"]) for s in scores.shifted_latents], dtype=torch.long)
    by_shift = [
        _latent(tokenizer, int(s["index"]), float(s["shift"]), sources) for s in scores.shifted_latents
    ]  # one LatentEvidence per shifted latent, largest shift first
    domains = [
        DomainEvidence(s.name, _terms(s, scores.score, latents), _top_examples(tokenizer, s, scores.score))
        for s in sources
        if s.name != scores.target.name
    ]
    return Evidence(scores.score, tokens, scores.target.name, by_shift, domains)


# --------------------------------------------------------------------------------------- explanation


@dataclass
class DomainExplanation:
    """One domain: its score and where it stands, its allocation and what binds it, and why."""

    name: str
    rank: int  # 1 = most exposed by the recipe's scorer
    score: float  # scores.json `sts`: the recipe's scorer
    interval: list[float] | None  # its bootstrap 95% interval
    baseline: float
    similarity: float
    count: int  # allocation.json: rows in the mixture
    share: float  # of the whole mixture
    replay_share: float
    share_interval: list[float] | None  # bootstrap interval of the replay share (stability)
    epochs: float
    binding: list[str]  # constraints at their bound
    latents: list[LatentTerm]  # the shifted latents that carry the score most (see Explanation.terms_are_score)
    top_examples: list[TopExample]  # the examples whose own scores are highest


@dataclass
class Explanation:
    scorer: str
    caveat: str
    terms_are_score: bool  # True: each domain's latent terms sum to its score; False: they describe it only
    target: str
    target_count: int
    target_share: float
    budget: int
    unit: str
    objective: str
    sensitivity: dict[str, dict[str, float]]  # allocation.json: replay shares under changed settings
    domains: list[DomainExplanation]  # by rank
    latents: list[LatentEvidence]  # by shift, largest first
    notes: list[str] = field(default_factory=list)  # the solver's notes (what it skipped)

    @classmethod
    def build(cls, scores: Scores, allocation: Allocation, evidence: Evidence) -> Explanation:
        """Join scores, allocation and their evidence."""
        allocated = {d.name: d for d in allocation.domains}
        found = {d.name: d for d in evidence.domains}
        scored = {d.name for d in scores.domains}
        if scored != set(allocated) or scored != set(found):
            differ = sorted(scored.symmetric_difference(allocated).union(scored.symmetric_difference(found)))
            raise ValueError(f"scores, allocation and explain.json name different domains ({', '.join(differ)})")
        domains = []
        for rank, s in enumerate(scores.ranked(), start=1):
            a, e = allocated[s.name], found[s.name]
            domains.append(
                DomainExplanation(
                    s.name,
                    rank,
                    s.score,
                    s.interval,
                    s.baseline,
                    s.similarity,
                    a.count,
                    a.share,
                    a.replay_share,
                    a.share_interval,
                    a.epochs,
                    a.binding,
                    e.terms[:LATENTS_PER_DOMAIN],
                    e.top_examples,
                )  # fmt: skip
            )
        return cls(
            scorer=scores.score,
            caveat=caveat(scores.score, evidence.tokens),
            terms_are_score=evidence.terms_are_score,
            target=scores.target.name,
            target_count=allocation.target_count,
            target_share=1 - sum(d.share for d in allocation.domains),
            budget=allocation.budget,
            unit=allocation.unit,
            objective=allocation.objective,
            sensitivity=allocation.sensitivity,
            domains=domains,
            latents=evidence.latents,
            notes=list(allocation.notes),
        )

    @classmethod
    def from_run(cls, run: Path) -> Explanation:
        """From a `mixopt plan` output folder (scores.json, allocation.json, explain.json)."""
        from mixopt.scores import Scores
        from mixopt.solver import Allocation

        if not run.is_dir():
            raise MixoptError(f"{run}: not a folder; pass the output folder of `mixopt plan`")
        path = run / "explain.json"
        if not path.exists():
            raise MixoptError(f"{path}: missing; re-run `mixopt plan` with this mixopt (it writes explain.json)")
        try:
            evidence = Evidence.load(path)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MixoptError(f"{path}: not a mixopt explain file ({err}); re-run `mixopt plan`") from None
        scores, allocation = Scores.load(run / "scores.json"), Allocation.load(run / "allocation.json")
        try:
            return cls.build(scores, allocation, evidence)
        except ValueError as err:
            raise MixoptError(f"{run}: {err}; the files come from different runs, re-run `mixopt plan`") from None

    def latent(self, index: int) -> LatentEvidence:
        for latent in self.latents:
            if latent.index == index:
                return latent
        shown = ", ".join(str(latent.index) for latent in self.latents[:10])
        raise MixoptError(f"latent {index} is not a shifted latent of this run; shifted (largest first): {shown}, ...")

    def domain(self, name: str) -> DomainExplanation:
        for domain in self.domains:
            if domain.name == name:
                return domain
        names = ", ".join(d.name for d in self.domains)
        raise MixoptError(f"no domain '{name}' in this run; domains: {names}")

    def select(self, domain: str | None = None, latent: int | None = None) -> Explanation:
        """The part `explain --domain/--latent` shows: a domain and the latents that carry it, a latent
        alone, or both; everything when neither is given."""
        if domain is None and latent is None:
            return self
        domains = [self.domain(domain)] if domain is not None else []
        if latent is not None:
            latents = [self.latent(latent)]
        else:
            carrying = {t.index for t in domains[0].latents}
            latents = [x for x in self.latents if x.index in carrying]
        return Explanation(**{**self.__dict__, "domains": domains, "latents": latents})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
