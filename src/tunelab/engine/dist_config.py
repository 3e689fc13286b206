"""What train.distributed, train.offload and a user's own DeepSpeed or accelerate config file mean together.

`resolve_engine` reads the file a config names (train.deepspeed: a DeepSpeed JSON; train.accelerate_config: the YAML
`accelerate config` writes) and checks it against the tunelab config: every value both say must agree, or the run is
refused in one line naming the key. A DeepSpeed file's own tuning knobs (bucket sizes, overlap, ZeRO-3 thresholds)
pass through to deepspeed.initialize; "auto" in it means "what tunelab says" (the convention of HF's Trainer).
`deepspeed_config` builds the dictionary tunelab hands DeepSpeed.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

ZERO_STAGES = {"zero1": 1, "zero2": 2, "zero3": 3}


@dataclass(frozen=True)
class EngineSpec:
    """The engine a run uses and what its config files add."""

    name: str  # ddp | zero1 | zero2 | zero3 | fsdp2
    offload: str = "none"  # none | optimizer | optimizer+params
    deepspeed: dict = field(default_factory=dict)  # the user's DeepSpeed config ({} if none), checked
    layer_classes: tuple[str, ...] = ()  # FSDP2: module classes sharded as units (default: the model's own)
    reshard_after_forward: bool = True  # FSDP2: free the gathered parameters after each unit's forward
    source: str = ""  # the file the settings came from, for messages

    @property
    def zero_stage(self) -> int:
        return ZERO_STAGES.get(self.name, 0)

    @property
    def sharded(self) -> bool:
        return self.name != "ddp"


def _read_mapping(path: str, key: str, fmt: str) -> dict:
    """The mapping a JSON or YAML file holds, or one line naming the file and what is wrong."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}: {path} does not exist")
    errors = (UnicodeDecodeError, ValueError) if fmt == "JSON" else (UnicodeDecodeError, yaml.YAMLError)
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if fmt == "JSON" else yaml.safe_load(text)
    except errors as e:
        raise UserError(f"{key}: {path} is not valid {fmt} ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"{key}: {path} must hold a {'JSON object' if fmt == 'JSON' else 'mapping'}")
    return data


def _read_json(path: str, key: str) -> dict:
    return _read_mapping(path, key, "JSON")


def _read_yaml(path: str, key: str) -> dict:
    return _read_mapping(path, key, "YAML")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def _agree(theirs, ours) -> bool:
    if theirs is None or theirs == "auto":
        return True
    if isinstance(ours, bool) or isinstance(theirs, bool):
        return bool(theirs) == bool(ours)
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)):
        return float(theirs) == float(ours)
    return str(theirs).lower() == str(ours).lower()


def _precision_flags(precision: str) -> dict[str, bool]:
    return {"bf16.enabled": precision == "bf16", "fp16.enabled": precision == "fp16"}


def tunelab_values(name: str, offload: str, tcfg, precision: str, world: int) -> dict[str, Any]:
    """The DeepSpeed keys tunelab sets (dotted), as its config says."""
    stage = ZERO_STAGES[name]
    values: dict[str, Any] = {
        "zero_optimization.stage": stage,
        "train_micro_batch_size_per_gpu": tcfg.batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum,
        "train_batch_size": tcfg.batch_size * tcfg.grad_accum * world,
        "gradient_clipping": tcfg.max_grad_norm,
        "zero_optimization.offload_optimizer.device": "cpu" if offload != "none" else "none",
        "zero_optimization.offload_param.device": "cpu" if offload == "optimizer+params" else "none",
        **_precision_flags(precision),
    }
    return values


def check_deepspeed_file(data: dict, path: str, name: str, offload: str, tcfg, precision: str, world: int) -> None:
    """Refuse a DeepSpeed config that says something else than the tunelab config does."""
    where = f"train.deepspeed: {path}"
    for section in ("optimizer", "scheduler"):
        if section in data:
            own = "train.optimizer" if section == "optimizer" else "train.scheduler"
            raise UserError(f"{where}: has a {section!r} section; tunelab's {section} is {own} (remove the section)")
    if _get(data, "zero_optimization.offload_optimizer.device") == "nvme" or \
            _get(data, "zero_optimization.offload_param.device") == "nvme":
        raise UserError(f"{where}: NVMe offload is not supported by tunelab; use train.offload (cpu)")
    for key, ours in tunelab_values(name, offload, tcfg, precision, world).items():
        theirs = _get(data, key)
        if key == "train_batch_size" and theirs is not None and theirs != "auto" and not _agree(theirs, ours):
            raise UserError(f"{where}: {key} is {theirs}, but batch_size {tcfg.batch_size} x grad_accum "
                            f"{tcfg.grad_accum} x {world} processes is {ours}")
        if not _agree(theirs, ours):
            raise UserError(f"{where}: {key} is {theirs!r}, but the tunelab config says {ours!r} "
                            f"({_tunelab_key(key)}); make them agree or remove the key from the file")


