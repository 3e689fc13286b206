"""Precision helpers shared by the losses."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half-precision values to float32 for a loss or metric; float32 and float64 pass unchanged.

    `.float()` would also *lower* a float64 computation to float32 (the precision `model.dtype: float64` runs ask
    for, e.g. to check that two computations agree exactly)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
