"""The one training loop. Every method (sft, pt, and later rm/dpo/kto/...) runs through `run_training`.

What lives here and nowhere else: device placement and data parallelism (through accelerate), gradient accumulation
with global normalisation, mixed precision, clipping, the schedule, evaluation, logging, checkpoints and exact resume.

Data order is a pure function of (seed, epoch, step): step s of epoch e trains rows perm_e[s*G:(s+1)*G] where
G = batch_size x grad_accum x world_size and perm_e is a seeded permutation. So the data position of a checkpoint is just
its step, and a 2-process run sees the same global batches as a 1-process run with twice the accumulation. The last
incomplete global batch of an epoch is dropped (the next epoch reshuffles, so no row is lost for good).
"""

from __future__ import annotations

import contextlib
import json
import math
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
from tunelab.data.collate import collate, collate_kto, collate_pairs, collate_pairs_packed
from tunelab.engine import checkpoint as ckpt_io
from tunelab.engine import rundir
from tunelab.engine.metrics import MetricsLog, Progress, fmt_tokens_per_s, plot_loss
from tunelab.engine.optim import build_optimizer, build_scheduler
from tunelab.errors import ConfigError, Interrupted, UserError
from tunelab.utils.hardware import cpu_has_native_bf16


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


def resolve_precision(requested: str) -> str:
    """Map train.precision to accelerate's mixed_precision, refusing what this hardware can't do well."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if requested == "fp32":
        return "no"
    if requested == "bf16" and not cuda and not cpu_has_native_bf16():
        raise UserError(
            "train.precision: bf16 on this CPU has no native support and runs ~26x slower than fp32; "
            "use train.precision=fp32 (or auto)"
        )
    if requested == "fp16" and not cuda:
        raise UserError("train.precision: fp16 mixed precision needs a CUDA GPU; use fp32 (or auto) on CPU")
    return requested


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


def packing_works(model, vocab_size: int) -> bool:
    """One-off check that this model isolates packed sequences: logits of two sequences packed into one row (position
    ids restarting, no attention mask) must equal their logits computed separately."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab_size, (1, 5), generator=g)
    b = torch.randint(0, vocab_size, (1, 7), generator=g)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sep = [model(input_ids=x.to(device), use_cache=False).logits.double() for x in (a, b)]
            packed = model(input_ids=torch.cat([a, b], 1).to(device),
                           position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None].to(device),
                           use_cache=False).logits.double()
        # Packed and separate rows differ only in summation order: each logit is within a few hundred roundings of
        # the compute dtype, relative to the logits' scale (2^-24 * 1700 ~ 1e-4 for float32, 2^-8 * 5 ~ 2e-2 for
        # bfloat16). A sequence that sees its neighbour moves its logits by a sizeable share of that scale.
        weight_dtype = next(model.parameters()).dtype
        rel = 1e-4 if weight_dtype in (torch.float32, torch.float64) else 2e-2
        expected = torch.cat(sep, 1)
        tol = rel * max(1.0, float(expected.abs().max()))
        return bool(torch.allclose(expected, packed, atol=tol, rtol=0))
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)