def _tunelab_key(ds_key: str) -> str:
    return {
        "zero_optimization.stage": "train.distributed",
        "train_micro_batch_size_per_gpu": "train.batch_size",
        "gradient_accumulation_steps": "train.grad_accum",
        "train_batch_size": "train.batch_size x train.grad_accum x processes",
        "gradient_clipping": "train.max_grad_norm",
        "zero_optimization.offload_optimizer.device": "train.offload",
        "zero_optimization.offload_param.device": "train.offload",
        "bf16.enabled": "train.precision",
        "fp16.enabled": "train.precision",
    }.get(ds_key, ds_key)


# a Llama-shaped decoder layer holds ~12 hidden^2 parameters (4 h^2 of attention, 3 x 2.7 h^2 of MLP)
ZERO3_LIVE_HIDDEN2 = 30  # ZeRO-3 keeps at most ~2.5 such layers gathered (DeepSpeed's default: 1e9 parameters)


def bucket_sizes(hidden: int | None) -> dict[str, int]:
    """DeepSpeed's buckets and ZeRO-3's gathering limits sized to the model, for the keys a train.deepspeed file
    leaves out or sets to "auto": hidden^2 elements per gradient reduction bucket and 0.9 hidden^2 per ZeRO-3
    prefetch, parameters under 10 hidden elements kept whole (HF Trainer's "auto" values), and at most 30 hidden^2
    parameters gathered at once or kept for reuse (ZERO3_LIVE_HIDDEN2). DeepSpeed's own defaults (buckets of 5e8
    and 5e7 elements, 1e9 live parameters) hold every gradient and every parameter of a model under ~1B
    parameters at once, which undoes ZeRO-2's and ZeRO-3's savings."""
    if not hidden:
        return {}
    live = ZERO3_LIVE_HIDDEN2 * hidden * hidden
    return {"zero_optimization.reduce_bucket_size": hidden * hidden,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden,
            "zero_optimization.stage3_max_live_parameters": live,
            "zero_optimization.stage3_max_reuse_distance": live}


def deepspeed_config(spec: EngineSpec, tcfg, precision: str, world: int, hidden: int | None = None) -> dict:
    """What tunelab hands deepspeed.initialize: the user's file (if any) with tunelab's values filled in, and
    the bucket sizes it leaves out (or sets to "auto") sized to the model's `hidden` size (`bucket_sizes`).

    tunelab runs mixed precision itself (autocast over the weights' own dtype, as under ddp), so DeepSpeed's own
    bf16/fp16 modes stay off whatever precision is; the file's precision keys were checked to agree with it."""
    out = copy.deepcopy(spec.deepspeed)
    for key, value in bucket_sizes(hidden).items():
        if _get(out, key) in (None, "auto"):
            _set(out, key, value)
    for key, value in tunelab_values(spec.name, spec.offload, tcfg, precision, world).items():
        if key.endswith(".device"):
            if value == "none":
                parent = key.rsplit(".", 1)[0]
                section = _get(out, parent)
                if isinstance(section, dict):
                    section["device"] = "none"
                continue
        if key in ("bf16.enabled", "fp16.enabled"):
            value = False
        _set(out, key, value)
    out.setdefault("steps_per_print", 10 ** 12)  # tunelab logs; DeepSpeed stays quiet
    out.setdefault("wall_clock_breakdown", False)
    out["zero_allow_untested_optimizer"] = True  # tunelab's torch optimizers (adamw, sgd)
    out["zero_force_ds_cpu_optimizer"] = False  # offload keeps tunelab's optimizer (no compiled CPU Adam)
    return out


# accelerate's `distributed_type` -> tunelab's engine (DEEPSPEED and FSDP read their sections)
_ACCELERATE_TYPES = {"NO": "ddp", "MULTI_CPU": "ddp", "MULTI_GPU": "ddp", "MULTI_XPU": "ddp", "MULTI_NPU": "ddp"}
# keys of an accelerate config that tunelab reads; the rest (compute_environment, gpu_ids, ...) do not change training
_ACCELERATE_READ = {"distributed_type", "deepspeed_config", "fsdp_config", "mixed_precision", "num_processes",
                    "num_machines", "machine_rank", "main_process_ip", "main_process_port"}


