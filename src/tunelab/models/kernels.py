"""Speed and memory switches applied to a loaded model: torch.compile, Liger kernels, flash attention checks,
activation offloading. Each one fails with a clear message where the hardware or an optional package is missing."""

from __future__ import annotations

import contextlib
import importlib.util

from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError
from tunelab.models.wrappers import core_model


def check_model_switches(cfg: ModelConfig) -> None:
    """Refuse switches this machine cannot honour, before any weights load."""
    import torch

    cuda = torch.cuda.is_available()
    if cfg.attn_implementation.startswith("flash_attention"):
        package = "flash_attn" if cfg.attn_implementation == "flash_attention_2" else "flash_attn_interface"
        if not cuda:
            raise UserError(f"model.attn_implementation: {cfg.attn_implementation} needs a CUDA GPU; use sdpa on CPU")
        if importlib.util.find_spec(package) is None:
            raise UserError(
                f"model.attn_implementation: {cfg.attn_implementation} needs the {package} package "
                "(pip install flash-attn --no-build-isolation); or use sdpa"
            )
    if cfg.liger_kernels:
        if not cuda:
            raise UserError("model.liger_kernels: Liger's Triton kernels need a CUDA GPU")
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError("model.liger_kernels: liger-kernel is not installed (pip install 'tunelab[liger]')")
    if cfg.offload_activations and not cuda:
        raise UserError(
            "model.offload_activations: moves activations from GPU to CPU memory; a CPU run has nothing to offload"
        )


def apply_model_switches(model, cfg: ModelConfig):
    """Liger kernels (RMSNorm, RoPE, SwiGLU; tunelab keeps its own loss) and torch.compile, in that order."""
    if cfg.liger_kernels:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # cross-entropy stays tunelab's: it already skips untrained positions and chunks the vocabulary
        _apply_liger_kernel_to_instance(model=core_model(model), rope=True, rms_norm=True, swiglu=True,
                                        cross_entropy=False, fused_linear_cross_entropy=False)
    if cfg.compile:
        # dynamic shapes: micro-batches differ in length, so avoid one recompilation per length
        core_model(model).compile(dynamic=True)
    return model


def activation_offload(cfg: ModelConfig):
    """A context for the forward pass that keeps saved activations in pinned CPU memory until the backward."""
    if not cfg.offload_activations:
        return contextlib.nullcontext()
    import torch

    return torch.autograd.graph.save_on_cpu(pin_memory=True)


def enable_activation_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs and with LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "config"):
        model.config.use_cache = False
