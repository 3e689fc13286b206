"""The frozen models a method asks for (`Method.models`): built once, beside the policy, without gradients.

adapter_off runs the policy itself with its peft adapter disabled: the frozen base, and no second copy in memory.
copy loads the base model (model.*) a second time; path loads another model folder (a teacher), with the base's
model.* options otherwise. Copies are frozen and in eval mode, on this process's device, in the policy's dtype. With
per-sequence attention for packed rows (models/varlen.py) a copy attends per sequence like the policy.
"""

from __future__ import annotations

import dataclasses

from tunelab.config.schema import Config
from tunelab.methods.base import ExtraModel, FrozenModel
from tunelab.models.load import load_model
from tunelab.models.varlen import use_varlen
from tunelab.models.wrappers import core_model


def build_frozen(need: ExtraModel, cfg: Config, policy, *, dtype, device, autocast) -> FrozenModel:
    """One frozen model as `need` describes it."""
    if need.source == "adapter_off":
        return FrozenModel(policy, disable=policy.disable_adapter, autocast=autocast, source="adapter_off")
    model_cfg = cfg.model if need.source == "copy" else dataclasses.replace(cfg.model, path=need.path)
    module = load_model(model_cfg, dtype=dtype).to(device).eval()
    module.requires_grad_(False)
    return FrozenModel(module, autocast=autocast, source=need.source)


def build_frozen_models(needs: dict[str, ExtraModel], cfg: Config, policy, *, dtype, device,
                        autocast) -> dict[str, FrozenModel]:
    return {role: build_frozen(need, cfg, policy, dtype=dtype, device=device, autocast=autocast)
            for role, need in needs.items()}


def attend_per_sequence(models: dict[str, FrozenModel]) -> None:
    """Switch the loaded copies to per-sequence attention, as the policy was for packed rows."""
    for frozen in models.values():
        if frozen.source != "adapter_off":
            use_varlen(core_model(frozen.module))