def _from_accelerate(data: dict, path: str, tcfg, precision: str, world: int) -> EngineSpec:
    where = f"train.accelerate_config: {path}"
    kind = str(data.get("distributed_type", "NO")).upper()
    deepspeed: dict = {}
    layer_classes: tuple[str, ...] = ()
    reshard = True
    offload = "none"
    if kind == "DEEPSPEED":
        ds = data.get("deepspeed_config") or {}
        if ds.get("deepspeed_config_file"):
            file = Path(ds["deepspeed_config_file"])
            if not file.is_absolute():
                file = Path(path).parent / file
            deepspeed = _read_json(str(file), "train.accelerate_config: deepspeed_config_file")
            stage = _get(deepspeed, "zero_optimization.stage")
        else:
            stage = ds.get("zero_stage")
            opt_dev, param_dev = ds.get("offload_optimizer_device", "none"), ds.get("offload_param_device", "none")
            if "nvme" in (opt_dev, param_dev):
                raise UserError(f"{where}: NVMe offload is not supported by tunelab; use train.offload (cpu)")
            offload = "optimizer+params" if param_dev == "cpu" else "optimizer" if opt_dev == "cpu" else "none"
            for key, ds_key in (("gradient_accumulation_steps", "gradient_accumulation_steps"),
                                ("gradient_clipping", "gradient_clipping")):
                if key in ds:
                    deepspeed[ds_key] = ds[key]
        if stage not in (1, 2, 3):
            raise UserError(f"{where}: DEEPSPEED with zero_stage {stage!r}; tunelab runs ZeRO stage 1, 2 or 3")
        name = f"zero{stage}"
        if deepspeed:
            deepspeed.setdefault("zero_optimization", {})
            if not ds.get("deepspeed_config_file"):
                _set(deepspeed, "zero_optimization.offload_optimizer.device", "cpu" if offload != "none" else "none")
                _set(deepspeed, "zero_optimization.offload_param.device",
                     "cpu" if offload == "optimizer+params" else "none")
    elif kind == "FSDP":
        fsdp = data.get("fsdp_config") or {}
        version = int(fsdp.get("fsdp_version", 1))
        if version != 2:
            raise UserError(f"{where}: fsdp_version {version}; tunelab runs FSDP2 (set fsdp_version: 2)")
        name = "fsdp2"
        if _truthy(fsdp.get("fsdp_offload_params", False)):
            offload = "optimizer+params"
        wrap = fsdp.get("fsdp_transformer_layer_cls_to_wrap")
        if wrap:
            layer_classes = tuple(c.strip() for c in (wrap.split(",") if isinstance(wrap, str) else wrap) if c.strip())
        reshard = _truthy(fsdp.get("fsdp_reshard_after_forward", True))
    elif kind in _ACCELERATE_TYPES:
        name = "ddp"
    else:
        raise UserError(f"{where}: distributed_type {kind} is not one tunelab runs (DEEPSPEED, FSDP, MULTI_GPU, "
                        "MULTI_CPU or NO)")
    if name != tcfg.distributed:
        raise UserError(f"{where}: distributed_type {kind} means train.distributed {name}, but the tunelab config "
                        f"says {tcfg.distributed}; make them agree")
    if offload != tcfg.offload and not (deepspeed and name.startswith("zero")
                                        and (data.get("deepspeed_config") or {}).get("deepspeed_config_file")):
        raise UserError(f"{where}: its offload settings mean train.offload {offload}, but the tunelab config says "
                        f"{tcfg.offload}; make them agree")
    mixed = data.get("mixed_precision")
    want = "no" if precision == "fp32" else precision
    if mixed is not None and str(mixed) != want:
        raise UserError(f"{where}: mixed_precision is {mixed}, but the run's precision is {precision} "
                        f"(train.precision); make them agree")
    procs = data.get("num_processes")
    if procs is not None and world > 1 and int(procs) != world:
        raise UserError(f"{where}: num_processes is {procs}, but {world} processes were launched")
    if name.startswith("zero"):
        check_deepspeed_file(deepspeed, path, name, tcfg.offload, tcfg, precision, world)
    return EngineSpec(name, tcfg.offload, deepspeed, layer_classes, reshard, path)


def _truthy(value) -> bool:
    return str(value).lower() in ("true", "1", "yes")


def resolve_engine(tcfg, *, precision: str, world: int) -> EngineSpec:
    """train.distributed and train.offload with the file train.deepspeed or train.accelerate_config names (read
    and checked here; a difference is refused with the key named)."""
    if tcfg.deepspeed:
        data = _read_json(tcfg.deepspeed, "train.deepspeed")
        check_deepspeed_file(data, tcfg.deepspeed, tcfg.distributed, tcfg.offload, tcfg, precision, world)
        return EngineSpec(tcfg.distributed, tcfg.offload, data, source=tcfg.deepspeed)
    if tcfg.accelerate_config:
        return _from_accelerate(_read_yaml(tcfg.accelerate_config, "train.accelerate_config"),
                                tcfg.accelerate_config, tcfg, precision, world)
    return EngineSpec(tcfg.distributed, tcfg.offload)


def accelerate_launch_values(path: str) -> dict:
    """The process layout an accelerate config gives (for `tunelab train --nproc` when it names none)."""
    data = _read_yaml(path, "train.accelerate_config")
    return {k: data[k] for k in ("num_processes", "num_machines", "machine_rank", "main_process_ip",
                                 "main_process_port") if k in data}


def unused_accelerate_keys(path: str) -> list[str]:
    data = _read_yaml(path, "train.accelerate_config")
    return sorted(k for k in data if k not in _ACCELERATE_READ)
