"""The one training loop. Every method runs through `run_training`, which reads top to bottom as
build (`_build`: data, model, the method's setup, optimizer, resume) -> a loop of steps (`_train_step`, then
`_evaluate_if_due`, `_report`, `_checkpoint_if_due`) -> save (`_save_final`, `_summarise`).

What lives here and nowhere else: device placement and data parallelism (through accelerate), gradient accumulation
with global normalisation, mixed precision, clipping, the schedule, evaluation, logging, checkpoints and exact resume.
What a method needs beyond that it asks for through its contract (methods/base.py: frozen models, setup, per-row
preparation, rollout, its metrics); what its data needs, its data kind declares (data/kinds.py). So this file names
no method and no data kind. Data order is engine/order.py's.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.config.load import save_config
from tunelab.config.schema import Config
from tunelab.data.kinds import DataKind
from tunelab.engine import checkpoint as ckpt_io
from tunelab.engine import rundir
from tunelab.engine.dist_config import EngineSpec, resolve_engine
from tunelab.engine.engines import (
    Engine,
    autocast_forward,
    check_sharding,
    load_shards,
    make_engine,
    save_shards,
)
from tunelab.engine.frozen import attend_per_sequence, build_frozen_models, build_trained_models
from tunelab.engine.metrics import MetricsLog, Progress, fmt_tokens_per_s, plot_loss
from tunelab.engine.optim import build_optimizer, build_scheduler
from tunelab.engine.order import RowOrder, split_global_batch
from tunelab.engine.packing import choose_packing
from tunelab.engine.shape import RunShape, resolve_run
from tunelab.errors import ConfigError, Interrupted, UserError
from tunelab.methods.base import Method, Rollout, SetupContext, StepContext


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path | None
    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    data_stats: dict[str, int] = field(default_factory=dict)
    packing: str = ""  # the batching mode used (data.packing with auto resolved)
    trainable_params: int = 0
    total_params: int = 0
    peak_memory: list[int] = field(default_factory=list)  # bytes per process (CUDA allocated, or peak RSS on CPU)


@dataclass
class _Window:
    """Sums since the last logged step (kept in checkpoints so a resumed run logs the same numbers)."""

    loss: float = 0.0
    weight: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    grad_norm: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # the method's own metrics, summed over its units
    rollout: dict[str, list[float]] = field(default_factory=dict)  # a rollout's metrics: name -> [sum, count]
    rollout_seconds: float = 0.0


def _prepare_output(cfg: Config) -> Path:
    """Check output.dir may be used (new, empty or a tunelab run: engine/rundir.py), create it and check it is
    writable. Main process only; nothing is deleted here (output.overwrite clears the old run later, once the new
    one has loaded its data and model)."""
    out = Path(cfg.output.dir)
    rundir.check_output_dir(out, cfg.output.overwrite)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output.dir: cannot write to {out}: {e.strerror or e}") from None
    return out


def _input_paths(cfg: Config) -> list[str]:
    """Files and folders the run reads: overwrite must not delete them."""
    paths = [cfg.model.path, cfg.model.tokenizer or ""]
    for spec in [*cfg.data.train, *cfg.data.val]:
        paths += [spec.path or "", spec.registry or ""]
    if cfg.train.resume not in ("auto", "never"):
        paths.append(cfg.train.resume)
    return paths


def _find_resume(cfg: Config, rank: int, say) -> ckpt_io.CheckpointData | None:
    """The checkpoint to resume from, per train.resume, read whole and checked (called by every process after
    output.dir is ready; every process reaches the same verdict from the same files)."""
    out = Path(cfg.output.dir)
    ckpt_root = out / "checkpoints"
    resume = cfg.train.resume
    if cfg.output.overwrite:
        inside = rundir.inputs_inside(out, _input_paths(cfg))
        if inside is not None:
            raise UserError(f"output.overwrite: {inside} is an input of this run and lies inside what overwrite "
                            f"deletes in {out} (an earlier run's files); move it out of the run folder first")
        if resume in ("auto", "never"):
            return None  # starting over: the earlier run's checkpoints are not resumed
    if resume == "never":
        if (out / "final").exists() or ckpt_io.list_checkpoints(ckpt_root):
            raise UserError(
                f"output.dir: {out} already holds a run; set output.overwrite=true to start over "
                "or train.resume=auto to continue it"
            )
        return None
    if resume == "auto":
        return ckpt_io.newest_readable(ckpt_root, rank, say)
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        return ckpt_io.newest_readable(path / "checkpoints", rank, say)
    if not (path / "state.json").exists():
        raise UserError(f"train.resume: {resume} is not a checkpoint folder (no state.json)")
    return ckpt_io.read_checkpoint(path, rank)


def _check_resume_config(cfg: Config, ckpt: ckpt_io.CheckpointData, world: int) -> dict:
    """Refuse resuming under a config that changes what is trained; return the allowed changes (recorded in
    run.json's history)."""
    from tunelab.config.load import config_to_dict

    if not ckpt.config:
        return {}
    refused, allowed = rundir.config_changes(ckpt.config, config_to_dict(cfg), old_world=ckpt.state.world_size,
                                             new_world=world)
    if refused:
        raise UserError(
            f"train.resume: {ckpt.path} was trained with other settings ({rundir.describe_changes(refused)}); "
            "resuming would silently mix two runs. Set them back to continue, or start a new run: another "
            "output.dir, or output.overwrite=true to replace this one"
        )
    return allowed


def model_positions(model_path: str) -> tuple[int, str] | None:
    """(positions, config key) of a local model folder's config.json: the longest sequence its position embeddings
    cover. None when the folder or the key is absent (a hub id: checked nowhere else before loading)."""
    config_file = Path(model_path) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(section.get(key), int) and section[key] > 0:
                return section[key], key
    return None


def check_positions(cfg: Config) -> None:
    """Refuse a data.max_length (plus soft-prompt tokens) beyond the model's positions: absolute position
    embeddings fail with an index error mid-run, rotary ones extrapolate to positions never trained."""
    found = model_positions(cfg.model.path)
    if found is None:
        return
    positions, key = found
    virtual = getattr(cfg.adapter, "virtual_tokens", 0) if cfg.adapter.type in ("prompt", "ptuning") else 0
    needed = cfg.data.max_length + virtual
    if needed > positions:
        plus = f" + {virtual} virtual tokens of adapter.virtual_tokens" if virtual else ""
        raise ConfigError(
            f"data.max_length: {cfg.data.max_length}{plus} is beyond the {positions} positions of {cfg.model.path} "
            f"(config.json {key}); set data.max_length to at most {positions - virtual}"
        )


def save_weights(model, dest: Path, tokenizer=None, template=None, **adapter_kw) -> None:
    """What trained (models.adapters.save_adapter: the adapter, or a whole HF model folder for full/freeze); with
    the tokenizer and chat template when given."""
    from tunelab.models.adapters import save_adapter
    from tunelab.utils.env import quiet_transformers

    with quiet_transformers():  # no "Writing model shards" bar in the middle of the run's output
        save_adapter(model, dest, **adapter_kw)
    if tokenizer is not None:
        if template is not None:
            tokenizer.chat_template = template.source
        tokenizer.save_pretrained(dest)


def load_weights(model, ckpt: Path) -> None:
    """Restore trained weights from a checkpoint into an already-built (adapter-wrapped) model."""
    from safetensors.torch import load_file

    from tunelab.models.adapters import load_adapter_state

    if load_adapter_state(model, ckpt / "weights"):
        return
    state: dict[str, torch.Tensor] = {}
    for f in sorted((ckpt / "weights").glob("*.safetensors")):
        state.update(load_file(str(f)))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    # tied weights (e.g. lm_head = embed_tokens) are saved once under one name
    missing = [n for n in missing if not any(q is params[n] for m, q in params.items() if m in state)]
    if missing:
        raise UserError(f"{ckpt}: checkpoint lacks trained weight {missing[0]}")
    with torch.no_grad():
        for n, p in params.items():
            if n in state:
                p.copy_(state[n].to(p.dtype))


class NonFiniteLoss(UserError):
    """Training produced a NaN or infinite loss or gradient norm; the step was not applied."""

    exit_code = 3


def _non_finite_message(step: int, loss: float, grad_norm: float, rows: list, out: Path, tcfg) -> str:
    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
    sources = [str(getattr(r, "source", "")) for r in rows]
    sources = [x for x in sources if x]
    shown = ", ".join(sources[:6]) + (f" and {len(sources) - 6} more" if len(sources) > 6 else "")
    last = ckpt_io.latest_checkpoint(out / "checkpoints")
    kept = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was saved before it"
    hint = "lower train.lr" + ("" if tcfg.max_grad_norm > 0 else " or set train.max_grad_norm (clipping is off)")
    return (f"train: non-finite {what} at step {step} (rows: {shown or 'unknown'}); stopped before applying it, "
            f"{kept}; {hint}, or check those rows")


def run_summary(records: list[dict], *, steps: int, wall_seconds: float, train_seconds: float, tokens: int,
                progress: tuple[tuple[str, str], ...], outputs: list[tuple[str, Path]]) -> list[str]:
    """The lines `tunelab train` ends with: time and throughput, first -> last logged loss, the last evaluation and
    the method's key metrics, and where the outputs are. `records` are metrics.jsonl's (the whole run, resumed
    parts included); `tokens`/`train_seconds` count the whole run's trained tokens and time in training steps."""
    lines = [f"done: {steps} steps in {_fmt_seconds(wall_seconds)} (this invocation), "
             f"{fmt_tokens_per_s(tokens / train_seconds) if train_seconds > 0 else '-'} tokens/s mean over "
             f"{_fmt_seconds(train_seconds)} of training steps"]
    losses = [r for r in records if "loss" in r]
    if losses:
        first, last = losses[0], losses[-1]
        lines.append(f"loss: {first['loss']:.4f} (step {first['step']}) -> {last['loss']:.4f} (step {last['step']})")
        shown = [f"{label} {last[name]:.3g}" for name, label in progress if name in last]
        if shown:
            lines[-1] += "; " + ", ".join(shown)
    evals = [r for r in records if "eval_loss" in r]
    if evals:
        ev = evals[-1]
        parts = [f"eval_loss {ev['eval_loss']:.4f}"]
        if "eval_ppl" in ev:
            parts.append(f"perplexity {ev['eval_ppl']:.2f}")
        parts += [f"{label} {ev['eval_' + name]:.3g}" for name, label in progress if "eval_" + name in ev]
        if len(evals) > 1:
            parts.append(f"first eval_loss {evals[0]['eval_loss']:.4f} at step {evals[0]['step']}")
        lines.append(f"eval (step {ev['step']}): " + ", ".join(parts))
    lines += [f"{what}: {path}" for what, path in outputs if path.exists()]
    return lines


def _fmt_seconds(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _SignalFlag:
    def __init__(self):
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a web UI worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def run_training(cfg: Config, *, echo: bool = True) -> TrainResult:
    """Train per `cfg`: the main process holds output.dir's lock for the whole run (engine/rundir.py)."""
    from accelerate import Accelerator

    if not torch.cuda.is_available():  # DeepSpeed (imported by accelerate when installed) need not guess the device
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    shape = resolve_run(cfg)  # what the config means here: refused now if this machine cannot run it
    # the engine and the files it reads, checked before any process group starts
    spec = resolve_engine(cfg.train, precision=shape.precision, world=int(os.environ.get("WORLD_SIZE", "1")))
    if spec.sharded:
        check_sharding(cfg, shape)
    accelerator = Accelerator(mixed_precision=shape.mixed_precision, cpu=not torch.cuda.is_available())
    lock = None
    if accelerator.is_main_process:
        lock = rundir.RunLock(_prepare_output(cfg))
        lock.acquire()
    try:
        return _train(cfg, shape, accelerator, echo, spec)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class _Run:
    """Everything a training run built, shared by the step, evaluation and saving functions below."""

    cfg: Config
    shape: RunShape
    accelerator: Any
    say: Callable[..., None]
    echo: bool
    out: Path
    t_start: float
    data: Any  # data.prepare.Prepared
    order: RowOrder
    total_steps: int
    tokenizer: Any
    resumed: ckpt_io.CheckpointData | None = None
    changes: dict = field(default_factory=dict)
    stream: Any = None
    engine: Engine | None = None  # how the processes share the model (engine/engines.py)
    model: Any = None  # as the engine prepared it (DDP-wrapped or a DeepSpeed engine with several processes)
    raw_model: Any = None
    optimizer: Any = None
    scheduler: Any = None
    runtime: Any = None  # the adapter's per-step hooks (models.adapters.AdapterRuntime)
    ctx: StepContext | None = None
    setup_ctx: SetupContext | None = None
    packing: str = "none"
    capacity: int = 0  # tokens per packed row
    min_rows: int = 1
    counts: Any = None
    state: ckpt_io.TrainState | None = None
    window: _Window = field(default_factory=_Window)
    log: MetricsLog | None = None
    progress: Progress | None = None
    params: list = field(default_factory=list)
    step_rows: list = field(default_factory=list)  # the global batch of the step in progress
    rollout_cache: list | None = None  # the rolled-out batch the next steps train on (Method.rollout_steps > 1)

    @property
    def method(self) -> Method:
        return self.shape.method

    @property
    def kind(self) -> DataKind:
        """The kind micro-batches are built from (Method.batch_kind)."""
        return self.shape.kind

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def batch(self, rows: list, packing: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one micro-batch (this run's batching mode unless `packing` says otherwise), on the CPU."""
        return self.kind.batch(rows, self.packing if packing is None else packing, self.tokenizer.pad_token_id,
                               self.cfg.data.max_length, self.capacity, self.min_rows)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def reduce_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()


def _train(cfg: Config, shape: RunShape, accelerator, echo: bool, spec: EngineSpec) -> TrainResult:
    """Build the run, train it step by step (evaluating, logging and checkpointing as configured), save it."""
    run = _build(cfg, shape, accelerator, echo, spec)
    if isinstance(run, TrainResult):  # already complete
        return run
    with _SignalFlag() as sig:
        while run.state.step < run.total_steps:
            record = _train_step(run)
            record = _evaluate_if_due(run, record)
            _report(run, record)
            _checkpoint_if_due(run, sig.signum)
    run.progress.close()
    _save_final(run)
    return _summarise(run)


# ------------------------------------------------------------------------------------------------------- build
def _build(cfg: Config, shape: RunShape, accelerator, echo: bool, spec: EngineSpec) -> _Run | TrainResult:
    run = _load_data(cfg, shape, accelerator, echo)
    if isinstance(run, TrainResult):
        return run
    run.engine = make_engine(spec, accelerator, tcfg=cfg.train, precision=shape.precision)
    _load_model(run)
    _set_up_method(run)
    _prepare_training(run)
    _restore(run)
    return run


def _load_data(cfg: Config, shape: RunShape, accelerator, echo: bool) -> _Run | TrainResult:
    """Find what to resume, check the inputs before anything heavy loads, then tokenize the data."""
    from accelerate.utils import set_seed

    from tunelab.data.prepare import prepare_data, prepare_stream
    from tunelab.models.load import check_weights_format, load_tokenizer

    tcfg = cfg.train
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    say = print if (echo and is_main) else (lambda *a, **k: None)
    t_start = time.perf_counter()
    out = Path(cfg.output.dir)
    accelerator.wait_for_everyone()
    resumed = _find_resume(cfg, rank, say)
    changes = _check_resume_config(cfg, resumed, world) if resumed is not None else {}

    set_seed(tcfg.seed)
    check_positions(cfg)
    # before the data is tokenized: a model that would be refused at load time is refused now
    check_weights_format(cfg.model.path, allow_pickle=cfg.model.allow_pickle)
    if getattr(cfg.adapter, "path", None):
        check_weights_format(cfg.adapter.path, allow_pickle=cfg.model.allow_pickle, what="adapter.path")
    tokenizer = load_tokenizer(cfg.model)

    global_batch = tcfg.batch_size * tcfg.grad_accum * world
    stream = None
    if cfg.data.streaming:
        if tcfg.max_steps <= 0:
            raise UserError("train.max_steps: required with data.streaming (a stream has no length to count epochs)")
        data, stream = prepare_stream(cfg.data, tokenizer, kind=shape.data_kind, seed=tcfg.seed)
        total_steps = tcfg.max_steps
    else:
        data = prepare_data(cfg.data, tokenizer, kind=shape.data_kind, seed=tcfg.seed)
        steps_per_epoch = len(data.train) // global_batch
        if steps_per_epoch == 0:
            raise UserError(
                f"data: {len(data.train)} training rows are fewer than one global batch "
                f"(batch_size {tcfg.batch_size} x grad_accum {tcfg.grad_accum} x {world} processes = "
                f"{global_batch}); lower train.batch_size or add data"
            )
        # a rollout that trains several steps consumes its prompts once: an epoch is that many more steps
        steps_per_epoch *= shape.steps_per_rollout
        total_steps = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    for line in data.lines:
        say(line)
    if resumed is not None and resumed.state.step >= total_steps and (out / "final").exists():
        say(f"train: {out} is already complete ({resumed.state.step} steps); raise train.max_steps to train on, "
            "or set output.overwrite=true to start over")
        return TrainResult(out, out / "final", resumed.state.step, [], data.stats, cfg.data.packing)
    lengths = [shape.data_kind.length(r) for r in data.train] if shape.packing == "group_by_length" else None
    order = RowOrder(data.train, global_batch, seed=tcfg.seed, shuffle=cfg.data.shuffle, lengths=lengths,
                     stream=stream)
    return _Run(cfg=cfg, shape=shape, accelerator=accelerator, say=say, echo=echo, out=out, t_start=t_start,
                data=data, order=order, total_steps=total_steps,
                tokenizer=tokenizer, resumed=resumed, changes=changes, stream=stream)


def _load_model(run: _Run) -> None:
    """The policy with its adapter; then (main process) the earlier run is cleared if asked and this one recorded."""
    from tunelab import __version__
    from tunelab.models import quant
    from tunelab.models.adapters import AdapterSetup, apply_adapter
    from tunelab.models.kernels import check_model_switches
    from tunelab.models.load import load_model

    cfg, out = run.cfg, run.out
    check_model_switches(cfg.model)
    model = load_model(cfg.model, dtype=run.shape.torch_dtype, head=run.method.head,
                       pad_token_id=run.tokenizer.pad_token_id)
    model = quant.prepare_for_training(model, cfg.model, cfg.model.gradient_checkpointing)
    resume_from = run.resumed.path if run.resumed is not None else None
    if run.is_main:
        # data and model are loaded: only now may output.overwrite delete the earlier run's files
        if cfg.output.overwrite:
            removed = rundir.clear_run(out)
            if removed:
                run.say(f"output: cleared the earlier run in {out} ({', '.join(removed)})")
        ckpt_io.clean_partial(out / "checkpoints")
        save_config(cfg, out / "config.yaml")
        rundir.record_start(out, version=__version__, resumed_from=resume_from,
                            step=run.resumed.state.step if run.resumed is not None else 0, changes=run.changes)
    run.accelerator.wait_for_everyone()

    def calibration(n: int) -> list[dict]:
        """The first n micro-batches of training rows, unpacked (EVA initialises LoRA from their activations)."""
        rows, size = (run.data.train if run.stream is None else []), cfg.train.batch_size  # none from a stream
        return [run.kind.batch(rows[i * size:(i + 1) * size], "none", run.tokenizer.pad_token_id,
                               cfg.data.max_length) for i in range(min(n, -(-len(rows) // size)))]

    setup = AdapterSetup(total_steps=run.total_steps, model_path=cfg.model.path,
                         tokenizer_path=cfg.model.tokenizer or cfg.model.path, calibration=calibration,
                         resuming=resume_from is not None, output_dir=out if run.is_main else None)
    run.raw_model = apply_adapter(model, cfg.adapter, setup)
    if cfg.train.qat != "none":
        from tunelab.models.qat import prepare_qat, qat_spec

        spec = qat_spec(cfg.train.qat, cfg.train.qat_group_size)
        count = prepare_qat(run.raw_model, spec)
        run.say(f"qat: {count} linear layers compute with {spec.describe()} fake-quantized weights; final/ is saved "
                "as compressed-tensors")


def _set_up_method(run: _Run) -> None:
    """The method's frozen models and setup; the batching mode; the step context every loss call receives."""
    from tunelab.models.adapters import count_parameters

    cfg, accelerator = run.cfg, run.accelerator
    model = run.raw_model
    run.ctx = StepContext(loss_chunk=cfg.train.loss_chunk, config=cfg.method, tokenizer=run.tokenizer,
                          template=run.data.template, max_length=cfg.data.max_length, device=accelerator.device,
                          seed=cfg.train.seed, total_steps=run.total_steps)
    models = build_frozen_models(run.shape.extra_models, cfg, model, dtype=run.shape.torch_dtype,
                                 device=accelerator.device, autocast=accelerator.autocast)
    for frozen in models.values():
        if frozen.source != "adapter_off":  # a copy: sharded like the policy under ZeRO-3 and FSDP2
            frozen.module = run.engine.place_frozen(frozen.module)
    trained = build_trained_models(run.shape.extra_models, cfg, dtype=run.shape.torch_dtype,
                                   device=accelerator.device, pad_token_id=run.tokenizer.pad_token_id)
    run.setup_ctx = SetupContext(config=cfg.method, step=run.ctx, policy=model, models=models, trained=trained,
                                 streaming=run.stream is not None, batches=lambda rows: _batches(run, rows),
                                 say=run.say, rank=run.rank, world=run.world,
                                 barrier=run.accelerator.wait_for_everyone)
    if run.method.setup is not None:
        run.method.setup(run.setup_ctx)
    run.counts = count_parameters(model)
    run.say(f"model: {cfg.model.path} ({cfg.adapter.type}), {run.counts}")
    for role, module in run.setup_ctx.trained.items():
        module.to(accelerator.device)
        params = sum(p.numel() for p in module.parameters() if p.requires_grad)
        run.say(f"model: {role} trains beside the policy ({params:,} parameters)")

    run.packing, varlen = choose_packing(model, cfg, len(run.tokenizer), run.shape)
    if varlen:
        attend_per_sequence(models, run.setup_ctx.trained)
    # torch.compile specialises a batch dimension of 1: packed micro-batches keep at least 2 rows when compiled
    run.min_rows = 2 if cfg.model.compile else 1
    # with per-sequence attention (tunelab's varlen SDPA, flash attention) a row's length costs nothing quadratic, so
    # a micro-batch packs into one row with no padding at all; with a mask, rows of at most max_length
    per_sequence = varlen or cfg.model.attn_implementation.startswith("flash")
    sequences = run.shape.sequences_per_micro_batch
    run.capacity = sequences * cfg.data.max_length if per_sequence and not cfg.model.compile \
        else cfg.data.max_length
    run.say(f"data: batching mode {run.packing}" + (" (auto)" if cfg.data.packing == "auto" else "")
            + (", attention per packed sequence (varlen SDPA)" if varlen else ""))
    if run.packing == "padding_free":
        run.say("data: packed micro-batches are " + ("one row each (per-sequence attention: no padding)"
                                                     if run.capacity > cfg.data.max_length
                                                     else f"rows of at most {cfg.data.max_length} tokens"))


def _batches(run: _Run, rows: list):
    """Padded micro-batches of train.batch_size rows on the device, with the rows they hold (for prepare_rows)."""
    size = run.cfg.train.batch_size
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        yield chunk, run.to_device(run.batch(chunk, "none"))


def _prepare_training(run: _Run) -> None:
    """Model switches, optimizer, schedule and data parallelism; then the method's per-row preparation."""
    from tunelab.models.adapters import AdapterRuntime, lr_scale
    from tunelab.models.kernels import apply_model_switches

    cfg, engine = run.cfg, run.engine
    model = apply_model_switches(run.raw_model, cfg.model)
    trained = run.setup_ctx.trained

    def make_optimizer(policy, extra):
        return build_optimizer(policy, cfg.train, lr_scale(cfg.adapter), extra=extra)

    run.model, run.ctx.trained, run.optimizer = engine.prepare(model, trained, make_optimizer)
    run.scheduler = build_scheduler(run.optimizer, cfg.train, run.total_steps)
    run.raw_model = engine.modules["policy"]
    run.ctx.sharded_params = engine.shards_params
    if engine.sharded and run.world > 1:
        for module in engine.modules.values():
            autocast_forward(module, run.accelerator)
    _say_engine(run)
    run.runtime = AdapterRuntime.for_model(run.raw_model, cfg.adapter)
    if run.method.prepare_rows is not None:
        run.method.prepare_rows(run.setup_ctx, [run.data.train, run.data.val])
    needs = run.shape.extra_models
    for role in [r for r in run.setup_ctx.models if not needs[r].during_training]:
        del run.setup_ctx.models[role]  # used before training only: let it go


def _say_engine(run: _Run) -> None:
    """The engine, and the parameter bytes each process holds: what is sharded shows here, never assumed."""
    engine = run.engine
    held = torch.tensor([float(engine.local_param_bytes())], dtype=torch.float64, device=run.accelerator.device)
    per_rank = run.accelerator.gather(held).tolist() if run.world > 1 else held.tolist()
    run.say(f"train: engine {engine.describe()}; parameters held per process: "
            + ", ".join(f"{b / 2 ** 20:.2f} MiB" for b in per_rank))


def _restore(run: _Run) -> None:
    """Training state: fresh, or the checkpoint's weights, optimizer, schedule, window and RNG."""
    cfg, resumed = run.cfg, run.resumed
    world = run.world
    run.state = ckpt_io.TrainState(world_size=world, total_steps=run.total_steps)
    if resumed is not None:
        run.state = resumed.state
        sharded = bool(ckpt_io.shard_files(resumed.path))
        if sharded != run.engine.sharded:
            was = f"a sharded engine ({ckpt_io.shard_engine(resumed.path)})" if sharded else "ddp"
            raise UserError(f"train.distributed: {resumed.path} was written under {was}; resume it with "
                            f"train.distributed {'zero1, zero2, zero3 or fsdp2' if sharded else 'ddp'}, or start "
                            "over (another output.dir, or output.overwrite=true)")
        if sharded:
            load_shards(run.engine, resumed.path)
            for group, lr in zip(run.optimizer.param_groups, resumed.extra.get("lrs", [])):
                group["lr"] = lr
        else:
            load_weights(run.raw_model, resumed.path)
            _load_trained(run, resumed.path)
            # states are read onto the CPU; the optimizer moves its own onto each parameter's device
            run.optimizer.load_state_dict(resumed.optimizer)
        run.scheduler.load_state_dict(resumed.scheduler)
        run.window = _Window(**resumed.extra["window"])
        run.runtime.load_state_dict(resumed.extra.get("adapter", {}))
        if resumed.extra.get("rollout") is not None:
            run.rollout_cache = [_row_from_state(r) for r in resumed.extra["rollout"]]
        if resumed.rng is not None:
            ckpt_io.set_rng_state(resumed.rng)
        run.state.total_steps = run.total_steps
        run.state.world_size = world
        run.say(f"resume: continuing from {resumed.path} at step {run.state.step}/{run.total_steps}"
                + (f" (changed: {rundir.describe_changes(run.changes)})" if run.changes else ""))
    if run.is_main:
        run.log = MetricsLog(run.out, run.state.step if resumed is not None else None,
                             tensorboard="tensorboard" in cfg.output.report_to)
    run.progress = Progress(run.total_steps, run.state.step, enabled=run.echo and run.is_main)
    run.model.train()
    run.params = [p for p in run.model.parameters() if p.requires_grad]
    for module in run.ctx.trained.values():
        module.train()
        run.params += [p for p in module.parameters() if p.requires_grad]
    tcfg = cfg.train
    run.say(f"train: {run.total_steps} steps, global batch {tcfg.batch_size * tcfg.grad_accum * world} rows "
            f"({tcfg.batch_size} x {tcfg.grad_accum} accumulation x {world} process{'es' if world > 1 else ''}), "
            f"precision {run.shape.precision}")


# -------------------------------------------------------------------------------------------------------- steps
def _micro_batches(run: _Run, step: int) -> list[dict[str, torch.Tensor]]:
    """This process's micro-batches of global batch `step`: its rows, prepared and rolled out if the method asks
    (every `steps_per_rollout` steps; the steps between train on the same rolled-out batch)."""
    k = run.shape.steps_per_rollout
    if run.shape.rolls_out and step % k and run.rollout_cache is not None:
        rows = run.rollout_cache
    else:
        rows = run.order.global_rows(step // k)
        if run.stream is not None and run.method.prepare_rows is not None:
            run.method.prepare_rows(run.setup_ctx, [rows])
        if run.shape.rolls_out:
            rows = _rollout(run, rows, step)
            run.rollout_cache = rows if k > 1 else None
    run.step_rows = rows
    return [run.batch(part) for part in split_global_batch(rows, run.cfg.train.grad_accum, run.world, run.rank)]


def _rollout(run: _Run, rows: list, step: int) -> list:
    """The method's rollout of a global batch, finished over the whole batch (Method.finish_rollout); when the
    finish keeps fewer rows than a full batch, further prompts are rolled out (refills, up to
    Method.rollout_refills) and the finish sees everything sampled. Its metrics and time go to the window."""
    method = run.method
    t0 = time.perf_counter()
    produced = _rollout_share(run, rows, step, 0)
    if method.finish_rollout is not None:
        limit = len(produced)
        most = method.rollout_refills(run.cfg) if method.rollout_refills is not None else 0
        refills = 0
        while True:
            kept, metrics = _rollout_output(method.finish_rollout(produced, run.ctx, limit, refills >= most))
            if len(kept) >= limit or refills >= most:
                break
            refills += 1
            produced = produced + _rollout_share(run, run.order.refill_rows(step, refills), step,
                                                 refills * len(rows))
        produced = kept
        # computed from the whole batch every process holds: the same on every process, not summed over them
        metrics = {**metrics, **({"refills": (refills, 1)} if most else {})}
        _add_window_metrics(run.window, metrics)
    run.window.rollout_seconds += time.perf_counter() - t0
    return produced


def _rollout_share(run: _Run, rows: list, step: int, offset: int) -> list:
    """Each process rolls out its contiguous share of `rows` (seeded from `offset` + its index), and every process
    then holds the whole rolled-out batch (in rank order)."""
    from accelerate.utils import gather_object

    world, rank = run.world, run.rank
    start = rank * len(rows) // world
    share = rows[start:(rank + 1) * len(rows) // world]
    run.ctx.step, run.ctx.rollout_offset = step, offset + start
    with run.engine.for_sampling(run.raw_model):
        produced, metrics = _rollout_output(run.method.rollout(run.raw_model, share, run.ctx))
    run.raw_model.train()
    if world > 1:
        produced = gather_object(produced)
    _add_rollout_metrics(run, metrics)
    return produced


def _rollout_output(output) -> tuple[list, dict[str, tuple[float, float]]]:
    if isinstance(output, Rollout):
        return output.rows, output.metrics
    return output, {}


def _add_rollout_metrics(run: _Run, metrics: dict[str, tuple[float, float]]) -> None:
    """Sum (or max/min) a rollout's metrics over processes into the window; every process has the same names."""
    names = sorted(metrics)
    if run.world > 1 and names:
        values = torch.tensor([v for n in names for v in metrics[n]], dtype=torch.float64,
                              device=run.accelerator.device).view(-1, 2)
        for reduction, pick in (("sum", lambda n: not n.endswith(("_max", "_min"))),
                                ("max", lambda n: n.endswith("_max")), ("min", lambda n: n.endswith("_min"))):
            idx = [i for i, n in enumerate(names) if pick(n)]
            if idx:
                sel = values[idx] if reduction != "min" else -values[idx]
                red = run.accelerator.reduce(sel.contiguous(), reduction="sum" if reduction == "sum" else "max")
                values[idx] = red if reduction != "min" else -red
        metrics = {n: (float(values[i, 0]), float(values[i, 1])) for i, n in enumerate(names)}
    _add_window_metrics(run.window, metrics)


def _add_window_metrics(window: _Window, metrics: dict[str, tuple[float, float]]) -> None:
    for name in sorted(metrics):
        total, count = metrics[name]
        have = window.rollout.get(name)
        if have is None:
            window.rollout[name] = [total, count]
        elif name.endswith("_max"):
            have[0] = max(have[0], total)
        elif name.endswith("_min"):
            have[0] = min(have[0], total)
        else:
            have[0] += total
            have[1] += count


def _add_metrics(sums: dict[str, float], metrics: dict) -> None:
    """Accumulate a method's metrics (each summed over the micro-batch's units, like its loss)."""
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach() if hasattr(v, "detach") else v)


def _train_step(run: _Run) -> dict | None:
    """One optimizer step over the global batch; returns the log record when this step logs."""
    from tunelab.models.kernels import activation_offload

    tcfg, method = run.cfg.train, run.method
    t0 = time.perf_counter()
    micro = _micro_batches(run, run.state.step)
    local = [sum(method.weight(b) for b in micro), sum(int(b["token_mask"].sum()) for b in micro),
             sum(b["input_ids"].numel() for b in micro)]
    global_weight, global_tokens, global_positions = run.reduce_sum(local)
    # Every micro-batch's summed loss is divided by the weight of the whole global batch. DDP averages gradients over
    # processes, so multiply by the world size to get a plain sum over all units.
    scale = run.world / max(global_weight, 1.0)
    loss_sum = 0.0
    step_metrics: dict[str, float] = {}
    engine = run.engine
    for m, batch in enumerate(micro):
        batch = run.to_device(batch)
        sync = m == len(micro) - 1
        with contextlib.ExitStack() as stack:
            if not sync:
                stack.enter_context(engine.no_sync((run.model, *run.ctx.trained.values())))
            run.runtime.before_forward(run.raw_model, batch)
            with activation_offload(run.cfg.model):
                out = method.loss(run.model, batch, run.ctx)
            total = out.loss_sum * scale
            extra_loss = run.runtime.extra_loss(run.raw_model) if sync else None
            if extra_loss is not None:  # once per step (DDP averages identical copies across ranks)
                total = total + extra_loss
            engine.backward(total)
        loss_sum += float(out.loss_sum.detach())
        _add_metrics(step_metrics, out.metrics)
    max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm > 0 else float("inf")
    grad_norm = engine.clip(run.params, max_norm)  # None: DeepSpeed measures (and clips) in its step
    metric_names = sorted(step_metrics)  # the same names on every rank: the same method and batch layout
    loss_sum, *metric_values = run.reduce_sum([loss_sum, *(step_metrics[k] for k in metric_names)])
    stepped = grad_norm is None and math.isfinite(loss_sum)
    if stepped:  # DeepSpeed measures the norm in its step: a non-finite one ends the run before anything is saved
        grad_norm = engine.step()
    grad_norm = math.nan if grad_norm is None else grad_norm
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        # every rank sees the same summed loss and global norm, so all stop here, before the update
        _close(run)
        raise NonFiniteLoss(_non_finite_message(run.state.step + 1, loss_sum, grad_norm, run.step_rows, run.out,
                                                tcfg))
    if not stepped:
        engine.step()
    run.runtime.after_optimizer_step(run.raw_model, run.state.step)
    run.scheduler.step()
    engine.zero_grad()
    _count_step(run, time.perf_counter() - t0, loss_sum, dict(zip(metric_names, metric_values)), global_weight,
                int(global_tokens), int(global_positions), grad_norm)
    return _log_record(run)


def _count_step(run: _Run, seconds: float, loss_sum: float, metrics: dict[str, float], weight: float, tokens: int,
                positions: int, grad_norm: float) -> None:
    state, window = run.state, run.window
    state.step += 1
    state.elapsed += seconds
    state.tokens += tokens
    state.positions += positions
    window.loss += loss_sum
    for k, v in metrics.items():
        window.metrics[k] = window.metrics.get(k, 0.0) + v
    window.weight += weight
    window.tokens += tokens
    window.seconds += seconds
    window.steps += 1
    window.grad_norm += grad_norm


def _log_record(run: _Run) -> dict | None:
    """The means over the window since the last logged step, when this step logs (then the window restarts)."""
    step, state, window = run.state.step, run.state, run.window
    if not (step % run.cfg.train.log_every == 0 or step == run.total_steps):
        return None
    record = {
        "step": step,
        "epoch": _epoch(run, step),
        "loss": window.loss / max(window.weight, 1.0),
        **{k: v / max(window.weight, 1.0) for k, v in sorted(window.metrics.items())},
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": window.grad_norm / window.steps,
        "tokens": state.tokens,
        "positions": state.positions,
        "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
        "elapsed": round(state.elapsed, 3),
    }
    for name, (total, count) in sorted(window.rollout.items()):
        record[name] = total if name.endswith(("_max", "_min")) else total / max(count, 1e-12)
    if run.shape.rolls_out:  # generation and training time apart
        record["rollout_s"] = window.rollout_seconds / window.steps
        record["train_s"] = (window.seconds - window.rollout_seconds) / window.steps
    run.window = _Window()
    return record


# --------------------------------------------------------------------------------------------------- evaluation
def _evaluate_if_due(run: _Run, record: dict | None) -> dict | None:
    step, every = run.state.step, run.cfg.train.eval_every
    if not run.data.val or not ((every and step % every == 0) or step == run.total_steps):
        return record
    return {**(record or {"step": step, "epoch": _epoch(run, step)}), **evaluate(run)}


def _epoch(run: _Run, step: int) -> float:
    return run.order.epoch_at(step / run.shape.steps_per_rollout if run.stream is None else step)


def evaluate(run: _Run) -> dict[str, float]:
    """The method's loss and metrics over the validation rows (each process a share), per unit; plus the method's
    own evaluation metrics (sft/pt: perplexity)."""
    tcfg, method, model = run.cfg.train, run.method, run.raw_model
    model.eval()
    for module in run.ctx.trained.values():
        module.eval()
    loss_sum = weight = 0.0
    sums: dict[str, float] = {}
    rollout_sums: dict[str, list[float]] = {}
    with torch.no_grad(), run.accelerator.autocast():
        for start in range(run.rank * tcfg.batch_size, len(run.data.val), run.world * tcfg.batch_size):
            rows = run.data.val[start:start + tcfg.batch_size]
            if run.shape.rolls_out:
                run.ctx.step, run.ctx.rollout_offset, run.ctx.evaluating = run.state.step, start, True
                with run.engine.for_sampling(model):
                    rows, metrics = _rollout_output(method.rollout(model, rows, run.ctx))
                if method.finish_rollout is not None:  # over this process's rows; nothing is dropped
                    rows = _rollout_output(method.finish_rollout(rows, run.ctx, len(rows), True))[0]
                run.ctx.evaluating = False
                model.eval()
                for name, (total, count) in metrics.items():
                    if not name.endswith(("_max", "_min")):
                        have = rollout_sums.setdefault(name, [0.0, 0.0])
                        have[0] += total
                        have[1] += count
            batch = run.to_device(run.batch(rows))
            run.runtime.before_forward(model, batch)
            out = method.loss(model, batch, run.ctx)
            loss_sum += float(out.loss_sum)
            weight += method.weight(batch)
            _add_metrics(sums, out.metrics)
    model.train()
    for module in run.ctx.trained.values():
        module.train()
    names = sorted(sums)
    loss_sum, weight, *values = run.reduce_sum([loss_sum, weight, *(sums[k] for k in names)])
    result = {"eval_loss": loss_sum / max(weight, 1.0)}
    result.update({f"eval_{k}": v / max(weight, 1.0) for k, v in zip(names, values)})
    rollout_names = sorted(rollout_sums)
    if rollout_names:  # a rollout's own metrics: sums and counts over every process's share
        totals = run.reduce_sum([v for n in rollout_names for v in rollout_sums[n]])
        result.update({f"eval_{n}": totals[2 * i] / max(totals[2 * i + 1], 1e-12)
                       for i, n in enumerate(rollout_names)})
    if method.eval_metrics is not None:
        result.update(method.eval_metrics(result))
    return result


# ------------------------------------------------------------------------------------------ logging and saving
def _report(run: _Run, record: dict | None) -> None:
    """The metrics file and the progress line (with the method's key metrics)."""
    if record is not None and run.log is not None:
        run.log.write(record)
    step, total = run.state.step, run.total_steps
    postfix = {"loss": f"{record['loss']:.4f}" if record and "loss" in record else "",
               "lr": f"{run.scheduler.get_last_lr()[0]:.2e}"}
    if record and "tokens_per_s" in record:
        postfix["tok/s"] = fmt_tokens_per_s(record["tokens_per_s"])
    for name, label in run.method.progress:  # the method's key metrics (preference methods: margin, accuracy)
        if record and name in record:
            postfix[label] = f"{record[name]:.3g}"
    if record and "eval_loss" in record:
        postfix["eval"] = f"{record['eval_loss']:.4f}"
    if not run.progress.tty:  # tqdm shows its own ETA on a terminal
        postfix["eta"] = _fmt_seconds(run.state.elapsed / step * (total - step))
    run.progress.update(step, total, record, {k: v for k, v in postfix.items() if v})


def _checkpoint_if_due(run: _Run, signum: int) -> None:
    """Save every train.save_every steps, at the end, and when a signal asked to stop (then stop: Interrupted)."""
    stop = torch.tensor([signum], device=run.accelerator.device)
    if run.world > 1:
        stop = run.accelerator.reduce(stop, reduction="max")
    step, every = run.state.step, run.cfg.train.save_every
    if (every and step % every == 0) or step == run.total_steps or int(stop):
        path = save_checkpoint(run, step)
        if int(stop):
            _close(run)
            raise Interrupted(step, path, int(stop))


def save_checkpoint(run: _Run, step: int) -> Path:
    """An atomic checkpoint of everything resume needs (engine/checkpoint.py), written by the main process."""
    accelerator, is_main = run.accelerator, run.is_main
    root = run.out / "checkpoints"
    tmp = root / f".tmp-checkpoint-{step:06d}"
    if is_main:
        tmp = ckpt_io.begin_save(root, step)
    accelerator.wait_for_everyone()
    ckpt_io.write_rng(tmp, run.rank)
    sharded = run.engine.sharded
    if sharded:  # every rank writes its share of the trained tensors and their optimizer states
        save_shards(run.engine, tmp)
    if is_main:
        if not sharded:
            save_weights(run.raw_model, tmp / "weights")
            torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
            _save_trained(run, tmp / TRAINED_STATE)
        torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
        # a rolled-out batch the next steps still train on goes with the checkpoint (plain data: weights-only)
        cache = run.rollout_cache if step % run.shape.steps_per_rollout else None
        torch.save({"window": asdict(run.window), "adapter": run.runtime.state_dict(),
                    "rollout": None if cache is None else [_row_state(r) for r in cache],
                    "lrs": [float(g["lr"]) for g in run.optimizer.param_groups]}, tmp / "extra.pt")
        save_config(run.cfg, tmp / "config.yaml")
    accelerator.wait_for_everyone()
    if is_main:
        ckpt_io.finish_save(tmp, root, step, run.state, run.cfg.train.save_total_limit)
    accelerator.wait_for_everyone()
    return ckpt_io.checkpoint_dir(root, step)


TRAINED_STATE = "trained.safetensors"  # a checkpoint's modules that train beside the policy (a critic)


def _save_trained(run: _Run, path: Path) -> None:
    """The modules that train beside the policy, as one safetensors file of role-prefixed tensors."""
    from safetensors.torch import save_file

    trained = run.setup_ctx.trained
    if trained:
        save_file({f"{role}.{name}": t.detach().contiguous() for role, module in trained.items()
                   for name, t in module.state_dict().items()}, str(path))


def _load_trained(run: _Run, ckpt: Path) -> None:
    from safetensors.torch import load_file

    trained = run.setup_ctx.trained
    if not trained:
        return
    if not (ckpt / TRAINED_STATE).exists():
        raise UserError(f"{ckpt}: checkpoint lacks {TRAINED_STATE} (the {', '.join(trained)} this method trains)")
    state = load_file(str(ckpt / TRAINED_STATE))
    for role, module in trained.items():
        prefix = f"{role}."
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = module.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise UserError(f"{ckpt}: {TRAINED_STATE} does not match the {role} "
                            f"({(missing or unexpected)[0]} {'missing' if missing else 'unexpected'})")


def _row_state(row) -> dict:
    """A rolled-out token row as plain data for a checkpoint."""
    return {"input_ids": list(row.input_ids), "labels": list(row.labels), "truncated": bool(row.truncated),
            "source": row.source, "values": {k: list(v) for k, v in row.values.items()}}


def _row_from_state(state: dict):
    from tunelab.data.tokenize import Encoded

    return Encoded(state["input_ids"], state["labels"], state["truncated"], state["source"],
                   values={k: tuple(v) for k, v in state["values"].items()})


def _close(run: _Run) -> None:
    run.progress.close()
    if run.log is not None:
        run.log.close()


def _save_final(run: _Run) -> None:
    """RUN/final: what trained, with the tokenizer and chat template, written whole then renamed into place."""
    out, raw_model, engine = run.out, run.raw_model, run.engine
    # a sharded model is gathered whole for the save (collectives: every rank takes part, the main one writes)
    states = {role: engine.full_state_dict(module) for role, module in engine.modules.items()}
    with contextlib.ExitStack() as gathered:
        for module in engine.modules.values():
            gathered.enter_context(engine.gathered(module))
        _write_final(run, out, raw_model, states)
    run.accelerator.wait_for_everyone()


def _write_final(run: _Run, out: Path, raw_model, states: dict) -> None:
    from tunelab.models import quant
    from tunelab.models.adapters import is_peft

    if run.is_main:
        tmp = out / ".tmp-final"
        if tmp.exists():
            shutil.rmtree(tmp)
        if not is_peft(raw_model) and getattr(raw_model, "generation_config", None) is not None:
            raw_model.generation_config.eos_token_id = run.data.template.stop_token_ids(run.tokenizer)
        quantized = quant.describe(run.cfg.model)  # chat/export rebuild the same base from it
        if run.cfg.train.qat != "none":
            _write_final_qat(run, raw_model, tmp)
        else:
            save_weights(raw_model, tmp, run.tokenizer, run.data.template, final=True, output_dir=out,
                         base_info={"quantization": quantized} if quantized else None, state_dict=states["policy"])
        _save_final_trained(run, tmp, states)
        final_dir = out / "final"
        if final_dir.exists():
            shutil.rmtree(final_dir)
        tmp.rename(final_dir)
        if run.log is not None:
            run.log.close()
        if run.cfg.output.plot:
            plot_loss(out)


def _write_final_qat(run: _Run, model, dest: Path) -> None:
    """final/ of a QAT run (models/qat.py): the integers its fake-quantized layers computed with, as a
    compressed-tensors folder (the model is converted in place: the run has ended)."""
    from tunelab import __version__
    from tunelab.models.compressed import save_compressed
    from tunelab.models.qat import convert_qat, qat_spec
    from tunelab.models.record import RECORD, record_text
    from tunelab.utils.env import quiet_transformers

    tcfg = run.cfg.train
    spec = qat_spec(tcfg.qat, tcfg.qat_group_size)
    params = convert_qat(model, spec)
    with quiet_transformers():
        save_compressed(model, dest, spec, params, targets=["Linear"])
    run.tokenizer.chat_template = run.data.template.source
    run.tokenizer.save_pretrained(dest)
    info = {"method": "qat", "bits": spec.bits, "symmetric": True, "granularity": spec.granularity,
            "group_size": spec.group_size, "format": f"compressed-tensors {spec.storage}",
            "quantized_linears": len(params), "steps": run.state.step, "written_by": f"tunelab {__version__} train"}
    (dest / RECORD).write_text(record_text("quantize", info) + "\n")


def _save_final_trained(run: _Run, dest: Path, states: dict) -> None:
    """Each module that trained beside the policy: a model as a standard folder RUN/final/<role>/ (with the
    tokenizer: a critic loads like a reward model), a small module as RUN/final/<role>.safetensors."""
    from safetensors.torch import save_file

    from tunelab.utils.env import quiet_transformers

    for role, module in run.setup_ctx.trained.items():
        state = states.get(role)
        if hasattr(module, "save_pretrained"):
            with quiet_transformers():
                module.save_pretrained(dest / role, safe_serialization=True,
                                       **({} if state is None else {"state_dict": state}))
            run.tokenizer.save_pretrained(dest / role)
        else:
            state = module.state_dict() if state is None else state
            save_file({k: t.detach().contiguous() for k, t in state.items()}, str(dest / f"{role}.safetensors"))


def _summarise(run: _Run) -> TrainResult:
    from tunelab.engine.metrics import METRICS_FILE, read_metrics

    out, state = run.out, run.state
    final_dir = out / "final"
    records = read_metrics(out) if run.is_main else []
    peaks = _peak_memory(run)
    if run.is_main:
        what = "GPU memory allocated" if torch.cuda.is_available() else "resident memory"
        run.say(f"memory: peak {what} per process: " + ", ".join(f"{b / 2 ** 20:.0f} MiB" for b in peaks))
        for line in run_summary(records, steps=state.step, wall_seconds=time.perf_counter() - run.t_start,
                                train_seconds=state.elapsed, tokens=state.tokens, progress=run.method.progress,
                                outputs=[("model", final_dir), ("metrics", out / METRICS_FILE),
                                         ("loss curve", out / "loss.png"), ("checkpoints", out / "checkpoints")]):
            run.say(line)
    return TrainResult(out, final_dir, state.step, records, run.data.stats, run.packing, run.counts.trainable,
                       run.counts.total, peaks)


def _peak_memory(run: _Run) -> list[int]:
    """Every process's peak: torch's CUDA allocations on a GPU, the resident set (VmHWM) on a CPU (collective)."""
    from tunelab.utils.hardware import peak_rss_bytes

    own = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else peak_rss_bytes()
    mine = torch.tensor([float(own)], dtype=torch.float64, device=run.accelerator.device)
    return [int(v) for v in (run.accelerator.gather(mine) if run.world > 1 else mine).tolist()]
