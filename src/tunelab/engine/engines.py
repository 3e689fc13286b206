"""The engine seam: how the processes of a run share the model, its gradients and optimizer states.

The loop (engine/loop.py) trains through one `Engine` whatever train.distributed says:

- ddp: accelerate prepares the model (DDP on several processes; NCCL on GPUs, gloo on CPU).
- zero1 / zero2 / zero3: DeepSpeed ZeRO through `deepspeed.initialize`, with tunelab's torch optimizer: the optimizer
  states, then the gradients too, then the parameters too, are split across processes; train.offload keeps them in
  host memory (ZeRO-Offload).
- fsdp2: torch's `fully_shard` on every decoder layer and then the whole model: parameters, gradients and optimizer
  states are DTensors split along their first dimension.

accelerate enables its DeepSpeed and FSDP plugins only on GPU-type devices (on a CPU it silently runs plain DDP), so
tunelab calls both engines' own APIs directly, on every device: the path tested on a CPU over gloo is the one a GPU
cluster runs. accelerate still starts the processes' group, places tensors and runs autocast and the collective
metrics. On one process nothing is split: every engine trains the plain model (and still writes the sharded
checkpoint layout, so a run can move between one process and several).

Sharded checkpoints (`save_shards` / `load_shards`): every rank writes its share of whole tensors, each trained
parameter with its optimizer states under the parameter's own name, into shards/rank-R-of-W.safetensors. The share
goes by size (each tensor is gathered by all ranks in turn, kept by its owner only), so no rank holds more than one
gathered tensor at a time, and a checkpoint resumes on any number of processes and under any sharded engine.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from tunelab.engine.checkpoint import SHARDS, SafetensorsWriter, shard_files
from tunelab.engine.dist_config import EngineSpec, deepspeed_config
from tunelab.errors import UserError
from tunelab.models.wrappers import core_model, unwrap


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class Engine:
    """ddp, and every engine on one process: accelerate prepares the modules (DDP when there are several)."""

    sharded = False  # writes the sharded checkpoint layout
    shards_params = False  # each process holds a part of every parameter (gathered per forward)

    def __init__(self, spec: EngineSpec, accelerator, *, tcfg, precision: str):
        self.spec, self.accelerator, self.tcfg, self.precision = spec, accelerator, tcfg, precision
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.optimizer = None
        self.modules: dict[str, torch.nn.Module] = {}  # the raw trained modules by role ("policy" first)

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> str:
        if self.world == 1:
            return "one process" + (f" (train.distributed {self.name}: nothing to shard)" if self.spec.sharded
                                    else "")
        return {"ddp": "DDP (accelerate)"}.get(self.name, self.name)

    # ------------------------------------------------------------------------------------------------- set-up
    def prepare(self, model, trained: dict[str, torch.nn.Module], make_optimizer: Callable):
        """(the model to call, the trained modules to call by role, the optimizer tunelab built)."""
        optimizer = make_optimizer(model, trained)
        model, *wrapped, optimizer = self.accelerator.prepare(model, *trained.values(), optimizer)
        self.optimizer = optimizer
        self.modules = {"policy": self.accelerator.unwrap_model(model),
                        **{r: self.accelerator.unwrap_model(m) for r, m in zip(trained, wrapped)}}
        return model, dict(zip(trained, wrapped)), optimizer

    def place_frozen(self, module: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy (a reference model, a teacher) as this engine keeps it: whole on every process here."""
        return module

    # ------------------------------------------------------------------------------------------------- a step
    def no_sync(self, modules: Iterable) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for module in modules:
            stack.enter_context(self.accelerator.no_sync(module))
        return stack

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip(self, params: list, max_norm: float) -> float | None:
        """The global gradient norm before clipping (None: the engine computes it in `step`)."""
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def step(self) -> float | None:
        """Apply the update; the gradient norm when the engine measured it itself."""
        self.optimizer.step()
        return None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def for_sampling(self, module: torch.nn.Module) -> Iterator[None]:
        """Inside: a rollout samples token by token from `module` (the engine may keep it gathered meanwhile)."""
        yield

    # ---------------------------------------------------------------------------------------------- saving
    @contextlib.contextmanager
    def gathered(self, module: torch.nn.Module) -> Iterator[None]:
        """Inside: `module`'s parameters whole (for a final save); nothing to do when nothing is split."""
        yield

    def full_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """A whole tensor (a collective where it is split)."""
        return t.detach()

    def full_state_dict(self, module: torch.nn.Module) -> dict | None:
        """`module`'s whole state dict on the main process for a final save, where its own state_dict() would
        give shards (a collective); None where state_dict() inside `gathered` is whole already."""
        return None

    def full_param(self, p) -> torch.Tensor:
        """A trained parameter, whole (a collective where it is split)."""
        return self.full_tensor(p)

    def param_state(self, p) -> dict[str, torch.Tensor]:
        """The optimizer's state of parameter p, whole ({} before the first step)."""
        return {k: (self.full_tensor(v) if torch.is_tensor(v) else torch.tensor(v))
                for k, v in self.optimizer.state.get(p, {}).items()}

    def set_param(self, p, full: torch.Tensor) -> None:
        with torch.no_grad():
            p.copy_(full.to(p.dtype))

    def set_param_state(self, p, state: dict[str, torch.Tensor]) -> None:
        opt_state = self.optimizer.state[p]
        for k, v in state.items():
            opt_state[k] = v.to(p.dtype).to(p.device).clone() if v.ndim else v.clone()

    def local_param_bytes(self) -> int:
        """Bytes of parameters this process holds."""
        return sum(p.numel() * p.element_size() for m in self.modules.values() for p in m.parameters())


