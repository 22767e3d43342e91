"""The allocation solver: exact integer budgets, constraints, objectives, infeasibility messages, scale."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mixopt.errors import InfeasibleError, MixoptError
from mixopt.recipe import AllocationSpec, DomainSpec, GroupConstraint, SourceSpec
from mixopt.solver import (
    Allocation,
    DomainLimits,
    limits_from_domains,
    risk_weights,
    round_to_budget,
    solve_allocation,
    static_conflicts,
)
from tests.helpers import make_scores

SOLVER_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])


def spec(**fields) -> AllocationSpec:
    """An AllocationSpec without the bootstrap (slow and irrelevant to most tests)."""
    return AllocationSpec(**{"stability": 0, **fields})


@st.composite
def feasible_problems(draw):
    """Scores, limits and a budget whose constraints can all hold (static checks are complete without groups)."""
    n = draw(st.integers(1, 6))
    sts = draw(st.lists(st.floats(-2, 5, allow_nan=False), min_size=n, max_size=n))
    available = draw(st.lists(st.integers(1, 400), min_size=n, max_size=n))
    replay = draw(st.integers(1, sum(available)))
    lower = draw(st.lists(st.floats(0, 0.3), min_size=n, max_size=n))
    width = draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    limits = {f"d{j}": DomainLimits(lower[j], min(1.0, lower[j] + width[j])) for j in range(n)}
    scores = make_scores(sts, available=available)
    names = [d.name for d in scores.domains]
    allocation_spec = spec(objective=draw(st.sampled_from(["minimax", "utility", "proportional"])))
    assume(not static_conflicts(names, available, None, allocation_spec, limits, 2 * replay))
    return scores, limits, allocation_spec, 2 * replay


@SOLVER_SETTINGS
@given(feasible_problems())
def test_counts__are_whole_numbers_summing_exactly_to_the_replay_budget_within_shares_and_supply(problem):
    scores, limits, allocation_spec, budget = problem
    allocation = solve_allocation(scores, allocation_spec, limits, budget=budget)
    replay = budget // 2
    counts = [d.count for d in allocation.domains]
    assert all(isinstance(c, int) and c >= 0 for c in counts)
    assert sum(counts) == replay == allocation.replay_budget
    assert allocation.target_count == budget - replay
    for d, score in zip(allocation.domains, scores.domains, strict=True):
        assert d.count <= score.available  # max_epochs = 1: never more than once through a domain
        assert math.floor(limits[d.name].min_share * replay - 1e-9) <= d.count
        assert d.count <= math.ceil(limits[d.name].max_share * replay + 1e-9)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_round_to_budget__hits_the_total_within_integer_caps_and_floors(data):
    n = data.draw(st.integers(1, 12))
    caps = np.array(data.draw(st.lists(st.floats(0, 50), min_size=n, max_size=n)))
    floors = caps * np.array(data.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n)))
    lo, hi = np.ceil(floors - 1e-9), np.floor(caps + 1e-9)
    assume((lo <= hi).all())  # an integer inside every [floor, cap]; widening is tested below
    total = data.draw(st.integers(int(lo.sum()), int(hi.sum())))
    t = (total - floors.sum()) / max(caps.sum() - floors.sum(), 1e-12)
    amounts = floors + (caps - floors) * min(max(t, 0.0), 1.0)  # feasible amounts, roughly on the total
    counts = np.array(round_to_budget(amounts, total, caps, floors))
    assert counts.sum() == total
    assert (lo <= counts).all() and (counts <= hi).all()


def test_round_to_budget__widens_a_cap_only_when_the_integer_caps_cannot_reach_the_total():
    assert sorted(round_to_budget([10 / 3] * 3, 10, caps=[10 / 3] * 3)) == [3, 3, 4]
    assert round_to_budget([2.5, 2.5], 5, caps=[2, 10]) == [2, 3]


def test_proportional__equals_normalised_scores_when_no_cap_binds():
    sts = [0.5, 1.0, 2.0, 3.5]
    scores = make_scores(sts, available=10_000_000, target_available=10_000_000)
    allocation = solve_allocation(scores, spec(objective="proportional"), budget=2_000_000)
    shares = [d.replay_share for d in allocation.domains]
    np.testing.assert_allclose(shares, np.array(sts) / sum(sts), atol=1e-4)
    assert all(d.binding == [] for d in allocation.domains)


@SOLVER_SETTINGS
@given(
    st.lists(st.floats(0.1, 5), min_size=2, max_size=5),
    st.data(),
    st.sampled_from(["minimax", "utility"]),
)
def test_raising_a_domains_sts__never_lowers_its_count(sts, data, objective):
    available = data.draw(st.lists(st.integers(1000, 5000), min_size=len(sts), max_size=len(sts)))  # some caps bind
    k = data.draw(st.integers(0, len(sts) - 1))
    raised = [s * (data.draw(st.floats(1.1, 3.0)) if j == k else 1.0) for j, s in enumerate(sts)]
    before = solve_allocation(make_scores(sts, available=available), spec(objective=objective), budget=4000)
    after = solve_allocation(make_scores(raised, available=available), spec(objective=objective), budget=4000)
    assert after.domains[k].count >= before.domains[k].count - 1  # -1: rounding may move one unit


@pytest.mark.parametrize("objective", ["minimax", "utility", "proportional"])
@pytest.mark.parametrize("n, budget", [(3, 1000), (7, 1001), (16, 333)])
def test_equal_scores_with_uniform_prior__give_equal_counts_up_to_rounding(objective, n, budget):
    allocation = solve_allocation(make_scores([2.0] * n), spec(objective=objective, prior="uniform"), budget=budget)
    counts = [d.count for d in allocation.domains]
    assert max(counts) - min(counts) <= 1


INFEASIBLE = [
    ({}, {"d0": DomainLimits(0.7), "d1": DomainLimits(0.6)}, 1000, r"min shares sum to 1\.30 > 1"),
    ({}, {f"d{j}": DomainLimits(0, 0.2) for j in range(4)}, 1000, r"max shares sum to 0\.80 < 1"),
    ({}, {}, 20_000, r"domains can supply at most 1,840 examples with max_epochs=1 but the replay budget is 10,000"),
    ({}, {"d0": DomainLimits(0.3)}, 1000, r"domain 'd0' needs min_share 0\.3 x replay budget 500 = 150 examples"),
    (
        {"groups": [GroupConstraint(tag="stem", min_share=0.5)]},
        {"d0": DomainLimits(0, 0.2, ["stem"]), "d1": DomainLimits(0, 0.2, ["stem"])},
        1000,
        r"group 'stem' needs at least 0\.50 of the replay budget but its domains' max shares sum to 0\.40",
    ),
    (
        {"groups": [GroupConstraint(tag="stem", max_share=0.2)]},
        {"d0": DomainLimits(0.15, 1, ["stem"]), "d1": DomainLimits(0.15, 1, ["stem"])},
        1000,
        r"group 'stem' allows at most 0\.20 of the replay budget but its domains' min shares sum to 0\.30",
    ),
    ({"target_fraction": 0.9}, {}, 2000, r"the target needs 1,800 examples .* at most 1,000 examples"),
    (
        {"groups": [GroupConstraint(tag="a", max_share=0.3), GroupConstraint(tag="b", max_share=0.3)]},
        {
            "d0": DomainLimits(groups=["a"]),
            "d1": DomainLimits(groups=["a"]),
            "d2": DomainLimits(groups=["b"]),
            "d3": DomainLimits(groups=["b"]),
        },
        1000,
        r"infeasible: constraint family groups conflicts with the budget \(dropping it makes the problem feasible\)",
    ),
]


@pytest.mark.parametrize("fields, limits, budget, message", INFEASIBLE)
def test_infeasible_constraints__raise_a_message_with_the_numbers(fields, limits, budget, message):
    scores = make_scores([1.0, 2.0, 3.0, 4.0], available=[100, 240, 500, 1000], target_available=1000)
    with pytest.raises(InfeasibleError, match=message):
        solve_allocation(scores, spec(**fields), limits, budget=budget)


def test_no_budget__raises_with_the_fix():
    with pytest.raises(InfeasibleError, match=r"no budget: pass --budget N or set allocation\.budget"):
        solve_allocation(make_scores([1.0, 2.0]), spec())


def test_limits_for_an_unscored_domain__raise():
    with pytest.raises(MixoptError, match="domains typo have no score"):
        solve_allocation(make_scores([1.0, 2.0]), spec(), {"typo": DomainLimits(0.1)}, budget=100)


def test_static_conflicts__are_empty_for_a_feasible_recipe_and_skip_tokens_without_sizes():
    names, available = ["a", "b"], [100, 100]
    assert static_conflicts(names, available, [50.0, 80.0], spec(), None, 200) == []
    assert static_conflicts(names, available, None, spec(unit="tokens"), None, 10**9) == []


def test_tokens_unit__counts_whole_examples_whose_tokens_fill_the_replay_budget():
    scores = make_scores([1.0, 2.0, 3.0], available=10_000, mean_tokens=[50.0, 120.0, 300.0], target_mean_tokens=80.0)
    allocation = solve_allocation(scores, spec(unit="tokens"), budget=400_000)
    assert allocation.target_count == 2500 and allocation.target_tokens == 200_000
    tokens = [d.tokens for d in allocation.domains]
    assert all(t == d.count * size for t, d, size in zip(tokens, allocation.domains, [50, 120, 300], strict=True))
    assert abs(sum(tokens) - allocation.replay_budget) <= 50 + 120 + 300  # whole examples: each off by < 1
    assert math.isclose(sum(d.replay_share for d in allocation.domains), 1.0, abs_tol=1e-5)


def test_stability__intervals_contain_the_point_share():
    rng = np.random.default_rng(1)
    examples = [list(rng.normal(mean, 1.0, 40)) for mean in (2.0, 3.0, 4.0, 5.0)]
    scores = make_scores([2.0, 3.0, 4.0, 5.0], available=5000, example_scores=examples)
    for objective in ("minimax", "proportional"):
        allocation = solve_allocation(scores, spec(objective=objective, stability=40), budget=4000)
        assert allocation.settings["stability"] == 40
        for d in allocation.domains:
            low, high = d.share_interval
            unit = 1 / allocation.replay_budget  # the point share is rounded to whole examples
            assert low - unit <= d.replay_share <= high + unit
        assert any(d.share_interval[1] - d.share_interval[0] > 1e-3 for d in allocation.domains)


def test_stability__is_skipped_with_a_note_when_scores_carry_no_examples():
    allocation = solve_allocation(make_scores([1.0, 2.0]), spec(stability=10), budget=100)
    assert allocation.domains[0].share_interval is None
    assert "no per-example scores" in allocation.notes[0]


def test_sensitivity__reports_replay_shares_at_half_and_double_the_parameters():
    scores = make_scores([1.0, 2.0, 4.0])
    minimax = solve_allocation(scores, spec(objective="minimax"), budget=1000)
    assert set(minimax.sensitivity) == {"lambda x0.5", "lambda x2", "alpha x0.5", "alpha x2"}
    assert math.isclose(sum(minimax.sensitivity["lambda x2"].values()), 1.0, abs_tol=1e-4)
    assert set(solve_allocation(scores, spec(objective="utility"), budget=1000).sensitivity) == {
        "scale x0.5",
        "scale x2",
    }


def test_binding__names_the_constraints_a_domain_sits_on():
    scores = make_scores([0.5, 5.0, 5.0, 1.0], available=[1000, 100, 1000, 1000])
    limits = {"d0": DomainLimits(min_share=0.2), "d2": DomainLimits(max_share=0.4)}
    allocation = solve_allocation(scores, spec(objective="proportional"), limits, budget=1000)
    assert [d.binding for d in allocation.domains] == [["min_share"], ["max_epochs"], ["max_share"], []]
    assert [d.count for d in allocation.domains] == [100, 100, 200, 100]


def test_group_binding__is_reported_on_every_member():
    scores = make_scores([1.0, 1.0, 5.0])
    groups = [GroupConstraint(tag="stem", min_share=0.6)]
    limits = {"d0": DomainLimits(groups=["stem"]), "d1": DomainLimits(groups=["stem"])}
    allocation = solve_allocation(scores, spec(objective="utility", groups=groups), limits, budget=1000)
    assert [d.binding for d in allocation.domains] == [["group:stem"], ["group:stem"], []]
    assert allocation.domains[0].count + allocation.domains[1].count == 300


def test_risk_weights__shift_non_positive_scores_and_keep_their_order():
    w = risk_weights([-1.0, 0.0, 2.0])
    assert math.isclose(w.sum(), 1.0) and (w > 0).all() and list(np.argsort(w)) == [0, 1, 2]
    np.testing.assert_allclose(risk_weights([1.0, 3.0]), [0.25, 0.75])


def test_allocation__round_trips_through_json_with_the_documented_keys(tmp_path):
    allocation = solve_allocation(make_scores([1.0, 2.0]), spec(), budget=100)
    allocation.save(tmp_path / "allocation.json")
    data = json.loads((tmp_path / "allocation.json").read_text())
    for key in ("budget", "unit", "objective", "status", "solver", "solve_seconds", "target_fraction", "domains"):
        assert key in data
    assert {"name", "score", "count", "share", "epochs"} <= set(data["domains"][0])
    assert "share_interval" not in data["domains"][0]  # stability did not run
    assert Allocation.load(tmp_path / "allocation.json") == allocation


def test_table__has_a_row_per_domain_and_the_target():
    table = solve_allocation(make_scores([1.0, 2.0]), spec(), budget=100).table()
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["domain", "score", "count", "tokens", "share", "epochs"]
    assert [line.split()[0] for line in lines[1:]] == ["(target)", "d0", "d1"]


def test_limits_from_domains__reads_the_recipes_shares_and_groups():
    domain = DomainSpec(name="a", source=SourceSpec(path="a.jsonl"), text="{t}", min_share=0.1, groups=["stem"])
    assert limits_from_domains([domain]) == {"a": DomainLimits(0.1, 1.0, ["stem"])}


def _many_domains(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    available = list(rng.integers(1, 200, n))
    return make_scores(list(rng.lognormal(size=n)), available=available), 20 * n


def test_thousand_domains__solve_with_every_objective():
    scores, budget = _many_domains(1000)
    for objective in ("minimax", "utility", "proportional"):
        allocation = solve_allocation(scores, spec(objective=objective), budget=budget)
        assert sum(d.count for d in allocation.domains) == allocation.replay_budget


@pytest.mark.slow
def test_ten_thousand_domains__solve_in_under_five_seconds_with_minimax():
    scores, budget = _many_domains(10_000)
    start = time.perf_counter()
    allocation = solve_allocation(scores, AllocationSpec(objective="minimax"), budget=budget)
    assert time.perf_counter() - start < 5.0
    assert allocation.status == "optimal" and sum(d.count for d in allocation.domains) == allocation.replay_budget
    assert any("stability skipped" in note for note in allocation.notes)
