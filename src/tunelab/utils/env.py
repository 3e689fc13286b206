"""`tunelab env`: versions and hardware, pasted into bug reports; and keeping other libraries' console noise out of
tunelab's output (`quiet_transformers`)."""

from __future__ import annotations

import importlib
import logging
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager

# bitsandbytes logs this on import on CPUs with AVX512-BF16 when the optional `kernels` package is missing; its own
# CPU 4-bit path works, so `tunelab env` reports it in one line instead (see _bitsandbytes).
_BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"


class _DropNotice(logging.Filter):
    """DeepSpeed logs, to stdout, the first time anything imports it (accelerate and transformers do, to save a
    model) on a machine without a GPU, that it chose its CPU accelerator: news to nobody running tunelab on a CPU,
    and a line in the middle of a command's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Setting accelerator to CPU")


def drop_library_notices() -> None:
    """Install the filters above (once; the loggers keep them when their libraries configure them on import)."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropNotice) for f in logger.filters):
        logger.addFilter(_DropNotice())


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-call progress bars ("Loading weights", "Writing model shards") while tunelab loads or
    saves a model: tunelab prints its own line about the model, and on a pipe or in a log the bars are only noise.

    transformers' `set_tqdm_hook` (its own serving code uses it the same way) reaches only the bars drawn by
    transformers itself; download bars from the Hub are huggingface_hub's and stay visible, as does tunelab's own
    training bar. Older transformers without the hook: its global progress-bar switch, restored afterwards.
    compressed-tensors (loading or writing a quantized folder) draws plain tqdm bars ("Compressing model"): tqdm
    bars made inside are disabled too, and only inside.
    """
    from transformers.utils import logging as hf_logging

    drop_library_notices()
    with _quiet_tqdm():
        if hasattr(hf_logging, "set_tqdm_hook"):
            empty = hf_logging.EmptyTqdm
            previous = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: empty(*args, **kwargs))
            try:
                yield
            finally:
                hf_logging.set_tqdm_hook(previous)
            return
        enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if enabled:
                hf_logging.enable_progress_bar()


@contextmanager
def _quiet_tqdm() -> Iterator[None]:
    try:
        from tqdm import std
    except ImportError:
        yield
        return
    init = std.tqdm.__init__

    def silent(self, *args, **kwargs):
        kwargs["disable"] = True
        init(self, *args, **kwargs)

    std.tqdm.__init__ = silent
    try:
        yield
    finally:
        std.tqdm.__init__ = init


def _version(name: str) -> str:
    try:
        mod = importlib.import_module(name)
    except Exception:
        return "not installed"
    return getattr(mod, "__version__", "installed")


@contextmanager
def _bnb_cpu_warning(seen: list[str]) -> Iterator[None]:
    """Collect (instead of printing) bitsandbytes' import-time CPU-kernel warning; peft imports bitsandbytes too."""
    log = logging.getLogger(_BNB_CPU_LOGGER)

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "gemm_4bit_forward" in record.getMessage():
                seen.append(str(record.args[0]) if record.args else "the optional `kernels` package is missing")

    keep = _Keep(logging.WARNING)
    propagate, level = log.propagate, log.level
    log.addHandler(keep)
    log.propagate = False
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.removeHandler(keep)
        log.propagate, log.level = propagate, level


def env_report() -> str:
    from tunelab import __version__
    from tunelab.utils.hardware import cpu_has_native_bf16

    lines = [
        f"tunelab: {__version__}",
        f"python: {sys.version.split()[0]} ({platform.python_implementation()})",
        f"platform: {platform.platform()}",
        f"cpu: {platform.machine()}, {os.cpu_count()} logical cores, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}",
    ]
    bnb_cpu: list[str] = []
    with _bnb_cpu_warning(bnb_cpu):
        versions = {name: _version(name) for name in ("torch", "transformers", "peft", "accelerate", "datasets",
                                                      "tokenizers", "safetensors", "bitsandbytes", "deepspeed",
                                                      "flash_attn")}
    if bnb_cpu:
        versions["bitsandbytes"] += (f" (fast CPU 4-bit kernels not available: {bnb_cpu[0]}; its built-in CPU path "
                                     "is used)")
    lines += [f"{name}: {version}" for name, version in versions.items()]
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
