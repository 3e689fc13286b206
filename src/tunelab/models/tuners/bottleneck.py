"""Bottleneck adapters (Houlsby et al. 2019): small residual MLPs after the attention and/or MLP sub-blocks.

Each adapted sub-block's output o becomes o + up(dropout(act(down(o)))) before the decoder layer adds it to the
residual stream. `up` starts at zero, so the adapted model computes exactly what the base computes until the first
optimizer step: training starts from the pretrained behaviour instead of from a perturbed one.

The adapters are applied with forward hooks on the sub-blocks rather than by replacing them with wrappers: the
base model's parameter names, module classes (which transformers matches for output recording, device maps and
gradient checkpointing) and `save_pretrained` layout stay as they were. The adapter modules themselves live in one
ModuleDict on the causal LM (`model.tunelab_tuner`), whose state_dict keys (``layers.<i>.<attn|mlp>.<down|up>.*``)
are the names saved in the adapter file.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.config.schema import BottleneckAdapter
from tunelab.errors import UserError
from tunelab.models.tuners import io

CONFIG = BottleneckAdapter
TRAINS = ("Small bottleneck MLPs (down-projection, activation, zero-initialised up-projection) added after the "
          "attention and/or MLP block of each chosen decoder layer; the base weights stay frozen.")
MERGEABLE = False

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
# Attribute names of the sub-blocks across architectures, most common first.
_SUBBLOCKS: dict[str, tuple[str, ...]] = {
    "attn": ("self_attn", "attn", "self_attention", "attention"),
    "mlp": ("mlp", "feed_forward", "ffn", "block_sparse_moe"),
}


class Bottleneck(nn.Module):
    """h -> up(dropout(act(down(h)))), the residual delta of one adapter.

    Its weights are kept in float32 whatever the base dtype (float64 beside a float64 base): these few parameters are all that trains, and AdamW
    updates on bf16 weights lose most small steps. The input is upcast and the delta cast back to the stream dtype.
    """

    def __init__(self, hidden: int, bottleneck: int, activation: str, dropout: float):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, dtype=torch.float32)
        self.act = _ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, hidden, dtype=torch.float32)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.dropout(self.act(self.down(h.to(self.down.weight.dtype)))))
        return h + delta.to(h.dtype)


def _subblock(layer: nn.Module, where: str) -> nn.Module:
    for name in _SUBBLOCKS[where]:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(f"adapter.where: cannot find the {where} block in {type(layer).__name__} (looked for "
                    f"{', '.join(_SUBBLOCKS[where])})")


class _ApplyAdapter:
    """Forward hook applying an adapter to a sub-block's output; attention blocks return (output, weights, ...).

    A class rather than a closure so that `copy.deepcopy(model)` gives the copy hooks that use the copy's adapters
    (deepcopy shares functions but copies objects).
    """

    def __init__(self, adapter: Bottleneck):
        self.adapter = adapter

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (self.adapter(output[0]), *output[1:])
        if isinstance(output, torch.Tensor):
            return self.adapter(output)
        raise TypeError(f"bottleneck adapter: unsupported output type {type(output).__name__} from "
                        f"{type(module).__name__}")


def inject(model: nn.Module, cfg: BottleneckAdapter) -> None:
    """Create the adapters of `cfg` on `model` and hook them into the chosen sub-blocks (frozen state untouched)."""
    layers = io.decoder_layers(model)
    hidden = io.hidden_size(model)
    bottleneck = max(1, hidden // cfg.reduction)
    where = [w for w in ("attn", "mlp") if w in cfg.where]  # fixed order: stable module names
    if not where or len(where) != len(set(cfg.where)):
        raise UserError(f"adapter.where: choose among attn, mlp (got {cfg.where})")
    container = nn.ModuleDict({"layers": nn.ModuleDict()})
    for i in io.select_layers(model, cfg.layers):
        per_layer = nn.ModuleDict()
        for w in where:
            block = _subblock(layers[i], w)
            adapter = Bottleneck(hidden, bottleneck, cfg.activation, cfg.dropout).to(
                device=io.module_device(block), dtype=io.trainable_dtype(block))
            per_layer[w] = adapter
            block.register_forward_hook(_ApplyAdapter(adapter))
        container["layers"][str(i)] = per_layer
    container.train(model.training)  # new modules start in train mode; an eval-mode model must not get dropout
    model.add_module(io.CONTAINER, container)


def parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter parameters under their saved names (``layers.<i>.<attn|mlp>.<down|up>.<weight|bias>``)."""
    return dict(getattr(model, io.CONTAINER).named_parameters())


def before_forward(model: nn.Module, batch: dict) -> None:
    """Bottleneck adapters act on every position: nothing depends on the batch."""
