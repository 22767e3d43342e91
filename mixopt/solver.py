"""Allocation: how much of each domain's replay data goes into the fine-tuning mixture (DESIGN.md section 4).

The target takes `target_fraction` of the budget B; the rest, the replay budget R, is split across the
domains. The convex problem is written in replay shares p = x / R (x: examples or tokens of each domain),
so its numbers do not depend on the budget's unit or size (`_build_model` solves it in z = n p):

    minimise    max_i w_i (1 + x_i / c)^(-alpha) + lambda KL(p || prior)        (`minimax`)
    maximise    sum_i w_i log(1 + x_i / c)                                      (`utility`)
    minimise    || p - w ||^2                                                   (`proportional`)
    subject to  sum_i p_i = 1,  min_share_i <= p_i <= max_share_i,
                x_i <= max_epochs * available_i,  group min <= sum_{i in g} p_i <= group max

with risk weights w = normalised STS (`risk_weights`) and scale c (default R / n). The continuous
solution is rounded to whole examples (`round_to_budget`). No torch import: `mixopt solve` stays fast.

Example:
    >>> from mixopt.scores import Scores
    >>> from mixopt.recipe import AllocationSpec
    >>> scores = Scores.load("runs/quickstart/scores.json")                    # doctest: +SKIP
    >>> print(solve_allocation(scores, AllocationSpec(budget=2000)).table())  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from mixopt.errors import InfeasibleError, MixoptError
from mixopt.recipe import AllocationSpec, DomainSpec
from mixopt.scores import DomainScore, Scores
from mixopt.stats import resampled_means

MEAN_RISK_WEIGHT = 0.1  # minimax tie-break: weight of the mean risk beside the max
SOLVERS = ("CLARABEL", "SCS")  # Clarabel first (exact cones, fast); SCS when Clarabel fails
SOLVED = (cp.OPTIMAL, cp.OPTIMAL_INACCURATE)
FAMILIES = ("min_share", "max_share", "max_epochs", "groups")  # constraint families, for diagnosis
WEIGHT_EPS = 1e-3  # keeps the least exposed domain's weight above zero when STS are shifted
ACTIVE_RTOL, ACTIVE_ATOL = 1e-4, 1e-9  # a share this close to its bound counts as binding
DPP_MAX_DOMAINS = 1_000  # above this, cvxpy's DPP compile costs more than it saves (8-13 s at n=10,000)
RESOLVE_MAX_DOMAINS = 2_000  # above this, only the point solution: no bootstrap, no sensitivity re-solves
TOLERANCE = 1e-9


@dataclass
class DomainLimits:
    """Per-domain constraints; shares are fractions of the replay part (budget minus the target's part)."""

    min_share: float = 0.0
    max_share: float = 1.0
    groups: list[str] = field(default_factory=list)


@dataclass
class DomainAllocation:
    name: str
    score: float  # the recipe scorer's value the allocation read
    count: int  # examples in the mixture
    share: float  # of the whole mixture (target included), in the budget's unit
    replay_share: float  # of the replay part, in the budget's unit
    tokens: int | None  # count * mean tokens (as `Allocation.count` says); None when unknown
    epochs: float  # count / available
    binding: list[str] = field(default_factory=list)  # constraints at their bound: "max_epochs", "group:stem"
    share_interval: list[float] | None = None  # bootstrap 2.5-97.5 percentile of replay_share

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DomainAllocation:
        if "score" not in data and "sts" in data:  # allocation.json written before the rename
            data = {**data, "score": data["sts"]}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Allocation:
    """The solved mixture: what `mixopt solve` prints and `allocation.json` holds."""

    budget: int
    unit: str  # "examples" or "tokens"
    objective: str
    status: str  # cvxpy status of the main solve: "optimal" or "optimal_inaccurate"
    solver: str  # the solver that produced it
    solve_seconds: float  # build + compile + solve of the main problem
    objective_value: float
    target_fraction: float
    target_count: int
    target_tokens: int | None
    count: str  # "response" or "all": which tokens a token budget (and `tokens`) counts
    domains: list[DomainAllocation]
    replay_budget: int = 0  # R = budget - the target's part
    sensitivity: dict[str, dict[str, float]] = field(default_factory=dict)  # "lambda x0.5" -> replay shares
    settings: dict[str, Any] = field(default_factory=dict)  # alpha, lambda, scale, prior, max_epochs, ...
    notes: list[str] = field(default_factory=list)  # what was skipped, and why

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for domain in data["domains"]:
            if domain["share_interval"] is None:
                del domain["share_interval"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Allocation:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        data["domains"] = [DomainAllocation.from_dict(d) for d in data["domains"]]
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Allocation:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MixoptError(f"{path}: not a mixopt allocation file ({err}); make one with `mixopt solve`") from None

    def table(self) -> str:
        """A plain aligned text table: one row for the target, one per domain."""
        header = ["domain", "score", "count", "tokens", "share", "epochs", "binding"]
        target_tokens = "-" if self.target_tokens is None else f"{self.target_tokens:,}"
        target_share = 1.0 - sum(d.share for d in self.domains)
        rows = [["(target)", "-", f"{self.target_count:,}", target_tokens, f"{target_share:.1%}", "-", ""]]
        for d in self.domains:
            tokens = "-" if d.tokens is None else f"{d.tokens:,}"
            share = f"{d.share:.1%}"
            if d.share_interval is not None:  # the interval is of the replay share
                share += f" (replay {d.share_interval[0]:.1%}-{d.share_interval[1]:.1%})"
            row = [d.name, f"{d.score:.4g}", f"{d.count:,}", tokens, share, f"{d.epochs:.2f}", ", ".join(d.binding)]
            rows.append(row)
        return _aligned([header, *rows], right={1, 2, 3, 4, 5})


def _aligned(rows: list[list[str]], right: set[int]) -> str:
    widths = [max(len(row[j]) for row in rows) for j in range(len(rows[0]))]
    cell = [lambda s, w: s.ljust(w), lambda s, w: s.rjust(w)]
    return "\n".join(
        "  ".join(cell[j in right](s, w) for j, (s, w) in enumerate(zip(row, widths, strict=True))).rstrip()
        for row in rows
    )


def limits_from_domains(domains: Sequence[DomainSpec]) -> dict[str, DomainLimits]:
    """The recipe's per-domain limits (`recipe.domains`), keyed by domain name."""
    return {d.name: DomainLimits(d.min_share, d.max_share, list(d.groups)) for d in domains}


def risk_weights(sts: Sequence[float]) -> np.ndarray:
    """w = s / sum(s): the share of exposure each domain carries.

    STS variants can be zero or negative (e.g. after subtracting a baseline), where ratios mean nothing but
    differences still do; then we shift: s - min(s) + eps * max(max|s|, 1). The shift keeps the order and
    the gaps; eps keeps the least exposed domain's weight above zero, so its risk term stays in the
    objective instead of leaving its amount to the prior alone.
    """
    s = np.asarray(sts, dtype=float)  # (n,)
    if s.min() <= 0:
        s = s - s.min() + WEIGHT_EPS * max(np.abs(s).max(), 1.0)
    return s / s.sum()


# ----------------------------------------------------------------------------------------------- rounding


def round_to_budget(
    amounts: Sequence[float],
    total: int,
    caps: Sequence[float] | None = None,
    floors: Sequence[float] | None = None,
) -> list[int]:
    """Whole numbers that sum exactly to `total`, each within [ceil(floor), floor(cap)], near `amounts`.

    Largest remainder: start from floor(amount) clipped to the bounds, then hand the missing units to the
    largest fractional parts (or take surplus units from the smallest). Where integer bounds inside
    [floor, cap] cannot meet the total (e.g. three caps of 3.33 and a total of 10), a bound widens to the
    nearest integer outside it: ceil(cap) or floor(floor). Raises ValueError if even that cannot.
    """
    a = np.asarray(amounts, dtype=float)  # (n,)
    cap = np.full(a.shape, np.inf) if caps is None else np.asarray(caps, dtype=float)
    floor = np.zeros(a.shape) if floors is None else np.asarray(floors, dtype=float)
    lo, hi = _integer_bounds(floor, cap, total)
    counts = np.clip(np.floor(a), lo, hi)
    deficit = a - counts  # what each count still lacks; the fractional part before clipping
    missing = total - int(counts.sum())
    while missing != 0:  # the repair pass: a unit at a time to (or from) the most deserving counts
        step = 1 if missing > 0 else -1
        movable = np.flatnonzero(counts < hi) if step > 0 else np.flatnonzero(counts > lo)
        if movable.size == 0:
            raise ValueError(f"cannot round {a.sum():.6g} to {total} within the caps and floors")
        order = movable[np.argsort(-step * deficit[movable], kind="stable")][: abs(missing)]
        counts[order] += step
        deficit[order] -= step
        missing -= step * order.size
    return [int(c) for c in counts]


def _integer_bounds(floor: np.ndarray, cap: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.ceil(floor - TOLERANCE), np.floor(cap + TOLERANCE)
    loose_lo, loose_hi = np.floor(floor + TOLERANCE), np.ceil(cap - TOLERANCE)
    empty = lo > hi  # no integer inside [floor, cap]: widen this one
    lo, hi = np.where(empty, loose_lo, lo), np.where(empty, loose_hi, hi)
    if lo.sum() > total:
        lo = np.minimum(loose_lo, hi)
    if hi.sum() < total:
        hi = np.maximum(loose_hi, lo)
    if lo.sum() > total or hi.sum() < total or (lo > hi).any():
        raise ValueError(f"no whole numbers within the caps and floors sum to {total}")
    return lo, hi


# ------------------------------------------------------------------------------------- static conflicts


def _int(x: float) -> str:
    return f"{math.floor(x + 1e-9):,}"


def static_conflicts(
    names: Sequence[str],
    available: Sequence[int],
    mean_tokens: Sequence[float] | None,
    spec: AllocationSpec,
    limits: dict[str, DomainLimits] | None,
    budget: int,
    *,
    target_available: int | None = None,
    target_mean_tokens: float | None = None,
) -> list[str]:
    """Conflicts visible without a solver, each with its numbers; empty when none is found.

    `available`: examples each domain offers; `mean_tokens`: tokens per example as `spec.count` counts
    them (needed for a token budget; None skips the token checks). The target's numbers are optional.
    """
    limits = limits or {}
    lower = np.array([limits.get(n, DomainLimits()).min_share for n in names], dtype=float)
    upper = np.minimum([limits.get(n, DomainLimits()).max_share for n in names], 1.0)
    tokens = spec.unit == "tokens"
    unit = "tokens" if tokens else "examples"
    target_part = round(spec.target_fraction * budget)
    replay = budget - target_part
    if replay <= 0:
        return [
            f"budget {budget:,} leaves no replay part after the target's {target_part:,} "
            f"(target_fraction {spec.target_fraction:g}); raise the budget or lower target_fraction"
        ]
    conflicts = _share_conflicts(names, lower, upper)
    if tokens and mean_tokens is None:
        supply = None
    else:
        size = np.asarray(mean_tokens, dtype=float) if tokens else np.ones(len(names))
        supply = np.floor(spec.max_epochs * np.asarray(available, dtype=float) + 1e-9) * size  # (n,) in unit
        conflicts += _supply_conflicts(names, lower, upper, supply, replay, spec.max_epochs, unit)
    conflicts += _group_conflicts(names, lower, upper, supply, limits, spec, replay, unit)
    if target_available is not None:
        conflicts += _target_conflicts(spec, budget, target_available, target_mean_tokens)
    return conflicts


def _share_conflicts(names: Sequence[str], lower: np.ndarray, upper: np.ndarray) -> list[str]:
    conflicts = [
        f"domain '{n}': min_share {lo:g} > max_share {hi:g}"
        for n, lo, hi in zip(names, lower, upper, strict=True)
        if lo > hi + TOLERANCE
    ]
    if lower.sum() > 1 + TOLERANCE:
        conflicts.append(f"min shares sum to {lower.sum():.2f} > 1; lower some min_share")
    if upper.sum() < 1 - TOLERANCE:
        conflicts.append(f"max shares sum to {upper.sum():.2f} < 1, so shares cannot sum to 1; raise some max_share")
    return conflicts


def _supply_conflicts(
    names: Sequence[str],
    lower: np.ndarray,
    upper: np.ndarray,
    supply: np.ndarray,
    replay: int,
    max_epochs: float,
    unit: str,
) -> list[str]:
    conflicts = []
    if supply.sum() < replay - TOLERANCE:
        conflicts.append(
            f"domains can supply at most {_int(supply.sum())} {unit} with max_epochs={max_epochs:g} "
            f"but the replay budget is {replay:,}; lower the budget or raise max_epochs"
        )
    elif upper.sum() >= 1 - TOLERANCE and np.minimum(upper * replay, supply).sum() < replay - TOLERANCE:
        within = np.minimum(upper * replay, supply).sum()
        conflicts.append(
            f"domains can supply at most {_int(within)} {unit} within their max_share and "
            f"max_epochs={max_epochs:g} limits but the replay budget is {replay:,}"
        )
    for n, lo, cap in zip(names, lower, supply, strict=True):
        if lo * replay > cap + TOLERANCE:
            conflicts.append(
                f"domain '{n}' needs min_share {lo:g} x replay budget {replay:,} = {lo * replay:,.0f} {unit} "
                f"but offers at most {_int(cap)} with max_epochs={max_epochs:g}"
            )
    return conflicts


def _group_conflicts(
    names: Sequence[str],
    lower: np.ndarray,
    upper: np.ndarray,
    supply: np.ndarray | None,
    limits: dict[str, DomainLimits],
    spec: AllocationSpec,
    replay: int,
    unit: str,
) -> list[str]:
    conflicts = []
    for group in spec.groups:
        tag = group.tag
        members = np.array([tag in limits.get(n, DomainLimits()).groups for n in names], dtype=bool)
        if not members.any():
            if group.min_share > 0:
                conflicts.append(f"group '{tag}' has min_share {group.min_share:g} but no domain is tagged '{tag}'")
            continue
        if group.min_share > upper[members].sum() + TOLERANCE:
            conflicts.append(
                f"group '{tag}' needs at least {group.min_share:.2f} of the replay budget "
                f"but its domains' max shares sum to {upper[members].sum():.2f}"
            )
        elif supply is not None and group.min_share * replay > supply[members].sum() + TOLERANCE:
            conflicts.append(
                f"group '{tag}' needs at least {group.min_share * replay:,.0f} {unit} ({group.min_share:g} x "
                f"{replay:,}) but its domains can supply at most {_int(supply[members].sum())} "
                f"with max_epochs={spec.max_epochs:g}"
            )
        if group.max_share < lower[members].sum() - TOLERANCE:
            conflicts.append(
                f"group '{tag}' allows at most {group.max_share:.2f} of the replay budget "
                f"but its domains' min shares sum to {lower[members].sum():.2f}"
            )
    return conflicts


def _target_conflicts(spec: AllocationSpec, budget: int, available: int, mean_tokens: float | None) -> list[str]:
    count, _ = _target_part(spec, budget, mean_tokens)
    if count is None or count <= math.floor(spec.max_epochs * available + 1e-9):
        return []
    need = f"{round(spec.target_fraction * budget):,} {spec.unit}"
    if spec.unit == "tokens":
        need += f" = {count:,} examples of {mean_tokens:.0f} tokens"
    return [
        f"the target needs {need} (target_fraction {spec.target_fraction:g} x budget {budget:,}) but offers "
        f"at most {_int(spec.max_epochs * available)} examples with max_epochs={spec.max_epochs:g} "
        f"({available:,} available); lower the budget or target_fraction"
    ]


def _target_part(spec: AllocationSpec, budget: int, mean_tokens: float | None) -> tuple[int | None, int]:
    """(target examples, target part in the budget's unit); examples None when a token size is unknown."""
    part = round(spec.target_fraction * budget)
    if spec.unit == "examples":
        return part, part
    if not mean_tokens or mean_tokens <= 0:
        return None, part
    return round(part / mean_tokens), part


# ------------------------------------------------------------------------------------------ the problem


@dataclass
class _Problem:
    """The allocation in replay shares p = x / R: every array is (n,), every share a fraction of R."""

    weights: np.ndarray  # w, sums to 1
    lower: np.ndarray  # min_share
    upper: np.ndarray  # max_share
    supply: np.ndarray  # max_epochs * available, in the unit, as a share of R
    prior: np.ndarray  # KL anchor, sums to 1
    ratio: float  # R / c, so that x / c = ratio * p
    membership: sp.csr_matrix  # (groups, n): 1 where domain j carries group g's tag
    group_lower: np.ndarray  # (groups,)
    group_upper: np.ndarray  # (groups,)
    group_tags: list[str]


@dataclass
class _Model:
    """The cvxpy problem, solved in z = n p (see `_build_model`); `solution` and `value` undo the scaling."""

    problem: cp.Problem
    z: cp.Variable  # n p: replay shares relative to uniform
    weights: cp.Parameter  # n w: set by the bootstrap through `set_weights`
    kl_weight: cp.Parameter  # lambda: set by the sensitivity
    value_scale: float  # objective in z units / objective in p units

    def set_weights(self, weights: np.ndarray) -> None:
        self.weights.value = len(weights) * weights

    def solve(self, dpp: bool) -> tuple[str, str]:
        """(solver, status); Clarabel first, SCS when Clarabel errs or cannot decide."""
        status = "solver_error"
        for solver in SOLVERS:
            try:
                with warnings.catch_warnings():  # an inaccurate solution shows in the status we report
                    warnings.simplefilter("ignore", UserWarning)
                    self.problem.solve(solver=solver, ignore_dpp=not dpp)
            except cp.SolverError:
                continue
            status = self.problem.status
            if status in (*SOLVED, cp.INFEASIBLE):
                return solver, status
        return SOLVERS[-1], status

    def solution(self) -> np.ndarray:
        """(n,) replay shares p."""
        z = np.asarray(self.z.value, dtype=float)
        return np.clip(z, 0.0, None) / z.size  # clip: interior points end at -1e-12

    def value(self) -> float:
        return float(self.problem.value) / self.value_scale


def _build_model(
    prob: _Problem, objective: str, alpha: float, kl_weight: float, families: Sequence[str] = FAMILIES
) -> _Model:
    """The objective over z = n p, times n, with n w as weights: the same minimiser as over p, but every
    number is O(1). Over p itself (shares ~1e-4 at n = 10,000) Clarabel stalls (InsufficientProgress)."""
    n = len(prob.weights)
    z = cp.Variable(n, nonneg=True)  # n p
    w = cp.Parameter(n, nonneg=True, value=n * prob.weights)  # n w, mean 1
    lam = cp.Parameter(nonneg=True, value=kl_weight)
    x_over_c = prob.ratio / n * z  # x / c = (R / c) p
    scale = float(n)
    if objective == "minimax":
        # Risk weights n w have mean 1, so the risk term is O(1) at any n and lambda keeps one meaning; with
        # w summing to 1 the KL term would swamp the risk as n grows. The small mean-risk term orders the
        # domains that the max no longer sees once the most exposed one sits at a cap.
        risk = cp.multiply(w, cp.power(1 + x_over_c, -alpha))  # (n,) n w_i (1 + x_i/c)^-alpha
        kl = cp.sum(cp.rel_entr(z, n * prob.prior)) / n  # KL(p || prior) = (1/n) sum_i z_i log(z_i / (n prior_i))
        goal, scale = cp.Minimize(cp.max(risk) + MEAN_RISK_WEIGHT * cp.sum(risk) / n + lam * kl), 1.0
    elif objective == "utility":
        goal = cp.Maximize(w @ cp.log(1 + x_over_c))  # n sum_i w_i log(1 + x_i/c)
    elif objective == "proportional":
        goal, scale = cp.Minimize(cp.sum_squares(z - w)), n**2.0  # n^2 ||p - w||^2: the paper's heuristic
    elif objective == "feasibility":
        goal = cp.Minimize(0)
    else:
        raise MixoptError(f"unknown objective '{objective}'; use minimax, utility or proportional")
    constraints = [cp.sum(z) == n, *_constraints(prob, z, families)]
    return _Model(cp.Problem(goal, constraints), z, w, lam, scale)


def _constraints(prob: _Problem, z: cp.Variable, families: Sequence[str]) -> list[cp.Constraint]:
    """Vectorised: one constraint per family, never one per domain (10,000 domains compile in ~0.1 s).

    Each reads p <= bound, written z <= n bound so that its row is O(1) too.
    """
    n = z.size
    constraints = []
    if "min_share" in families and prob.lower.any():
        constraints.append(z >= n * prob.lower)
    if "max_share" in families and (prob.upper < 1).any():
        constraints.append(z <= n * prob.upper)
    if "max_epochs" in families and (prob.supply < 1).any():
        constraints.append(z <= n * prob.supply)  # x_i <= max_epochs * available_i
    if "groups" in families and prob.group_tags:
        share = prob.membership @ z  # (groups,) n times each group's share
        constraints += [share >= n * prob.group_lower, share <= n * prob.group_upper]
    return constraints


def _binding(prob: _Problem, p: np.ndarray) -> list[list[str]]:
    """Constraints each domain sits on, by activity: the share is at the bound (within ACTIVE_RTOL)."""

    def at(bound: np.ndarray, value: np.ndarray) -> np.ndarray:
        return np.abs(value - bound) <= ACTIVE_RTOL * np.abs(bound) + ACTIVE_ATOL

    active = {
        "min_share": (prob.lower > 0) & at(prob.lower, p),
        "max_share": (prob.upper < 1) & at(prob.upper, p),
        "max_epochs": at(prob.supply, p),
    }
    binding = [[family for family, on in active.items() if on[j]] for j in range(p.size)]
    group_share = prob.membership @ p  # (groups,)
    tight = ((prob.group_lower > 0) & at(prob.group_lower, group_share)) | (
        (prob.group_upper < 1) & at(prob.group_upper, group_share)
    )
    for g in np.flatnonzero(tight):
        for j in prob.membership[g].indices:
            binding[j].append(f"group:{prob.group_tags[g]}")
    return binding


def _diagnose(prob: _Problem) -> str:
    """Which constraint family conflicts with the budget: the ones whose removal makes it feasible."""
    culprits = []
    for family in FAMILIES:
        model = _build_model(prob, "feasibility", 1.0, 0.0, [f for f in FAMILIES if f != family])
        if model.solve(dpp=False)[1] in SOLVED:
            culprits.append(family)
    if len(culprits) == 1:
        return (
            f"infeasible: constraint family {culprits[0]} conflicts with the budget "
            "(dropping it makes the problem feasible)"
        )
    if culprits:
        return (
            f"infeasible: constraint families {', '.join(culprits)} each conflict with the budget "
            "(dropping any one makes the problem feasible)"
        )
    return f"infeasible: constraint families {', '.join(FAMILIES)} conflict together (no single one is to blame)"


# ---------------------------------------------------------------------------------------------- inputs


def _unit_tokens(domain: DomainScore, count: str) -> float:
    """Tokens per example as the recipe's `count` counts them."""
    return float(domain.mean_response_tokens if count == "response" else domain.mean_tokens)


def _check_inputs(scores: Scores, spec: AllocationSpec, limits: dict[str, DomainLimits]) -> None:
    names = [d.name for d in scores.domains]
    if not names:
        raise MixoptError("the scores have no domains; add domains to the recipe and re-run `mixopt score`")
    if unknown := sorted(set(limits) - set(names)):
        raise MixoptError(f"domains {', '.join(unknown)} have no score; re-run `mixopt score` with this recipe")
    if bad := [d.name for d in scores.domains if not math.isfinite(d.score)]:
        raise MixoptError(f"domains {', '.join(bad)} have a non-finite STS; re-run `mixopt score`")
    if spec.unit == "tokens" and (bad := [d.name for d in scores.domains if _unit_tokens(d, spec.count) <= 0]):
        raise MixoptError(
            f"a token budget needs tokens per example, but domains {', '.join(bad)} have none "
            f"(count={spec.count}); use --unit examples or re-run `mixopt score`"
        )


def _problem(scores: Scores, spec: AllocationSpec, limits: dict[str, DomainLimits], replay: int) -> _Problem:
    names = [d.name for d in scores.domains]
    get = [limits.get(n, DomainLimits()) for n in names]
    available = np.array([d.available for d in scores.domains], dtype=float)
    size = _sizes(scores, spec)
    natural = available * size  # the domains' own sizes, in the unit
    prior = np.full(len(names), 1 / len(names)) if spec.prior == "uniform" else natural / natural.sum()
    tags = [g.tag for g in spec.groups]
    pairs = [(g, j) for g, tag in enumerate(tags) for j, lim in enumerate(get) if tag in lim.groups]
    rows, cols = [g for g, _ in pairs], [j for _, j in pairs]
    membership = sp.csr_matrix((np.ones(len(pairs)), (rows, cols)), shape=(len(tags), len(names)))
    return _Problem(
        weights=risk_weights([d.score for d in scores.domains]),
        lower=np.array([lim.min_share for lim in get], dtype=float),
        upper=np.minimum([lim.max_share for lim in get], 1.0),
        supply=np.floor(spec.max_epochs * available + 1e-9) * size / replay,
        prior=np.maximum(prior, 1e-12),  # a domain with nothing available: rel_entr needs prior > 0
        ratio=replay / (spec.scale or replay / len(names)),
        membership=membership,
        group_lower=np.array([g.min_share for g in spec.groups], dtype=float),
        group_upper=np.array([g.max_share for g in spec.groups], dtype=float),
        group_tags=tags,
    )


def _sizes(scores: Scores, spec: AllocationSpec) -> np.ndarray:
    """(n,) amount of the unit in one example: 1 for examples, mean tokens for tokens."""
    if spec.unit == "examples":
        return np.ones(len(scores.domains))
    return np.array([_unit_tokens(d, spec.count) for d in scores.domains], dtype=float)


# ------------------------------------------------------------------------------------------- stability


def _bootstrap_sts(domains: Sequence[DomainScore], resamples: int, rng: np.random.Generator) -> np.ndarray:
    """(resamples, n) STS, each domain's examples resampled with replacement.

    A resample's STS is the token-weighted mean of its example scores, recentred on the reported STS
    (sts + resampled mean - full mean): the same number when the STS is that mean, and still centred when
    a variant is not. Domains without example scores keep their STS.
    """
    sts = np.tile([d.score for d in domains], (resamples, 1))
    for j, d in enumerate(domains):
        scores = np.asarray(d.example_scores, dtype=float)  # (k,)
        if scores.size == 0:
            continue
        weights = np.asarray(d.example_tokens, dtype=float) if len(d.example_tokens) == scores.size else None
        weights = np.ones_like(scores) if weights is None else weights
        sts[:, j] += resampled_means(scores, resamples, rng, weights) - np.average(scores, weights=weights)
    return sts


def _share_intervals(model: _Model, prob: _Problem, sts: np.ndarray, dpp: bool) -> np.ndarray | None:
    """(n, 2) 2.5 and 97.5 percentiles of the replay shares over re-solves with resampled weights."""
    solutions = []
    for row in sts:
        model.set_weights(risk_weights(row))
        if model.solve(dpp)[1] in SOLVED:
            solutions.append(model.solution())
    model.set_weights(prob.weights)
    if not solutions:
        return None
    return np.percentile(np.array(solutions), [2.5, 97.5], axis=0).T


def _sensitivity(
    model: _Model, prob: _Problem, spec: AllocationSpec, names: Sequence[str], dpp: bool
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Replay shares with the objective's parameters halved and doubled: lambda (a Parameter, cheap) and
    alpha for minimax, the scale c for utility (which has no other parameter); none for proportional."""
    if spec.objective == "proportional":
        return {}, []
    if len(names) > RESOLVE_MAX_DOMAINS:
        return {}, [f"sensitivity skipped: more than {RESOLVE_MAX_DOMAINS:,} domains"]
    runs: dict[str, np.ndarray] = {}
    if spec.objective == "minimax" and spec.kl_weight > 0:
        for factor in (0.5, 2.0):
            model.kl_weight.value = spec.kl_weight * factor
            if model.solve(dpp)[1] in SOLVED:
                runs[f"lambda x{factor:g}"] = model.solution()
        model.kl_weight.value = spec.kl_weight
    for factor in (0.5, 2.0):
        if spec.objective == "minimax":
            key, rebuilt = "alpha", _build_model(prob, "minimax", spec.alpha * factor, spec.kl_weight)
        else:
            key, rebuilt = "scale", _build_model(replace(prob, ratio=prob.ratio / factor), "utility", 1.0, 0.0)
        if rebuilt.solve(dpp=False)[1] in SOLVED:  # solved once: DPP's slower compile would not pay
            runs[f"{key} x{factor:g}"] = rebuilt.solution()
    shares = {key: {n: round(float(v), 6) for n, v in zip(names, p, strict=True)} for key, p in runs.items()}
    return shares, []


# -------------------------------------------------------------------------------------------- solving


def solve_allocation(
    scores: Scores,
    spec: AllocationSpec,
    limits: dict[str, DomainLimits] | None = None,
    budget: int | None = None,
    seed: int = 0,
) -> Allocation:
    """Solve the recipe's allocation for `scores`. `budget` overrides `spec.budget`; `seed` the bootstrap.

    Raises InfeasibleError naming the conflict with numbers; MixoptError for unusable scores.
    """
    budget = budget if budget is not None else spec.budget
    if budget is None:
        raise InfeasibleError("no budget: pass --budget N or set allocation.budget")
    limits = limits or {}
    target_count, replay = _checked_budget(scores, spec, limits, budget)
    prob = _problem(scores, spec, limits, replay)
    dpp = len(scores.domains) <= DPP_MAX_DOMAINS

    start = time.perf_counter()
    model = _build_model(prob, spec.objective, spec.alpha, spec.kl_weight)
    solver, status = model.solve(dpp)
    seconds = time.perf_counter() - start
    if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        raise InfeasibleError(_diagnose(prob))
    if status not in SOLVED:
        raise MixoptError(f"the solvers {' and '.join(SOLVERS)} failed (status {status}); try another objective")
    shares, value = model.solution(), model.value()

    names = [d.name for d in scores.domains]
    sensitivity, notes = _sensitivity(model, prob, spec, names, dpp)
    intervals, stability_notes = _stability(model, prob, scores, spec, seed, dpp)
    target_size = _unit_tokens(scores.target, spec.count)
    target_amount = target_count * (1.0 if spec.unit == "examples" else target_size)  # in the unit
    return Allocation(
        budget=budget,
        unit=spec.unit,
        objective=spec.objective,
        status=status,
        solver=solver,
        solve_seconds=round(seconds, 4),
        objective_value=value,
        target_fraction=spec.target_fraction,
        target_count=target_count,
        target_tokens=_tokens(target_count, target_size),
        count=spec.count,
        domains=_domains(scores, spec, prob, shares, intervals, replay, target_amount),
        replay_budget=replay,
        sensitivity=sensitivity,
        settings=_settings(spec, replay / prob.ratio, 0 if intervals is None else spec.stability, seed),
        notes=notes + stability_notes,
    )


def _checked_budget(
    scores: Scores, spec: AllocationSpec, limits: dict[str, DomainLimits], budget: int
) -> tuple[int, int]:
    """(target examples, replay budget R in the unit), after every check that needs no solver."""
    _check_inputs(scores, spec, limits)
    target_size = _unit_tokens(scores.target, spec.count)
    conflicts = static_conflicts(
        [d.name for d in scores.domains],
        [d.available for d in scores.domains],
        list(_sizes(scores, spec)),
        spec,
        limits,
        budget,
        target_available=scores.target.available,
        target_mean_tokens=target_size,
    )
    if conflicts:
        raise InfeasibleError("; ".join(conflicts))
    target_count, target_part = _target_part(spec, budget, target_size)
    if target_count is None:
        raise MixoptError(f"a token budget needs the target's tokens per example (count={spec.count}); it has none")
    return target_count, budget - target_part


def _settings(spec: AllocationSpec, scale: float, stability: int, seed: int) -> dict[str, Any]:
    """The numbers behind the solution, for the manifest: enough to re-solve it."""
    return {
        "alpha": spec.alpha,
        "lambda": spec.kl_weight,
        "prior": spec.prior,
        "max_epochs": spec.max_epochs,
        "scale": scale,  # c, in the budget's unit
        "stability": stability,  # bootstrap re-solves behind share_interval (0: none)
        "seed": seed,
    }


def _stability(
    model: _Model, prob: _Problem, scores: Scores, spec: AllocationSpec, seed: int, dpp: bool
) -> tuple[np.ndarray | None, list[str]]:
    if spec.stability == 0:
        return None, []
    if len(scores.domains) > RESOLVE_MAX_DOMAINS:
        return None, [f"stability skipped: more than {RESOLVE_MAX_DOMAINS:,} domains"]
    if not any(d.example_scores for d in scores.domains):
        return None, ["stability skipped: the scores carry no per-example scores"]
    sts = _bootstrap_sts(scores.domains, spec.stability, np.random.default_rng(seed))
    intervals = _share_intervals(model, prob, sts, dpp)
    return intervals, [] if intervals is not None else ["stability skipped: no bootstrap re-solve succeeded"]


def _tokens(count: int, size: float) -> int | None:
    return round(count * size) if size > 0 else None


def _domains(
    scores: Scores,
    spec: AllocationSpec,
    prob: _Problem,
    shares: np.ndarray,
    intervals: np.ndarray | None,
    replay: int,
    target_amount: float,
) -> list[DomainAllocation]:
    """Round the replay shares to whole examples and describe each domain."""
    size = _sizes(scores, spec)  # (n,) unit per example
    available = np.array([d.available for d in scores.domains], dtype=float)
    amounts = shares * replay / size  # (n,) examples
    caps = np.minimum(prob.upper * replay / size, np.floor(spec.max_epochs * available + 1e-9))
    # Examples: counts sum exactly to R. Tokens: whole examples, so the tokens sum to R only approximately.
    total = replay if spec.unit == "examples" else round(amounts.sum())
    try:
        counts = round_to_budget(amounts, total, caps, prob.lower * replay / size)
    except ValueError as err:  # only near-degenerate bounds get here; the static checks catch the rest
        raise InfeasibleError(f"infeasible in whole examples: {err}") from None
    in_unit = np.array(counts) * size  # (n,) examples or tokens
    replay_share = in_unit / max(in_unit.sum(), 1.0)
    share = in_unit / (in_unit.sum() + target_amount)
    binding = _binding(prob, shares)
    return [
        DomainAllocation(
            name=d.name,
            score=d.score,
            count=count,
            share=round(float(share[j]), 6),
            replay_share=round(float(replay_share[j]), 6),
            tokens=_tokens(count, _unit_tokens(d, spec.count)),
            epochs=round(count / d.available, 4) if d.available else 0.0,
            binding=binding[j],
            share_interval=None if intervals is None else [round(float(v), 6) for v in intervals[j]],
        )
        for j, (d, count) in enumerate(zip(scores.domains, counts, strict=True))
    ]