# ------------------------------------------------------------------------------------------------------- fsdp2
class FSDP2Engine(Engine):
    """torch fully_shard on each decoder layer (the model's _no_split_modules classes, or the classes an accelerate
    config names), then on each whole trained module; frozen copies are sharded the same way."""

    sharded = True
    shards_params = True

    def describe(self) -> str:
        return f"FSDP2 (torch fully_shard over {self.world} processes" + \
            (", parameters/gradients/optimizer states offloaded to host memory" if self.spec.offload != "none" else "") \
            + ")"

    def _shard(self, module: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        if getattr(self, "_mesh", None) is None:
            self._mesh = init_device_mesh(self.accelerator.device.type, (self.world,))
        kw: dict[str, Any] = {"mesh": self._mesh}
        if self.spec.offload != "none":
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        core = core_model(module)
        classes = set(self.spec.layer_classes or getattr(core, "_no_split_modules", None) or ())
        for sub in module.modules():
            if sub is not module and type(sub).__name__ in classes:
                fully_shard(sub, reshard_after_forward=self.spec.reshard_after_forward, **kw)
        # the root keeps torch's default: gathered from its forward to its backward (its parameters, the embeddings
        # and heads, are needed right back; a loss may also read a head's output captured inside the forward)
        fully_shard(module, **kw)

    def prepare(self, model, trained, make_optimizer):
        for module in (model, *trained.values()):
            self._shard(module)
        self.optimizer = make_optimizer(model, trained)
        self.modules = {"policy": model, **trained}
        return model, dict(trained), self.optimizer

    def place_frozen(self, module):
        self._shard(module)
        return module

    def no_sync(self, modules):
        stack = contextlib.ExitStack()
        for module in modules:
            fsdp = [m for m in unwrap(module).modules() if hasattr(m, "set_requires_gradient_sync")][:1]
            for m in fsdp:  # the root: it sets every unit below it
                m.set_requires_gradient_sync(False)
                stack.callback(m.set_requires_gradient_sync, True)
        return stack

    def backward(self, loss):
        loss.backward()

    def clip(self, params, max_norm):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if _is_dtensor(norm) else norm)

    @contextlib.contextmanager
    def for_sampling(self, module):
        # every sampled token is a forward: keep each unit gathered after its first one instead of gathering it
        # again per token (the whole model in memory while sampling), and free it all afterwards
        units = [m for m in module.modules() if hasattr(m, "set_reshard_after_forward") and m is not module]
        for m in units:
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m in units:
                m.set_reshard_after_forward(self.spec.reshard_after_forward, recurse=False)
                m.reshard()
            if hasattr(module, "reshard"):
                module.reshard()

    @contextlib.contextmanager
    def gathered(self, module):
        units = [m for m in module.modules() if hasattr(m, "unshard")]
        for m in units:
            m.unshard()
        try:
            yield
        finally:
            for m in units:
                m.reshard()

    def full_tensor(self, t):
        return t.full_tensor().detach() if _is_dtensor(t) else t.detach()

    def full_state_dict(self, module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def set_param(self, p, full):
        with torch.no_grad():
            if _is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                local = distribute_tensor(full.to(p.dtype).to(p.device_mesh.device_type), p.device_mesh,
                                          p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)
            else:
                p.copy_(full.to(p.dtype))

    def set_param_state(self, p, state):
        from torch.distributed.tensor import distribute_tensor

        opt_state = self.optimizer.state[p]
        for k, v in state.items():
            if v.ndim and _is_dtensor(p):
                opt_state[k] = distribute_tensor(v.to(p.dtype).to(p.device_mesh.device_type), p.device_mesh,
                                                 p.placements, src_data_rank=None)
            else:
                opt_state[k] = v.clone()

    def local_param_bytes(self):
        return sum((p.to_local() if _is_dtensor(p) else p).numel() * p.element_size()
                   for m in self.modules.values() for p in m.parameters())


# --------------------------------------------------------------------------------------------------- deepspeed
class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2/3 over tunelab's torch optimizer. The policy (and the modules that train beside it, in one
    container module) is one DeepSpeed engine; tunelab's loop owns accumulation: every micro-batch's backward adds
    to the engine's gradients (ZeRO-2/3 reduce them into each rank's partition as they come), the last one's step
    is the update."""

    sharded = True

    @property
    def shards_params(self) -> bool:
        return self.spec.zero_stage == 3

    def describe(self) -> str:
        where = {"none": "", "optimizer": ", optimizer states in host memory (ZeRO-Offload)",
                 "optimizer+params": ", optimizer states and parameters in host memory (ZeRO-Offload)"}
        return f"DeepSpeed ZeRO-{self.spec.zero_stage} over {self.world} processes{where[self.spec.offload]}"

    def _config(self, model) -> dict:
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return deepspeed_config(self.spec, self.tcfg, self.precision, self.world,
                                hidden=getattr(text, "hidden_size", None))

    def prepare(self, model, trained, make_optimizer):
        import deepspeed

        if self.spec.zero_stage == 3:
            # ZeRO-3 flattens every trained parameter into one buffer of one dtype: a small module of the method's
            # own (PPO's value head, made in float32) takes the policy's; DeepSpeed's update stays in float32
            dtype = next((p.dtype for p in model.parameters() if p.requires_grad), None)
            for module in trained.values():
                if dtype is not None and any(p.dtype != dtype for p in module.parameters()):
                    module.to(dtype)
        optimizer = make_optimizer(model, trained)
        module = model if not trained else torch.nn.ModuleDict({"policy": model, **trained})
        config = self._config(model)
        with _quiet_deepspeed():
            if self.spec.zero_stage == 3:
                _partition_float64(module, config["zero_optimization"])
            engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.ds, self.ds_optimizer, self.optimizer = engine, ds_optimizer, optimizer
        self.modules = {"policy": model, **trained}
        self._micro = 0
        if not trained:
            return engine, {}, optimizer
        return model, dict(trained), optimizer

    def place_frozen(self, module):
        if self.spec.zero_stage != 3:
            return module
        import deepspeed

        config = {k: v for k, v in self._config(module).items() if k not in ("gradient_clipping",)}
        zero = config.get("zero_optimization", {})
        config["zero_optimization"] = {"stage": 3, **{k: zero[k] for k in (
            "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
            "stage3_max_reuse_distance") if k in zero}, **(
            {"offload_param": {"device": "cpu"}} if self.spec.offload == "optimizer+params" else {})}
        with _quiet_deepspeed():
            _partition_float64(module, config["zero_optimization"])
            engine, *_ = deepspeed.initialize(model=module, config=config)
        return engine.module

    def no_sync(self, modules):
        return contextlib.nullcontext()  # the engine's accumulation boundary is the step (see backward)

    def backward(self, loss):
        # tunelab scales every micro-batch's loss by the global batch itself: no division by the accumulation steps
        self.ds.backward(loss, scale_wrt_gas=False)
        self._micro += 1
        if self._micro % self.tcfg.grad_accum:
            self.ds.step()  # not a boundary: the engine only counts the micro-step

    def clip(self, params, max_norm):
        return None  # DeepSpeed clips in its step (gradient_clipping) and measures the norm there

    def step(self):
        self.ds.step()
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self):
        pass  # the engine's step clears its gradients

    @contextlib.contextmanager
    def for_sampling(self, module):
        # ZeRO-3 would gather every layer again for every sampled token: gather the model once for the rollout
        with self.gathered(module):
            yield

    @contextlib.contextmanager
    def gathered(self, module):
        if self.spec.zero_stage != 3:
            yield
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield

    def full_tensor(self, t):
        return t.detach()

    def param_state(self, p):
        out = {}
        for k, is_tensor in self._state_keys().items():
            out[k] = self._full_hp(p, k) if is_tensor else self._scalar_state(k)
        return out

    def full_param(self, p) -> torch.Tensor:
        return self._full_hp(p)

    def _full_hp(self, p, key: str | None = None) -> torch.Tensor:
        """The whole master copy of p (key None) or of one of its optimizer states, in the master's own dtype (a
        collective). DeepSpeed's safe_get_full_* gather ZeRO-1/2 fragments in float32 whatever the dtype."""
        shape = p.ds_shape if hasattr(p, "ds_shape") else p.shape
        if hasattr(p, "ds_id"):  # ZeRO-3 gathers in the partition's dtype
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            full = safe_get_full_fp32_param(p) if key is None else safe_get_full_optimizer_state(p, key)
            return full.detach().cpu().reshape(shape)
        import torch.distributed as dist

        mapping = p._hp_mapping
        dtype = self.ds_optimizer.single_partition_of_fp32_groups[0].dtype
        buffer = torch.zeros(p.numel(), dtype=dtype, device=p.device)
        if mapping is not None:
            where = mapping.lp_fragment_address
            buffer.narrow(0, where.start, where.numel).copy_(mapping.get_hp_fragment(key))
        dist.all_reduce(buffer, group=p._dp_group)  # each element comes from one rank; the others add zeros
        return buffer.cpu().reshape(shape)

    def _inner(self):
        return self.ds_optimizer.optimizer

    def _state_keys(self) -> dict[str, bool]:
        """The inner optimizer's state keys: True for tensors shaped like the parameter, False for scalars."""
        for state in self._inner().state.values():
            return {k: torch.is_tensor(v) and v.ndim > 0 for k, v in state.items()}
        return {}

    def _scalar_state(self, key: str) -> torch.Tensor:
        for state in self._inner().state.values():
            v = state[key]
            return v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
        raise KeyError(key)

    def ensure_state(self, keys: dict[str, torch.Tensor]) -> None:
        """Create the inner optimizer's state (zeros; the scalars given) before the first step, so that it can be
        loaded into; then let DeepSpeed map its fragments to the parameters."""
        inner = self._inner()
        # ZeRO-3 keys its states by its fp32 sub-group partitions; ZeRO-1/2 by the inner groups' flat partitions
        flats = getattr(self.ds_optimizer, "fp32_partitioned_groups_flat", None) or \
            [flat for group in inner.param_groups for flat in group["params"]]
        for flat in flats:
            state = inner.state[flat]  # a defaultdict: created when missing
            for k, v in keys.items():
                if k not in state:
                    state[k] = torch.zeros_like(flat) if v.ndim else v.clone()
        self.relink()

    def relink(self) -> None:
        """Map the inner optimizer's states to each parameter's fragment again (ZeRO-1/2). DeepSpeed 0.19 links
        them once, after its first parameter group's first update, when the other groups have no state yet: their
        fragments would stay unlinked and unreadable."""
        link = getattr(self.ds_optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            self.ds_optimizer._hp_optimizer_states_linked = False
            link()

    def set_param(self, p, full):
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, full.to(self.accelerator.device))
        with torch.no_grad():
            if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition of the parameter itself
                part = p.ds_tensor
                flat = full.flatten().to(part.dtype)
                start = part.numel() * self.rank
                piece = flat[start:start + part.numel()]
                part.data[:piece.numel()].copy_(piece)
            else:  # ZeRO-1/2: every rank holds the whole parameter
                p.data.copy_(full.to(p.dtype))

    def set_param_state(self, p, state):
        from deepspeed.utils import safe_set_full_optimizer_state

        for k, v in state.items():
            if v.ndim:
                safe_set_full_optimizer_state(p, v.to(self.accelerator.device), k)
        scalars = {k: v for k, v in state.items() if not v.ndim}
        if scalars:
            for st in self._inner().state.values():
                for k, v in scalars.items():
                    st[k] = v.clone()

    def local_param_bytes(self):
        total = 0
        for m in self.modules.values():
            for p in m.parameters():
                t = getattr(p, "ds_tensor", None)
                total += (t.numel() * t.element_size()) if t is not None else p.numel() * p.element_size()
        return total


