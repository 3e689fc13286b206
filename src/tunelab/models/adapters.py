"""Fine-tuning types: which parameters train. full | freeze | lora (through peft).

`ADAPTERS` maps the names users write (`adapter.type`) to the function that prepares a model for that type.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from tunelab.config.schema import AdapterBase, FreezeAdapter, FullAdapter, LoraAdapter
from tunelab.errors import UserError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


@dataclass
class ParamCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable params: {self.trainable:,} / {self.total:,} ({pct:.4f}%)"


@contextlib.contextmanager
def quiet_peft_warnings():
    """peft reads transformers' deprecated `is_gradient_checkpointing`; its FutureWarning is noise for our users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def count_parameters(model) -> ParamCount:
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCount(trainable, total)


def _full(model, cfg: FullAdapter):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _freeze(model, cfg: FreezeAdapter):
    names = [n for n, _ in model.named_parameters()]
    indices = sorted({i for i in (layer_index(n) for n in names) if i is not None})
    if cfg.layers > len(indices):
        raise UserError(f"adapter.layers: {cfg.layers} exceeds the model's {len(indices)} decoder layers")
    train_layers = set(indices[len(indices) - cfg.layers:]) if cfg.layers else set()
    matched_modules: set[str] = set()
    for name, p in model.named_parameters():
        idx = layer_index(name)
        train = idx is not None and idx in train_layers
        parts = name.split(".")
        for mod in cfg.modules:
            mparts = mod.split(".")
            # a module matches when its dotted name appears as consecutive components of the parameter name
            if any(parts[i:i + len(mparts)] == mparts for i in range(len(parts) - len(mparts) + 1)):
                train = True
                matched_modules.add(mod)
        p.requires_grad_(train)
    missing = [m for m in cfg.modules if m not in matched_modules]
    if missing:
        raise UserError(f"adapter.modules: no parameter matches {missing[0]!r} in this model")
    return model


def _lora(model, cfg: LoraAdapter):
    from peft import LoraConfig, PeftModel, get_peft_model

    from tunelab.models import fused_lora

    if cfg.path:
        from pathlib import Path

        if not (Path(cfg.path) / "adapter_config.json").exists():
            raise UserError(f"adapter.path: no adapter_config.json in {cfg.path}")
        with quiet_peft_warnings():
            model = PeftModel.from_pretrained(model, cfg.path, is_trainable=True)
        fused_lora.install(model)
        return model
    target = cfg.target
    if isinstance(target, list) and len(target) == 1 and target[0] == "all-linear":
        target = "all-linear"
    lora_cfg = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target,
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        modules_to_save=cfg.modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    try:
        with quiet_peft_warnings():
            model = get_peft_model(model, lora_cfg)
    except ValueError as e:
        raise UserError(f"adapter.target: {str(e).splitlines()[0]}") from None
    fused_lora.install(model)  # same function, fewer passes over activations (models/fused_lora.py)
    return model


ADAPTERS: dict[str, Callable] = {
    "full": _full,
    "freeze": _freeze,
    "lora": _lora,
}


def apply_adapter(model, cfg: AdapterBase):
    """Prepare `model` for training with the configured fine-tuning type; returns the (possibly wrapped) model."""
    model = ADAPTERS[cfg.type](model, cfg)
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:  # transformers < 5
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing and cfg.type != "full":
        # With a frozen embedding layer, checkpointed blocks would see inputs that need no grad.
        model.enable_input_require_grads()
    return model


def lr_scale(cfg: AdapterBase) -> Callable[[str], float] | None:
    """Per-parameter learning-rate multiples the adapter asks for (LoRA+: `lr_ratio` on the B matrices), or None."""
    ratio = getattr(cfg, "lr_ratio", 1.0)
    if cfg.type != "lora" or ratio == 1.0:
        return None
    return lambda name: ratio if ".lora_B." in name else 1.0


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