def choose_packing(model, cfg: Config, vocab_size: int) -> tuple[str, bool]:
    """The batching mode (data.packing with auto resolved) and whether packed rows attend per sequence.

    For padding_free / auto the model is switched to per-sequence SDPA (models/varlen.py) unless it is compiled,
    then checked once to isolate packed sequences; a model whose attention layout the varlen path does not fit goes
    back to its masked path and is checked again."""
    from tunelab.methods import METHODS
    from tunelab.models.adapters import ADAPTERS
    from tunelab.models.varlen import use_varlen
    from tunelab.models.wrappers import core_model

    packing = cfg.data.packing
    if packing not in ("auto", "padding_free"):
        return packing, False
    method = METHODS[cfg.method.type]
    # pairs scored by log-probabilities pack like sft rows (sequence_ids keep the answers apart); a score head
    # (rm) reads one position per row, and KTO's mismatched batch is built per row: those stay unpacked
    if method.data_kind not in ("chat", "text") and not (method.data_kind == "pairs" and method.head == "lm"):
        if packing == "padding_free":
            raise UserError(f"data.packing: padding_free cannot be used with method {cfg.method.type}, which "
                            "scores each row as one sequence: use data.packing=group_by_length or none")
        return "none", False
    if not ADAPTERS[cfg.adapter.type].packs:
        if packing == "padding_free":
            raise UserError(f"data.packing: padding_free cannot be used with adapter {cfg.adapter.type}, which "
                            "needs each row's own positions; use data.packing=group_by_length or none")
        return "none", False
    varlen = not cfg.model.compile and use_varlen(core_model(model))
    works = packing_works(model, vocab_size)
    if varlen and not works:
        core_model(model).set_attn_implementation(cfg.model.attn_implementation)
        varlen, works = False, packing_works(model, vocab_size)
    if works:
        return "padding_free", varlen
    if packing == "padding_free":
        raise UserError(
            f"data.packing: padding_free gives different outputs than unpacked rows on this model "
            f"(attention {cfg.model.attn_implementation}); use data.packing=none or group_by_length"
        )
    return "none", False


def row_length(row) -> int:
    """Tokens of a prepared row; a preference pair counts its longer sequence (what its batch rows are padded to)."""
    length = getattr(row, "length", None)
    return int(length) if isinstance(length, int) else len(row.input_ids)


def make_batch(kind: str, rows, packing: str, pad_id: int, row_capacity: int, min_rows: int = 1):
    """Tensors for one micro-batch of a method's data kind: preference pairs become one concatenated batch (chosen
    rows, then rejected rows) so both answers are scored in one forward pass; other rows follow data.packing."""
    if kind == "pairs":
        if packing == "padding_free":
            return collate_pairs_packed(rows, pad_id, row_capacity, min_rows)
        return collate_pairs(rows, pad_id)
    if kind == "kto":
        return collate_kto(rows, pad_id, row_capacity)
    return collate(rows, packing, pad_id, row_capacity, min_rows)


def reference_scorer(cfg: Config, raw_model, accelerator, dtype, ctx, varlen: bool = False) -> Callable:
    """The reference policy of methods that need one (dpo): batch -> per-row summed log-probabilities of the trained
    tokens, without gradients and in eval mode (no dropout), so it is a fixed function of the batch.

    adapter_off runs the policy model itself with its peft adapter disabled: the frozen base is the reference and
    no second copy is held in memory. copy loads the base model a second time, frozen."""
    from tunelab.methods.lm import sequence_logprobs
    from tunelab.models.adapters import is_peft
    from tunelab.models.load import load_model

    mode = cfg.method.reference
    if mode == "auto":
        mode = "adapter_off" if is_peft(raw_model) else "copy"
    if mode == "adapter_off":
        if not is_peft(raw_model):
            raise UserError(f"method.reference: adapter_off needs a peft adapter, and adapter.type "
                            f"{cfg.adapter.type} is not one; use method.reference=copy")

        def score_without_adapter(batch):
            was_training = raw_model.training
            raw_model.eval()
            try:
                with torch.no_grad(), raw_model.disable_adapter(), accelerator.autocast():
                    return sequence_logprobs(raw_model, batch, ctx)[0]
            finally:
                raw_model.train(was_training)

        return score_without_adapter
    ref = load_model(cfg.model, dtype=dtype).to(accelerator.device).eval()
    ref.requires_grad_(False)
    if varlen:  # packed rows: the copy must attend per sequence like the policy (models/varlen.py)
        from tunelab.models.varlen import use_varlen
        from tunelab.models.wrappers import core_model

        use_varlen(core_model(ref))

    def score_with_copy(batch):
        with torch.no_grad(), accelerator.autocast():
            return sequence_logprobs(ref, batch, ctx)[0]

    return score_with_copy


