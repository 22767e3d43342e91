"""Batching: group token sequences by length under a padded-token budget.

Sorting by length and capping each batch's *padded* size (rows x longest row), not its row count, cuts
padding and keeps the activation memory of every batch the same, whatever the data's length profile.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

# Fixed cost of one batch in padded-token equivalents: per-layer dispatch and small, less efficient matmuls.
BATCH_COST = 64


def length_batches(lengths: Sequence[int], batch_tokens: int, batch_cost: int = BATCH_COST) -> Iterator[list[int]]:
    """Indices of sequences, longest first, in batches whose padded size fits `batch_tokens`.

    The batches cut the length-sorted sequences where padded tokens + `batch_cost` per batch is least
    (an exact dynamic programme over cut points): greedy filling makes each batch span a wide range of
    lengths when lengths are spread out, which padded 20% of the tokens of real chat data. A sequence
    longer than `batch_tokens` gets a batch of its own.

    Example:
        >>> list(length_batches([5, 100, 98, 6, 97], batch_tokens=400, batch_cost=8))
        [[1, 2, 4], [3, 0]]
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    longest = np.array([lengths[i] for i in order], dtype=np.int64)  # descending: row i is its batch's longest
    cost = np.zeros(len(order) + 1)  # cost[j]: least cost of batching the first j sorted sequences
    cut = np.zeros(len(order) + 1, dtype=np.int64)  # where the last batch of that optimum starts
    for j in range(1, len(order) + 1):
        first = np.arange(max(0, j - max(1, batch_tokens // max(int(longest[j - 1]), 1))), j)
        padded = (j - first) * longest[first]
        total = np.where((padded <= batch_tokens) | (first == j - 1), cost[first] + padded + batch_cost, np.inf)
        k = int(np.argmin(total))
        cost[j], cut[j] = total[k], first[k]
    batches, j = [], len(order)
    while j > 0:
        batches.append(order[cut[j] : j])
        j = int(cut[j])
    yield from reversed(batches)


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded: with a causal model, real tokens never see the padding,
    and positions stay 0..n-1 as in an unpadded pass."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[b, : len(row)] = 1
    return ids.to(device), mask.to(device)


def epoch_stream(n: int, count: int, seed: int) -> list[int]:
    """`count` indices into range(n): seeded permutations, one per epoch (`default_rng([seed, epoch])`), read in
    order, so an index repeats only after every index has appeared. The training order of a fine-tune and the
    rows a validation mixture draws."""
    if count > 0 and n == 0:
        raise ValueError(f"cannot draw {count} indices from an empty range")
    stream: list[int] = []
    epoch = 0
    while len(stream) < count:
        stream += np.random.default_rng([seed, epoch]).permutation(n).tolist()
        epoch += 1
    return stream[:count]
