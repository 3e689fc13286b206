"""The model inside its wrappers: DDP and FSDP hold it as `.module`, peft as its base model."""

from __future__ import annotations

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model a data-parallel wrapper (DDP, FSDP: `.module`) holds; the model itself when not wrapped. peft
    wrappers stay (their adapters are what trains)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def core_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside data-parallel and peft wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
