"""BitFit (Ben Zaken et al. 2022): train only the bias terms.

Every parameter named ``bias`` trains (linear layers, norms, heads, wherever the model has them); the rest stays
frozen. Most current LLMs (Llama, Mistral, Gemma) have no biases at all, so on its own BitFit would train nothing:
that is refused with a message, unless ``add_bias`` is set, which gives every nn.Linear inside the decoder layers
that lacks a bias a zero one. Zero biases leave the output unchanged at step 0, and the lm_head and embeddings are
left alone so the vocabulary projection keeps its pretrained form.

The trained tensors are plain biases of plain nn.Linear modules, so the adapted model is an ordinary transformers
model: merging only has to make the config say the biases exist (Llama-style `attention_bias` / `mlp_bias`), so
that `save_pretrained` + `from_pretrained` rebuild the same modules and load the trained values. The names saved in
the adapter file are the model's own parameter names (``model.layers.0.self_attn.q_proj.bias``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from tunelab.config.schema import BitFitAdapter
from tunelab.errors import UserError
from tunelab.models.tuners import io

CONFIG = BitFitAdapter
TRAINS = ("Only the bias terms of the model (with add_bias, zero-initialised biases are first added to the "
          "decoder's linear layers that have none); every weight matrix stays frozen.")
MERGEABLE = True

# Which Llama-style config flag makes transformers build the bias of a linear layer inside this sub-block.
_FLAG_OF_BLOCK: tuple[tuple[tuple[str, ...], str], ...] = (
    (("self_attn", "attn", "self_attention", "attention"), "attention_bias"),
    (("mlp", "feed_forward", "ffn"), "mlp_bias"),
)


def _decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(qualified name, module) of every nn.Linear inside the decoder layers, in model order."""
    inside = {id(m) for layer in io.decoder_layers(model) for m in layer.modules()}
    return [(name, m) for name, m in model.named_modules() if id(m) in inside and isinstance(m, nn.Linear)]


def inject(model: nn.Module, cfg: BitFitAdapter) -> None:
    """Check that the model has biases to train, adding zero ones to the decoder's linears when `add_bias`."""
    linears = _decoder_linears(model)
    if not linears:
        raise UserError(f"adapter bitfit: found no linear layers in the decoder of {type(model).__name__}")
    if not any(m.bias is not None for _, m in linears) and not cfg.add_bias:
        raise UserError(f"adapter bitfit: {type(model).__name__} has no biases in its decoder linear layers, so "
                        "there is nothing to train; set adapter.add_bias=true to add zero-initialised ones")
    added: list[str] = []
    if cfg.add_bias:
        for name, module in linears:
            if module.bias is not None:
                continue
            weight = module.weight
            # Quantized linears keep integer weights; their bias lives in the compute dtype (the model's).
            dtype = weight.dtype if weight.is_floating_point() else model.dtype
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=dtype, device=weight.device))
            added.append(f"{name}.bias")
    # Plain attribute (not a buffer): merge needs to know which biases the base config does not describe.
    model._tunelab_bitfit_added = added


def parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every bias of the model, under its qualified parameter name."""
    return {name: p for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}


def before_forward(model: nn.Module, batch: dict) -> None:
    """Biases act on every position: nothing depends on the batch."""


def _flag_for(name: str) -> str | None:
    parts = name.split(".")
    for blocks, flag in _FLAG_OF_BLOCK:
        if any(b in parts for b in blocks):
            return flag
    return None


def _param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def merge(model: nn.Module) -> nn.Module:
    """Make the config describe the added biases so the model saves and reloads as a plain transformers model.

    Nothing numeric changes: the biases already are the modules' own. What can go wrong is the reload: a config
    that does not create a bias where the model has one would drop the trained value silently. So the patched
    config is checked by building the architecture from it on the meta device (no memory, no weights) and
    comparing every parameter name and shape with the trained model; any difference is an error and the config
    is left as it was.
    """
    added: list[str] = list(getattr(model, "_tunelab_bitfit_added", []))
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    old_flags: dict[str, object] = {}
    if added:
        needed = {_flag_for(name) for name in added}
        for flag in sorted(f for f in needed if f is not None):
            if hasattr(config, flag):
                old_flags[flag] = getattr(config, flag)
                setattr(config, flag, True)
        expected = _param_shapes(model)
        try:
            with torch.device("meta"):
                rebuilt = type(model)(copy.deepcopy(model.config))
        except Exception as e:  # an architecture that cannot be built from its config alone
            _restore(config, old_flags)
            raise UserError(f"adapter bitfit: cannot check that {type(model).__name__}'s config reloads the added "
                            f"biases ({type(e).__name__}: {e}); use `tunelab chat --adapter` with the adapter "
                            "folder instead of merging") from None
        got = _param_shapes(rebuilt)
        lost = [n for n in expected if n not in got] + [n for n in got if n not in expected]
        lost += [n for n in expected if n in got and expected[n] != got[n]]
        if lost:
            _restore(config, old_flags)
            raise UserError(f"adapter bitfit: add_bias added biases that the {type(model).__name__} config cannot "
                            f"express (e.g. {lost[0]}), so a merged model would not reload them; train without "
                            "adapter.add_bias to merge, or use `tunelab chat --adapter` with the adapter folder")
    for attr in ("_tunelab_tuner", "_tunelab_bitfit_added"):
        if attr in model.__dict__:
            delattr(model, attr)
    return model


def _restore(config: object, flags: dict[str, object]) -> None:
    for flag, value in flags.items():
        setattr(config, flag, value)
