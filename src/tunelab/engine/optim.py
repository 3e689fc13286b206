"""Optimizer with weight-decay groups and learning-rate schedules with warm-up."""

from __future__ import annotations

import math

import torch

from tunelab.config.schema import TrainConfig


def decay_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norms and other 1-D parameters are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = decay_groups(model, cfg.weight_decay)
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
