"""Batching: group token sequences by length under a padded-token budget.

Sorting by length and capping each batch's *padded* size (rows x longest row), not its row count, cuts
padding and keeps the activation memory of every batch the same, whatever the data's length profile.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def length_batches(lengths: Sequence[int], batch_tokens: int) -> Iterator[list[int]]:
    """Indices of sequences, longest first, in batches whose padded size fits `batch_tokens`.

    A sequence longer than `batch_tokens` gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) + 1) * longest > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


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
