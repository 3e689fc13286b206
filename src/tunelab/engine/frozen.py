"""The models a method asks for (`Method.models`): built once, beside the policy; frozen ones without gradients.

adapter_off runs the policy itself with its peft adapter disabled: the frozen base, and no second copy in memory.
copy loads the base model (model.*) a second time; path loads another model folder (a teacher), with the base's
model.* options otherwise, and merges the adapter it names into it. Copies are frozen and in eval mode, on this
process's device, in the policy's dtype. With per-sequence attention for packed rows (models/varlen.py) a copy
attends per sequence like the policy.

A trainable model (a critic) is loaded the same way, with the head it asks for, every parameter trainable and in
train mode; the loop then trains it beside the policy (methods/base.py).
"""

from __future__ import annotations

import dataclasses

from tunelab.config.schema import Config
from tunelab.methods.base import ExtraModel, FrozenModel
from tunelab.models.adapters import merge_adapter_folder
from tunelab.models.load import load_model
from tunelab.models.varlen import use_varlen
from tunelab.models.wrappers import core_model


def build_frozen(need: ExtraModel, cfg: Config, policy, *, dtype, device, autocast) -> FrozenModel:
    """One frozen model as `need` describes it."""
    if need.source == "adapter_off":
        return FrozenModel(policy, disable=policy.disable_adapter, autocast=autocast, source="adapter_off")
    model_cfg = cfg.model if need.source == "copy" else dataclasses.replace(cfg.model, path=need.path)
    module = load_model(model_cfg, dtype=dtype)
    if need.adapter:
        module = merge_adapter_folder(module, need.adapter, what=need.what or "adapter")
    module = module.to(device).eval()
    module.requires_grad_(False)
    return FrozenModel(module, autocast=autocast, source=need.source)


def build_frozen_models(needs: dict[str, ExtraModel], cfg: Config, policy, *, dtype, device,
                        autocast) -> dict[str, FrozenModel]:
    return {role: build_frozen(need, cfg, policy, dtype=dtype, device=device, autocast=autocast)
            for role, need in needs.items() if not need.trainable}


def build_trained_models(needs: dict[str, ExtraModel], cfg: Config, *, dtype, device, pad_token_id: int | None):
    """The trainable models `needs` asks for, by role: loaded with their head, trainable in full, in train mode."""
    out = {}
    for role, need in needs.items():
        if not need.trainable:
            continue
        if need.source not in ("copy", "path"):
            raise ValueError(f"a trainable model is a copy or a path, not {need.source!r}")
        model_cfg = cfg.model if need.source == "copy" else dataclasses.replace(cfg.model, path=need.path)
        module = load_model(model_cfg, dtype=dtype, head=need.head, pad_token_id=pad_token_id).to(device)
        module.requires_grad_(True)
        out[role] = module.train()
    return out


def attend_per_sequence(models: dict[str, FrozenModel], trained: dict | None = None) -> None:
    """Switch the loaded copies (and trained models) to per-sequence attention, as the policy was for packed
    rows."""
    for frozen in models.values():
        if frozen.source != "adapter_off":
            use_varlen(core_model(frozen.module))
    for module in (trained or {}).values():
        if hasattr(module, "config"):  # a model, not a small head of the method's own
            use_varlen(core_model(module))
