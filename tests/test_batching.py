"""Length batching: every sequence once, budgets kept, and the least padded-tokens + per-batch cost."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from mixopt.batching import length_batches


def cost(lengths: list[int], batches: list[list[int]], batch_cost: int) -> int:
    return sum(len(b) * max(lengths[i] for i in b) + batch_cost for b in batches)


def brute_force_least_cost(lengths: list[int], budget: int, batch_cost: int) -> int:
    """Every way of cutting the length-sorted sequence into contiguous batches that fit the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = None
    for cuts in itertools.product([False, True], repeat=len(order) - 1):
        batches, current = [], [order[0]]
        for i, cut in zip(order[1:], cuts, strict=True):
            if cut:
                batches.append(current)
                current = []
            current.append(i)
        batches.append(current)
        if all(len(b) == 1 or len(b) * lengths[b[0]] <= budget for b in batches):
            c = cost(lengths, batches, batch_cost)
            best = c if best is None else min(best, c)
    assert best is not None
    return best


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 60), min_size=1, max_size=8),
    budget=st.integers(1, 200),
    batch_cost=st.integers(0, 100),
)
def test_length_batches__are_an_optimal_partition_within_budget(
    lengths: list[int], budget: int, batch_cost: int
) -> None:
    batches = list(length_batches(lengths, budget, batch_cost))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in batches)
    assert cost(lengths, batches, batch_cost) == brute_force_least_cost(lengths, budget, batch_cost)


def test_length_batches__cut_at_the_length_gap_greedy_filling_pads_across() -> None:
    lengths = [100, 99, 98, 10, 9, 8]  # greedy fills one batch of 6 x 100 = 600 padded tokens for 324 real
    assert list(length_batches(lengths, batch_tokens=1000, batch_cost=32)) == [[0, 1, 2], [3, 4, 5]]
