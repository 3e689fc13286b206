"""Optimizer states as each train.optimizer allocates them, and the transient memory of one optimizer step.

States are counted per tensor: AdamW's two moments, bitsandbytes' 8-bit blocks (and paged variants), Adafactor's
factored moments, GaLore's projections, SGD's momentum (engine/optim.py builds the optimizers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tunelab.errors import UserError

OPTIMIZERS: dict[str, str] = {
    "adamw": "two states (exp_avg, exp_avg_sq) in the parameter's dtype",
    "adamw_8bit": "two blockwise 8-bit states (bitsandbytes): 1 B each plus a fp32 absmax per block of 256; "
                  "tensors under 4096 elements keep two fp32 states",
    "paged_adamw": "two fp32 states (bitsandbytes, whatever the parameter's dtype); on CUDA they live in unified "
                   "memory and page out to host RAM under pressure instead of failing (plain on CPU)",
    "paged_adamw_8bit": "as adamw_8bit; on CUDA the states live in unified memory and page out to host RAM under "
                        "pressure instead of failing (plain on CPU)",
    "adafactor": "factored fp32 second moment (one value per row and per column of a matrix, full for 1-D "
                 "tensors), no first moment",
    "galore": "AdamW states on the rank-r projection of each targeted matrix plus its projection matrix; AdamW "
              "states for the rest",
    "sgd": "one momentum buffer in the parameter's dtype (none at momentum 0)",
}

# bitsandbytes' 8-bit optimizers: states quantized in blocks of 256 with one fp32 absmax each; tensors smaller than
# min_8bit_size keep 32-bit states; the two 256-entry fp32 quantization maps are shared by all tensors.
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
BNB_QMAPS_BYTES = 2 * 256 * 4


@dataclass(frozen=True)
class OptimizerSettings:
    """The train.* settings state memory depends on besides the optimizer's name."""

    momentum: float = 0.9  # sgd
    galore_rank: int = 128
    galore_target: tuple[str, ...] = ("attn", "mlp")


def galore_projected(name: str, dims: Sequence[int], target: Sequence[str]) -> bool:
    """engine.optim.galore_groups' rule: 2-D weights whose name contains one of the targets."""
    return len(dims) == 2 and any(t in name for t in target)


def optimizer_state_bytes(optimizer: str, tensors: Sequence[tuple[str, Sequence[int], float]],
                          settings: OptimizerSettings = OptimizerSettings()) -> float:
    """Bytes of optimizer state for the trained tensors (name, shape, bytes per element of the parameter), as each
    optimizer allocates it (engine/optim.py builds them)."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"plan: unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    total = 0.0
    any_8bit = False
    for name, dims, pb in tensors:
        n = math.prod(dims)
        if optimizer == "adamw":
            total += 2 * pb * n
        elif optimizer == "paged_adamw":
            total += 2 * 4 * n  # bitsandbytes' 32-bit states are fp32 for every parameter dtype
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            if n < BNB_MIN_8BIT_SIZE:
                total += 2 * 4 * n
            else:
                any_8bit = True
                total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK))  # uint8 state + fp32 absmax per block, twice
        elif optimizer == "adafactor":
            # transformers' Adafactor upcasts half-precision gradients, so its states are fp32
            if len(dims) >= 2:
                total += 4 * (math.prod(dims[:-1]) + math.prod(dims[:-2]) * dims[-1])
            else:
                total += 4 * n
        elif optimizer == "galore":
            if galore_projected(name, dims, settings.galore_target):
                small, big = min(dims), max(dims)
                k = min(settings.galore_rank, small)
                # exp_avg and exp_avg_sq [big, k], and the projection [small, k]
                total += pb * (2 * big * k + small * k)
            else:
                total += 2 * pb * n
        elif optimizer == "sgd":
            total += pb * n if settings.momentum > 0 else 0
    return total + (BNB_QMAPS_BYTES if any_8bit else 0)


def _optimizer_detail(optimizer: str, settings: OptimizerSettings) -> str:
    if optimizer == "galore":
        return f" (rank {settings.galore_rank}, targets {', '.join(settings.galore_target)})"
    if optimizer == "sgd":
        return f" (momentum {settings.momentum:g})"
    return ""


def _step_temp(optimizer: str, tensors: Sequence[tuple[str, Sequence[int], float]], *, cpu: bool,
               settings: OptimizerSettings) -> float:
    """Transient memory of one optimizer step (tunelab's loop, not DeepSpeed): what the update allocates beside the
    states. torch AdamW: nothing on CPU (tunelab uses its fused kernel there), sqrt(v) and its quotient for every
    tensor at once on CUDA (foreach); bitsandbytes: nothing on CUDA (fused kernels), on CPU an fp32 gradient, the
    denominator and the update of one tensor at a time (8-bit: with both states dequantized to fp32); Adafactor:
    the squared gradient and the factored estimate of the largest tensor; GaLore: the projected-back update of the
    largest tensor and, on the steps that refresh the projection, the fp32 SVD of the largest projected gradient;
    SGD: updates in place."""
    if not tensors:
        return 0.0
    biggest = max(math.prod(d) * pb for _, d, pb in tensors)
    biggest_elems = max(math.prod(d) for _, d, _ in tensors)
    if optimizer == "sgd":
        return 0.0
    if optimizer == "adamw":
        return 0.0 if cpu else sum(math.prod(d) * pb for _, d, pb in tensors)
    if optimizer == "paged_adamw":  # CPU: fp32 gradient copy, sqrt(v) + eps, the update
        return 3 * 4 * biggest_elems if cpu else 0.0
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):  # CPU: both states in fp32 too
        return 5 * 4 * biggest_elems if cpu else 0.0
    if optimizer == "adafactor":
        return 2 * 4 * biggest_elems
    svd = max((4 * (min(d) * sum(d) + min(d)) for n, d, _ in tensors
               if galore_projected(n, d, settings.galore_target)), default=0)
    return 2 * biggest + svd
