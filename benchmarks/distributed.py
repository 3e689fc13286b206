"""Per-process peak memory and tokens/s of ddp, zero1, zero2, zero3 and fsdp2 (2 processes), beside what
`tunelab plan` predicts for each; writes benchmarks/RESULTS-distributed.md and results-distributed.json.

Full fine-tuning of tiny-50m (the saving is in the optimizer states, gradients and parameters, which LoRA keeps
small), fp32 AdamW, micro-batches of 2 rows of at most 256 tokens per process, 8 steps, in two regimes (REGIMES:
model states dominate the peak, or activations do); the engines run interleaved (A B C D E, then again) so that
the machine's drift falls on all of them alike. Each process's peak is its own resident set
(VmHWM, which the run's summary prints), with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536) as in
the planner's own validation (docs/plan.md: with the default, freed buffers stay in a fragmented heap and RSS runs
above the live memory), and per phase (training, checkpoint, final save) as benchmarks/memprobe samples it; the
plan is `plan_from_config(..., devices=2)` for the engine, with the CPU runtime calibrated on this machine under
the same setting, beside the training peak (what it models). "-dsdefaults" runs the engine with DeepSpeed's own
bucket and gathering defaults (a train.deepspeed file) instead of tunelab's, sized to the model.

    python benchmarks/make_workload.py         # the models and data, once
    python benchmarks/distributed.py [--rounds 1] [--steps 8] [--model tiny-50m]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# "-dsdefaults": DeepSpeed with its own defaults for the buckets and ZeRO-3's gathering limits (a train.deepspeed
# file setting them) instead of tunelab's, sized to the model (engine/dist_config.py: bucket_sizes)
ENGINES = ["ddp", "zero1", "zero2", "zero3", "fsdp2", "zero2-dsdefaults", "zero3-dsdefaults"]
PLAN_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp2": "fsdp2", "zero2-dsdefaults": 2,
              "zero3-dsdefaults": 3}
DS_DEFAULTS = {"zero_optimization": {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
                                     "stage3_prefetch_bucket_size": 50_000_000,
                                     "stage3_param_persistence_threshold": 100_000,
                                     "stage3_max_live_parameters": 1_000_000_000,
                                     "stage3_max_reuse_distance": 1_000_000_000}}
# the phases benchmarks/memprobe files each sample under; "training" is the largest of the first two
PHASES = ["forward/backward", "optimizer step", "checkpoint", "final save", "setup", "after backward"]
# what dominates the peak: "states", the model states ZeRO shards (weights, gradients, optimizer states), with
# gradient checkpointing and 2 micro-batches per step (the first one's gradients live through the second one's
# forward: ZeRO-1 holds them whole, ZeRO-2/3 only their partition); "activations", one micro-batch without
# checkpointing, whose peak comes at the start of the backward, before any gradient exists
REGIMES = {"states": {"grad_accum": 2, "gradient_checkpointing": True},
           "activations": {"grad_accum": 1, "gradient_checkpointing": False}}


def _config(model: Path, out: Path, engine: str, steps: int, regime: str = "states") -> dict:
    extra = {}
    if engine.endswith("-dsdefaults"):
        engine = engine.removesuffix("-dsdefaults")
        path = out.parent / "deepspeed_defaults.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(DS_DEFAULTS))
        extra = {"deepspeed": str(path)}
    knobs = REGIMES[regime]
    return {
        "model": {"path": str(model), "gradient_checkpointing": knobs["gradient_checkpointing"]},
        "data": {"train": [{"path": str(HERE / "data" / "alpaca_2k.json"), "format": "alpaca"}], "max_length": 256,
                 "packing": "none"},
        "adapter": {"type": "full"},
        "method": {"type": "sft"},
        "train": {"batch_size": 2, "grad_accum": knobs["grad_accum"], "lr": 1e-5, "max_steps": steps, "log_every": 1, "save_every": 0,
                  "distributed": engine, "seed": 0, **extra},
        "output": {"dir": str(out), "plot": False, "overwrite": True},
    }


def _run(cfg_path: Path) -> dict:
    probe = cfg_path.with_suffix(".probe")
    probe.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "TUNELAB_MEMPROBE": str(probe),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE / "memprobe"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "tunelab", "train", str(cfg_path), "--nproc", "2"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{cfg_path}: failed\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    peaks = re.search(r"memory: peak resident memory per process: (.+)", proc.stdout)
    held = re.search(r"parameters held per process: (.+)", proc.stdout)
    mib = [float(x) for x in re.findall(r"([\d.]+) MiB", peaks.group(1))]
    out = Path(yaml.safe_load(cfg_path.read_text())["output"]["dir"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    tps = [r["tokens_per_s"] for r in records[2:]]  # after two warm-up steps
    phases: dict[str, float] = {}
    for f in probe.glob("rank-*.json"):
        for phase, mib_ in json.loads(f.read_text()).items():
            phases[phase] = max(phases.get(phase, 0.0), mib_)
    return {"peak_mib": mib, "held_mib": [float(x) for x in re.findall(r"([\d.]+) MiB", held.group(1))],
            "tokens_per_s": statistics.median(tps), "loss": [r["loss"] for r in records], "phases": phases}


def _plan(cfg: dict, engine: str) -> float:
    from tunelab.config import load_config
    from tunelab.engine.plan import plan_from_config

    stage = PLAN_STAGE[engine]
    report = plan_from_config(load_config(cfg), devices=2, device="cpu", **(
        {"zero_stage": stage} if stage != "fsdp2" else {"zero_stage": 0, "fsdp2": True}))
    return report.plan.total / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="tiny-50m")
    args = ap.parse_args()
    model = HERE / "models" / args.model
    if not model.is_dir():
        raise SystemExit(f"{model}: missing; run python benchmarks/make_workload.py first")
    from tunelab.engine.plan.calibrate import calibrate_cpu_runtime

    os.environ.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    calibrate_cpu_runtime(save=True)  # the plans below use this machine's runtime
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for regime in REGIMES:
            runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
            for r in range(args.rounds):
                for engine in ENGINES:
                    cfg = _config(model, Path(tmp) / f"{regime}-{engine}-{r}", engine, args.steps, regime)
                    path = Path(tmp) / f"{regime}-{engine}-{r}.yaml"
                    path.write_text(yaml.safe_dump(cfg))
                    runs[engine].append(_run(path))
                    print(regime, engine, r, runs[engine][-1]["peak_mib"], runs[engine][-1]["phases"],
                          f"{runs[engine][-1]['tokens_per_s']:.0f} tok/s", flush=True)
            plans = {e: _plan(_config(model, Path(tmp) / "plan", e, args.steps, regime), e) for e in ENGINES}
            results[regime] = {"rows": _rows(runs, plans), "runs": runs}
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    machine = _cpu_name() or machine
    (HERE / "results-distributed.json").write_text(json.dumps({"machine": machine, **results}, indent=1))
    _write_md(results, machine, args)


def _rows(runs: dict[str, list[dict]], plans: dict[str, float]) -> list[dict]:
    rows = []
    for engine in ENGINES:
        peak = statistics.median(max(x["peak_mib"]) for x in runs[engine])
        phase = {p: statistics.median(x["phases"].get(p, 0.0) for x in runs[engine]) for p in PHASES}
        training = statistics.median(max(x["phases"].get("forward/backward", 0.0),
                                         x["phases"].get("optimizer step", 0.0)) for x in runs[engine])
        rows.append({"engine": engine, "peak_mib": peak, "training_mib": training, "phases_mib": phase,
                     "plan_mib": plans[engine], "held_mib": runs[engine][0]["held_mib"][0],
                     "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs[engine]),
                     "loss_last": runs[engine][0]["loss"][-1]})
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return ""


def _write_md(results: dict[str, dict], machine: str, args) -> None:
    lines = [
        "# Distributed engines: per-process memory and throughput",
        "",
        f"`python benchmarks/distributed.py --rounds {args.rounds} --steps {args.steps} --model {args.model}`: full "
        f"fine-tuning of {args.model}, fp32 AdamW, 2 processes over gloo, micro-batches of 2 x 256 tokens per "
        f"process; medians of {args.rounds} interleaved round(s), `MALLOC_MMAP_THRESHOLD_=65536` (peak RSS = live "
        f"memory, as in docs/plan.md's validation). Machine: {machine} (no GPU).",
        "",
        "Peak: the process's high-water mark over the whole run (VmHWM, the larger of the two ranks). Training: the "
        "largest resident set sampled (every ms, benchmarks/memprobe) during forward/backward and the optimizer "
        "step, which `tunelab plan` predicts; after backward: the resident set right after each micro-batch's "
        "backward (what stays between micro-batches: weights, gradients or their partitions, optimizer states, "
        "without the backward's working set); checkpoint: while writing the sharded checkpoint; final: while saving "
        "the final model. -dsdefaults: the engine with DeepSpeed's own bucket sizes and ZeRO-3 gathering limits "
        "instead of tunelab's (sized to the model).",
    ]
    titles = {"states": "Model states dominate: gradient checkpointing, 2 micro-batches per step",
              "activations": "Activations dominate: 1 micro-batch per step, no checkpointing"}
    for regime, result in results.items():
        rows = result["rows"]
        ddp = rows[0]
        lines += ["", f"## {titles[regime]}", "",
                  "| engine | peak RSS per process | training | vs ddp | after backward | vs ddp | checkpoint | "
                  "final save | `tunelab plan` | plan error | parameters held | tokens/s | vs ddp |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            err = (r["plan_mib"] - r["training_mib"]) / r["training_mib"]
            ph = r["phases_mib"]
            lines.append(
                f"| {r['engine']} | {r['peak_mib']:.0f} MiB | {r['training_mib']:.0f} MiB | "
                f"{r['training_mib'] - ddp['training_mib']:+.0f} MiB | {ph['after backward']:.0f} MiB | "
                f"{ph['after backward'] - ddp['phases_mib']['after backward']:+.0f} MiB | {ph['checkpoint']:.0f} MiB | "
                f"{ph['final save']:.0f} MiB | {r['plan_mib']:.0f} MiB | {err:+.0%} | {r['held_mib']:.0f} MiB | "
                f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ddp['tokens_per_s']:.2f}x |")
    lines += ["", "Raw numbers: results-distributed.json.", ""]
    (HERE / "RESULTS-distributed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