def _partition_float64(module: torch.nn.Module, zero: dict) -> None:
    """Partition a float64 module for ZeRO-3 with zero.Init from the config before deepspeed.initialize sees it.
    initialize partitions the parameters it is handed with a dtype it takes from them where the CPU reports fp16
    (mkldnn: AVX-512 FP16 machines; elsewhere it takes bf16 and ignores them), and that dtype must be fp16, bf16 or
    fp32: a float64 run (tunelab's exactness checks) failed there. zero.Init with a config takes fp32 from it and
    keeps each parameter's own dtype; initialize then finds nothing left to partition."""
    import deepspeed

    if any(p.dtype == torch.float64 and not hasattr(p, "ds_id") for p in module.parameters()):
        deepspeed.zero.Init(module=module, config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                                "zero_optimization": zero})


@contextlib.contextmanager
def _quiet_deepspeed():
    import logging

    from tunelab.utils.env import quiet_transformers

    logger = logging.getLogger("DeepSpeed")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with quiet_transformers():
            yield
    finally:
        logger.setLevel(level)


def check_sharding(cfg, shape) -> None:
    """Refuse, in one line with the reason, what the sharded engines do not run (docs/distributed.md)."""

    name = cfg.train.distributed
    if shape.adapter.runtime_class is not None:
        raise UserError(f"train.distributed: {name} with adapter.type {cfg.adapter.type} is not supported: its "
                        "per-step hooks read whole gradients (the rank budget), which the sharded engines split; use "
                        "ddp")
    if shape.quantized and name in ("zero3", "fsdp2") and torch.cuda.is_available():
        raise UserError(f"train.distributed: {name} with a quantized base (model.quantization "
                        f"{cfg.model.quantization}) is refused on GPUs: tunelab keeps bitsandbytes' uint8 4-bit "
                        "storage, which FSDP-style sharding on CUDA crashes on or trains with loss 0 (accelerate "
                        "#3983), and the combination is not tested on a GPU; use zero1, zero2 or ddp")


