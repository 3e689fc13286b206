"""Peak-memory planning: what a training run will hold per device, predicted from config.json alone.

`tunelab plan CONFIG` answers "will this fit, and with which micro-batch?" before any weights are loaded. Everything
here is arithmetic on a `ModelShape` (parameter names and sizes, read from the model's config.json by building the
model on the meta device, which allocates nothing), so planning a 70B model takes seconds, most of them
importing transformers.

The package, by topic (docs/plan.md has the formulas and the validation against measured runs):

- model_shape: the model's geometry and parameter inventory, bytes per parameter by dtype and bitsandbytes format;
- trainable: which parameters each adapter type trains (other adapter types: counted on the meta device);
- activations: the tensors autograd saves for backward in a decoder layer;
- optimizer: optimizer states as each train.optimizer allocates them, and an optimizer step's temporaries;
- memory: `estimate`, the peak of one device over four moments of a step, and `max_batch_size`;
- calibrate: the CPU runtime (the process's memory before any tensor), measured on this machine by a real run;
- here: the entry point, `plan_from_config` (a config) and `plan_run` (a config and its resolved run shape), and
  the report they return.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.schema import Config
from tunelab.engine.plan.calibrate import (
    cached_cpu_runtime,
    calibrate_cpu_runtime,
    finish_measured,
    runtime_cache_path,
    start_measured_train,
)
from tunelab.engine.plan.memory import (
    COMPONENTS,
    CPU_RUNTIME_BYTES,
    CUDA_RUNTIME_BYTES,
    DATASET_BYTES_PER_TOKEN,
    DEEPSPEED_BUCKET_ELEMS,
    DEEPSPEED_SUB_GROUP_ELEMS,
    PHASES,
    MemoryPlan,
    _fmt_count,
    estimate,
    frozen_model_bytes,
    max_batch_size,
)
from tunelab.engine.plan.model_shape import (
    DTYPE_BYTES,
    FOUR_BIT_BYTES_PER_PARAM,
    NF4_BYTES_PER_PARAM,
    QUANT_FORMATS,
    GiB,
    MiB,
    ModelShape,
    dtype_bytes,
    quantized_weight_bytes,
)
from tunelab.engine.plan.optimizer import (
    BNB_BLOCK,
    BNB_MIN_8BIT_SIZE,
    BNB_QMAPS_BYTES,
    OPTIMIZERS,
    OptimizerSettings,
    galore_projected,
    optimizer_state_bytes,
)
from tunelab.engine.plan.trainable import (
    CPU_FALLBACK_MAX_PARAMS,
    WIDE_BRANCH_ADAPTERS,
    AdapterParams,
    adapter_params,
)
from tunelab.engine.shape import RunShape, resolve_run

__all__ = [
    "BNB_BLOCK", "BNB_MIN_8BIT_SIZE", "BNB_QMAPS_BYTES", "COMPONENTS", "CPU_FALLBACK_MAX_PARAMS", "CPU_RUNTIME_BYTES",
    "CUDA_RUNTIME_BYTES", "DATASET_BYTES_PER_TOKEN", "DEEPSPEED_BUCKET_ELEMS", "DEEPSPEED_SUB_GROUP_ELEMS",
    "DTYPE_BYTES", "FOUR_BIT_BYTES_PER_PARAM", "NF4_BYTES_PER_PARAM", "OPTIMIZERS", "PHASES", "QUANT_FORMATS",
    "WIDE_BRANCH_ADAPTERS", "AdapterParams", "GiB", "MemoryPlan", "MiB", "ModelShape", "OptimizerSettings",
    "PlanReport", "adapter_params", "cached_cpu_runtime", "calibrate_cpu_runtime", "dtype_bytes", "estimate",
    "finish_measured", "frozen_model_bytes", "galore_projected", "max_batch_size", "optimizer_state_bytes",
    "plan_from_config", "plan_run", "quantized_weight_bytes", "runtime_cache_path", "start_measured_train",
]


# -------------------------------------------------------------------------------------------- from a config
@dataclass
class PlanReport:
    """A plan for one config: the prediction, the settings it assumed, and what fits a memory budget."""

    model: str
    shape: ModelShape
    plan: MemoryPlan
    settings: dict[str, Any]
    budget: int | None = None  # bytes available to the run (all processes on a CPU machine, else per device)
    budget_source: str = ""
    max_batch: int | None = None
    data: dict[str, int] = field(default_factory=dict)

    @property
    def processes_total(self) -> int:
        """Bytes the budget must hold: all processes' on one CPU machine, one device's on GPUs."""
        return self.plan.total * (self.settings["devices"] if self.settings["device"] == "cpu" else 1)

    def text(self) -> str:
        p, st, sh = self.plan, self.settings, self.shape
        heads = f"{sh.heads}/{sh.kv_heads} heads (q/kv)"
        lines = [
            f"model: {self.model} ({sh.arch}: {sh.layers} layers, hidden {sh.hidden}, {heads}, intermediate "
            f"{sh.intermediate}, vocab {sh.vocab}{', tied embeddings' if sh.tied else ''})",
            f"parameters: {_fmt_count(p.params)} total, {_fmt_count(p.trainable)} trainable ({st['adapter']})",
            f"setup: {st['device']} x {st['devices']}, precision {st['precision']}, weights stored "
            f"{st['storage_dtype']}"
            + (f" (decoder linears {st['quantization']})" if st.get("quantization", "none") != "none" else "")
            + f", optimizer {st.get('optimizer', 'adamw')}, "
            + ("FSDP2" if st.get("fsdp2") else f"ZeRO {st['zero_stage']}")
            + (" + optimizer offload" if st["offload_optimizer"] else "")
            + (" + parameter offload" if st["offload_params"] else ""),
            f"micro-batch: {st['batch_size']} rows, max_length {st['seq_len']}: {st['positions']:,} positions"
            + (" in the heaviest measured batch" if self.data else "") + f" ({st['packing']}), activation "
            f"checkpointing {'on' if st['grad_ckpt'] else 'off'}, attention {st['attn_impl']}"
            + (" with a mask" if st["attn_mask"] else ""),
            f"loss: {p.inputs['loss_path']}",
        ]
        if self.data:
            lines.append(f"data (measured): {self.data['rows']:,} rows, longest {self.data['longest']:,} tokens, "
                         f"mean {self.data['mean']:,}; worst micro-batch {self.data['positions']:,} positions, "
                         f"{self.data['trained']:,} trained")
        lines += ["", f"{'component':<14}{'GiB':>9}  made of"]
        for key in COMPONENTS:
            if key in ("frozen_models", "trained_models", "rollout_cache") and not p.components[key]:
                continue  # only methods with a reference copy, a teacher or a critic, or that sample, have them
            lines.append(f"{key:<14}{p.components[key] / GiB:>9.3f}  {p.notes[key]}")
        lines.append(f"{'total':<14}{p.total / GiB:>9.3f}  per {'process' if st['device'] == 'cpu' else 'device'},"
                     f" peak: {PHASES[p.phase]}")
        others = ", ".join(f"{PHASES[k]} {v / GiB:.2f}" for k, v in p.phases.items() if k != p.phase)
        lines.append(f"{'':<25}other moments (GiB): {others}")
        if p.host:
            lines.append(f"host memory per process: {p.host_total / GiB:.2f} GiB ("
                         + ", ".join(f"{k} {v / GiB:.2f}" for k, v in p.host.items()) + ")")
        if st["device"] == "cpu":
            lines.append("note: with glibc's default malloc, peak RSS measured 16-62 % above this (freed activation "
                         "buffers fragment the heap); MALLOC_MMAP_THRESHOLD_=65536 brings it to the prediction at a "
                         "throughput cost (docs/plan.md)")
        if self.budget is not None:
            need = self.processes_total
            verdict = "fits" if need <= self.budget else "does NOT fit"
            where = f"{st['devices']} processes" if st["device"] == "cpu" and st["devices"] > 1 else "the run"
            lines.append("")
            lines.append(f"budget: {self.budget / GiB:.1f} GiB ({self.budget_source}); {where} needs "
                         f"{need / GiB:.2f} GiB: {verdict}")
            if self.max_batch is not None:
                lines.append(f"largest micro-batch that fits (rows of max_length): {self.max_batch}"
                             + (" (even one row does not fit)" if self.max_batch == 0 else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "shape": {k: getattr(self.shape, k) for k in ("arch", "layers", "hidden", "intermediate", "heads",
                                                          "kv_heads", "head_dim", "vocab", "tied")}
            | {"params": self.shape.total, "params_by_kind": self.shape.by_kind()},
            "settings": dict(self.settings),
            "components": dict(self.plan.components),
            "notes": dict(self.plan.notes),
            "total": self.plan.total,
            "phase": self.plan.phase,
            "phases": dict(self.plan.phases),
            "moments": {k: dict(v) for k, v in self.plan.moments.items()},
            "host": dict(self.plan.host),
            "params": self.plan.params,
            "trainable": self.plan.trainable,
            "budget": self.budget,
            "budget_source": self.budget_source,
            "max_batch": self.max_batch,
            "data": dict(self.data),
        }


def _local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_memory(device: str) -> tuple[int | None, str]:
    """Memory of this machine's device: the first GPU's, or the RAM."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"{props.name} on this machine"
        return None, ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "this machine's RAM"
    except OSError:
        pass
    return None, ""


