"""Optimizers (train.optimizer) over weight-decay groups, and learning-rate schedules with warm-up.

adamw is torch's; adamw_8bit and the paged ones are bitsandbytes'; adafactor is transformers'; galore is
galore-torch's; sgd is torch's. The optional packages are imported only when chosen.
"""

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


def _optional(package: str, optimizer: str):
    """Import an optional package an optimizer needs, or say in one line which one is missing."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        from tunelab.errors import UserError

        pip = {"galore_torch": "galore-torch"}.get(package, package)
        raise UserError(f"train.optimizer: {optimizer} needs the {pip} package (pip install {pip})") from None


def _adamw(groups: list[dict], cfg: TrainConfig, model) -> torch.optim.Optimizer:
    # foreach kernels on GPU; on CPU torch's fused kernel: one pass over each tensor, no temporaries (the plain
    # loop allocates sqrt(v) and its quotient, two copies of the largest tensor: of a whole partition under
    # DeepSpeed, whose optimizer steps one flat tensor) and ~9x faster than that loop on one thread (measured on a
    # 25M-element tensor: benchmarks/RESULTS-distributed.md)
    cuda = torch.cuda.is_available()
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, foreach=True if cuda else None,
        fused=None if cuda else True,
    )


def _bnb_adamw(bits: int, paged: bool):
    """bitsandbytes AdamW with 32-bit or 8-bit blockwise states, paged or not.

    Paging keeps the states in CUDA unified memory, which the driver evicts to host RAM under GPU memory pressure
    instead of failing the allocation. It exists only on CUDA: on CPU bitsandbytes would fall back to ordinary
    tensors with a warning, so there the non-paged class is built directly — the same update, the same states and
    the same state_dict (a checkpoint moves between the two freely). Note that bitsandbytes keeps parameters with
    fewer than 4096 elements (`min_8bit_size`) in 32-bit states even with 8-bit optimizers.
    """

    def build(groups: list[dict], cfg: TrainConfig, model) -> torch.optim.Optimizer:
        name = ("paged_" if paged else "") + ("adamw_8bit" if bits == 8 else "adamw")
        bnb = _optional("bitsandbytes", name)
        use_paged = paged and torch.cuda.is_available()
        cls = {(8, True): bnb.optim.PagedAdamW8bit, (8, False): bnb.optim.AdamW8bit,
               (32, True): bnb.optim.PagedAdamW, (32, False): bnb.optim.AdamW}[(bits, use_paged)]
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)

    return build


def _adafactor(groups: list[dict], cfg: TrainConfig, model) -> torch.optim.Optimizer:
    """transformers' Adafactor as a plain optimizer: the loop's scheduler drives the learning rate (no relative
    step sizes, no scaling by the parameter's RMS), and no first moment (beta1 None), which is where its memory
    saving comes from: a row and a column second moment per matrix instead of two full states."""
    optimization = _optional("transformers.optimization", "adafactor")
    return optimization.Adafactor(groups, lr=cfg.lr, relative_step=False, scale_parameter=False, warmup_init=False,
                                  beta1=None, weight_decay=cfg.weight_decay)


def galore_groups(model, groups: list[dict], cfg: TrainConfig) -> list[dict]:
    """Split each decay group into the 2-D weights GaLore projects (name contains one of `galore_target`) and the
    rest, which stay plain AdamW; the projected group carries GaLore's rank, gap, scale and projection type."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for group in groups:
        projected = [p for p in group["params"]
                     if p.ndim == 2 and any(t in names[id(p)] for t in cfg.galore_target)]
        chosen = {id(p) for p in projected}
        rest = [p for p in group["params"] if id(p) not in chosen]
        if rest:
            out.append({**group, "params": rest})
        if projected:
            out.append({**group, "params": projected, "rank": cfg.galore_rank, "update_proj_gap": cfg.galore_gap,
                        "scale": cfg.galore_scale, "proj_type": "std"})
    return out


def _galore(groups: list[dict], cfg: TrainConfig, model) -> torch.optim.Optimizer:
    """galore-torch's GaLoreAdamW (its 1.0 release imports and runs with transformers 5): AdamW states on the
    rank-r projection of each targeted matrix's gradient, the projection recomputed by SVD every `galore_gap`
    steps. Its projector (with the projection matrix) lives in the optimizer state, so checkpoints resume
    exactly."""
    galore = _optional("galore_torch", "galore")
    split = galore_groups(model, groups, cfg)
    if not any("rank" in g for g in split):
        from tunelab.errors import UserError

        raise UserError(f"train.galore_target: no trainable 2-D weight name contains any of {cfg.galore_target}")
    return galore.GaLoreAdamW(split, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                              weight_decay=cfg.weight_decay, no_deprecation_warning=True)


def _sgd(groups: list[dict], cfg: TrainConfig, model) -> torch.optim.Optimizer:
    """torch SGD with `momentum` (one buffer per parameter; none at momentum 0). Its weight decay is L2 (added
    to the gradient), not AdamW's decoupled decay."""
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, foreach=torch.cuda.is_available())


OPTIMIZER_BUILDERS: dict[str, Callable] = {
    "adamw": _adamw,
    "adamw_8bit": _bnb_adamw(8, paged=False),
    "paged_adamw": _bnb_adamw(32, paged=True),
    "paged_adamw_8bit": _bnb_adamw(8, paged=True),
    "adafactor": _adafactor,
    "galore": _galore,
    "sgd": _sgd,
}


def build_optimizer(model, cfg: TrainConfig, lr_scale: Callable[[str], float] | None = None,
                    extra: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` names, over `decay_groups` (no decay on 1-D parameters; LoRA+ lr groups) of
    the model and of the `extra` modules that train beside it (a method's critic). Every one of them saves and
    restores its whole state through state_dict/load_state_dict, which the loop's checkpoints rely on for exact
    resume."""
    from tunelab.errors import UserError

    groups = decay_groups(model, cfg.weight_decay, cfg.lr, lr_scale)
    for module in (extra or {}).values():
        groups += decay_groups(module, cfg.weight_decay, cfg.lr)
    if not groups:
        raise UserError("adapter: no trainable parameters; check adapter.type and its options")
    try:
        builder = OPTIMIZER_BUILDERS[cfg.optimizer]
    except KeyError:
        raise UserError(f"train.optimizer: unknown optimizer {cfg.optimizer!r}; use one of "
                        f"{', '.join(OPTIMIZER_BUILDERS)}") from None
    return builder(groups, cfg, model)


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
