"""Optimizer with weight-decay groups and learning-rate schedules with warm-up."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tunelab.config.schema import TrainConfig


def decay_groups(model, weight_decay: float, lr: float | None = None,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other 1-D parameters are not decayed. With `lr_scale`
    (parameter name -> multiple of `lr`), parameters are further grouped by their learning rate (LoRA+)."""
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decayed = not (p.ndim < 2 or "norm" in name.lower())
        scale = lr_scale(name) if lr_scale is not None else 1.0
        groups.setdefault((decayed, scale), []).append(p)
    out = []
    for (decayed, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        if lr is not None and scale != 1.0:
            group["lr"] = lr * scale
        out.append(group)
    return out


def build_optimizer(model, cfg: TrainConfig, lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    groups = decay_groups(model, cfg.weight_decay, cfg.lr, lr_scale)
    if not groups:
        from tunelab.errors import UserError

        raise UserError("adapter: no trainable parameters; check adapter.type and its options")
    # foreach kernels are faster on GPU; on CPU the plain loop is as fast and uses less memory.
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, foreach=torch.cuda.is_available()
    )


def lr_lambda(kind: str, total: int, warmup: int, min_ratio: float):
    """Multiplier of the peak lr at a given step (0-based count of completed steps)."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return min_ratio + (1.0 - min_ratio) * (1.0 - progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.scheduler, total_steps, warmup, cfg.min_lr_ratio))