def _measure_data(cfg: Config) -> tuple[list[int], list[int], int]:
    """Tokenize the training data (through the tokenization cache) as `bench` does: row lengths, trained counts,
    and the tokens of train and validation together."""
    from tunelab.engine.shape import measure_sequences

    stats = measure_sequences(cfg)
    return stats.lengths, stats.trained, sum(stats.lengths) + stats.val_tokens


def _frozen_models(run: RunShape, cfg: Config, base: ModelShape) -> list[tuple[str, float]]:
    """The frozen models the method keeps while training, as `estimate` counts them."""
    out = []
    for role, need in run.resident_models().items():
        if need.source == "copy":
            what, model, quant = "a copy of the base", base, cfg.model.quantization
        else:
            model = ModelShape.from_pretrained(need.path, trust_remote_code=cfg.model.trust_remote_code)
            what, quant = need.path, cfg.model.quantization
        size = frozen_model_bytes(model, run.dtype, quant, cfg.model.double_quant)
        out.append((f"{role}: {what}, {_fmt_count(model.total)} params ({run.dtype})", size))
    return out


def _trained_models(run: RunShape, cfg: Config, base: ModelShape) -> list[tuple[str, ModelShape]]:
    """The models that train in full beside the policy (a critic), as `estimate` plans them."""
    out = []
    for role, need in run.trained_models().items():
        model = base if need.source == "copy" else ModelShape.from_pretrained(
            need.path, trust_remote_code=cfg.model.trust_remote_code)
        if need.head == "score":
            model = model.with_score_head()
        out.append((f"{role} ({'a copy of the base' if need.source == 'copy' else need.path})", model))
    return out


