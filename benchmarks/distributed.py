"""Per-process peak memory and tokens/s of ddp, zero1, zero2, zero3 and fsdp2 (2 processes), beside what
`tunelab plan` predicts for each; writes benchmarks/RESULTS-distributed.md and results-distributed.json.

Full fine-tuning of tiny-50m (the saving is in the optimizer states, gradients and parameters, which LoRA keeps
small), fp32 AdamW, batch 2 rows of at most 256 tokens per process, 8 steps; the engines run interleaved (A B C D E,
then again) so that the machine's drift falls on all of them alike. Each process's peak is its own resident set
(VmHWM, which the run's summary prints), with glibc's mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=65536) as in
the planner's own validation (docs/plan.md: with the default, freed buffers stay in a fragmented heap and RSS runs
above the live memory); the plan is `plan_from_config(..., devices=2)` for the engine, with the CPU runtime
calibrated on this machine under the same setting.

    python benchmarks/make_workload.py         # the models and data, once
    python benchmarks/distributed.py [--rounds 2] [--steps 8] [--model tiny-50m]
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
# "-small": DeepSpeed with buckets of 5e6 elements (train.deepspeed) instead of its defaults (a 5e8-element reduce
# bucket, a 5e7-element ZeRO-3 prefetch), which hold every gradient and parameter of a model this small
ENGINES = ["ddp", "zero1", "zero2", "zero3", "fsdp2", "zero2-small", "zero3-small"]
PLAN_STAGE = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp2": "fsdp2", "zero2-small": 2, "zero3-small": 3}
SMALL_BUCKETS = {"zero_optimization": {"reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000,
                                       "stage3_prefetch_bucket_size": 5_000_000}}


def _config(model: Path, out: Path, engine: str, steps: int) -> dict:
    extra = {}
    if engine.endswith("-small"):
        engine = engine.removesuffix("-small")
        path = out.parent / "small_buckets.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(SMALL_BUCKETS))
        extra = {"deepspeed": str(path)}
    return {
        "model": {"path": str(model)},
        "data": {"train": [{"path": str(HERE / "data" / "alpaca_2k.json"), "format": "alpaca"}], "max_length": 256,
                 "packing": "none"},
        "adapter": {"type": "full"},
        "method": {"type": "sft"},
        "train": {"batch_size": 2, "grad_accum": 1, "lr": 1e-5, "max_steps": steps, "log_every": 1, "save_every": 0,
                  "distributed": engine, "seed": 0, **extra},
        "output": {"dir": str(out), "plot": False, "overwrite": True},
    }


def _run(cfg_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536"}
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
    return {"peak_mib": mib, "held_mib": [float(x) for x in re.findall(r"([\d.]+) MiB", held.group(1))],
            "tokens_per_s": statistics.median(tps), "loss": [r["loss"] for r in records]}


def _plan(cfg: dict, engine: str) -> float:
    from tunelab.config import load_config
    from tunelab.engine.plan import plan_from_config

    stage = PLAN_STAGE[engine]
    report = plan_from_config(load_config(cfg), devices=2, device="cpu", **(
        {"zero_stage": stage} if stage != "fsdp2" else {"zero_stage": 0, "fsdp2": True}))
    return report.plan.total / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--model", default="tiny-50m")
    args = ap.parse_args()
    model = HERE / "models" / args.model
    if not model.is_dir():
        raise SystemExit(f"{model}: missing; run python benchmarks/make_workload.py first")
    from tunelab.engine.plan.calibrate import calibrate_cpu_runtime

    os.environ.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    calibrate_cpu_runtime(save=True)  # the plans below use this machine's runtime
    runs: dict[str, list[dict]] = {e: [] for e in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for engine in ENGINES:
                cfg = _config(model, Path(tmp) / f"{engine}-{r}", engine, args.steps)
                path = Path(tmp) / f"{engine}-{r}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                runs[engine].append(_run(path))
                print(engine, r, runs[engine][-1]["peak_mib"], f"{runs[engine][-1]['tokens_per_s']:.0f} tok/s",
                      flush=True)
        plans = {e: _plan(_config(model, Path(tmp) / "plan", e, args.steps), e) for e in ENGINES}
    rows = []
    for engine in ENGINES:
        peak = statistics.median(max(x["peak_mib"]) for x in runs[engine])
        rows.append({"engine": engine, "peak_mib": peak, "plan_mib": plans[engine],
                     "held_mib": runs[engine][0]["held_mib"][0],
                     "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs[engine]),
                     "loss_last": runs[engine][0]["loss"][-1]})
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    cpu = _cpu_name()
    (HERE / "results-distributed.json").write_text(json.dumps({"machine": cpu or machine, "rows": rows,
                                                               "runs": runs}, indent=1))
    _write_md(rows, cpu or machine, args)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} cores"
    except OSError:
        pass
    return ""


def _write_md(rows: list[dict], machine: str, args) -> None:
    ddp = rows[0]
    lines = [
        "# Distributed engines: per-process memory and throughput",
        "",
        f"`python benchmarks/distributed.py --rounds {args.rounds} --steps {args.steps} --model {args.model}`: full "
        f"fine-tuning of {args.model}, fp32 AdamW, 2 processes over gloo, batch 2 x 256 tokens per process; medians "
        f"of {args.rounds} interleaved rounds, `MALLOC_MMAP_THRESHOLD_=65536` (peak RSS = live memory, as in "
        f"docs/plan.md's validation). Machine: {machine} (no GPU).",
        "",
        "| engine | peak RSS per process | `tunelab plan` predicts | plan error | parameters held | tokens/s | vs ddp |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        err = (r["plan_mib"] - r["peak_mib"]) / r["peak_mib"]
        lines.append(f"| {r['engine']} | {r['peak_mib']:.0f} MiB | {r['plan_mib']:.0f} MiB | {err:+.0%} | "
                     f"{r['held_mib']:.0f} MiB | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / ddp['tokens_per_s']:.2f}x |")
    lines += ["", "Raw numbers: results-distributed.json.", ""]
    (HERE / "RESULTS-distributed.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
