"""The Python API: the same operations as the CLI, callable from code.

    import tunelab
    result = tunelab.train("examples/sft_lora.yaml", ["train.max_steps=20"])
    tunelab.export(run=result.output_dir, out="exported")
    print(tunelab.generate("exported", "What is 2 + 3?"))
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import load_config
from tunelab.config.schema import Config
from tunelab.errors import UserError

__all__ = ["train", "export", "chat", "generate", "generate_data", "evaluate_perplexity", "init_model",
           "data_check", "data_preview", "load_config"]


def train(config: str | os.PathLike | dict | Config, overrides: list[str] | dict | None = None, *, echo: bool = True):
    """Train from a YAML path, a dict or a Config; returns a TrainResult (output_dir, final_dir, metrics)."""
    from tunelab.engine.loop import run_training

    cfg = load_config(config, overrides)
    return run_training(cfg, echo=echo)


def export(*, out: str | os.PathLike, model: str | None = None, adapter: str | list[str] | None = None,
           run: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None, dtype: str = "auto",
           merge_base: str = "trained", allow_pickle: bool | None = None,
           trust_remote_code: bool | None = None, keep_sparsity: bool = False) -> Path:
    """Merge adapters into their base model (or copy a full model) and write a standard HF folder. Adapters that
    cannot merge (prompt learning, bottleneck, ReFT) are refused with a message; merge_base: see `tunelab export
    --help`. Only the files export writes are replaced in `out` (see infer/export.py). allow_pickle /
    trust_remote_code: load pickle weights / run code shipped with the model (default: what the run's config says
    with --run, else no). checkpoint: export that training checkpoint instead of RUN/final (a checkpoint folder,
    or with `run` the name of one in RUN/checkpoints), gathered first into the folder RUN/final would be
    (engine/consolidate.py: sharded checkpoints too). keep_sparsity: merging into a pruned base (tunelab prune)
    re-applies its zeros; without it such a merge is refused (infer/prune.py)."""
    from tunelab.infer.export import export_model

    if checkpoint is not None:
        return _export_checkpoint(out=out, model=model, adapter=adapter, run=run, checkpoint=checkpoint, dtype=dtype,
                                  merge_base=merge_base, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code, keep_sparsity=keep_sparsity)
    if run is not None:
        run = Path(run)
        cfg = load_config(run / "config.yaml") if (run / "config.yaml").exists() else None
        if cfg is None:
            raise UserError(f"--run: {run} has no config.yaml; is it a tunelab output folder?")
        final = run / "final"
        from tunelab.config.schema import BASE_TRAINING_ADAPTERS

        if cfg.adapter.type not in BASE_TRAINING_ADAPTERS:
            model = model or cfg.model.path
            adapter = adapter or str(final)
        else:
            model = model or str(final)
        # the run's own opt-ins carry over to its base model (a full run's final/ is safetensors either way)
        allow_pickle = cfg.model.allow_pickle if allow_pickle is None else allow_pickle
        trust_remote_code = cfg.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    if model is None:
        raise UserError("export: give --model (and --adapter), or --run with a training output folder")
    return export_model(model=model, adapter=adapter, out=Path(out), dtype=dtype, merge_base=merge_base, run=run,
                        allow_pickle=bool(allow_pickle), trust_remote_code=bool(trust_remote_code),
                        keep_sparsity=keep_sparsity)


def _export_checkpoint(*, out, model, adapter, run, checkpoint, dtype, merge_base, allow_pickle,
                       trust_remote_code, keep_sparsity: bool = False) -> Path:
    import shutil
    import tempfile

    from tunelab.config.schema import BASE_TRAINING_ADAPTERS
    from tunelab.engine.consolidate import write_checkpoint_folder
    from tunelab.infer.export import check_out, export_model

    ckpt = Path(checkpoint)
    if not ckpt.is_dir() and run is not None:
        ckpt = Path(run) / "checkpoints" / str(checkpoint)
    if not ckpt.is_dir():
        where = f" (nor {ckpt})" if ckpt != Path(checkpoint) else ""
        raise UserError(f"--checkpoint: {checkpoint}: no such checkpoint folder{where}")
    if not (ckpt / "config.yaml").is_file():
        raise UserError(f"--checkpoint: {ckpt} has no config.yaml; is it a tunelab checkpoint?")
    cfg = load_config(ckpt / "config.yaml")
    check_out(Path(out), {"--checkpoint": [str(ckpt)], "--run": [str(run)] if run is not None else []})
    tmp = Path(tempfile.mkdtemp(prefix="tunelab-checkpoint-"))
    try:
        folder = tmp / ckpt.name
        write_checkpoint_folder(ckpt, folder)
        if cfg.adapter.type in BASE_TRAINING_ADAPTERS:
            model = model or str(folder)
        else:
            model = model or cfg.model.path
            adapter = adapter or str(folder)
        allow_pickle = cfg.model.allow_pickle if allow_pickle is None else allow_pickle
        trust_remote_code = cfg.model.trust_remote_code if trust_remote_code is None else trust_remote_code
        return export_model(model=model, adapter=adapter, out=Path(out), dtype=dtype, merge_base=merge_base,
                            run=run, allow_pickle=bool(allow_pickle), trust_remote_code=bool(trust_remote_code),
                            keep_sparsity=keep_sparsity)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def generate(model: str, prompt: str | list[dict[str, Any]], *, adapter: str | list[str] | None = None,
             template: str = "auto",
             system: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False,
             **options: Any) -> str:
    """One answer to a prompt (or to a list of chat messages) with the chat template the model was trained with.
    `allow_pickle` / `trust_remote_code`: the opt-ins of `tunelab chat --allow-pickle / --trust-remote-code`."""
    from tunelab.infer.chat import ChatSession, GenerationOptions

    opts = GenerationOptions(**options)  # checked before the model loads
    session = ChatSession.load(model, adapter=adapter, template=template, system=system, allow_pickle=allow_pickle,
                               trust_remote_code=trust_remote_code)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return session.reply(messages, opts, stream=None)


def generate_data(*, model: str, data: str | os.PathLike, out: str | os.PathLike, adapter: str | list[str] | None = None,
                  format: str = "alpaca", data_format: str = "auto", template: str | None = None,
                  system: str | None = None, max_length: int | None = None, overrides: list[str] | None = None,
                  allow_pickle: bool = False, trust_remote_code: bool = False, echo: bool = True,
                  **sampling: Any):
    """Answer every prompt of `data` (a data file, or a training config whose data.train is read) with `model`
    (+ adapters) and append training rows in `format` (alpaca or sharegpt) to `out` (JSON lines); an interrupted
    run continues where it stopped (infer/generate.py). `sampling`: n, batch_size, max_new_tokens, temperature,
    top_p, top_k, repetition_penalty, seed. Returns a GenerateReport."""
    from tunelab.infer.generate import SamplingSettings, generate_rows

    settings = SamplingSettings(**sampling)
    settings.check()
    cfg = _data_source(data, format=data_format, model=model, template=template, max_length=max_length,
                       overrides=overrides)
    if system is not None:
        cfg.data.system = system
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    return generate_rows(model=model, adapter=adapters, cfg=cfg, out=out, fmt=format, settings=settings,
                         allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, echo=echo)


def evaluate_perplexity(*, model: str, data: str | os.PathLike, adapter: str | list[str] | None = None,
                        kind: str | None = None, data_format: str = "auto", template: str | None = None,
                        max_length: int | None = None, batch_size: int = 8, overrides: list[str] | None = None,
                        allow_pickle: bool = False, trust_remote_code: bool = False):
    """Perplexity of `model` (+ adapters) on the trained tokens of `data` (a data file, or a training config), with
    its parameters, size on disk and inference speed (infer/evaluate.py). `kind`: chat (assistant turns scored)
    or text (every token); default: text for a text-format file, the config method's kind, else chat."""
    from tunelab.data.kinds import get_kind
    from tunelab.infer.evaluate import evaluate_perplexity as run

    cfg = _data_source(data, format=data_format, model=model, template=template, max_length=max_length,
                       overrides=overrides)
    read = get_kind(kind) if kind is not None else _data_kind(cfg, data_format)
    if not read.scored_by_perplexity:
        raise UserError(f"eval ppl: scores conversations (chat) or text; the data is read as {read.name} rows; give "
                        "--kind chat or --kind text")
    kind = read.name
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    return run(model=model, adapter=adapters, cfg=cfg, kind=kind, batch_size=batch_size, allow_pickle=allow_pickle,
               trust_remote_code=trust_remote_code)