def _worst_batch(lengths: Sequence[int], trained: Sequence[int], batch: int, max_length: int,
                 packing: str) -> dict[str, int]:
    """The heaviest micro-batch of `batch` rows: the longest rows together (padded to the longest, or packed)."""
    longest = sorted(lengths, reverse=True)[:batch]
    most_trained = sum(sorted(trained, reverse=True)[:batch])
    if packing == "padding_free":
        positions = sum(longest)
        rows = max(1, math.ceil(positions / max_length))
        width = min(max_length, max(positions, 1))
    else:
        rows, width = len(longest), (longest[0] if longest else 1)
        positions = rows * width
    return {"rows": rows, "width": width, "positions": positions, "trained": min(most_trained, positions),
            "uniform": int(len(set(lengths)) <= 1)}


def plan_from_config(cfg: Config, *, devices: int = 1, memory_gb: float | None = None, zero_stage: int | None = None,
                     offload: bool | None = None, device: str | None = None, measure_data: bool = False,
                     calibrate: bool = False, fsdp2: bool | None = None) -> PlanReport:
    """Plan the run a config describes. device: cuda | cpu (default: this machine's). memory_gb: the budget per
    device (per machine on CPU; default: this machine's device memory when planning for it). offload: ZeRO
    optimizer offload, plus parameter offload at stage 3. measure_data: tokenize the training data and plan for its
    heaviest micro-batch instead of data.max_length (the worst case). calibrate: measure the CPU runtime on this
    machine first (`calibrate_cpu_runtime`); a CPU plan otherwise uses an earlier calibration with the same
    libraries when there is one, else `CPU_RUNTIME_BYTES`. zero_stage, fsdp2, offload: the engine (default: what
    train.distributed and train.offload say)."""
    from tunelab.models.load import check_model_path

    check_model_path(cfg.model.path)
    device = device or _local_device()
    # what the loop decides (engine/shape.py), for the target device; the loop checks the model keeps packed
    # sequences apart at start, which Llama-style models do
    run = resolve_run(cfg, device=device, check_hardware=False)
    return plan_run(cfg, run, devices=devices, memory_gb=memory_gb, zero_stage=zero_stage, offload=offload,
                    measure_data=measure_data, calibrate=calibrate, fsdp2=fsdp2)


