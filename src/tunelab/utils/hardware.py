"""What the hardware can do: device, native bf16, how many data-parallel processes fit."""

from __future__ import annotations

import os
import resource
import sys
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


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark since it started (model loading included).

    On Linux this is VmHWM of /proc/self/status: getrusage's ru_maxrss also holds the RSS of the process that
    launched this one (the kernel carries it over fork and exec), so a small run started from a large parent (a test
    runner, a notebook) would report the parent's size."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
