"""Which parameters train: what each adapter type leaves trainable in the base and what it adds.

full, freeze (the top layers and named modules) and LoRA (its adapted linears and peft's modules_to_save copies) are
counted from the `ModelShape`; any other adapter type is counted by applying it to the model on the meta device
(`adapter_params`, the loop's own code), so the planner needs no formula per adapter type.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from tunelab.config.schema import Config
from tunelab.engine.plan.model_shape import ModelShape
from tunelab.errors import UserError
from tunelab.models.adapters import layer_index


# ------------------------------------------------------------------------------------------------- which train
def _matches(name: str, module: str) -> bool:
    """A dotted module name appears as consecutive components of a dotted parameter name (adapters._freeze's rule)."""
    parts, mparts = name.split("."), module.split(".")
    return any(parts[i:i + len(mparts)] == mparts for i in range(len(parts) - len(mparts) + 1))


def _lora_targets(shape: ModelShape, targets: str | Sequence[str]) -> list[tuple[str, int, int]]:
    """The linear modules peft adapts: all-linear is every nn.Linear but the output layer; a list matches suffixes."""
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    if isinstance(targets, str) or list(targets) == ["all-linear"]:
        return [lin for lin in shape.linears if lin[0] != shape.head]
    keys = list(targets)
    return [lin for lin in shape.linears if any(lin[0] == k or lin[0].endswith("." + k) for k in keys)]


# Adapters whose branches beside each adapted linear save tensors as wide as the layer (the input and a rank- or
# block-wide product per linear), so the base-layer activation model runs low for them: measured against
# autograd on a 64-wide, 2-layer Llama (fp32, all linears) the plan had 0.65 (adalora), 0.46 (oft) and 0.21 (vera,
# r=256) of the real saved bytes. The others' own saves are small: 0.8-1.04 of the real bytes for ia3, ln,
# prefix, prompt, bottleneck and bitfit; reft (edits after a layer) is over-estimated (1.8).
WIDE_BRANCH_ADAPTERS = frozenset({"adalora", "vera", "oft", "boft"})


@dataclass(frozen=True)
class AdapterParams:
    """What an adapter type other than full, freeze and lora trains, read off the model it builds.

    `adapter_params` counts it by building the model on the meta device and applying the adapter there (shapes
    only). The planner needs no formula per adapter type that way, and stays right when an adapter changes."""

    kind: str  # adapter.type
    trained_base: tuple[str, ...] = ()  # base parameters trained in place (bitfit's biases), named as in ModelShape
    added: tuple[tuple[str, tuple[int, ...]], ...] = ()  # parameters the adapter adds and trains, with shapes
    added_frozen: int = 0  # elements of frozen parameters and buffers it adds (VeRA's shared projections, ...)
    added_frozen_params: int = 0  # the parameters among them (the rest are buffers)
    virtual_tokens: int = 0  # soft-prompt positions prepended to every row (prompt, ptuning)

    @property
    def added_params(self) -> int:
        return sum(math.prod(d) for _, d in self.added)

    def first_layer(self) -> int | None:
        """The lowest decoder layer holding a trained tensor; 0 when one lives outside the layers (soft prompts,
        prefix encoders: their gradient comes through every layer); None when nothing trains."""
        names = list(self.trained_base) + [n for n, _ in self.added]
        if not names:
            return None
        layers = [layer_index(n) for n in names]
        return 0 if any(i is None for i in layers) else min(i for i in layers if i is not None)


@dataclass(frozen=True)
class _Trainable:
    base: frozenset[str]  # base-model parameter names that train (full, freeze, modules_to_save)
    lora: tuple[tuple[str, int, int], ...]  # adapted linears (name, in, out)
    lora_r: int
    save_copies: int  # parameters of peft modules_to_save copies (trained; the originals stay frozen)
    added: tuple[tuple[str, tuple[int, ...]], ...] = ()  # other adapters' own trained parameters

    @property
    def lora_params(self) -> int:
        return sum(self.lora_r * (i + o) for _, i, o in self.lora)

    @property
    def added_params(self) -> int:
        return sum(math.prod(d) for _, d in self.added)


def _trainable(shape: ModelShape, adapter: str, *, lora_r: int, lora_targets: str | Sequence[str],
               trainable_layers: int, trainable_modules: Sequence[str],
               adapter_params: AdapterParams | None = None) -> _Trainable:
    names = [n for n, _ in shape.params]
    if adapter_params is not None and adapter not in ("full", "freeze", "lora", "qlora"):
        known = set(names)
        return _Trainable(frozenset(n for n in adapter_params.trained_base if n in known), (), 0, 0,
                          adapter_params.added)
    if adapter == "full":
        return _Trainable(frozenset(names), (), 0, 0)
    if adapter == "freeze":
        top = set(range(shape.layers - trainable_layers, shape.layers)) if trainable_layers else set()
        chosen = {n for n in names if layer_index(n) in top or any(_matches(n, m) for m in trainable_modules)}
        return _Trainable(frozenset(chosen), (), 0, 0)
    if adapter in ("lora", "qlora"):
        copies = sum(k for n, k in shape.params if any(_matches(n, m) for m in trainable_modules))
        saved = frozenset(n for n in names if any(_matches(n, m) for m in trainable_modules))
        return _Trainable(saved, tuple(_lora_targets(shape, lora_targets)), lora_r, copies)
    raise UserError(f"plan: adapter type {adapter!r} needs its trained parameters counted (adapter_params(), "
                    "which plan_from_config does); estimate() models full, freeze, lora and qlora by itself")


# Models of at most this many parameters may be built on the CPU when an adapter cannot be applied on the meta
# device (BOFT's initialisation reads tensor values): a few hundred MB at fp32, seconds to build.
CPU_FALLBACK_MAX_PARAMS = 50_000_000


def adapter_params(cfg: Config, shape: ModelShape | None = None) -> AdapterParams:
    """Count what `cfg.adapter` trains by building the model on the meta device and applying the adapter there
    (`adapters.apply_adapter`, the loop's own code, so every adapter type is counted the way it trains).

    Base parameters that train in place are told apart from the adapter's own by identity (a wrapper keeps the
    base's parameter objects). An adapter whose setup needs real tensor values cannot be applied on meta; for a
    model of at most `CPU_FALLBACK_MAX_PARAMS` parameters it is then applied to a CPU build instead, otherwise
    this says which adapter type could not be counted.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.adapters import AdapterSetup, apply_adapter, virtual_tokens
    from tunelab.models.load import read_model_config

    hf_config = read_model_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                                  revision=cfg.model.revision)
    setup = AdapterSetup(model_path=cfg.model.path, tokenizer_path=cfg.model.tokenizer or cfg.model.path)

    def build(device: str) -> AdapterParams:
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
            base_names = {id(p): n for n, p in model.named_parameters()}
            base_buffers = sum(b.numel() for b in model.buffers())
            model = apply_adapter(model, cfg.adapter, setup)
        trained_base, added, seen = [], [], set()
        frozen_elems = 0
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in base_names:
                if p.requires_grad:
                    trained_base.append(base_names[id(p)])
            elif p.requires_grad:
                added.append((name, tuple(p.shape)))
            else:
                frozen_elems += p.numel()
        # frozen tensors the adapter brings: its frozen parameters and the buffers it added
        extra_buffers = max(0, sum(b.numel() for b in model.buffers()) - base_buffers)
        return AdapterParams(kind=cfg.adapter.type, trained_base=tuple(trained_base), added=tuple(added),
                             added_frozen=frozen_elems + extra_buffers, added_frozen_params=frozen_elems,
                             virtual_tokens=virtual_tokens(model))

    error: Exception
    try:
        return build("meta")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of an adapter's setup on meta tensors
        error = e
    if shape is not None and shape.total <= CPU_FALLBACK_MAX_PARAMS:
        try:
            return build("cpu")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            error = e
    reason = str(error).splitlines()[0] if str(error) else ""
    raise UserError(f"plan: cannot count the trainable parameters of adapter {cfg.adapter.type} for "
                    f"{cfg.model.path}: {type(error).__name__}: {reason}") from None
