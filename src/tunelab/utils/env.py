"""`tunelab env`: versions and hardware, pasted into bug reports."""

from __future__ import annotations

import importlib
import os
import platform
import sys


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception:
        return "not installed"
    return getattr(mod, "__version__", "installed")


def env_report() -> str:
    from tunelab import __version__
    from tunelab.utils.hardware import cpu_has_native_bf16

    lines = [
        f"tunelab: {__version__}",
        f"python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"platform: {platform.platform()}",
        f"cpu: {platform.machine()}, {os.cpu_count()} logical cores, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}",
    ]
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "safetensors",
                 "bitsandbytes", "deepspeed", "flash_attn"):
        lines.append(f"{name}: {_version(name)}")
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                lines.append(f"gpu {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, bf16: {torch.cuda.is_bf16_supported()}")
            lines.append(f"cuda: {torch.version.cuda}")
        else:
            lines.append("gpu: none (CUDA not available)")
        lines.append(f"torch threads: {torch.get_num_threads()}")
    except ImportError:
        pass
    return "\n".join(lines)
