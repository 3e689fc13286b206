"""What the hardware can do: device, native bf16, how many data-parallel processes fit."""

from __future__ import annotations

import os
from functools import lru_cache


@lru_cache(maxsize=1)
def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX); otherwise bf16 is emulated and ~26x slower."""
    flags = cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def max_processes() -> int:
    """How many data-parallel processes this machine can run: one per GPU, else one per CPU core."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count()
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
