"""Causal language-model loss shared by sft and pt (and later by methods with an SFT term).

Only positions whose next token is trained need logits. On typical SFT data half the positions are prompt, and the
LM head plus log-softmax over the vocabulary are a large share of the step, so computing them everywhere wastes
work and memory (batch x seq x vocab floats). Two exact paths avoid that:

- up to `loss_chunk` trained positions: the model's own head is asked for just those rows (transformers'
  boolean `logits_to_keep`), so model-specific head details (soft-capping, scaling) stay the model's;
- more than that: the decoder's final hidden states are captured, and the head + cross-entropy run over chunks of
  `loss_chunk` positions under activation checkpointing, so at most one chunk of logits exists at a time.
  Prompt and P-tuning models (peft prepends soft-prompt positions) take this path too, dropping those positions.

Both give the naive path's loss and gradients (tested in float64 to the reorder bound); `loss_chunk: 0` selects
the naive path.
"""

from __future__ import annotations

import inspect
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tunelab.data.collate import model_inputs
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.models.wrappers import core_model
from tunelab.utils.numerics import at_least_fp32


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next token is trained: labels are shifted by one inside the loss."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


@lru_cache(maxsize=32)
def _accepts_logits_to_keep(forward_cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(forward_cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _head(core, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head with the post-processing some models apply to logits."""
    logits = core.get_output_embeddings()(hidden)
    cfg = core.config
    scale = getattr(cfg, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _chunk_logprobs(core, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(at_least_fp32(_head(core, hidden)), targets, reduction="none")


def trained_logprobs(model, batch: dict[str, torch.Tensor], ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (float32, or float64 for a float64 model) of every trained next token, [n], and the
    sequence each belongs to, [n], in batch-major order: the one forward pass behind every language-model loss (the
    module docstring explains the three exact paths). A sequence is a batch row, or in a packed batch its ``sequence_ids`` entry."""
    from tunelab.models.adapters import virtual_tokens

    chunk = getattr(ctx, "loss_chunk", 4096)
    labels = batch["labels"]
    core = core_model(model)
    # keep[b, t]: the logits at t predict labels[b, t + 1], which is trained
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    if "sequence_ids" in batch:  # packed: the sequence of the predicted token
        rows = batch["sequence_ids"][:, 1:][keep[:, :-1]]
    else:
        rows = keep.nonzero()[:, 0]
    n = int(targets.numel())
    # prompt/P-tuning prepend soft-prompt positions: the model's outputs are that much longer than the labels
    n_virtual = virtual_tokens(model)
    if chunk <= 0 or not _accepts_logits_to_keep(type(core)):
        logits = model(**model_inputs(batch), use_cache=False).logits[:, n_virtual:]
        return -F.cross_entropy(at_least_fp32(logits[keep]), targets, reduction="none"), rows

    if n <= chunk and not n_virtual:
        out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
        logits = out.logits.reshape(n, -1)  # [n, vocab]: one row per kept position, batch-major order
        return -F.cross_entropy(at_least_fp32(logits), targets, reduction="none"), rows

    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = core.get_decoder().register_forward_hook(grab)
    try:
        # Ask for no logits at all; the hidden states come from the hook, still inside the wrapped forward so that
        # DDP/accelerate see a normal forward.
        # (with soft prompts the mask would not fit the longer sequence: keep one position's logits instead)
        model(**model_inputs(batch), use_cache=False, logits_to_keep=1 if n_virtual else torch.zeros_like(keep))
    finally:
        handle.remove()
    hidden = captured[-1][:, n_virtual:][keep]  # [n, hidden]
    # recompute each chunk's logits in the backward pass instead of keeping them
    parts = [checkpoint(_chunk_logprobs, core, hidden[i:i + chunk], targets[i:i + chunk], use_reentrant=False)
             for i in range(0, n, chunk)]
    return (torch.cat(parts) if parts else at_least_fp32(hidden.new_zeros(0))), rows


def causal_lm_loss(model, batch: dict[str, torch.Tensor], ctx=None):
    """Next-token cross-entropy summed over the trained tokens (sft, pt)."""
    from tunelab.methods.base import LossOutput

    logprobs, _ = trained_logprobs(model, batch, ctx)
    return LossOutput(loss_sum=-logprobs.sum())


def perplexity(results: dict[str, float]) -> dict[str, float]:
    """Evaluation perplexity, exp of the mean next-token loss (capped at e^50): a language-model quantity."""
    return {"eval_ppl": math.exp(min(results["eval_loss"], 50.0))}


def sequence_logprobs(model, batch: dict[str, torch.Tensor], ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its trained tokens and how many there are. Preference methods
    score whole answers with it. Sequences are the batch rows, or for a packed batch (``sequence_ids``) the
    ``num_sequences`` sequences packed into it."""
    logprobs, rows = trained_logprobs(model, batch, ctx)
    n_rows = int(batch["num_sequences"]) if "num_sequences" in batch else batch["labels"].shape[0]
    sums = logprobs.new_zeros(n_rows).index_add(0, rows, logprobs)
    return sums, torch.bincount(rows, minlength=n_rows)
