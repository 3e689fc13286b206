"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models"), tunelab's own implementation.

At each chosen decoder layer, the layer's output hidden state h at a few prompt positions is edited:

    h <- h + R^T (W h + b - R h)

R (r x hidden, orthonormal rows) spans the subspace that is edited; W h + b is the learned target of that
subspace's coordinates. Only R, W and b train, a few thousand parameters per layer, and the base weights never
change, so the method cannot be merged into them.

Which positions: the first `first` and the last `last` positions of each prompt (overlaps counted once, clipped to
the prompt), counted over its real (non-pad) tokens, so left and right padding choose the same tokens.
  * Training (`before_forward`): the prompt of a sequence is its positions before the first trained token (label
    != -100). The label of a sequence's first token is never a loss target, so it is ignored: plain-text,
    pretraining-style rows have a one-token prompt whether or not the collator marks that label. A sequence with no
    trained token is all prompt. Packed rows (position_ids restarting at 0) are split into their sequences and
    each sequence's prompt is edited, as if it had its own row. `set_prompt_lengths(model, lengths)` sets per-row
    prompt lengths directly instead.
  * Inference (`set_prompt_lengths(model, None)`, the state after loading): a forward that starts with an empty KV
    cache has its whole non-pad input as the prompt; a forward that continues a cache (a decoding step, seen from
    the cache length or from an attention mask longer than the input) is not edited: its tokens come after the
    prompt. A one-token prompt is edited like any other (its only position is both first and last).
`model.generate` is wrapped so that the prompt is fixed by the first forward of each call: with a KV cache the later
steps are decoding steps anyway; without one (`use_cache=False`) every step re-reads the whole sequence and only the
original prompt's positions are edited. Both give the same tokens.

Implementation: a forward pre-hook on the causal LM computes, once per forward, the (batch, seq) mask of positions
to edit; forward hooks on the chosen decoder layers edit exactly those positions and return every other position
untouched, bit for bit. transformers 5 checkpoints a layer's `forward`, so with gradient checkpointing the layer
hooks run outside the recomputed region and read the mask only once. R is
`torch.nn.utils.parametrizations.orthogonal` on a Linear(hidden, r) with the Householder map and no trivialization,
so the only stored tensor for R is the r x hidden `original` (the trivialization would add a hidden x hidden base
matrix per layer); a small parametrization in front of it keeps R from collapsing under weight decay (see
`_DiagonalSigns`). Saved names: ``layers.<i>.rotate.parametrizations.weight.original``,
``layers.<i>.source.weight``, ``layers.<i>.source.bias``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from tunelab.config.schema import ReftAdapter
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import UserError
from tunelab.models.tuners import io

CONFIG = ReftAdapter
TRAINS = ("A low-rank edit h + R^T(W h + b - R h) of the hidden states at the first/last prompt positions of each "
          "chosen decoder layer (R orthonormal, r x hidden); the model's weights stay frozen.")
MERGEABLE = False

_STATE = "_tunelab_reft"


class _DiagonalSigns(nn.Module):
    """Replace the diagonal of a matrix by the signs (+-1) of its entries.

    torch's Householder orthogonal map reads the diagonal of its parameter as the signs of Q's columns through an
    integer cast: a diagonal of exactly +-1 works, but weight decay shrinks it (1 -> 0.9995 after one AdamW step)
    and the cast then gives 0, so R silently collapses to zero and the edit becomes a no-op. Put in front of that
    map, this parametrization hands it exact signs whatever the optimizer does to the stored diagonal (which gets
    no gradient, so only decay ever moves it, and decay never changes a sign).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        diagonal = torch.eye(x.shape[-2], x.shape[-1], dtype=torch.bool, device=x.device)
        return torch.where(diagonal, torch.where(x < 0, -1.0, 1.0).to(x.dtype), x)


class LoReFT(nn.Module):
    """The LoReFT edit of a set of hidden states (N, hidden) -> (N, hidden).

    Kept in float32 whatever the base dtype (float64 beside a float64 base): the orthogonal parametrization (a product of Householder reflections)
    loses orthogonality in bf16, and these are the only weights that train.
    """

    def __init__(self, hidden: int, r: int, dropout: float):
        super().__init__()
        rotate = nn.Linear(hidden, r, bias=False, dtype=torch.float32)
        nn.init.orthogonal_(rotate.weight)
        # original -> exact diagonal signs -> Householder product: R = rotate.weight, r x hidden, orthonormal rows.
        # Without trivialization the only stored tensor is `original` (r x hidden), no hidden x hidden base.
        parametrize.register_parametrization(rotate, "weight", _DiagonalSigns())
        self.rotate = orthogonal(rotate, orthogonal_map="householder", use_trivialization=False)
        self.source = nn.Linear(hidden, r, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = h.to(self.source.weight.dtype)  # float32 (float64 beside a float64 base) unless the model was cast afterwards
        rot = self.rotate.weight  # (r, hidden): the parametrization is evaluated once per call
        delta = (self.source(x) - x @ rot.T) @ rot
        return (x + self.dropout(delta)).to(h.dtype)


@dataclass
class _State:
    """Per-model bookkeeping shared by the pre-hook, the layer hooks and the generate wrapper."""

    first: int
    last: int
    lengths: torch.Tensor | None = None  # set_prompt_lengths: per-row prompt lengths
    prompt: tuple[torch.Tensor, torch.Tensor] | None = None  # before_forward: (prompt mask, sequence ids), (B, T)
    generating: bool = False  # inside model.generate
    generate_prompt: tuple[int, torch.Tensor] | None = None  # (absolute offset, chosen mask) of that call's prompt
    edit: torch.Tensor | None = None  # (batch, seq) positions the current forward edits; None: none


# ------------------------------------------------------------------------------------------------------ positions
def _segment_start_values(values: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """For a row-wise nondecreasing `values` (B, T), each position's value at the start of its sequence."""
    batch, seq = values.shape
    ids = (segments + torch.arange(batch, device=values.device)[:, None] * seq).reshape(-1)
    start = torch.zeros(batch * seq, dtype=values.dtype, device=values.device)
    start = start.scatter_reduce(0, ids, values.reshape(-1), reduce="amin", include_self=False)
    return start[ids].reshape(batch, seq)