def _deepspeed_buckets(cfg: Config) -> dict[str, int]:
    """The bucket sizes a train.deepspeed file sets (numbers; "auto" and absent keys get tunelab's, sized to the
    model)."""
    if not cfg.train.deepspeed:
        return {}
    from tunelab.engine.dist_config import _read_json

    zero = _read_json(cfg.train.deepspeed, "train.deepspeed").get("zero_optimization") or {}
    out = {}
    for key, arg in (("reduce_bucket_size", "bucket_elems"), ("stage3_prefetch_bucket_size", "prefetch_elems"),
                     ("stage3_max_live_parameters", "live_elems")):
        value = zero.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[arg] = int(value)
    return out


def plan_run(cfg: Config, run: RunShape, *, devices: int = 1, memory_gb: float | None = None,
             zero_stage: int | None = None, offload: bool | None = None, measure_data: bool = False,
             calibrate: bool = False, fsdp2: bool | None = None) -> PlanReport:
    """Plan `run`, the shape `cfg` resolves to (`engine.shape.resolve_run`) on the device it trains on
    (`run.device`); the other arguments are `plan_from_config`'s. `cfg.model.path` is expected to be checked
    (`models.load.check_model_path`) as `plan_from_config` and the loop do."""
    device = run.device
    engine = cfg.train.distributed
    if zero_stage is None and fsdp2 is None:
        zero_stage, fsdp2 = {"zero1": 1, "zero2": 2, "zero3": 3}.get(engine, 0), engine == "fsdp2"
    zero_stage, fsdp2 = zero_stage or 0, bool(fsdp2)
    if offload is None:
        offload = cfg.train.offload != "none" and zero_stage >= 1
    runtime_bytes = None
    if device == "cpu":
        from tunelab.models.adapters import peft_backed

        peft = peft_backed(cfg.adapter.type)
        runtime_bytes = calibrate_cpu_runtime(peft=peft) if calibrate else cached_cpu_runtime(peft)
    shape = ModelShape.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                                       revision=cfg.model.revision)
    precision, storage = run.precision, run.storage

    a = cfg.adapter
    adapter = a.type
    target = getattr(a, "target", "all-linear")
    packing = run.packing
    attn = cfg.model.attn_implementation
    packed_unmasked = attn.startswith("flash") or (attn == "sdpa" and not cfg.model.compile)
    if adapter == "freeze":
        modules = list(a.modules)
        if getattr(a, "embeddings", False):  # the input embeddings and the output head
            modules += [n.rsplit(".", 1)[0] for n, _ in shape.params
                        if shape.kind(n) in ("embedding", "lm_head")]
        if getattr(a, "norms", False):
            modules += [n.rsplit(".", 1)[0] for n, _ in shape.params if shape.kind(n) == "norm"]
    else:
        modules = list(getattr(a, "modules_to_save", None) or [])
    t = cfg.train
    kwargs: dict[str, Any] = dict(
        adapter=adapter,
        lora_r=getattr(a, "r", 8),
        lora_targets=target,
        trainable_layers=a.layers if adapter == "freeze" else 0,
        trainable_modules=modules,
        adapter_params=None if adapter in ("full", "freeze", "lora") else adapter_params(cfg, shape),
        quantization=cfg.model.quantization,
        double_quant=cfg.model.double_quant,
        optimizer=t.optimizer,
        optimizer_settings=OptimizerSettings(momentum=t.momentum, galore_rank=t.galore_rank,
                                             galore_target=tuple(t.galore_target)),
        precision=precision,
        storage_dtype=storage,
        seq_len=run.rollout_tokens or cfg.data.max_length,  # rolled-out rows: prompt + completion
        grad_ckpt=cfg.model.gradient_checkpointing,
        loss_chunk=cfg.train.loss_chunk,
        zero_stage=zero_stage,
        fsdp2=fsdp2,
        **_deepspeed_buckets(cfg),
        offload_optimizer=offload and zero_stage >= 1,
        offload_params=offload and zero_stage == 3,
        devices=devices,
        device=device,
        attn_impl="flash" if attn.startswith("flash") else attn,
        # padded batches of unequal rows carry a mask; packed rows do only with eager attention or compiled SDPA
        # (tunelab's varlen SDPA and flash attention attend per sequence), flash attention unpads padded rows
        attn_mask=not packed_unmasked if packing == "padding_free" else True,
        grad_accum=cfg.train.grad_accum,
        runtime_bytes=runtime_bytes,
        frozen_models=_frozen_models(run, cfg, shape),
        rollout=run.rollout_memory,
        trained_models=_trained_models(run, cfg, shape),
        rollout_merged=run.rollout_merged,
    )
    data_stats: dict[str, int] = {}
    per_row = run.sequences_per_row  # a micro-batch of preference pairs is twice as many sequences
    batch = cfg.train.batch_size * per_row
    if measure_data and not cfg.data.streaming:
        lengths, trained, total_tokens = _measure_data(cfg)
        worst = _worst_batch(lengths, trained, batch, cfg.data.max_length, packing)
        kwargs["dataset_tokens"] = total_tokens
        kwargs["attn_mask"] = (not packed_unmasked) if packing == "padding_free" else not worst["uniform"]
        data_stats = {"rows": len(lengths), "longest": max(lengths, default=0),
                      "mean": round(sum(lengths) / max(len(lengths), 1)), "positions": worst["positions"],
                      "trained": worst["trained"], "packed_rows": worst["rows"], "width": worst["width"]}
        plan = estimate(shape, batch_size=worst["rows"], positions=worst["positions"],
                        trained_tokens=worst["trained"], **{**kwargs, "seq_len": worst["width"]})
    else:
        plan = estimate(shape, batch_size=batch, **kwargs)

    if memory_gb is not None:
        budget: int | None = int(memory_gb * GiB)
        source = "--memory-gb"
    else:
        budget, source = _local_memory(device) if device == _local_device() else (None, "")
    max_batch = None
    if budget is not None:
        per_process = budget / devices if device == "cpu" else budget
        max_batch = max_batch_size(shape, per_process, **kwargs)
        if max_batch is not None:
            max_batch //= per_row  # in the config's unit: pairs for preference methods
    settings = {**kwargs, "batch_size": cfg.train.batch_size, "packing": packing, "attn_mask": plan.inputs["attn_mask"],
                "positions": plan.inputs["positions"], "trained_tokens": plan.inputs["trained_tokens"]}
    settings.pop("dataset_tokens", None)
    settings["runtime_calibrated"] = settings.pop("runtime_bytes") is not None
    settings["optimizer_settings"] = plan.inputs["optimizer_settings"]  # plain dicts: to_dict() is JSON
    settings["adapter_params"] = plan.inputs["adapter_params"]
    return PlanReport(model=cfg.model.path, shape=shape, plan=plan, settings=settings, budget=budget,
                      budget_source=source, max_batch=max_batch, data=data_stats)