def _calibration(data, data_format: str, model: str, template, overrides):
    return None if data is None else _data_source(data, format=data_format, model=model, template=template,
                                                  overrides=overrides)


def prune(*, model: str, out: str | os.PathLike, method: str, adapter: str | list[str] | None = None,
          sparsity: float | None = None, pattern: str = "unstructured", drop: float | None = None, mlp: float = 0.0,
          heads: float = 0.0, calibration: str | os.PathLike | None = None, data_format: str = "auto",
          template: str | None = None, overrides: list[str] | None = None, samples: int = 64, length: int = 256,
          seed: int = 0, batch_size: int = 8, allow_pickle: bool = False, trust_remote_code: bool = False,
          echo: bool = True) -> dict:
    """Prune a model folder (+ merged adapters) into `out`: method magnitude or wanda (with `sparsity`, or
    `pattern` N:M), layers (`drop`: a share or a count of decoder layers) or width (`mlp` / `heads`: shares to
    remove), calibrated on `calibration` (a data file or a training config) where the method needs it
    (infer/prune.py). Returns what tunelab_compression.json records."""
    from tunelab.infer.prune import run_prune

    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    return run_prune(model=model, adapter=adapters, out=out, method=method, sparsity=sparsity, pattern=pattern,
                     drop=drop, mlp=mlp, heads=heads,
                     calibration=_calibration(calibration, data_format, model, template, overrides),
                     samples=samples, length=length, seed=seed, batch_size=batch_size, allow_pickle=allow_pickle,
                     trust_remote_code=trust_remote_code, echo=echo)


