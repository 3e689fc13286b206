"""Helpers every native tuner shares: finding decoder layers, and writing/reading an adapter folder.

An adapter folder holds two files:
  ``tunelab_adapter.json``        ``{"tunelab_adapter": type, "config": {...}, "format": 1, ...}``
  ``adapter_model.safetensors``   only the method's trained tensors, under names that do not depend on how the
                                  model happens to be wrapped when it is saved: relative to the method's own
                                  modules (``layers.3.attn.down.weight``), or for BitFit the causal LM's own
                                  parameter names (``model.layers.0.self_attn.q_proj.bias``).
Loading is strict: the tensors of a folder must match what the method creates on the base model name for name and
shape, because a silently skipped or broadcast tensor gives a model that loads, runs and is quietly wrong.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.errors import UserError

ADAPTER_JSON = "tunelab_adapter.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = 1
# Attribute of the causal LM that holds the method's modules (bottleneck, reft): one registered submodule, so the
# modules follow model.to(...), model.train()/eval() and model.parameters() without touching the base's own names.
CONTAINER = "tunelab_tuner"


# ------------------------------------------------------------------------------------------------ model structure
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, in order.

    transformers models expose their backbone through `get_decoder()` with the blocks in `.layers` (Llama, Qwen,
    Mistral, Gemma, ...); older architectures name the list differently (GPT-2 `h`, Falcon `h`, OPT
    `decoder.layers`). When neither route works, the longest ModuleList of same-class modules is the block stack
    in every architecture we know of.
    """
    try:
        core = model.get_decoder()
    except (AttributeError, NotImplementedError):
        core = None
    if core is not None:
        for name in ("layers", "h", "blocks", "block", "layer"):
            layers = getattr(core, name, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return layers
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}; native adapters need a "
                        "transformer with a list of decoder blocks")
    return best


def select_layers(model: nn.Module, indices: Iterable[int], what: str = "adapter.layers") -> list[int]:
    """Resolve a user's layer list (negative counts from the end; empty: all) to sorted, distinct indices."""
    n = len(decoder_layers(model))
    indices = list(indices)
    if not indices:
        return list(range(n))
    chosen: set[int] = set()
    for i in indices:
        if not -n <= i < n:
            raise UserError(f"{what}: layer {i} is out of range for a model with {n} decoder layers "
                            f"(use 0..{n - 1}, or -1..-{n} from the end)")
        chosen.add(i % n)
    return sorted(chosen)


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream, from the (text) config."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UserError(f"cannot read the hidden size of {type(model).__name__} from its config")


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights live, so new modules are created beside them (also with a device_map)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def trainable_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of new trainable weights beside `module`: float32 (AdamW's small steps vanish in half precision),
    or float64 when the base is float64 (a float64 run keeps its precision throughout)."""
    for p in module.parameters():
        return torch.float64 if p.dtype == torch.float64 else torch.float32
    return torch.float32


# ------------------------------------------------------------------------------------------------------ folders
def write_folder(folder: Path, type_name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                 base_model: str | None = None) -> None:
    """Write the json description and the safetensors file of an adapter into `folder` (created if missing)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views that share storage and non-contiguous tensors; checkpoints must live on the CPU.
    plain = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
    save_file(plain, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "tunelab_adapter": type_name})
    meta: dict[str, Any] = {"tunelab_adapter": type_name, "config": dict(config), "format": FORMAT}
    if base_model:
        # Informational (like peft's base_model_name_or_path): what the adapter was trained on.
        meta["base_model_name_or_path"] = base_model
    (folder / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def is_folder(folder: str | Path) -> bool:
    return (Path(folder) / ADAPTER_JSON).is_file()


def read_meta(folder: Path) -> tuple[str, dict[str, Any]]:
    """The (type, config) stored in an adapter folder, with every malformed case reported as a UserError."""
    path = Path(folder) / ADAPTER_JSON
    if not path.is_file():
        raise UserError(f"{folder}: not a tunelab adapter folder (no {ADAPTER_JSON})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: cannot read adapter description: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("tunelab_adapter"), str):
        raise UserError(f"{path}: missing the 'tunelab_adapter' type name")
    fmt = meta.get("format", FORMAT)
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise UserError(f"{path}: adapter format {fmt!r} is newer than this tunelab reads ({FORMAT}); upgrade tunelab")
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise UserError(f"{path}: 'config' must be an object")
    return meta["tunelab_adapter"], config


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise UserError(f"{folder}: adapter weights {WEIGHTS_FILE} are missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read adapter weights: {e}") from None


def copy_strict(params: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy `state` into the live tensors `params`, demanding the same names and shapes.

    Values are cast to each parameter's dtype and device, so a folder saved from an fp32 run loads into a bf16
    base. The copy is in place (no new Parameter objects), so an optimizer built on the parameters keeps them.
    """
    missing = [name for name in params if name not in state]
    if missing:
        raise UserError(f"{source}: tensor {missing[0]} is missing"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                        + "; was it saved from a different model or adapter config?")
    unexpected = [name for name in state if name not in params]
    if unexpected:
        raise UserError(f"{source}: unexpected tensor {unexpected[0]}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                        + "; was it saved from a different model or adapter config?")
    for name, p in params.items():
        value = state[name]
        if tuple(value.shape) != tuple(p.shape):
            raise UserError(f"{source}: tensor {name} has shape {tuple(value.shape)}, the model expects "
                            f"{tuple(p.shape)}; was it saved from a different base model or adapter config?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(device=p.device, dtype=p.dtype))