def make_engine(spec: EngineSpec, accelerator, *, tcfg, precision: str) -> Engine:
    if accelerator.num_processes == 1 or spec.name == "ddp":
        engine = Engine(spec, accelerator, tcfg=tcfg, precision=precision)
        engine.sharded = spec.sharded  # one process: the sharded layout still, so a run can move to several
        return engine
    if spec.name == "fsdp2":
        return FSDP2Engine(spec, accelerator, tcfg=tcfg, precision=precision)
    _deepspeed_ready()
    return DeepSpeedEngine(spec, accelerator, tcfg=tcfg, precision=precision)


def _deepspeed_ready() -> None:
    """DeepSpeed installed, and set up not to compile its CPU shared-memory collective (an inference speed-up that
    costs a ~45 s build on first use; training collectives go through torch.distributed)."""
    import importlib.util
    import os

    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("train.distributed: ZeRO needs the deepspeed package (DS_BUILD_OPS=0 pip install "
                        "--no-build-isolation deepspeed; `make install` does it)")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict) and not torch.cuda.is_available():
        compatible["deepspeed_shm_comm"] = False


# ---------------------------------------------------------------------------------------- sharded checkpoints
def trained_tensors(engine: Engine) -> list[tuple[str, Any]]:
    """Every trained parameter by checkpoint name (role/parameter name), in one order on every rank."""
    out = []
    for role, module in engine.modules.items():
        for name, p in unwrap(module).named_parameters():
            if p.requires_grad:
                out.append((f"{role}/{name}", p))
    return out


