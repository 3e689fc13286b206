"""The method contract: what a training method gives the one loop.

A method is a module that builds a `Method`: the data shape it needs, whether it needs a reference policy, and its
loss as a pure function of (model, batch). The loop owns everything else: accumulation, precision, clipping,
logging, checkpointing and distribution.

Normalisation: `loss` returns the loss *summed* over the method's units (trained tokens for language-model losses,
pairs for preference losses) and `weight` counts those units in a micro-batch before the forward pass. The loop divides
by the total weight of the whole accumulated global batch (all micro-batches, all ranks), so the gradient does not
depend on how a batch is split into micro-batches or processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: the loss summed over this micro-batch's units
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # also sums over units; the loop averages


@dataclass
class StepContext:
    """What a loss may need beyond (model, batch): options of the run, and later reference/reward models."""

    loss_chunk: int = 4096  # trained positions per LM-head/cross-entropy chunk (0: naive full logits)
    config: Any = None  # the method's own config section (beta, loss variant, ...)
    # the reference policy's per-row summed log-probabilities of a batch's trained tokens (no grad), for methods
    # with `needs_reference`; built by the loop (engine/loop.py: reference_scorer)
    reference: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None


@dataclass(frozen=True)
class Method:
    name: str
    # "chat" (conversations, assistant turns trained) | "text" (every token trained) | "pairs" (a prompt with a
    # chosen and a rejected answer: data.collate.collate_pairs) | "kto" (a conversation and a desirable label)
    data_kind: str
    loss: Callable[[Any, dict[str, torch.Tensor], StepContext], LossOutput]
    weight: Callable[[dict[str, torch.Tensor]], int]
    describe: str = ""
    needs_reference: bool = False  # the loop provides StepContext.reference
    head: str = "lm"  # the model the method trains: "lm" (a causal LM) or "score" (a scalar score head: rm)
    # the metrics the progress line and the end-of-run summary show beside the loss: (metric name, short label)
    progress: tuple[tuple[str, str], ...] = ()
