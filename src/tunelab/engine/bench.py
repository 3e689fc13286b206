"""Throughput benchmark of tunelab's real training path: tokens/s, step time, padding, peak memory and MFU.

`run_bench` trains a config for warm-up + measured steps through `run_training` (the same loop as `tunelab train`)
with benchmark overrides (log every step, no checkpoints or evaluation, a temporary output folder) and derives every
number from `metrics.jsonl`, whose per-step records carry cumulative real tokens, token positions (padding included)
and training seconds. Only the steps after warm-up count: the difference between the record at step `warmup` and the
last one. Model loading, tokenization and the final save are outside the measurement.

MFU (model FLOPs utilisation) = real tokens/s x model FLOPs per real token / peak FLOP/s, where the peak is measured
here (`measure_peak`: a large matmul in the training dtype) and cached per device and dtype. Model FLOPs count the
useful work of the training (see `estimate_flops`), the same for every implementation: padding, recomputation and
logits nobody trains on are not counted, so MFU compares with the hardware and, across systems on the same workload,
in the same ratio as tokens/s.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunelab.config import load_config
from tunelab.config.schema import Config
from tunelab.utils.hardware import peak_rss_bytes

# Training options the benchmark sets, after the user's overrides so that they win.
_BENCH_OVERRIDES = [
    "train.log_every=1",
    "train.save_every=0",
    "train.eval_every=0",
    "train.resume=never",
    "data.val=[]",
    "data.val_size=0",
    "output.plot=false",
    "output.overwrite=true",
    "output.report_to=[]",
]


# --------------------------------------------------------------------------------------------------- peak FLOP/s
def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name() -> str:
    """What the peak FLOP/s depends on: the GPU model, or the CPU model and the number of threads torch uses."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def peak_cache_path() -> Path:
    """$TUNELAB_CACHE/peak.json, else ~/.cache/tunelab/peak.json."""
    root = os.environ.get("TUNELAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunelab")
    return Path(root) / "peak.json"