def length_grouped(perm: torch.Tensor, lengths: list[int], group: int) -> torch.Tensor:
    """Reorder a permutation so that consecutive rows have similar lengths: sort within chunks of `group` rows
    (longest first). The chunks keep their random order, so epochs still differ."""
    out = []
    for start in range(0, len(perm), group):
        chunk = perm[start:start + group].tolist()
        chunk.sort(key=lambda i: -lengths[i])
        out.extend(chunk)
    return torch.tensor(out, dtype=torch.long)


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

    mixed = resolve_precision(cfg.train.precision)
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    lock = None
    if accelerator.is_main_process:
        lock = rundir.RunLock(_prepare_output(cfg))
        lock.acquire()
    try:
        return _train(cfg, accelerator, mixed, echo)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, accelerator, mixed: str, echo: bool) -> TrainResult:
    from accelerate.utils import set_seed

    from tunelab import __version__
    from tunelab.data.prepare import prepare_data, prepare_stream
    from tunelab.methods import METHODS
    from tunelab.methods.base import StepContext
    from tunelab.models import quant
    from tunelab.models.adapters import (
        ADAPTERS,
        AdapterRuntime,
        AdapterSetup,
        apply_adapter,
        count_parameters,
        is_peft,
        lr_scale,
    )
    from tunelab.models.kernels import activation_offload, apply_model_switches, check_model_switches
    from tunelab.models.load import check_weights_format, load_model, load_tokenizer, resolve_dtype

    tcfg = cfg.train
    cuda = torch.cuda.is_available()
    is_main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index
    say = print if (echo and is_main) else (lambda *a, **k: None)
    t_start = time.perf_counter()

    out = Path(cfg.output.dir)
    accelerator.wait_for_everyone()
    resumed = _find_resume(cfg, rank, say)
    resume_from = resumed.path if resumed is not None else None
    changes = _check_resume_config(cfg, resumed, world) if resumed is not None else {}

    set_seed(tcfg.seed)
    method = METHODS[cfg.method.type]
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
        data, stream = prepare_stream(cfg.data, tokenizer, kind=method.data_kind, seed=tcfg.seed)
        n_train, steps_per_epoch, total_steps = 0, 0, tcfg.max_steps
    else:
        data = prepare_data(cfg.data, tokenizer, kind=method.data_kind, seed=tcfg.seed)
        n_train = len(data.train)
        steps_per_epoch = n_train // global_batch
        if steps_per_epoch == 0:
            raise UserError(
                f"data: {n_train} training rows are fewer than one global batch "
                f"(batch_size {tcfg.batch_size} x grad_accum {tcfg.grad_accum} x {world} processes = "
                f"{global_batch}); lower train.batch_size or add data"
            )
        total_steps = tcfg.max_steps if tcfg.max_steps > 0 else max(1, math.ceil(tcfg.epochs * steps_per_epoch))
    for line in data.lines:
        say(line)
    if resumed is not None and resumed.state.step >= total_steps and (out / "final").exists():
        say(f"train: {out} is already complete ({resumed.state.step} steps); raise train.max_steps to train on, "
            "or set output.overwrite=true to start over")
        return TrainResult(out, out / "final", resumed.state.step, [], data.stats, cfg.data.packing)

    dtype = resolve_dtype(cfg.model.dtype, trains_base=ADAPTERS[cfg.adapter.type].trains_base,
                          device_type="cuda" if cuda else "cpu")
    check_model_switches(cfg.model)
    model = load_model(cfg.model, dtype=dtype, head=method.head, pad_token_id=tokenizer.pad_token_id)
    model = quant.prepare_for_training(model, cfg.model, cfg.model.gradient_checkpointing)
    if is_main:
        # data and model are loaded: only now may output.overwrite delete the earlier run's files
        if cfg.output.overwrite:
            removed = rundir.clear_run(out)
            if removed:
                say(f"output: cleared the earlier run in {out} ({', '.join(removed)})")
        ckpt_io.clean_partial(out / "checkpoints")
        save_config(cfg, out / "config.yaml")
        rundir.record_start(out, version=__version__, resumed_from=resume_from,
                            step=resumed.state.step if resumed is not None else 0, changes=changes)
    accelerator.wait_for_everyone()

    def calibration(n: int) -> list[dict]:
        """The first n micro-batches of training rows, unpacked (EVA initialises LoRA from their activations)."""
        rows = data.train if stream is None else []
        return [make_batch(method.data_kind, rows[i * tcfg.batch_size:(i + 1) * tcfg.batch_size], "none",
                           tokenizer.pad_token_id, cfg.data.max_length)
                for i in range(min(n, -(-len(rows) // tcfg.batch_size)))]  # none from a stream

    setup = AdapterSetup(total_steps=total_steps, model_path=cfg.model.path,
                         tokenizer_path=cfg.model.tokenizer or cfg.model.path, calibration=calibration,
                         resuming=resume_from is not None, output_dir=out if is_main else None)
    model = apply_adapter(model, cfg.adapter, setup)
    if method.head == "score" and not is_peft(model):  # a new head always trains (peft's SEQ_CLS task does this)
        for p in model.score.parameters():
            p.requires_grad_(True)
    counts = count_parameters(model)
    say(f"model: {cfg.model.path} ({cfg.adapter.type}), {counts}")

    packing, varlen = choose_packing(model, cfg, len(tokenizer))
    # torch.compile specialises a batch dimension of 1: packed micro-batches keep at least 2 rows when compiled
    min_rows = 2 if cfg.model.compile else 1
    # with per-sequence attention (tunelab's varlen SDPA, flash attention) a row's length costs nothing quadratic, so
    # a micro-batch packs into one row with no padding at all; with a mask, rows of at most max_length
    per_sequence = varlen or cfg.model.attn_implementation.startswith("flash")
    sequences = tcfg.batch_size * (2 if method.data_kind == "pairs" else 1)  # a pair is two sequences
    row_capacity = sequences * cfg.data.max_length if per_sequence and not cfg.model.compile \
        else cfg.data.max_length
    say(f"data: batching mode {packing}" + (" (auto)" if cfg.data.packing == "auto" else "")
        + (", attention per packed sequence (varlen SDPA)" if varlen else ""))
    if packing == "padding_free":
        say("data: packed micro-batches are " + ("one row each (per-sequence attention: no padding)"
                                                 if row_capacity > cfg.data.max_length
                                                 else f"rows of at most {cfg.data.max_length} tokens"))
    ctx = StepContext(loss_chunk=tcfg.loss_chunk, config=cfg.method)
    model = apply_model_switches(model, cfg.model)

    optimizer = build_optimizer(model, tcfg, lr_scale(cfg.adapter))
    scheduler = build_scheduler(optimizer, tcfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    runtime = AdapterRuntime.for_model(raw_model, cfg.adapter)
    ref_table: dict[int, tuple[float, float]] = {}  # precomputed reference: id(pair) -> (chosen, rejected)
    if method.needs_reference:
        ctx.reference = reference_scorer(cfg, raw_model, accelerator, dtype, ctx, varlen)
        if getattr(cfg.method, "precompute_reference", False):
            if stream is not None:
                raise UserError("method.precompute_reference: needs the whole dataset; not available with "
                                "data.streaming")
            t_ref = time.perf_counter()
            for rows in (data.train, data.val):
                for start in range(0, len(rows), tcfg.batch_size):
                    chunk = rows[start:start + tcfg.batch_size]
                    batch = make_batch(method.data_kind, chunk, "none", tokenizer.pad_token_id, cfg.data.max_length)
                    values = ctx.reference({k: v.to(accelerator.device) for k, v in batch.items()}).tolist()
                    for i, row in enumerate(chunk):
                        ref_table[id(row)] = (values[i], values[len(chunk) + i])
            # the reference model (a copy, if one was loaded) is not needed any more: free it
            ctx.reference = lambda batch: batch["ref_logps"]
            say(f"reference: log-probabilities of {len(ref_table)} pairs precomputed in "
                f"{time.perf_counter() - t_ref:.1f} s")

    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # what live scoring returns

    def batch_of(rows):
        batch = make_batch(method.data_kind, rows, packing, pad_id, row_capacity, min_rows)
        if ref_table:  # the pairs' precomputed reference log-probabilities, in the batch's row order
            batch["ref_logps"] = torch.tensor([ref_table[id(r)][0] for r in rows]
                                              + [ref_table[id(r)][1] for r in rows], dtype=ref_dtype)
        return batch

    state = ckpt_io.TrainState(world_size=world, total_steps=total_steps)
    window = _Window()
    if resumed is not None:
        state = resumed.state
        load_weights(raw_model, resume_from)
        # states are read onto the CPU; the optimizer moves its own onto each parameter's device
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        window = _Window(**resumed.extra["window"])
        runtime.load_state_dict(resumed.extra.get("adapter", {}))
        if resumed.rng is not None:
            ckpt_io.set_rng_state(resumed.rng)
        state.total_steps = total_steps
        state.world_size = world
        say(f"resume: continuing from {resume_from} at step {state.step}/{total_steps}"
            + (f" (changed: {rundir.describe_changes(changes)})" if changes else ""))

    log = MetricsLog(out, state.step if resume_from is not None else None, tensorboard="tensorboard" in cfg.output.report_to) \
        if is_main else None
    pad_id = tokenizer.pad_token_id
    device = accelerator.device
    perm_cache: dict[int, torch.Tensor] = {}
    train_lengths = [row_length(r) for r in data.train]

    stream_iter = iter(stream) if stream is not None else None
    stream_pos = {"consumed": 0, "epoch": 0}

    def global_rows(step: int) -> list:
        """The rows of global batch `step`: a slice of a seeded permutation, or the next rows of the stream."""
        if stream_iter is not None:
            # Steps are taken in order; on resume, replay (and drop) what earlier steps consumed.
            target = step * global_batch
            while stream_pos["consumed"] < target:
                next(stream_iter)
                stream_pos["consumed"] += 1
            taken = [next(stream_iter) for _ in range(global_batch)]
            stream_pos["consumed"] += global_batch
            stream_pos["epoch"] = taken[-1][0]
            return [enc for _, enc in taken]
        epoch, k = divmod(step, steps_per_epoch)
        if epoch not in perm_cache:
            perm_cache.clear()
            if cfg.data.shuffle:
                g = torch.Generator().manual_seed(tcfg.seed + epoch)
                perm_cache[epoch] = torch.randperm(n_train, generator=g)
            else:
                perm_cache[epoch] = torch.arange(n_train)
            if packing == "group_by_length":
                perm_cache[epoch] = length_grouped(perm_cache[epoch], train_lengths, global_batch * 32)
        idx = perm_cache[epoch][k * global_batch:(k + 1) * global_batch].tolist()
        return [data.train[i] for i in idx]

    step_rows: list = []  # the global batch of the step in progress (named when its loss is not finite)

    def rows_for(step: int) -> list[list]:
        rows = global_rows(step)
        step_rows[:] = rows
        micro = []
        for m in range(tcfg.grad_accum):
            start = (m * world + rank) * tcfg.batch_size
            micro.append(rows[start:start + tcfg.batch_size])
        return micro

    def epoch_at(step: int) -> float:
        if stream is not None:
            return stream_pos["epoch"]
        return round(step / steps_per_epoch, 4)

    def add_metrics(sums: dict[str, float], metrics: dict) -> None:
        """Accumulate a method's metrics (each summed over the micro-batch's units, like its loss)."""
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach() if hasattr(v, "detach") else v)

    def reduce_sum(values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if world > 1:
            t = accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def evaluate() -> dict[str, float]:
        if not data.val:
            return {}
        raw_model.eval()
        loss_sum = weight = 0.0
        sums: dict[str, float] = {}
        with torch.no_grad(), accelerator.autocast():
            for start in range(rank * tcfg.batch_size, len(data.val), world * tcfg.batch_size):
                batch = batch_of(data.val[start:start + tcfg.batch_size])
                batch = {k: v.to(device) for k, v in batch.items()}
                runtime.before_forward(raw_model, batch)
                out_ = method.loss(raw_model, batch, ctx)
                loss_sum += float(out_.loss_sum)
                weight += method.weight(batch)
                add_metrics(sums, out_.metrics)
        raw_model.train()
        names = sorted(sums)
        loss_sum, weight, *values = reduce_sum([loss_sum, weight, *(sums[k] for k in names)])
        loss = loss_sum / max(weight, 1.0)
        result = {"eval_loss": loss}
        if method.data_kind in ("chat", "text"):  # perplexity is a language-model quantity
            result["eval_ppl"] = math.exp(min(loss, 50.0))
        result.update({f"eval_{k}": v / max(weight, 1.0) for k, v in zip(names, values)})
        return result

    def save_checkpoint(step: int) -> Path:
        root = out / "checkpoints"
        tmp = root / f".tmp-checkpoint-{step:06d}"
        if is_main:
            tmp = ckpt_io.begin_save(root, step)
        accelerator.wait_for_everyone()
        ckpt_io.write_rng(tmp, rank)
        final = ckpt_io.checkpoint_dir(root, step)
        if is_main:
            save_weights(raw_model, tmp / "weights")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({"window": asdict(window), "adapter": runtime.state_dict()}, tmp / "extra.pt")
            save_config(cfg, tmp / "config.yaml")
        accelerator.wait_for_everyone()
        if is_main:
            ckpt_io.finish_save(tmp, root, step, state, tcfg.save_total_limit)
        accelerator.wait_for_everyone()
        return final

    progress = Progress(total_steps, state.step, enabled=echo and is_main)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    say(f"train: {total_steps} steps, global batch {global_batch} rows "
        f"({tcfg.batch_size} x {tcfg.grad_accum} accumulation x {world} process{'es' if world > 1 else ''}), "
        f"precision {'fp32' if mixed == 'no' else mixed}")

    with _SignalFlag() as sig:
        while state.step < total_steps:
            t0 = time.perf_counter()
            micro = [batch_of(rows) for rows in rows_for(state.step)]
            local_weight = sum(method.weight(b) for b in micro)
            local_tokens = sum(int(b["token_mask"].sum()) for b in micro)
            local_positions = sum(b["input_ids"].numel() for b in micro)
            global_weight, global_tokens, global_positions = reduce_sum([local_weight, local_tokens, local_positions])
            # Every micro-batch's summed loss is divided by the weight of the whole global batch. DDP averages
            # gradients over processes, so multiply by the world size to get a plain sum over all units.
            scale = world / max(global_weight, 1.0)
            loss_sum = 0.0
            step_metrics: dict[str, float] = {}
            for m, batch in enumerate(micro):
                batch = {k: v.to(device) for k, v in batch.items()}
                sync = m == len(micro) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                    runtime.before_forward(raw_model, batch)
                    with activation_offload(cfg.model):
                        out_ = method.loss(model, batch, ctx)
                    total = out_.loss_sum * scale
                    extra_loss = runtime.extra_loss(raw_model) if sync else None
                    if extra_loss is not None:  # once per step (DDP averages identical copies across ranks)
                        total = total + extra_loss
                    accelerator.backward(total)
                loss_sum += float(out_.loss_sum.detach())
                add_metrics(step_metrics, out_.metrics)
            max_norm = tcfg.max_grad_norm if tcfg.max_grad_norm > 0 else float("inf")
            grad_norm = float(accelerator.clip_grad_norm_(params, max_norm))
            metric_names = sorted(step_metrics)  # the same names on every rank: the same method and batch layout
            loss_sum, *metric_values = reduce_sum([loss_sum, *(step_metrics[k] for k in metric_names)])
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                # every rank sees the same summed loss and global norm, so all stop here, before the update
                progress.close()
                if log is not None:
                    log.close()
                raise NonFiniteLoss(_non_finite_message(state.step + 1, loss_sum, grad_norm, step_rows, out,
                                                        tcfg))
            optimizer.step()
            runtime.after_optimizer_step(raw_model, state.step)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            dt = time.perf_counter() - t0
            state.elapsed += dt
            state.tokens += int(global_tokens)
            state.positions += int(global_positions)
            window.loss += loss_sum
            for k, v in zip(metric_names, metric_values):
                window.metrics[k] = window.metrics.get(k, 0.0) + v
            window.weight += global_weight
            window.tokens += int(global_tokens)
            window.seconds += dt
            window.steps += 1
            window.grad_norm += grad_norm

            record = None
            step = state.step
            is_last = step == total_steps
            if step % tcfg.log_every == 0 or is_last:
                record = {
                    "step": step,
                    "epoch": epoch_at(step),
                    "loss": window.loss / max(window.weight, 1.0),
                    **{k: v / max(window.weight, 1.0) for k, v in sorted(window.metrics.items())},
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": window.grad_norm / window.steps,
                    "tokens": state.tokens,
                    "positions": state.positions,
                    "tokens_per_s": window.tokens / max(window.seconds, 1e-9),
                    "elapsed": round(state.elapsed, 3),
                }
                window = _Window()
            do_eval = bool(data.val) and ((tcfg.eval_every and step % tcfg.eval_every == 0) or is_last)
            if do_eval:
                metrics = evaluate()
                record = {**(record or {"step": step, "epoch": epoch_at(step)}), **metrics}
            if record is not None and log is not None:
                log.write(record)
            postfix = {"loss": f"{record['loss']:.4f}" if record and "loss" in record else "",
                       "lr": f"{scheduler.get_last_lr()[0]:.2e}"}
            if record and "tokens_per_s" in record:
                postfix["tok/s"] = fmt_tokens_per_s(record["tokens_per_s"])
            for name, label in method.progress:  # the method's key metrics (preference methods: margin, accuracy)
                if record and name in record:
                    postfix[label] = f"{record[name]:.3g}"
            if record and "eval_loss" in record:
                postfix["eval"] = f"{record['eval_loss']:.4f}"
            if not progress.tty:  # tqdm shows its own ETA on a terminal
                postfix["eta"] = _fmt_seconds(state.elapsed / step * (total_steps - step))
            progress.update(step, total_steps, record, {k: v for k, v in postfix.items() if v})

            stop = torch.tensor([sig.signum], device=device)
            if world > 1:
                stop = accelerator.reduce(stop, reduction="max")
            if (tcfg.save_every and step % tcfg.save_every == 0) or is_last or int(stop):
                path = save_checkpoint(step)
                if int(stop):
                    progress.close()
                    if log is not None:
                        log.close()
                    raise Interrupted(step, path, int(stop))
    progress.close()

    final_dir = out / "final"
    if is_main:
        tmp = out / ".tmp-final"
        if tmp.exists():
            shutil.rmtree(tmp)
        if not is_peft(raw_model) and getattr(raw_model, "generation_config", None) is not None:
            raw_model.generation_config.eos_token_id = data.template.stop_token_ids(tokenizer)
        quantized = quant.describe(cfg.model)  # chat/export rebuild the same base from it
        save_weights(raw_model, tmp, tokenizer, data.template, final=True, output_dir=out,
                     base_info={"quantization": quantized} if quantized else None)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        tmp.rename(final_dir)
        if log is not None:
            log.close()
        if cfg.output.plot:
            plot_loss(out)
    accelerator.wait_for_everyone()
    from tunelab.engine.metrics import METRICS_FILE, read_metrics

    records = read_metrics(out) if is_main else []
    if is_main:
        for line in run_summary(records, steps=state.step, wall_seconds=time.perf_counter() - t_start,
                                train_seconds=state.elapsed, tokens=state.tokens, progress=method.progress,
                                outputs=[("model", final_dir), ("metrics", out / METRICS_FILE),
                                         ("loss curve", out / "loss.png"), ("checkpoints", out / "checkpoints")]):
            say(line)
    return TrainResult(out, final_dir, state.step, records, data.stats, packing, counts.trainable, counts.total)
