"""A faster forward for peft's plain LoRA linear layers.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the scaling multiplies, and the sum adds, a full
[tokens, out_features] tensor in the forward and again in the backward — four elementwise passes over the largest
activation of the layer, for every adapted linear. Here both go into one GEMM: `addmm` scales the low-rank product
by its `alpha` and adds it to the base output in the same kernel:

    y = addmm(base(x), dropout(x) @ A^T, B^T, alpha=scaling)

The result is the same function with the same parameters (peft's modules, state dict and adapter files are
untouched; only the order of floating-point operations differs, ~1e-7 relative in fp32), and autograd saves the
same tensors as for peft's forward (the planner's activation model holds for both). It is installed per layer,
and a layer falls back to peft's own forward whenever it is not plain LoRA at that moment: DoRA or another variant,
several active adapters, a mixed-adapter batch, merged or disabled adapters, a LoRA bias, a quantized or
non-`nn.Linear` base layer, or an input whose dtype differs from the adapter's.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _fused_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    active = self.active_adapters
    if args or kwargs or self.disable_adapters or self.merged or len(active) != 1 or active[0] in self.lora_variant \
            or active[0] not in self.lora_A:
        return self._tunelab_peft_forward(x, *args, **kwargs)
    name = active[0]
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    if lora_b.bias is not None or x.dtype != lora_a.weight.dtype:
        return self._tunelab_peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    low = F.linear(self.lora_dropout[name](x), lora_a.weight)
    shape = result.shape
    # alpha scales the product inside the GEMM; B enters as a view of the parameter, so autograd saves nothing new
    out = torch.addmm(result.reshape(-1, shape[-1]), low.reshape(-1, low.shape[-1]), lora_b.weight.t(),
                      alpha=self.scaling[name])
    return out.view(shape)


def _eligible(module: nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear as LoraLinear

    return type(module) is LoraLinear and type(module.get_base_layer()) is nn.Linear


def install(model: nn.Module) -> int:
    """Give every plain peft LoRA `Linear` in `model` the fused forward; returns how many layers got it."""
    n = 0
    for module in model.modules():
        if _eligible(module) and not hasattr(module, "_tunelab_peft_forward"):
            module._tunelab_peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n


def uninstall(model: nn.Module) -> int:
    """Restore peft's forward on every layer `install` changed; returns how many."""
    n = 0
    for module in model.modules():
        if hasattr(module, "_tunelab_peft_forward"):
            module.forward = module._tunelab_peft_forward
            del module._tunelab_peft_forward
            n += 1
    return n


def _mergeable(module: nn.Module) -> bool:
    """A plain LoRA linear at this moment (one active adapter, no variant or LoRA bias, not merged or disabled, not
    fan-in-fan-out) on an `nn.Linear` base whose weight no other module shares."""
    if not _eligible(module) or module.disable_adapters or module.merged or getattr(module, "fan_in_fan_out", False):
        return False
    active = module.active_adapters
    return (len(active) == 1 and active[0] in module.lora_A and active[0] not in module.lora_variant
            and module.lora_B[active[0]].bias is None)


def adapted_linears(model: nn.Module) -> list[nn.Module]:
    """The LoRA layers `merged_for_sampling` would merge."""
    return [m for m in model.modules() if _mergeable(m)]


class merged_for_sampling:
    """Within the block, every plain LoRA linear of `model` computes `x (W + scaling B A)^T` with one GEMM: its base
    layer's weight is temporarily a merged copy (a tensor of its own) and the adapter path is skipped. The base
    parameters are never written: on leaving, the same Parameter objects are back in place, bit for bit, so the
    frozen base cannot drift (peft's merge_adapter/unmerge_adapter add and subtract in place, which rounds). For
    forward passes without gradients (sampling); it costs one copy of the adapted weights while it lasts."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._saved: list[tuple[nn.Module, nn.Module, Any, Any]] = []

    def __enter__(self):
        with torch.no_grad():
            for module in adapted_linears(self.model):
                name = module.active_adapters[0]
                base = module.get_base_layer()
                weight = base.weight
                delta = (module.lora_B[name].weight @ module.lora_A[name].weight) * module.scaling[name]
                merged = weight.detach() + delta.to(weight.dtype)
                self._saved.append((module, base, weight, module.__dict__.get("forward")))
                base._parameters["weight"] = merged  # a plain tensor: F.linear reads it as the weight
                module.forward = base.forward
        return self

    def __exit__(self, *exc):
        for module, base, weight, forward in reversed(self._saved):
            base._parameters["weight"] = weight
            if forward is None:
                del module.forward
            else:
                module.forward = forward
        self._saved.clear()
        return False