def _read_peak_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def measure_peak(dtype: str = "float32", size: int | None = None, *, refresh: bool = False,
                 repeats: int | None = None) -> float:
    """Peak FLOP/s of this device in `dtype`: the best of several timed `size` x `size` matmuls (2 size^3 FLOPs each).

    The result is cached in `peak_cache_path()` keyed by device and dtype, so MFU uses the same denominator across
    runs; `refresh=True` measures again. Default sizes: 2048 on CPU (a fraction of a second per matmul on a laptop
    core), 8192 on CUDA.
    """
    cuda = torch.cuda.is_available()
    key = f"{device_name()} | {dtype}"
    path = peak_cache_path()
    cache = _read_peak_cache(path)
    if not refresh and isinstance(cache.get(key), dict) and cache[key].get("flops", 0) > 0:
        return float(cache[key]["flops"])

    size = size or (8192 if cuda else 2048)
    repeats = repeats or (20 if cuda else 5)
    device = "cuda" if cuda else "cpu"
    tdtype = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=g, device=device).to(tdtype)
    b = torch.randn(size, size, generator=g, device=device).to(tdtype)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(2):  # warm-up: thread pools, kernel selection, clocks
        torch.mm(a, b)
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    flops = 2.0 * size**3 / best

    cache = _read_peak_cache(path)  # re-read: another process may have added a device meanwhile
    cache[key] = {"flops": flops, "size": size, "torch": torch.__version__,
                  "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError:  # a read-only cache costs a re-measurement next time, nothing else
        pass
    return flops


# ---------------------------------------------------------------------------------------------------------- FLOPs
def _is_matmul(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # GPT-2 style transposed linear


def matmul_params(model: torch.nn.Module) -> dict[str, int]:
    """Weights of the model's matmuls (linear layers, incl. LoRA's A and B and the LM head; not the embedding
    lookup, norms or biases) by the backward work they need, walking modules in registration order (the forward
    order of decoder models):

    - forward_only: frozen weights before the first trainable parameter: nothing below needs a gradient;
    - frozen: frozen weights after it: the backward pass still computes their input gradients;
    - trained: trainable weights: input and weight gradients.

    Also `lm_head_weights` (the output layer's, counted in one of the three) and `lm_head_factor`, its FLOPs per
    weight and token (2, 4 or 6 by the same rules).
    """
    counts = {"forward_only": 0, "frozen": 0, "trained": 0, "lm_head_weights": 0, "lm_head_factor": 0}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen_trainable = False
    for module in model.modules():
        if _is_matmul(module):
            w = module.weight
            kind = "trained" if w.requires_grad else "frozen" if seen_trainable else "forward_only"
            counts[kind] += w.numel()
            seen_trainable = seen_trainable or w.requires_grad
            if module is head:
                counts["lm_head_weights"] = w.numel()
                counts["lm_head_factor"] = {"forward_only": 2, "frozen": 4, "trained": 6}[kind]
        elif any(p.requires_grad for p in module.parameters(recurse=False)):
            seen_trainable = True  # e.g. a trainable embedding: every matmul after it needs input gradients
    return counts


def _first_backward_layer(model: torch.nn.Module, n_layers: int) -> int:
    """Index of the first decoder layer whose attention needs a backward pass (n_layers: none)."""
    from tunelab.models.adapters import layer_index

    seen_layer = False
    for name, p in model.named_parameters():
        idx = layer_index(name)
        seen_layer = seen_layer or idx is not None
        if p.requires_grad:
            if idx is not None:
                return idx
            return n_layers if seen_layer else 0  # after the layers (LM head) or before them (embedding)
    return n_layers


def attention_context(lengths: Sequence[int]) -> float:
    """Mean number of keys a real token attends to under causal attention: sum L(L+1)/2 / sum L over sequences."""
    total = sum(lengths)
    return sum(n * (n + 1) / 2 for n in lengths) / total if total else 0.0


def estimate_flops(cfg: Config, lengths: Sequence[int], trained_fraction: float = 1.0) -> dict[str, Any]:
    """Model FLOPs per real token for training `cfg`'s model with its adapter on sequences of these lengths, where
    `trained_fraction` of the real tokens are loss targets.

    Useful work only, the same for every implementation of the same training: padding is not counted, and neither
    are logits at positions without a target (prompt tokens in SFT), which no implementation needs (counting them
    would let MFU exceed 1 for one that skips them, as tunelab does).

    - Matmuls: 2 FLOPs per weight and token forward, 2 more for the input gradient, 2 more for the weight gradient
      of a trained weight. Full fine-tuning is the usual 6N; a frozen base (LoRA, freeze) 4N for its frozen weights
      plus 6 per LoRA weight; frozen weights before the first trainable parameter need the forward only (2). N counts
      matmul weights (the LM head included, for `trained_fraction` of the tokens), not the embedding lookup.
    - Attention: per layer and token, QK^T and AV take 4 x heads x head_dim x context FLOPs forward and twice that
      backward (layers below every trainable parameter: forward only), context being the causal number of keys of
      a real token in its own sequence (sliding windows ignored).
    - Not counted: norms, activations, rotary embeddings, softmax, the loss and the optimizer (small: linear in N
      or in tokens), and LoRA's first-layer input-gradient matmuls, which autograd skips (under 1/layers of the
      frozen work).

    The model is built on the meta device: no memory, no weights read (small models whose adapter cannot be set up
    on meta tensors are built on the CPU instead).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.errors import UserError
    from tunelab.models.adapters import apply_adapter

    hf_config = AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                                           revision=cfg.model.revision)
    def build(device: str):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
            return apply_adapter(model, cfg.adapter)

    try:
        model = build("meta")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - an adapter whose set-up needs real values (BOFT) fails on meta
        from tunelab.engine.plan import CPU_FALLBACK_MAX_PARAMS

        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(hf_config).parameters())
        if n > CPU_FALLBACK_MAX_PARAMS:
            raise UserError(f"bench: cannot count the FLOPs of adapter {cfg.adapter.type} without building "
                            f"the {n / 1e6:.0f}M-parameter model ({str(e).splitlines()[0]})") from None
        model = build("cpu")
    params = matmul_params(model)
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    n_layers = int(text.num_hidden_layers)
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    bwd_layers = n_layers - _first_backward_layer(model, n_layers)
    context = attention_context(lengths)
    all_positions = 2 * params["forward_only"] + 4 * params["frozen"] + 6 * params["trained"]
    head_all = params["lm_head_factor"] * params["lm_head_weights"]
    lm_head = head_all * trained_fraction
    matmul = all_positions - head_all + lm_head
    attention = 4 * heads * head_dim * context * (n_layers + 2 * bwd_layers)
    return {"per_token": matmul + attention, "matmul": matmul, "lm_head": lm_head, "attention": attention,
            "mean_context": context, "trained_fraction": trained_fraction, "layers": n_layers,
            "backward_layers": bwd_layers, **params}


def train_lengths(cfg: Config) -> tuple[list[int], float]:
    """Token lengths of the training rows as the loop sees them and the fraction of their tokens that are loss
    targets."""
    from tunelab.engine.shape import measure_sequences

    stats = measure_sequences(cfg)
    return stats.lengths, sum(stats.trained) / max(sum(stats.lengths), 1)


# ------------------------------------------------------------------------------------------------------- measuring
def summarize_steps(records: Sequence[dict[str, Any]], warmup: int, *, rows_per_step: int | None = None
                    ) -> dict[str, Any]:
    """Throughput over the steps after `warmup` from per-step records with cumulative `tokens` (real),
    `positions` (padding included), `elapsed` (training seconds) and optionally `sequences`.

    Shared by tunelab's benchmark and the benchmark runner (which feeds it the peers' records), so every system is
    measured with the same arithmetic.
    """
    recs = sorted((r for r in records if "tokens" in r and "elapsed" in r), key=lambda r: r["step"])
    base = [r for r in recs if r["step"] <= warmup]
    if not base or base[-1]["step"] != warmup or recs[-1]["step"] <= warmup:
        raise ValueError(f"need per-step records for step {warmup} and after it; got steps "
                         f"{[r['step'] for r in recs]}")
    start, end = base[-1], recs[-1]
    measured = [r for r in recs if r["step"] > warmup]
    seconds = end["elapsed"] - start["elapsed"]
    tokens = end["tokens"] - start["tokens"]
    positions = end["positions"] - start["positions"]
    steps = end["step"] - start["step"]
    prev = start
    step_s: list[float] = []
    for r in measured:
        step_s.append((r["elapsed"] - prev["elapsed"]) / (r["step"] - prev["step"]))
        prev = r
    if "sequences" in end and "sequences" in start:
        samples = end["sequences"] - start["sequences"]
    else:
        samples = (rows_per_step or 0) * steps
    seconds = max(seconds, 1e-9)
    return {
        "measured_steps": steps,
        "seconds": seconds,
        "tokens": tokens,
        "positions": positions,
        "samples": samples,
        "tokens_per_s": tokens / seconds,
        "positions_per_s": positions / seconds,
        "samples_per_s": samples / seconds,
        "median_step_s": statistics.median(step_s),
        "min_step_s": min(step_s),
        "max_step_s": max(step_s),
        "padding_ratio": 1.0 - tokens / positions if positions else 0.0,
        "step_seconds": step_s,
    }


def _compute_dtype(cfg: Config) -> str:
    """The dtype the matmuls run in: the autocast dtype under mixed precision, else the weights' dtype."""
    from tunelab.engine.shape import resolve_run

    return resolve_run(cfg).compute_dtype


def run_bench(config: str | os.PathLike | dict | Config, overrides: list[str] | None = None, *, steps: int = 20,
              warmup: int = 3, peak_flops: float | None = None, echo: bool = False,
              output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train `config` for `warmup` + `steps` steps on tunelab's real training path and measure the steps after
    warm-up. Returns a JSON-serialisable dict (see `format_report` for what each number means).

    The run's output goes to a temporary folder that is deleted afterwards, unless `output_dir` is given.
    `peak_flops` overrides the measured (cached) peak used for MFU.
    """
    from tunelab.engine.loop import run_training

    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1, got steps={steps}, warmup={warmup}")
    tmp = None if output_dir is not None else tempfile.mkdtemp(prefix="tunelab-bench-")
    out = Path(output_dir) if output_dir is not None else Path(tmp) / "run"
    bench = [f"train.max_steps={warmup + steps}", f"output.dir={out}", *_BENCH_OVERRIDES]
    cfg = load_config(config, [*(overrides or []), *bench])
    cuda = torch.cuda.is_available()
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        result = run_training(cfg, echo=echo)
        if cuda:
            peak_memory, memory_kind = int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
        else:
            peak_memory, memory_kind = peak_rss_bytes(), "peak_rss"
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rows_per_step = cfg.train.batch_size * cfg.train.grad_accum * world
        summary = summarize_steps(result.metrics, warmup, rows_per_step=rows_per_step)
        flops = estimate_flops(cfg, *train_lengths(cfg))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    dtype = _compute_dtype(cfg)
    peak = peak_flops if peak_flops is not None else measure_peak(dtype)
    achieved = summary["tokens_per_s"] * flops["per_token"]
    import transformers

    return {
        "config": str(config) if isinstance(config, (str, os.PathLike)) else None,
        "overrides": list(overrides or []),
        "model": cfg.model.path,
        "adapter": cfg.adapter.type,
        "packing": result.packing or cfg.data.packing,
        "packing_config": cfg.data.packing,
        "batch_size": cfg.train.batch_size,
        "grad_accum": cfg.train.grad_accum,
        "max_length": cfg.data.max_length,
        "warmup": warmup,
        "steps": steps,
        **summary,
        "peak_memory_bytes": peak_memory,
        "peak_memory_kind": memory_kind,
        "flops_per_token": flops["per_token"],
        "flops": flops,
        "achieved_flops": achieved,
        "peak_flops": peak,
        "mfu": achieved / peak if peak > 0 else 0.0,
        "device": device_name(),
        "dtype": dtype,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "final_loss": next((m["loss"] for m in reversed(result.metrics) if "loss" in m), None),
        "trainable_params": result.trainable_params,
        "records": [{k: m[k] for k in ("step", "tokens", "positions", "elapsed")}
                    for m in result.metrics if "tokens" in m],
    }


def _si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}"
    return f"{value:.2f} {unit}"


def format_report(result: dict[str, Any]) -> str:
    """A short human-readable report of a `run_bench` result."""
    r = result
    memory = "peak RSS (process)" if r["peak_memory_kind"] == "peak_rss" else "peak CUDA memory allocated"
    f = r["flops"]
    lines = [
        f"benchmark: {r['model']} ({r['adapter']}), packing {r['packing']}, batch {r['batch_size']} x "
        f"{r['grad_accum']}, max_length {r['max_length']}, {r['dtype']} on {r['device']}",
        f"  measured: {r['measured_steps']} steps after {r['warmup']} warm-up, {r['seconds']:.2f} s",
        f"  real tokens/s: {r['tokens_per_s']:,.0f}   (positions/s incl. padding: {r['positions_per_s']:,.0f})",
        f"  samples/s: {r['samples_per_s']:.2f}",
        f"  step time: median {r['median_step_s']:.3f} s (min {r['min_step_s']:.3f}, max {r['max_step_s']:.3f})",
        f"  padding: {100 * r['padding_ratio']:.1f}% of positions",
        f"  {memory}: {r['peak_memory_bytes'] / 2**20:,.0f} MiB",
        f"  model FLOPs/token: {_si(r['flops_per_token'], 'FLOP')} (matmul {_si(f['matmul'], 'FLOP')} incl. LM head "
        f"{_si(f['lm_head'], 'FLOP')} for {100 * f['trained_fraction']:.0f}% trained tokens; attention "
        f"{_si(f['attention'], 'FLOP')} at mean context {f['mean_context']:.0f})",
        f"  MFU: {100 * r['mfu']:.2f}% ({_si(r['achieved_flops'], 'FLOP/s')} of a measured peak "
        f"{_si(r['peak_flops'], 'FLOP/s')})",
    ]
    return "\n".join(lines)
