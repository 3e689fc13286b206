"""Calibration rows for compression (prune, quantize, lowrank): token windows of a dataset, and the inputs each
linear layer of a decoder layer sees on them.

The windows: every row of the data rendered as text (conversations through the chat template, as pt reads them),
the token ids concatenated in order, then `samples` windows of `length` tokens at seeded random offsets (the way
Wanda, SparseGPT and GPTQ draw from C4 or wikitext). A corpus shorter than samples x length gives fewer windows,
without overlap; one shorter than a window gives one window of what there is.

`LayerInputs` runs the model over the windows and, for one decoder layer, hands every linear layer's input (the
tokens as rows) to a callback, stopping the forward pass right after that layer: the layers before it have already
been compressed when it runs, so each layer is calibrated on the inputs the compressed model gives it (sequential
calibration, as Wanda's and GPTQ's reference code do), at a cost of about half a forward pass per layer.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from tunelab.errors import UserError


def calibration_windows(cfg, tokenizer, *, samples: int, length: int, seed: int = 0) -> torch.Tensor:
    """[n, length] token ids (n <= samples) from `cfg.data.train` (module docstring)."""
    from tunelab.data.kinds import TEXT
    from tunelab.data.load import load_conversations
    from tunelab.data.prepare import encode_rows
    from tunelab.data.templates import resolve_template

    if samples < 1 or length < 2:
        raise UserError(f"--samples must be >= 1 and --length >= 2, got {samples} and {length}")
    convs, _ = load_conversations(cfg.data.train, on_bad_row=cfg.data.on_bad_row, kind=TEXT,
                                  replace=cfg.data.replace)
    template = resolve_template(cfg.data.template, tokenizer)
    max_length = cfg.data.max_length
    cfg.data.max_length = 10 ** 9  # whole rows: the windows cut them
    try:
        rows, _ = encode_rows(convs, tokenizer, template, cfg.data, TEXT)
    finally:
        cfg.data.max_length = max_length
    ids = [t for r in rows for t in r.input_ids]
    if len(ids) < 2:
        raise UserError("--calibration: the data holds no text to calibrate on")
    if len(ids) <= length:
        return torch.tensor([ids], dtype=torch.long)
    starts = range(0, len(ids) - length + 1)
    if len(ids) < samples * length:  # not enough for random windows: consecutive ones
        picked = list(range(0, len(ids) - length + 1, length))
    else:
        picked = sorted(random.Random(seed).sample(starts, samples))
    return torch.tensor([ids[s:s + length] for s in picked], dtype=torch.long)


class _Stop(Exception):
    pass


def decoder_layers(model) -> torch.nn.ModuleList:
    from tunelab.models.wrappers import core_model

    decoder = core_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise UserError(f"{type(core_model(model)).__name__}: no list of decoder layers found (model.layers)")
    return layers


def linear_layers(layer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers of a decoder layer, by their name inside it (self_attn.q_proj, mlp.down_proj, ...)."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}


def run_layer_inputs(model, windows: torch.Tensor, index: int, on_input: Callable[[str, torch.Tensor], None], *,
                     batch_size: int = 8, names: list[str] | None = None) -> None:
    """Run the model over `windows` up to decoder layer `index` and call on_input(name, x [tokens, in_features])
    for each linear of that layer (or those in `names`) on every batch."""
    layer = decoder_layers(model)[index]
    linears = linear_layers(layer)
    handles = []
    for name, module in linears.items():
        if names is not None and name not in names:
            continue

        def hook(mod, args, name=name):
            x = args[0]
            on_input(name, x.reshape(-1, x.shape[-1]).detach())

        handles.append(module.register_forward_pre_hook(hook))

    def stop(mod, args, output):
        raise _Stop

    handles.append(layer.register_forward_hook(stop))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                try:
                    model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()


def layer_io(model, windows: torch.Tensor, *, batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per decoder layer, two sums over every calibration token: (sum of cos(input, output) of its hidden states,
    the number of tokens), from one forward pass (layer dropping ranks layers by it)."""
    layers = decoder_layers(model)
    sums = [[0.0, 0] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        def hook(mod, args, output, i=i):
            h_in = args[0] if args else None
            h_out = output[0] if isinstance(output, tuple) else output
            if h_in is None:
                return
            cos = torch.nn.functional.cosine_similarity(h_in.double().reshape(-1, h_in.shape[-1]),
                                                        h_out.double().reshape(-1, h_out.shape[-1]), dim=-1)
            sums[i][0] += float(cos.sum())
            sums[i][1] += int(cos.numel())

        handles.append(layer.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [(torch.tensor(s), torch.tensor(n)) for s, n in sums]


def input_sums(model, windows: torch.Tensor, index: int, of: Callable[[torch.Tensor], torch.Tensor], *,
               names: list[str] | None = None, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Per linear layer of decoder layer `index`: the sum over the calibration batches of of(x), x its inputs
    [tokens, in_features] in float64."""
    sums: dict[str, torch.Tensor] = {}

    def add(name: str, x: torch.Tensor) -> None:
        value = of(x.double())
        sums[name] = sums[name] + value if name in sums else value

    run_layer_inputs(model, windows, index, add, batch_size=batch_size, names=names)
    return sums


def input_square_sums(model, windows: torch.Tensor, index: int, *, names: list[str] | None = None,
                      batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Each input feature's sum of squares over every calibration token, [in_features] (Wanda's norms squared)."""
    return input_sums(model, windows, index, lambda x: x.pow(2).sum(0), names=names, batch_size=batch_size)


def input_hessians(model, windows: torch.Tensor, index: int, *, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Each linear's H = sum over the calibration tokens of x x^T, [in_features, in_features] (GPTQ's)."""
    return input_sums(model, windows, index, lambda x: x.T @ x, batch_size=batch_size)
