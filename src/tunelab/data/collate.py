"""Batching token rows: dynamic padding to the longest row of the micro-batch."""

from __future__ import annotations

import torch

IGNORE = -100


def pad_collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids with pad_id, labels with -100; attention_mask marks real tokens."""
    longest = max(len(r.input_ids) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r.input_ids)
        input_ids[i, :k] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, :k] = torch.tensor(r.labels, dtype=torch.long)
        attention[i, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
