"""The `protect` objective: transfer-aware allocation, checked against minimax, a brute-force grid and
finite differences of its duals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import rel_entr

from mixopt.cli import cli
from mixopt.errors import MixoptError
from mixopt.recipe import AllocationSpec
from mixopt.scores import Scores, Transfer
from mixopt.solver import DomainLimits, solve_allocation
from tests.helpers import make_scores

BIG = 2_000_000  # examples: rounding to whole examples moves a share by < 1e-6


def spec(**fields) -> AllocationSpec:
    return AllocationSpec(**{"stability": 0, "objective": "protect", **fields})


def with_transfer(scores: Scores, matrix: list[list[float]], order: list[str] | None = None) -> Scores:
    names = order or [d.name for d in scores.domains]
    scores.transfer = Transfer(names, matrix, "test")
    return scores


def replay_shares(allocation) -> np.ndarray:
    return np.array([d.replay_share for d in allocation.domains])


@pytest.mark.parametrize("seed", range(5))
def test_protect_with_identity_transfer__ranks_domains_as_minimax_does(seed: int) -> None:
    forecasts = np.random.default_rng(seed).uniform(0.1, 3.0, 6)
    scores = make_scores(list(forecasts), available=BIG, target_available=BIG)
    protect = solve_allocation(scores, spec(), budget=BIG)
    minimax = solve_allocation(scores, spec(objective="minimax"), budget=BIG)
    assert list(np.argsort(replay_shares(protect))) == list(np.argsort(replay_shares(minimax)))
    assert list(np.argsort(replay_shares(protect))) == list(np.argsort(forecasts))
    assert "T = identity" in " ".join(protect.notes) and protect.settings["transfer"] == "identity"


def test_protect_with_identity_transfer__leaves_every_domain_the_same_change() -> None:
    """T = I, forecasts within one range of each other: the optimum equalises f_j - s x_j / c."""
    forecasts = [0.2, 0.5, 0.9, 1.4]
    allocation = solve_allocation(make_scores(forecasts, available=BIG, target_available=BIG), spec(), budget=BIG)
    changes = [d.protected_change for d in allocation.domains]
    np.testing.assert_allclose(changes, changes[0], atol=1e-5)
    c = allocation.settings["scale"]
    for d, f in zip(allocation.domains, forecasts, strict=True):  # recomputed from the counts, as documented
        assert math.isclose(d.protected_change, f - 1.2 * d.count / c, abs_tol=1e-5)  # s = 1.4 - 0.2


def test_a_domain_with_no_forecast_change_and_no_transfer__gets_only_its_min_share() -> None:
    scores = with_transfer(
        make_scores([1.0, 0.6, 0.0], available=BIG, target_available=BIG),
        [[1.0, 0.2, 0.0], [0.3, 1.0, 0.0], [0.0, 0.0, 0.0]],
    )
    replay = BIG // 2
    # scale: c = 10 R, so replay is weak and the other two domains stay worse off than d2's 0
    for min_share in (0.0, 0.05):
        limits = {"d2": DomainLimits(min_share=min_share)}
        allocation = solve_allocation(scores, spec(kl_weight=0.0, scale=10.0 * replay), limits, budget=BIG)
        assert allocation.domains[2].count == round(min_share * replay)
        assert allocation.domains[2].protected_change == 0.0


def _grid_objective(f, transfer, ratio, kl_weight, lower, upper, step=1 / 1500):
    """The documented objective on every point of a simplex grid of step `step` within the share bounds."""
    k = round(1 / step)
    a, b = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
    keep = a + b <= k
    p = np.stack([a[keep], b[keep], k - a[keep] - b[keep]], axis=1) / k  # (points, 3)
    p = p[((p >= lower - 1e-12) & (p <= upper + 1e-12)).all(axis=1)]
    s = f.max() - f.min()
    t_hat = transfer / np.mean(np.diag(transfer))
    d = f / s - (ratio * p) @ t_hat  # (points, 3): f_j / s - sum_i (x_i / c) T_ij, x / c = (R / c) p
    value = d.max(1) + 0.1 * d.mean(1) + kl_weight * rel_entr(p, 1 / 3).sum(1)
    best = int(np.argmin(value))
    return value[best], s * d[best].max()


@pytest.mark.parametrize("kl_weight", [0.0, 0.1])
def test_protect__objective_and_worst_change_equal_a_brute_force_grid_on_three_domains(kl_weight: float) -> None:
    f = np.array([0.3, -0.2, 0.5])
    transfer = np.array([[1.0, 0.4, -0.2], [0.1, 0.6, 0.3], [0.0, 0.2, 1.4]])
    lower, upper = np.array([0.0, 0.1, 0.0]), np.array([1.0, 1.0, 0.45])
    scores = with_transfer(make_scores(list(f), available=BIG, target_available=BIG), transfer.tolist())
    limits = {"d1": DomainLimits(min_share=0.1), "d2": DomainLimits(max_share=0.45)}
    allocation = solve_allocation(scores, spec(kl_weight=kl_weight, scale=BIG / 4), limits, budget=BIG)
    ratio = (BIG / 2) / (BIG / 4)
    value, worst = _grid_objective(f, transfer, ratio, kl_weight, lower, upper)
    assert allocation.objective_value == pytest.approx(value, abs=2e-3)
    assert max(d.protected_change for d in allocation.domains) == pytest.approx(worst, abs=5e-3)
    assert allocation.objective_value <= value + 1e-6  # the solver's optimum is never above a grid point


def test_protect__duals_are_reported_and_match_finite_differences() -> None:
    scores = with_transfer(
        make_scores([1.0, 0.7, 0.1], available=BIG, target_available=BIG),
        [[1.0, 0.3, 0.0], [0.2, 1.0, 0.1], [0.0, 0.0, 0.5]],
    )

    def solved(min_share: float):
        limits = {"d2": DomainLimits(min_share=min_share)}
        return solve_allocation(scores, spec(kl_weight=0.0, scale=4.0 * BIG), limits, budget=BIG)

    base, raised = solved(0.2), solved(0.21)
    worst = [d.duals.get("worst", 0.0) for d in base.domains]
    assert math.isclose(sum(worst), 1.0, abs_tol=1e-4)  # the max's weights
    assert worst[2] == 0.0  # d2 is not among the worst
    assert base.domains[2].binding == ["min_share"]
    slope = (raised.objective_value - base.objective_value) / 0.01  # an LP: exactly linear near the optimum
    assert base.domains[2].duals["min_share"] == pytest.approx(slope, rel=1e-3)
    assert "min_share" not in base.domains[0].duals


def test_transfer__rows_in_another_order_give_the_same_allocation() -> None:
    matrix = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.2], [0.3, 0.0, 2.0]])
    forward = with_transfer(make_scores([0.4, 0.9, 0.1]), matrix.tolist())
    order = [2, 0, 1]
    shuffled = with_transfer(
        make_scores([0.4, 0.9, 0.1]), matrix[np.ix_(order, order)].tolist(), [f"d{j}" for j in order]
    )
    a, b = (solve_allocation(s, spec(), budget=1000) for s in (forward, shuffled))
    assert [d.count for d in a.domains] == [d.count for d in b.domains]
    assert "divided by its mean diagonal 1.333" in a.settings["transfer"]


@pytest.mark.parametrize(
    "domains, matrix, message",
    [
        (["d0", "d1"], [[1, 0], [0, 1]], r"no row for domains d2"),
        (["d0", "d1", "d2", "x"], np.eye(4).tolist(), r"rows for unscored domains x"),
        (["d0", "d1", "d2"], [[1, 0], [0, 1]], r"matrix is \(2, 2\), expected 3 x 3"),
        (["d0", "d1", "d2"], (-np.eye(3)).tolist(), r"mean diagonal is -1; it must be positive"),
    ],
)
def test_transfer__that_does_not_fit_the_domains_is_named(domains, matrix, message) -> None:
    scores = make_scores([0.1, 0.2, 0.3])
    scores.transfer = Transfer(domains, matrix)
    with pytest.raises(MixoptError, match=message):
        solve_allocation(scores, spec(), budget=100)


def test_scores__round_trip_the_transfer_and_read_files_without_one(tmp_path: Path) -> None:
    scores = with_transfer(make_scores([0.1, 0.2]), [[1.0, 0.5], [0.25, 1.0]])
    scores.save(tmp_path / "scores.json")
    assert Scores.load(tmp_path / "scores.json") == scores
    data = json.loads((tmp_path / "scores.json").read_text())
    del data["transfer"]  # a file written before the field existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert Scores.load(tmp_path / "old.json").transfer is None


def test_protect__bootstrap_intervals_contain_the_point_share() -> None:
    rng = np.random.default_rng(3)
    examples = [list(rng.normal(mean, 0.5, 40)) for mean in (0.2, 0.5, 0.9)]
    scores = make_scores([0.2, 0.5, 0.9], available=5000, example_scores=examples)
    allocation = solve_allocation(scores, spec(stability=30), budget=4000)
    for d in allocation.domains:
        low, high = d.share_interval
        assert low - 1 / allocation.replay_budget <= d.replay_share <= high + 1 / allocation.replay_budget
    assert set(allocation.sensitivity) == {"lambda x0.5", "lambda x2", "scale x0.5", "scale x2"}


def test_solve_cli__protect_prints_the_protected_change_and_says_where_f_and_t_came_from(tmp_path: Path) -> None:
    make_scores([0.1, 0.4, 0.2]).save(tmp_path / "scores.json")
    result = CliRunner().invoke(
        cli, ["solve", str(tmp_path / "scores.json"), "--budget", "600", "--objective", "protect"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].split()[:3] == ["domain", "score", "protected"]
    assert "T = identity" in result.stderr and "no signed forecast" in result.stderr


@pytest.mark.parametrize("objective", ["minimax", "protect", "utility", "proportional"])
def test_duals__of_a_binding_min_share_equal_the_objectives_finite_difference(objective: str) -> None:
    scores = make_scores([3.0, 2.0, 0.5], available=BIG, target_available=BIG)

    def solved(min_share: float):
        limits = {"d2": DomainLimits(min_share=min_share)}
        return solve_allocation(scores, spec(objective=objective), limits, budget=BIG)

    base, raised = solved(0.4), solved(0.401)
    slope = abs(raised.objective_value - base.objective_value) / 0.001  # utility is maximised: it falls
    assert base.domains[2].duals["min_share"] == pytest.approx(slope, rel=5e-3)
    assert base.domains[0].duals.get("min_share") is None