def quantize(*, model: str, out: str | os.PathLike, bits: int = 4, symmetric: bool = True,
             granularity: str = "group", group_size: int | None = None, method: str = "rtn",
             adapter: str | list[str] | None = None, calibration: str | os.PathLike | None = None,
             data_format: str = "auto", template: str | None = None, overrides: list[str] | None = None,
             samples: int = 64, length: int = 256, seed: int = 0, batch_size: int = 8, damp: float = 0.01,
             allow_pickle: bool = False, trust_remote_code: bool = False, echo: bool = True) -> dict:
    """Quantize the decoder's linear layers of a model folder (+ merged adapters) to `bits` integers by
    round-to-nearest (rtn) or GPTQ (gptq, calibrated on `calibration`) and write a compressed-tensors folder to
    `out` (infer/quantize.py). granularity: tensor, channel or group (group_size inputs per scale, 128 unless
    given). Returns the record."""
    from tunelab.infer.quantize import run_quantize
    from tunelab.models.compressed import QuantSpec

    if granularity != "group" and group_size is not None:
        raise UserError(f"--group-size: only with --granularity group (here {granularity})")
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity,
                     group_size=(128 if group_size is None else group_size) if granularity == "group" else 0)
    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    return run_quantize(model=model, adapter=adapters, out=out, spec=spec, method=method,
                        calibration=_calibration(calibration, data_format, model, template, overrides),
                        samples=samples, length=length, seed=seed, batch_size=batch_size, damp=damp,
                        allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, echo=echo)


