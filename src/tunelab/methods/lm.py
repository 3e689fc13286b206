"""Causal language-model loss shared by sft and pt (and later by methods with an SFT term).

Only positions whose next token is trained need logits. On typical SFT data half the positions are prompt, and the
LM head plus log-softmax over the vocabulary are a large share of the step, so computing them everywhere wastes
work and memory (batch x seq x vocab floats). Two exact paths avoid that:

- up to `loss_chunk` trained positions: the model's own head is asked for just those rows (transformers'
  boolean `logits_to_keep`), so model-specific head details (soft-capping, scaling) stay the model's;
- more than that: the decoder's final hidden states are captured, and the head + cross-entropy run over chunks
  under activation checkpointing, so at most one chunk of logits exists at a time. A chunk is `loss_chunk` positions
  or fewer: at most `chunk_positions(vocab)`, 32 MiB of fp32 logits, small enough that glibc's allocator reuses
  the freed block for the next chunk instead of mapping (and page-faulting) fresh memory each time. On tiny-7m
  (vocab 8000) GRPO's training step over 8k completion tokens took 1.3x less time with such chunks than with
  4096-position ones (benchmarks/RESULTS.md). Each position's values do not depend on the chunking.
  Prompt and P-tuning models (peft prepends soft-prompt positions) take this path too, dropping those positions.

Both give the naive path's loss and gradients (tested in float64 to the reorder bound); `loss_chunk: 0` selects
the naive path.

Two options of sft and pt ride on that path without the loop knowing (method.label_smoothing, method.neftune_alpha):
label smoothing computes, per trained position and inside the same chunks, the mean log-probability over the
vocabulary beside the target's; NEFTune adds noise to the input embeddings through a forward hook the method's setup
registers, scaled per token by the length of the token's own sequence (so padding and packing do not change it).
"""

from __future__ import annotations

import functools
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


CHUNK_LOGITS_BYTES = 32 << 20  # glibc's largest mmap threshold: blocks up to it are reused from the heap


