"""Measurement shared by the peer runners; runs inside the peers' virtualenvs (transformers, no tunelab).

A `ThroughputCallback` counts, for every training forward pass, the real (non-pad) tokens, the token positions
(padding included) and the sequences of the batch the model actually receives, whatever the framework's collator
made of it, and records their cumulative sums with the training time at the end of every optimizer step. These
records have the same shape as tunelab's metrics.jsonl (step, tokens, positions, elapsed, plus sequences), so the
benchmark runner derives every system's numbers with the same function (tunelab.engine.bench.summarize_steps).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback


def real_token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Which positions hold real tokens, from the mask the model receives.

    No mask: every position (padding-free batches). 2-D: non-zero entries (0/1 masks, and LLaMA-Factory's
    sequence-index masks). 4-D ([batch, 1, q, k], additive float or boolean): positions that may attend to
    themselves; padding attends to nothing.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.dim() == 2:
        return attention_mask != 0
    diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
    return diagonal if diagonal.dtype == torch.bool else diagonal == 0


def count_batch(kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """(real tokens, positions, sequences) of one forward call's inputs."""
    input_ids = kwargs["input_ids"]
    real = real_token_mask(input_ids, kwargs.get("attention_mask"))
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.dim() == 2:
        sequences = int(((position_ids == 0) & real).sum())  # packed rows: positions restart at 0 per sequence
    else:
        sequences = int(real.any(dim=1).sum())
    return int(real.sum()), input_ids.numel(), sequences


class ThroughputCallback(TrainerCallback):
    """Records cumulative real tokens, positions, sequences and training seconds at the end of every step."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.totals = [0, 0, 0]
        self._t0 = 0.0
        self._hook = None

    def _count(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not module.training:
            return
        if "input_ids" not in kwargs and args:
            kwargs = {"input_ids": args[0], **kwargs}
        for i, n in enumerate(count_batch(kwargs)):
            self.totals[i] += n

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        tokens, positions, sequences = self.totals
        self.records.append({"step": state.global_step, "tokens": tokens, "positions": positions,
                             "sequences": sequences, "elapsed": time.perf_counter() - self._t0})

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()


def workload_args(description: str, modes: list[str], argv: list[str] | None = None):
    """The command line every peer runner takes (run.py passes the same options to each)."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=60, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--mode", choices=modes, default=modes[0])
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", help="write the result here")
    return p.parse_args(argv)


def peak_rss_bytes() -> int:
    """Peak RSS of this process: VmHWM on Linux (ru_maxrss also holds the launching parent's RSS), else ru_maxrss."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def versions(*names: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_result(path: str | None, system: str, warmup: int, records: list[dict[str, Any]],
                 extra: dict[str, Any]) -> dict[str, Any]:
    """Write the raw records (and a quick tokens/s for people running a peer by hand) as JSON; return it."""
    after = [r for r in records if r["step"] >= warmup]
    quick = None
    if len(after) >= 2:
        start, end = after[0], after[-1]
        seconds = end["elapsed"] - start["elapsed"]
        step_s = [(b["elapsed"] - a["elapsed"]) for a, b in zip(after, after[1:])]
        quick = {"tokens_per_s": (end["tokens"] - start["tokens"]) / seconds,
                 "median_step_s": statistics.median(step_s)}
    result = {"system": system, "warmup": warmup, "records": records, "quick": quick,
              "peak_rss_bytes": peak_rss_bytes(), **extra}
    text = json.dumps(result, indent=1)
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")
    if quick:
        print(f"{system}: {quick['tokens_per_s']:,.0f} real tokens/s after {warmup} warm-up steps, "
              f"median step {quick['median_step_s']:.3f} s, peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return result