def lowrank(*, model: str, out: str | os.PathLike, rank: int | None = None, energy: float | None = None,
            ratio: float | None = None, whiten: bool = False, adapter: str | list[str] | None = None,
            calibration: str | os.PathLike | None = None, data_format: str = "auto", template: str | None = None,
            overrides: list[str] | None = None, samples: int = 64, length: int = 256, seed: int = 0,
            batch_size: int = 8, damp: float = 0.01, allow_pickle: bool = False, trust_remote_code: bool = False,
            echo: bool = True) -> dict:
    """Replace the decoder's linear layers of a model folder (+ merged adapters) by truncated-SVD factor pairs at
    one `rank`, an `energy` share or a `ratio` of each layer's parameters, `whiten`ed by their inputs on
    `calibration` if asked, and write the low-rank folder to `out` (infer/lowrank.py, models/lowrank.py). Returns
    the record."""
    from tunelab.infer.lowrank import run_lowrank

    adapters = [adapter] if isinstance(adapter, str) else list(adapter or [])
    return run_lowrank(model=model, adapter=adapters, out=out, rank=rank, energy=energy, ratio=ratio, whiten=whiten,
                       calibration=_calibration(calibration, data_format, model, template, overrides),
                       samples=samples, length=length, seed=seed, batch_size=batch_size, damp=damp,
                       allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, echo=echo)


def average(*, out: str | os.PathLike, models: list[str] | None = None, run: str | os.PathLike | None = None,
            last: int | None = None, ema: float | None = None, echo: bool = True) -> dict:
    """The mean of model or adapter folders `models` (oldest first), or of the newest `last` checkpoints of `run`,
    written to `out`; `ema`: the decay of an exponential moving average instead (infer/average.py). Returns what
    tunelab_compression.json records."""
    from tunelab.infer.average import run_average

    if bool(models) == (run is not None):
        raise UserError("average: give the folders to average (--model, two or more), or --run with --last")
    if run is None:
        if last is not None:
            raise UserError("--last: only with --run")
        return run_average(inputs=[str(m) for m in models], ema=ema, out=out, echo=echo)
    if last is None:
        raise UserError("average --run: needs --last K (how many of its newest checkpoints)")
    from tunelab.engine.checkpoint import checkpoint_weights

    return run_average(inputs=[str(p) for p in checkpoint_weights(str(run), last)], run=str(run), ema=ema, out=out,
                       echo=echo)


def chat(model: str, *, adapter: str | list[str] | None = None, template: str = "auto", system: str | None = None,
         allow_pickle: bool = False, trust_remote_code: bool = False, **options: Any) -> int:
    """Interactive multi-turn chat on the terminal."""
    from tunelab.infer.chat import GenerationOptions, run_chat

    return run_chat(model=model, adapter=adapter, template=template, system=system, prompt=None,
                    options=GenerationOptions(**options), stream=True, allow_pickle=allow_pickle,
                    trust_remote_code=trust_remote_code)