def chunk_positions(vocab: int, loss_chunk: int) -> int:
    """Positions per chunk of the chunked head: loss_chunk, or fewer so that a chunk's fp32 logits fit in
    CHUNK_LOGITS_BYTES (the module docstring)."""
    return max(1, min(loss_chunk, CHUNK_LOGITS_BYTES // (4 * max(vocab, 1))))


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


def _token_values(logits: torch.Tensor, targets: torch.Tensor, smoothing: bool, entropy: bool = False) -> torch.Tensor:
    """Per position [k, n]: the target's log-probability; with `smoothing` then the mean log-probability over the
    vocabulary; with `entropy` last the distribution's entropy (without gradient: a metric)."""
    logits = at_least_fp32(logits)
    if not smoothing and not entropy:
        return -F.cross_entropy(logits, targets, reduction="none")[None]
    logprobs = F.log_softmax(logits, -1)
    rows = [logprobs.gather(1, targets[:, None])[:, 0]]
    if smoothing:
        rows.append(logprobs.mean(-1))
    if entropy:
        with torch.no_grad():
            rows.append(-(logprobs.exp() * logprobs).sum(-1))
    return torch.stack(rows)


def _chunk_values(core, hidden: torch.Tensor, targets: torch.Tensor, fn, *extras: torch.Tensor) -> torch.Tensor:
    return fn(_head(core, hidden), targets, *extras)


def _values_of(smoothing: bool, entropy: bool):
    """The per-chunk function of `trained_values`: (logits, targets) -> [m, n] (named, so checkpoint recomputes it
    without a closure over anything but two flags)."""
    return functools.partial(_token_values, smoothing=smoothing, entropy=entropy)


def trained_logprobs(model, batch: dict[str, torch.Tensor], ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities (float32, or float64 for a float64 model) of every trained next token, [n], and the
    sequence each belongs to, [n], in batch-major order: the one forward pass behind every language-model loss (the
    module docstring explains the three exact paths). A sequence is a batch row, or in a packed batch its
    ``sequence_ids`` entry."""
    values, rows = trained_values(model, batch, ctx)
    return values[0], rows


def trained_values(model, batch: dict[str, torch.Tensor], ctx=None, *, smoothing: bool = False,
                   entropy: bool = False, hidden: bool = False) -> tuple[torch.Tensor, ...]:
    """`trained_logprobs` as [1, n], or with `smoothing` and/or `entropy` [2, n] or [3, n]: each trained position's
    target log-probability, its mean log-probability over the vocabulary and the entropy of its distribution (no
    gradient), computed in the same pass and chunks. With `hidden`, a third result: the decoder's final hidden
    states at those positions, [n, hidden] (with gradient; PPO's value head reads them)."""
    return trained_head_values(model, batch, ctx, _values_of(smoothing, entropy), 1 + smoothing + entropy,
                               hidden=hidden)


def trained_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep [B, T]: the logits at t predict a trained labels[b, t + 1]; the targets [n]; the sequence of each [n]),
    in batch-major order."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    if "sequence_ids" in batch:  # packed: the sequence of the predicted token
        rows = batch["sequence_ids"][:, 1:][keep[:, :-1]]
    else:
        rows = keep.nonzero()[:, 0]
    return keep, targets, rows


def trained_head_values(model, batch: dict[str, torch.Tensor], ctx, fn, width: int, *,
                        extras: tuple[torch.Tensor, ...] = (), hidden: bool = False) -> tuple[torch.Tensor, ...]:
    """The general form of `trained_values`: `fn(logits [c, V], targets [c], *extras sliced to the same c
    positions)` -> [width, c] over the trained positions, through the same exact paths (the module docstring), so
    that at most one chunk of the vocabulary's logits exists at a time. `extras` are per trained position, [n, ...]
    in batch-major order (method kd passes the teacher's hidden states or its cached top-k distributions). Returns
    ([width, n] values, rows[, hidden states])."""
    from tunelab.models.adapters import virtual_tokens

    chunk = getattr(ctx, "loss_chunk", 4096)
    core = core_model(model)
    keep, targets, rows = trained_positions(batch)
    n = int(targets.numel())
    # prompt/P-tuning prepend soft-prompt positions: the model's outputs are that much longer than the labels
    n_virtual = virtual_tokens(model)
    if getattr(ctx, "sharded_params", False):
        return _values_in_forward(model, core, batch, keep, targets, rows, n_virtual, fn, extras, hidden)
    if hidden:  # the hidden states come from the decoder; the head runs over them in chunks
        chunk = chunk if chunk > 0 else max(n, 1)
    elif chunk <= 0 or not _accepts_logits_to_keep(type(core)):
        logits = model(**model_inputs(batch), use_cache=False).logits[:, n_virtual:]
        return fn(logits[keep], targets, *extras), rows

    if n <= chunk and not n_virtual and not hidden:
        out = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep)
        logits = out.logits.reshape(n, -1)  # [n, vocab]: one row per kept position, batch-major order
        return fn(logits, targets, *extras), rows

    states = decoder_states(model, batch, keep, n_virtual)  # [n, hidden]
    vocab = getattr(core.get_output_embeddings(), "out_features", None) or core.config.get_text_config().vocab_size
    chunk = chunk_positions(vocab, chunk)
    # recompute each chunk's logits in the backward pass instead of keeping them
    parts = [checkpoint(_chunk_values, core, states[i:i + chunk], targets[i:i + chunk], fn,
                        *(e[i:i + chunk] for e in extras), use_reentrant=False)
             for i in range(0, n, chunk)]
    empty = at_least_fp32(states.new_zeros((width, 0)))
    values = torch.cat(parts, dim=1) if parts else empty
    return (values, rows, states) if hidden else (values, rows)


def decoder_states(model, batch: dict[str, torch.Tensor], keep: torch.Tensor, n_virtual: int = 0) -> torch.Tensor:
    """The decoder's final hidden states at the `keep` positions, [n, hidden], from one forward pass that asks the
    head for no logits (a hook on the decoder, still inside the wrapped forward so that DDP/accelerate see a normal
    forward)."""
    core = core_model(model)
    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = core.get_decoder().register_forward_hook(grab)
    try:
        # (with soft prompts the mask would not fit the longer sequence: keep one position's logits instead)
        if n_virtual or not _accepts_logits_to_keep(type(core)):
            model(**model_inputs(batch), use_cache=False, **({"logits_to_keep": 1} if n_virtual else {}))
        else:
            model(**model_inputs(batch), use_cache=False, logits_to_keep=torch.zeros_like(keep))
    finally:
        handle.remove()
    return captured[-1][:, n_virtual:][keep]


def head_width(model) -> int:
    """The number of logits the model's LM head produces (its vocabulary, padded or not)."""
    core = core_model(model)
    head = core.get_output_embeddings()
    return int(getattr(head, "out_features", 0) or core.config.get_text_config().vocab_size)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The model's LM head (with its logit scaling and soft-capping) over hidden states."""
    return _head(core_model(model), hidden)


def _values_in_forward(model, core, batch, keep, targets, rows, n_virtual: int, fn, extras,
                       hidden: bool) -> tuple[torch.Tensor, ...]:
    """`trained_head_values` with the head inside the model's own forward: the logits of every trained position at
    once (logits_to_keep, or all positions with soft prompts), and with `hidden` the decoder's states from a hook in
    the same pass. Under ZeRO-3 and FSDP2 the engine gathers the head's weight for the forward only, so the chunked
    head, which runs (and recomputes in the backward pass) outside it, cannot be used."""
    captured: list[torch.Tensor] = []

    def grab(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = core.get_decoder().register_forward_hook(grab) if hidden else None
    try:
        if n_virtual or not _accepts_logits_to_keep(type(core)):
            logits = model(**model_inputs(batch), use_cache=False).logits[:, n_virtual:][keep]
        else:
            logits = model(**model_inputs(batch), use_cache=False, logits_to_keep=keep).logits
            logits = logits.reshape(int(targets.numel()), -1)
    finally:
        if handle is not None:
            handle.remove()
    values = fn(logits, targets, *extras)
    if hidden:
        return values, rows, captured[-1][:, n_virtual:][keep]
    return values, rows


def causal_lm_loss(model, batch: dict[str, torch.Tensor], ctx=None, *, label_smoothing: float = 0.0):
    """Next-token cross-entropy summed over the trained tokens (sft, pt). With `label_smoothing` e, each trained
    position's loss is (1 - e) x its NLL + e x its mean NLL over the vocabulary (F.cross_entropy's definition), and
    the plain NLL is reported as the metric ``nll``."""
    from tunelab.methods.base import LossOutput

    values, _ = trained_values(model, batch, ctx, smoothing=label_smoothing > 0)
    nll = -values[0].sum()
    if not label_smoothing:
        return LossOutput(loss_sum=nll)
    uniform = -values[1].sum()
    return LossOutput((1 - label_smoothing) * nll + label_smoothing * uniform, {"nll": nll.detach()})


def lm_loss(model, batch: dict[str, torch.Tensor], ctx) -> object:
    """sft's and pt's loss: the next-token cross-entropy with the method's label smoothing, and NEFTune's noise on
    the input embeddings of this forward pass when the model trains (`neftune_setup` registered the hook)."""
    cfg = ctx.config
    noise = ctx.state.get("neftune")
    if noise is not None and model.training:
        noise.lengths = sequence_lengths(batch)
    try:
        return causal_lm_loss(model, batch, ctx, label_smoothing=getattr(cfg, "label_smoothing", 0.0))
    finally:
        if noise is not None:
            noise.lengths = None


def perplexity(results: dict[str, float]) -> dict[str, float]:
    """Evaluation perplexity, exp of the mean next-token NLL (capped at e^50): a language-model quantity. Under
    label smoothing the NLL is the plain one (``eval_nll``), not the smoothed loss."""
    return {"eval_ppl": math.exp(min(results.get("eval_nll", results["eval_loss"]), 50.0))}


# ---------------------------------------------------------------------------------------------------------- NEFTune
def sequence_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per position [B, T]: the number of tokens of the sequence the position belongs to, 0 on padding. Padded
    rows are one sequence each; packed rows (``sequence_ids``) hold several."""
    if "sequence_ids" in batch:
        ids = batch["sequence_ids"]
        valid = ids >= 0
        counts = torch.bincount(ids[valid])
        lengths = torch.zeros_like(ids)
        lengths[valid] = counts[ids[valid]]
        return lengths
    if "attention_mask" in batch:
        mask = batch["attention_mask"]
        return mask.sum(1, keepdim=True) * mask
    ids = batch["input_ids"]
    return torch.full_like(ids, ids.shape[1])


class NEFTune:
    """Noisy embeddings (Jain et al., 2023, "NEFTune"): while training, each input embedding gets uniform noise in
    [-1, 1] x alpha / sqrt(L d), where d is the embedding width and L the length of the token's own sequence (the
    paper's L; HF's and TRL's implementations use the padded row width, which would make the noise depend on the
    batch's padding or packing). Nothing at evaluation, generation or in frozen copies (eval mode)."""

    def __init__(self, alpha: float):
        self.alpha = alpha
        self.lengths: torch.Tensor | None = None  # set by lm_loss for one training forward pass

    def __call__(self, module, args, output):
        if self.lengths is None or not module.training:
            return None
        lengths = self.lengths.to(output.device, torch.float64)
        scale = torch.where(lengths > 0, self.alpha / torch.sqrt(lengths.clamp(min=1) * output.shape[-1]), 0.0)
        noise = torch.empty_like(output).uniform_(-1, 1)
        return output + noise * scale.to(output.dtype)[..., None]


def neftune_setup(ctx) -> None:
    """sft's and pt's setup: with method.neftune_alpha, a forward hook on the policy's input embeddings."""
    alpha = getattr(ctx.config, "neftune_alpha", 0.0)
    if alpha:
        noise = NEFTune(alpha)
        core_model(ctx.policy).get_input_embeddings().register_forward_hook(noise)
        ctx.step.state["neftune"] = noise


def sequence_logprobs(model, batch: dict[str, torch.Tensor], ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: the summed log-probability of its trained tokens and how many there are. Preference methods
    score whole answers with it. Sequences are the batch rows, or for a packed batch (``sequence_ids``) the
    ``num_sequences`` sequences packed into it."""
    logprobs, rows = trained_logprobs(model, batch, ctx)
    n_rows = int(batch["num_sequences"]) if "num_sequences" in batch else batch["labels"].shape[0]
    sums = logprobs.new_zeros(n_rows).index_add(0, rows, logprobs)
    return sums, torch.bincount(rows, minlength=n_rows)