def choose_positions(prompt: torch.Tensor, first: int, last: int, segments: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Of the True positions of `prompt` (batch, seq), the first `first` and the last `last` of each sequence.

    `segments` (batch, seq) numbers the sequences of packed rows (0, 0, 1, 1, 1, ...); without it each row is one
    sequence. Counting runs over prompt positions only, so padding on either side does not shift the choice, and
    overlapping first/last ranges select a position once.
    """
    prompt = prompt.bool()
    if segments is None:
        segments = torch.zeros(prompt.shape, dtype=torch.long, device=prompt.device)
    p = prompt.long()
    before = p.cumsum(dim=1) - p  # prompt positions to the left, in the row
    rank = before - _segment_start_values(before, segments)
    n = torch.zeros_like(p).scatter_add(1, segments, p).gather(1, segments)  # prompt positions of the sequence
    return prompt & ((rank < first) | (rank >= n - last))


def sequence_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Number the packed sequences of each row: a new one starts where the position does not follow the last."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(dim=1) - 1


def training_prompt(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt mask, sequence ids) of a collated training batch; see the module docstring for the rules."""
    labels = batch["labels"]
    position_ids = batch.get("position_ids")
    segments = (sequence_ids(position_ids) if position_ids is not None
                else torch.zeros_like(labels, dtype=torch.long))
    starts = torch.ones_like(labels, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    trained = ((labels != IGNORE_INDEX) & ~starts).long()
    seen = trained.cumsum(dim=1)
    seen = seen - _segment_start_values(seen - trained, segments)  # trained positions so far in the sequence
    prompt = seen == 0
    for key in ("attention_mask", "token_mask"):
        if batch.get(key) is not None:
            prompt = prompt & batch[key].bool()
    return prompt, segments


def set_prompt_lengths(model: nn.Module, lengths: torch.Tensor | list[int] | None) -> None:
    """Set each row's prompt length for the next forwards (training); None switches to inference positions."""
    state = _state(model)
    state.prompt = None
    state.lengths = None if lengths is None else torch.as_tensor(lengths, dtype=torch.long).reshape(-1)


def before_forward(model: nn.Module, batch: dict) -> None:
    """Point the edits at this batch's prompts (per packed sequence when the batch is packed)."""
    state = _state(model)
    state.lengths = None
    state.prompt = training_prompt(batch)


def _state(model: nn.Module) -> _State:
    state = getattr(model, _STATE, None)
    if state is None:
        raise RuntimeError("model carries no reft adapter")
    return state


# ---------------------------------------------------------------------------------------------------------- hooks
def _past_length(kwargs: dict, mask: torch.Tensor | None, seq: int) -> int:
    """Tokens already in the KV cache before this forward: from the cache object, else from a longer mask."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if mask is not None:
        return max(0, mask.shape[1] - seq)
    return 0


def _check_rows(what: str, rows: int, batch: int) -> None:
    if rows != batch:
        raise RuntimeError(f"reft: {what} was set for {rows} rows but the forward has {batch}; call before_forward "
                           "with this batch, or set_prompt_lengths(model, None) for inference")


class _PreForward:
    """Forward pre-hook of the causal LM: decides, once per forward, which positions the layers edit."""

    def __init__(self, state: _State):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        state = self.state
        state.edit = None
        x = kwargs.get("input_ids")
        if x is None and args:
            x = args[0]
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            return
        batch, seq = x.shape[0], x.shape[1]
        device = x.device
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            mask = None  # a custom 4D mask says nothing about which tokens are padding
        past = _past_length(kwargs, mask, seq)
        current = (mask[:, -seq:].bool() if mask is not None
                   else torch.ones(batch, seq, dtype=torch.bool, device=device))
        if state.generating:
            if state.generate_prompt is None:  # the first forward of this generate call reads the prompt
                state.generate_prompt = (past, choose_positions(current, state.first, state.last))
            offset, chosen = state.generate_prompt
            _check_rows("the generation prompt", chosen.shape[0], batch)
            start = past - offset  # where this forward's tokens begin, relative to the prompt
            edit = torch.zeros(batch, seq, dtype=torch.bool, device=device)
            window = chosen[:, max(start, 0):max(start + seq, 0)]
            if window.shape[1]:
                at = max(-start, 0)
                edit[:, at:at + window.shape[1]] = window.to(device)
        elif state.prompt is not None:
            prompt, segments = state.prompt
            _check_rows("the training prompt", prompt.shape[0], batch)
            if prompt.shape[1] != seq:
                raise RuntimeError(f"reft: the training prompt covers {prompt.shape[1]} positions but the forward "
                                   f"has {seq}; call before_forward with this batch")
            edit = choose_positions(prompt.to(device) & current, state.first, state.last, segments.to(device))
        elif state.lengths is not None:
            lengths = state.lengths.to(device)
            _check_rows("prompt lengths", lengths.shape[0], batch)
            prompt = torch.arange(seq, device=device)[None, :] < lengths[:, None]
            edit = choose_positions(prompt & current, state.first, state.last)
        elif past > 0:
            return  # a decoding step: its tokens come after the prompt
        else:
            edit = choose_positions(current, state.first, state.last)
        if bool(edit.any()):  # one host sync per forward instead of one per edited layer
            state.edit = edit


class _EditLayer:
    """Forward hook of a chosen decoder layer: applies its intervention at the positions the pre-hook chose."""

    def __init__(self, state: _State, intervention: LoReFT):
        self.state = state
        self.intervention = intervention

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        edit = self.state.edit
        if edit is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        if tuple(edit.shape) != tuple(h.shape[:2]):
            raise RuntimeError(f"reft: position mask {tuple(edit.shape)} does not match the hidden states "
                               f"{tuple(h.shape[:2])} of {type(module).__name__}")
        where = edit.to(h.device).nonzero(as_tuple=True)
        # index_put is out of place: the unedited positions keep the layer's own values, bit for bit.
        edited = h.index_put(where, self.intervention(h[where]))
        return (edited, *output[1:]) if isinstance(output, tuple) else edited


class _Generate:
    """Stands in for `model.generate` on the instance: marks the call so that its first forward fixes the prompt.

    A class rather than a closure so that deepcopy and pickling of the model carry it over to the copy.
    """

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = _state(self.model)
        state.generating, state.generate_prompt = True, None
        try:
            return type(self.model).generate(self.model, *args, **kwargs)
        finally:
            state.generating, state.generate_prompt, state.edit = False, None, None


# --------------------------------------------------------------------------------------------------------- inject
def inject(model: nn.Module, cfg: ReftAdapter) -> None:
    """Create the interventions of `cfg`, hook them into the chosen layers and wrap generate."""
    layers = io.decoder_layers(model)
    hidden = io.hidden_size(model)
    if cfg.r > hidden:
        raise UserError(f"adapter.r: {cfg.r} exceeds the hidden size {hidden}; R needs orthonormal rows")
    state = _State(first=cfg.first, last=cfg.last)
    container = nn.ModuleDict({"layers": nn.ModuleDict()})
    for i in io.select_layers(model, cfg.layers):
        intervention = LoReFT(hidden, cfg.r, cfg.dropout).to(device=io.module_device(layers[i]),
                                                    dtype=io.trainable_dtype(layers[i]))
        container["layers"][str(i)] = intervention
        layers[i].register_forward_hook(_EditLayer(state, intervention))
    container.train(model.training)  # new modules start in train mode; an eval-mode model must not get dropout
    model.add_module(io.CONTAINER, container)
    setattr(model, _STATE, state)
    model.register_forward_pre_hook(_PreForward(state), with_kwargs=True)
    model.generate = _Generate(model)


def parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """R (as its Householder `original`), W and b of every chosen layer, under their saved names."""
    return dict(getattr(model, io.CONTAINER).named_parameters())
