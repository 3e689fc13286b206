"""tunelab's own parameter-efficient methods, for what peft does not provide: bottleneck adapters, BitFit, LoReFT.

Each method is a module with the same small surface:
  CONFIG                         its config dataclass (tunelab.config.schema)
  TRAINS, MERGEABLE              a sentence on what trains, and whether it merges into the weights (generated docs)
  inject(model, cfg)             add the method's modules / hooks / biases to a transformers causal LM, in place
  parameters(model)              the trained tensors under stable names (the names of the safetensors file)
  before_forward(model, batch)   per-batch setup before a training forward (ReFT's prompt positions)
and BitFit also `merge(model)`. This package adds what is common: freezing the base, marking the model, the
adapter folder format and strict loading.

The model stays the transformers model itself (no wrapper class): `generate`, `save_pretrained` of the base
layout, device maps and gradient checkpointing keep working, and `model._tunelab_tuner` records
``{"type": ..., "config": {...}}`` so later code (`tuner_of`) knows what it carries.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from tunelab.config.schema import AdapterBase
from tunelab.errors import ConfigError, UserError
from tunelab.models.tuners import bitfit, bottleneck, io, reft

TUNERS: dict[str, ModuleType] = {"bottleneck": bottleneck, "bitfit": bitfit, "reft": reft}

_MARK = "_tunelab_tuner"


def _config_dict(cfg: AdapterBase) -> dict[str, Any]:
    """The cfg fields that define the method (not `path`, which only says where training started)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "path"}


def _method(type_name: str):
    try:
        return TUNERS[type_name]
    except KeyError:
        raise UserError(f"unknown native adapter type {type_name!r}; expected one of {', '.join(TUNERS)}") from None


def _set_trainable(model: nn.Module, trained: dict[str, nn.Parameter], trainable: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained.values():
        p.requires_grad_(trainable)


def _inject(model: nn.Module, cfg: AdapterBase, trainable: bool) -> nn.Module:
    if tuner_of(model) is not None:
        raise UserError(f"the model already carries a {tuner_of(model)} adapter; load a fresh base model")
    method = _method(cfg.type)
    method.inject(model, cfg)
    setattr(model, _MARK, {"type": cfg.type, "config": _config_dict(cfg)})
    _set_trainable(model, method.parameters(model), trainable)
    return model


def apply_tuner(model: nn.Module, cfg: AdapterBase) -> nn.Module:
    """Add the method of `cfg` to `model` in place and make only its parameters trainable.

    With `cfg.path` the saved adapter is loaded instead (continue training); its folder's config wins over the
    other fields of `cfg`, since the saved tensors only fit the config they were trained with.
    """
    if getattr(cfg, "path", None):
        folder = Path(cfg.path).expanduser()
        type_name, _ = io.read_meta(folder)
        if type_name != cfg.type:
            raise UserError(f"adapter.path: {folder} holds a {type_name} adapter, but adapter.type is {cfg.type}")
        return load_tuner(model, folder, trainable=True)
    cfg.validate("adapter")
    return _inject(model, cfg, trainable=True)


def _unwrap(model: nn.Module) -> nn.Module:
    """The marked transformers model inside DDP / FSDP (`.module`) or torch.compile (`._orig_mod`) wrappers, so
    that callers holding the wrapper (the training loop) still reach the adapter."""
    seen = 0
    while not isinstance(model.__dict__.get(_MARK), dict) and seen < 8:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        model, seen = inner, seen + 1
    return model


def tuner_of(model: nn.Module) -> str | None:
    """The native adapter type `model` carries, or None."""
    mark = _unwrap(model).__dict__.get(_MARK)
    return mark["type"] if isinstance(mark, dict) else None


def _marked(model: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    model = _unwrap(model)
    mark = model.__dict__.get(_MARK)
    if not isinstance(mark, dict):
        raise UserError(f"{type(model).__name__} carries no tunelab native adapter")
    return model, mark


def tuner_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's trained tensors (live, not copies) under the names of the adapter file."""
    model, mark = _marked(model)
    return dict(_method(mark["type"]).parameters(model))


def load_tuner_state(model: nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Copy saved trained tensors into the model's (strict names and shapes), e.g. when resuming a checkpoint."""
    io.copy_strict(tuner_state(model), state, source)


def save_tuner(model: nn.Module, folder: Path) -> None:
    """Write the adapter folder: tunelab_adapter.json and adapter_model.safetensors (trained tensors only)."""
    model, mark = _marked(model)
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    io.write_folder(Path(folder), mark["type"], mark["config"], tuner_state(model), base_model=base)


def is_tuner_folder(folder: str | Path) -> bool:
    """Whether `folder` is an adapter folder written by save_tuner."""
    return io.is_folder(folder)


def load_tuner(model: nn.Module, folder: Path, *, trainable: bool = False) -> nn.Module:
    """Add the adapter saved in `folder` to a freshly loaded base `model` and load its tensors (strictly)."""
    folder = Path(folder)
    type_name, config = io.read_meta(folder)
    method = _method(type_name)
    fields = {f.name for f in dataclasses.fields(method.CONFIG)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise UserError(f"{folder / io.ADAPTER_JSON}: unknown {type_name} config field {unknown[0]!r}; "
                        "was it written by a newer tunelab?")
    config = {**config, "type": type_name}
    try:
        cfg = method.CONFIG(**config)
        cfg.validate("adapter")
    except (TypeError, ConfigError) as e:
        raise UserError(f"{folder / io.ADAPTER_JSON}: invalid {type_name} config: {e}") from None
    tensors = io.read_tensors(folder)
    _inject(model, cfg, trainable=trainable)
    io.copy_strict(tuner_state(model), tensors, str(folder / io.WEIGHTS_FILE))
    return model


def mergeable(type_name: str) -> bool:
    """Whether the adapter type folds into the model's own weights (only BitFit: its tensors are model biases)."""
    return bool(_method(type_name).MERGEABLE)


def merge_tuner(model: nn.Module) -> nn.Module:
    """A plain transformers model with the adapter folded in, for save_pretrained and export (BitFit only)."""
    model, mark = _marked(model)
    type_name = mark["type"]
    if not mergeable(type_name):
        raise UserError(f"adapter type {type_name} cannot be merged into the weights; use `tunelab chat --adapter` "
                        "with the adapter folder (the base model plus the adapter) instead")
    return _method(type_name).merge(model)


def before_forward(model: nn.Module, batch: dict) -> None:
    """Per-batch setup before a training forward; a no-op for models without a native adapter."""
    model = _unwrap(model)
    type_name = tuner_of(model)
    if type_name is not None:
        _method(type_name).before_forward(model, batch)
