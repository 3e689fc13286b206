"""Every fine-tuning type on the standard workload: trainable parameters, peak memory, tokens/s and final loss.

Each method trains the 7M model on the standard alpaca workload (benchmarks/configs/tunelab_group_by_length.yaml:
batch 8, max_length 512, fp32, group_by_length batching, since prompt learning and ReFT cannot pack) for the same
number of steps, each in a fresh subprocess so its peak RSS is its own. Runs are interleaved over rounds like run.py
(this machine drifts 30-45 % over minutes); the table reports per-method medians. The results go to
benchmarks/methods.json, from which `python scripts/methods_doc.py > docs/methods.md` builds the table.

Usage (repository root, tunelab's virtualenv, after `python benchmarks/make_workload.py`):
    python benchmarks/methods.py [--steps 30] [--warmup 3] [--repeats 1] [--only "lora r8,ia3,..."]
(--only reruns those methods and keeps the other entries of methods.json.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = HERE / "configs" / "tunelab_group_by_length.yaml"
OUT = HERE / "methods.json"

# name -> (adapter section, extra overrides). Learning rates follow each method's usual range.
METHODS: dict[str, tuple[dict, list[str]]] = {
    "full": ({"type": "full"}, ["train.lr=5e-5"]),
    "freeze (last 2 layers)": ({"type": "freeze", "layers": 2}, ["train.lr=5e-5"]),
    "lora r8": ({"type": "lora", "r": 8, "alpha": 16}, []),
    "lora r8 + LoRA+ (16)": ({"type": "lora", "r": 8, "alpha": 16, "lr_ratio": 16}, []),
    "dora r8": ({"type": "lora", "r": 8, "alpha": 16, "dora": True}, []),
    "pissa r8": ({"type": "lora", "r": 8, "alpha": 8, "init": "pissa"}, []),
    "qlora nf4 r8": ({"type": "lora", "r": 8, "alpha": 16}, ["model.quantization=nf4"]),
    "lora r8 + adamw_8bit": ({"type": "lora", "r": 8, "alpha": 16}, ["train.optimizer=adamw_8bit"]),
    "adalora r12->8": ({"type": "adalora", "r": 12, "target_r": 8}, []),
    "ia3": ({"type": "ia3"}, ["train.lr=3e-3"]),
    "ln": ({"type": "ln"}, ["train.lr=1e-3"]),
    "vera r256": ({"type": "vera", "r": 256}, ["train.lr=3e-3"]),
    "oft b16": ({"type": "oft", "block_size": 16}, ["train.lr=1e-3"]),
    "boft b8x2": ({"type": "boft", "block_size": 8, "butterfly": 2}, ["train.lr=1e-3"]),
    "prefix 16": ({"type": "prefix", "virtual_tokens": 16}, ["train.lr=1e-2"]),
    "prompt 16": ({"type": "prompt", "virtual_tokens": 16}, ["train.lr=1e-2"]),
    "ptuning 16": ({"type": "ptuning", "virtual_tokens": 16}, ["train.lr=1e-3"]),
    "bottleneck /16": ({"type": "bottleneck", "reduction": 16}, ["train.lr=1e-3"]),
    "bitfit (+bias)": ({"type": "bitfit", "add_bias": True}, ["train.lr=1e-3"]),
    "reft r4": ({"type": "reft", "r": 4}, ["train.lr=2e-3"]),
}

_RUN = """
import json, sys
from tunelab.engine.bench import run_bench
config, out, steps, warmup, *overrides = sys.argv[1:]
result = run_bench(config, overrides, steps=int(steps), warmup=int(warmup), peak_flops=1.0)
open(out, "w").write(json.dumps(result))
"""


def run_one(name: str, steps: int, warmup: int) -> dict:
    adapter, extra = METHODS[name]
    overrides = [f"adapter={json.dumps(adapter)}", *extra]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", _RUN, str(CONFIG), str(out), str(steps), str(warmup),
                               *overrides], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": (proc.stdout + proc.stderr)[-1500:]}
        r = json.loads(out.read_text())
    return {"trainable_params": r["trainable_params"], "peak_memory_bytes": r["peak_memory_bytes"],
            "tokens_per_s": r["tokens_per_s"], "final_loss": r["final_loss"], "wall_s": round(time.time() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", help="comma-separated method names")
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        print(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rnd in range(args.repeats):
        for name in names:
            r = run_one(name, args.steps, args.warmup)
            runs[name].append(r)
            shown = r.get("error", "").splitlines()[-1:] if "error" in r else \
                f"{r['tokens_per_s']:.0f} tok/s, {r['peak_memory_bytes'] / 2**20:.0f} MiB, loss {r['final_loss']:.3f}"
            print(f"round {rnd + 1} {name}: {shown}", flush=True)
    table = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            table[name] = {"error": rs[-1]["error"]}
            continue
        table[name] = {
            "adapter": METHODS[name][0], "overrides": METHODS[name][1],
            "trainable_params": ok[0]["trainable_params"],
            "peak_memory_mib": round(statistics.median(r["peak_memory_bytes"] for r in ok) / 2**20),
            "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in ok)),
            "final_loss": round(statistics.median(r["final_loss"] for r in ok), 4),
        }
    meta = {"model": "benchmarks/models/tiny-7m", "config": str(CONFIG.relative_to(ROOT)), "steps": args.steps,
            "warmup": args.warmup, "repeats": args.repeats, "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}
    if args.only and OUT.exists():  # update these methods, keep the others' earlier results
        earlier = json.loads(OUT.read_text())
        table = {**earlier["methods"], **table}
        meta["partial_update"] = sorted(runs)
    OUT.write_text(json.dumps({"meta": meta, "methods": {n: table[n] for n in METHODS if n in table}}, indent=1)
                   + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