def score(*, model: str, prompt: str, answers: list[str], adapter: str | None = None, template: str = "auto",
          system: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False) -> list[float]:
    """Rewards of a reward model (trained with method.type rm) for each answer to a prompt. `allow_pickle` /
    `trust_remote_code` opt in to pickle weights / model code shipped with the checkpoint."""
    from tunelab.infer.score import run_score

    return run_score(model=model, adapter=adapter, prompt=prompt, answers=answers, template=template, system=system,
                     allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def init_model(kind: str, out_dir: str | os.PathLike, **sizes: Any) -> Path:
    """Build a tiny model with its own tokenizer (kind: tiny-llama), offline, in seconds."""
    from tunelab.models.tiny import build_tiny_llama

    if kind != "tiny-llama":
        raise UserError(f"init-model: unknown kind {kind!r}; available: tiny-llama")
    sizes = {k: v for k, v in sizes.items() if v is not None}
    return build_tiny_llama(out_dir, **sizes)


# ------------------------------------------------------------------------------------------------------ data tools
_NO_MODEL = "\0no model"  # model.path is required by the schema; data tools without --model count no tokens


def _data_source(source: str | os.PathLike, *, format: str = "auto", model: str | None = None,
                 template: str | None = None, max_length: int | None = None,
                 overrides: list[str] | None = None, method: str | None = None) -> Config:
    """A Config for data tools: from a training config, or a bare data file plus options (and overrides)."""
    from tunelab.config.load import path_problem
    from tunelab.config.schema import METHOD_CONFIGS

    if method is not None and method not in METHOD_CONFIGS:
        import difflib

        close = difflib.get_close_matches(method, list(METHOD_CONFIGS), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"methods: {', '.join(METHOD_CONFIGS)}"
        raise UserError(f"--method: unknown method {method!r}; {hint}")
    p = Path(source)
    if p.suffix in (".yaml", ".yml"):
        cfg = load_config(p, overrides)
        if model:
            cfg.model.path = model
        if method and method != cfg.method.type:  # the data shape of another method; its options do not matter
            cfg.method = METHOD_CONFIGS[method]()
    else:
        problem = path_problem(p)
        if problem:
            raise UserError(f"{p}: data file is {problem}" if problem.startswith("a ") else f"{p}: data file {problem}")
        tree: dict[str, Any] = {"model": {"path": model or _NO_MODEL},
                                "data": {"train": [{"path": str(p), "format": format}]}}
        if method:
            tree["method"] = {"type": method}
        cfg = load_config(tree, overrides)
        if cfg.model.path == _NO_MODEL:
            cfg.model.path = ""
    if template:
        cfg.data.template = template
    if max_length:
        cfg.data.max_length = max_length
    return cfg


@dataclass
class DataReport:
    ok: bool
    lines: list[str] = field(default_factory=list)

    def text(self) -> str:
        return "\n".join(self.lines)


def _percentiles(values: list[int]) -> str:
    if not values:
        return "n/a"
    s = sorted(values)

    def q(f: float) -> int:
        return s[min(len(s) - 1, int(round(f * (len(s) - 1))))]

    return f"min {s[0]}, p50 {q(0.5)}, p90 {q(0.9)}, p99 {q(0.99)}, max {s[-1]}"


def _data_kind(cfg, format: str):
    """The data kind (data/kinds.py) the configured method reads; a text-format file is read as text."""
    from tunelab.data.kinds import kind_for_format
    from tunelab.methods import METHODS

    return kind_for_format(METHODS[cfg.method.type].kinds(cfg)[0], format)


def data_check(source: str | os.PathLike, *, format: str = "auto", model: str | None = None,
               max_length: int | None = None, template: str | None = None,
               overrides: list[str] | None = None, method: str | None = None) -> DataReport:
    """Validate every row (reporting FILE:LINE for bad ones) and print statistics; tokens when a model is known.
    `method` (sft, pt, dpo, kto, rm, ...) decides the data shape read: pairs, KTO rows, conversations or text."""
    from tunelab.data.load import load_conversations

    cfg = _data_source(source, format=format, model=model, template=template, max_length=max_length,
                       overrides=overrides, method=method)
    kind = _data_kind(cfg, format)
    rows, report = load_conversations(cfg.data.train, on_bad_row="skip", kind=kind, replace=cfg.data.replace)
    lines = [f"rows: {report.rows} valid, {len(report.bad)} invalid"]
    for name, n in report.per_dataset.items():
        lines.append(f"  {name}: {n} rows")
    lines += report.warnings
    if report.bad:
        lines.append("invalid rows:")
        lines += [f"  {b}" for b in report.bad[:20]]
        if len(report.bad) > 20:
            lines.append(f"  ... and {len(report.bad) - 20} more")
    if rows and kind.summary is not None:
        lines += kind.summary(rows)
    elif rows:
        turns = [sum(1 for m in r.messages if m["role"] == "assistant") for r in rows if not r.is_text]
        if turns:
            lines.append(f"assistant turns per row: {_percentiles(turns)}")
    if cfg.model.path and rows:
        from tunelab.data.prepare import encode_rows
        from tunelab.data.templates import resolve_template
        from tunelab.models.load import load_tokenizer

        tok = load_tokenizer(cfg.model)
        tmpl = resolve_template(cfg.data.template, tok)
        # Encode without truncation to see the true lengths, then count what max_length would cut.
        full = cfg.data.max_length
        cfg.data.max_length = 10**9
        enc, _ = encode_rows(rows, tok, tmpl, cfg.data, kind)
        cfg.data.max_length = full
        from tunelab.data.preview import token_counts

        counts = [token_counts(e) for e in enc]  # a preference pair: its longer sequence, both answers' tokens
        lengths = [n for n, _ in counts]
        trained = [t for _, t in counts]
        # A pair's length is its longer sequence (what max_length and batch padding apply to) while its trained
        # tokens are both answers': trained can exceed the tokens count, so the lines say which is which.
        pairs = kind.sequences_per_row == 2
        row = kind.row_name
        tokens = " (longer sequence: prompt + longer answer)" if pairs else ""
        both = " (chosen + rejected answers)" if pairs else ""
        lines.append(f"template: {tmpl.name}")
        lines.append(f"tokens per {row}{tokens}: {_percentiles(lengths)}")
        if sum(trained):  # prompts have none: a rollout writes their answers
            lines.append(f"trained tokens per {row}{both}: {_percentiles(trained)}")
        over = sum(1 for n in lengths if n > full)
        lines.append(f"{row}s longer than max_length {full}: {over} ({100.0 * over / max(len(lengths), 1):.1f}%)")
        lines.append(f"total tokens{tokens}: {sum(lengths):,}" + (f", trained{both}: {sum(trained):,}"
                                                                   if sum(trained) else ""))
    else:
        lines.append("token statistics: pass --model (or a config) to count tokens")
    return DataReport(ok=not report.bad, lines=lines)


def data_preview(source: str | os.PathLike, *, model: str | None = None, n: int = 3, color: bool = False,
                 format: str = "auto", template: str | None = None, overrides: list[str] | None = None,
                 method: str | None = None) -> str:
    """Rendered samples with the trained tokens highlighted: what the loss will see."""
    from tunelab.data.load import load_conversations
    from tunelab.data.prepare import encode_rows
    from tunelab.data.preview import render_preview
    from tunelab.data.templates import resolve_template
    from tunelab.models.load import load_tokenizer

    cfg = _data_source(source, format=format, model=model, template=template, overrides=overrides, method=method)
    if not cfg.model.path:
        raise UserError("data preview: pass --model (a model or tokenizer folder) or a training config")
    kind = _data_kind(cfg, format)
    rows, _ = load_conversations(cfg.data.train, on_bad_row="skip", kind=kind, replace=cfg.data.replace)
    tok = load_tokenizer(cfg.model)
    tmpl = resolve_template(cfg.data.template, tok)
    enc, stats = encode_rows(rows[: max(n, 0)], tok, tmpl, cfg.data, kind)
    parts = [f"template: {tmpl.name}; trained tokens are " + ("highlighted" if color else "inside [[ ]]")]
    for e in enc:
        parts.append(f"--- {e.source}")
        parts.append(render_preview(e, tok, color=color, header=False))  # the source is in the --- line
    if stats["dropped_no_labels"]:  # training drops them too: say so rather than show fewer rows unexplained
        parts.append(f"--- {stats['dropped_no_labels']} of the first {min(len(rows), max(n, 0))} rows not shown: no "
                     f"trained token left after truncation to data.max_length {cfg.data.max_length}")
    return "\n".join(parts)
