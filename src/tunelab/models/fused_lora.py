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