def _numel(engine: Engine, p) -> int:
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    return p.numel()


def owners(sizes: list[int], world: int) -> list[int]:
    """Each tensor's owning rank: the largest first, each to the rank with the least so far (ties: the lowest)."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def save_shards(engine: Engine, dest: Path) -> None:
    """This rank's share of the trained parameters and their optimizer states (collective: every rank calls it)."""
    named = trained_tensors(engine)
    owner = owners([_numel(engine, p) for _, p in named], engine.world)
    if isinstance(engine, DeepSpeedEngine):
        engine.relink()
    folder = dest / SHARDS
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"world": str(engine.world), "rank": str(engine.rank), "engine": engine.name,
            "tensors": str(len(named))}
    # one gathered tensor in memory at a time: each is written as soon as every rank has taken part in gathering it
    with SafetensorsWriter(folder / f"rank-{engine.rank:05d}-of-{engine.world:05d}.safetensors", meta) as out:
        for (name, p), rank in zip(named, owner):
            full = engine.full_param(p)
            if rank == engine.rank:
                out.add(f"param/{name}", full)
            del full
            for k, v in engine.param_state(p).items():
                if rank == engine.rank:
                    out.add(f"state/{name}/{k}", v)


def load_shards(engine: Engine, ckpt: Path) -> None:
    """Load a sharded checkpoint (written on any number of processes) into this run's modules and optimizer."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for f in shard_files(ckpt):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                index[key] = f
    named = trained_tensors(engine)
    missing = [n for n, _ in named if f"param/{n}" not in index]
    if missing:
        raise UserError(f"{ckpt}: the checkpoint lacks trained tensor {missing[0]} (it was written for another "
                        "model or adapter)")
    handles: dict[Path, Any] = {}
    with contextlib.ExitStack() as stack:
        def read(key: str) -> torch.Tensor:
            f = index[key]
            if f not in handles:
                handles[f] = stack.enter_context(safe_open(str(f), framework="pt"))
            return handles[f].get_tensor(key)

        first_state = None
        for name, p in named:
            prefix = f"state/{name}/"
            state = {k[len(prefix):]: read(k) for k in index if k.startswith(prefix)}
            if first_state is None and state:
                first_state = state
                if isinstance(engine, DeepSpeedEngine):
                    engine.ensure_state(state)
            engine.set_param(p, read(f"param/{name}"))
            if state:
                engine.set_param_state(p, state)


def gather_trained(ckpt: Path, role: str = "policy") -> dict[str, torch.Tensor]:
    """The whole trained tensors of `role` from a sharded checkpoint's files, by parameter name (for export)."""
    from safetensors import safe_open

    out = {}
    prefix = f"param/{role}/"
    for f in shard_files(ckpt):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                if key.startswith(prefix):
                    out[key[len(prefix):]] = handle.get_tensor(key)
    return out


def autocast_forward(module: torch.nn.Module, accelerator) -> None:
    """Run `module`'s forward under the run's autocast with fp32 outputs, as accelerate does for the models it
    prepares (the sharded engines are not prepared by accelerate)."""
    from accelerate.utils import convert_outputs_to_fp32

    if accelerator.mixed_precision == "no":
        return
    forward = module.forward

    def run(self, *args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)

    module.forward = types.MethodType(convert_outputs_to_fp32(run), module)

