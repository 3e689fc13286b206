"""GRPO throughput and memory: tunelab against TRL 1.16's GRPOTrainer on the same workload, interleaved.

Workload (every system): a benchmark model (benchmarks/make_workload.py: tiny-7m by default, or tiny-50m), the 64
arithmetic prompts of examples/data/rl_prompts.json, `--per-step` prompts per step (2 by default; 8 x 8 steps covers
the 64) x 8 completions per prompt, 128 new tokens, temperature 1, top-k and top-p off, LoRA r 8 / alpha 16 on every
linear layer of the decoder, fp32, the dapo loss, beta 0 (no reference), lr 1e-5, one reward function
(examples/rewards.py:correct), activation checkpointing as `--grad-ckpt` says for every system (on by default: TRL
GRPOConfig's default). The random model never stops early, so every system samples all 128 tokens of every
completion. Each run is a fresh process; rounds alternate the systems: tunelab, TRL, and with `--systems` also
tunelab-unmerged (tunelab sampling through the LoRA adapter: method.merge_adapter off).

Measured: prompts per second over the steps after the warm-up (wall time of those optimizer steps, generation
included), the share of a step spent generating (tunelab's rollout_s / step; TRL does not split it), and the
process's peak RSS (VmHWM, model loading included).

Usage: python benchmarks/grpo.py [--rounds 2 --steps 6 --warmup 2 --per-step 2 --model tiny-7m
       --systems tunelab,trl --grad-ckpt on --json OUT.json]   (from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "examples" / "data" / "rl_prompts.json"
GROUP, NEW_TOKENS = 8, 128


def peak_rss() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_tunelab(model: Path, per_step: int, steps: int, warmup: int, out: str, merge: bool = True,
                grad_ckpt: bool = True) -> dict:
    import tunelab

    cfg = {
        "model": {"path": str(model), "gradient_checkpointing": grad_ckpt},
        "data": {"train": [{"path": str(PROMPTS), "format": "alpaca"}], "max_length": 256, "cache": False},
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "method": {"type": "grpo", "num_generations": GROUP, "max_new_tokens": NEW_TOKENS, "temperature": 1.0,
                   "loss": "dapo", "merge_adapter": "on" if merge else "off",
                   "rewards": [{"file": str(ROOT / "examples" / "rewards.py"), "function": "correct"}]},
        "train": {"batch_size": per_step, "grad_accum": 1, "lr": 1e-5, "max_steps": warmup + steps, "log_every": 1,
                  "save_every": 0, "precision": "fp32"},
        "output": {"dir": out, "plot": False},
    }
    tunelab.train(cfg, echo=False)
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl", encoding="utf-8")]
    measured = records[warmup:]
    seconds = records[-1]["elapsed"] - records[warmup - 1]["elapsed"]
    rollout = sum(r["rollout_s"] for r in measured)
    return {"prompts_per_s": per_step * steps / seconds, "step_s": seconds / steps,
            "generation_share": rollout / seconds, "peak_rss": peak_rss()}


def run_trl(model_dir: Path, per_step: int, steps: int, warmup: int, out: str, grad_ckpt: bool = True) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, str(ROOT / "examples"))
    from rewards import correct

    rows = json.loads(PROMPTS.read_text())
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["instruction"]}], "answer": r["answer"]}
                              for r in rows])
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=per_step * GROUP,
                      gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=NEW_TOKENS,
                      temperature=1.0, top_k=0, top_p=1.0, loss_type="dapo", beta=0.0, learning_rate=1e-5,
                      max_steps=warmup + steps, logging_steps=1, save_strategy="no", report_to=[],
                      dataloader_num_workers=0, seed=42, gradient_checkpointing=grad_ckpt)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=args, train_dataset=data,
                          processing_class=tok, peft_config=lora, callbacks=[Timer()])
    trainer.train()
    seconds = sum(times[warmup:])
    return {"prompts_per_s": per_step * steps / seconds, "step_s": seconds / steps, "generation_share": None,
            "peak_rss": peak_rss()}


SYSTEMS = ("tunelab", "trl", "tunelab-unmerged")


def child(system: str, model: Path, per_step: int, steps: int, warmup: int, grad_ckpt: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"grpo-bench-{system}-") as tmp:
        out = str(Path(tmp) / "out")
        if system == "trl":
            return run_trl(model, per_step, steps, warmup, out, grad_ckpt)
        return run_tunelab(model, per_step, steps, warmup, out, merge=system == "tunelab", grad_ckpt=grad_ckpt)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--per-step", type=int, default=2, help="prompts per optimizer step")
    p.add_argument("--model", default="tiny-7m", help="a folder under benchmarks/models")
    p.add_argument("--systems", default="tunelab,trl", help=f"comma-separated, of {', '.join(SYSTEMS)}")
    p.add_argument("--grad-ckpt", choices=["on", "off"], default="on",
                   help="activation checkpointing for every system (TRL GRPOConfig's default is on)")
    p.add_argument("--json", default="")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    a = p.parse_args()
    model = ROOT / "benchmarks" / "models" / a.model
    if a.child:
        print("@@result " + json.dumps(child(a.child, model, a.per_step, a.steps, a.warmup, a.grad_ckpt == "on")))
        return 0
    if not model.exists():
        print(f"{model} is missing: run python benchmarks/make_workload.py first", file=sys.stderr)
        return 2
    systems = [s for s in a.systems.split(",") if s]
    if not set(systems) <= set(SYSTEMS) or "tunelab" not in systems or "trl" not in systems:
        print(f"--systems: tunelab and trl, optionally tunelab-unmerged; got {a.systems}", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for r in range(a.rounds):
        for system in systems:
            proc = subprocess.run([sys.executable, __file__, "--child", system, "--steps", str(a.steps),
                                   "--warmup", str(a.warmup), "--per-step", str(a.per_step), "--model", a.model,
                                   "--grad-ckpt", a.grad_ckpt],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("@@result ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{system} round {r + 1} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            results[system].append(json.loads(line.split(" ", 1)[1]))
            print(system, r + 1, results[system][-1], flush=True)
    ratios = [t["prompts_per_s"] / q["prompts_per_s"] for t, q in zip(results["tunelab"], results["trl"])]
    summary = {s: {"prompts_per_s": statistics.median(x["prompts_per_s"] for x in v),
                   "peak_rss_mib": statistics.median(x["peak_rss"] for x in v) / 2**20} for s, v in results.items()}
    summary["ratio_per_round"] = ratios
    if "tunelab-unmerged" in results:
        summary["merged_over_unmerged_per_round"] = [
            m["prompts_per_s"] / u["prompts_per_s"] for m, u in zip(results["tunelab"], results["tunelab-unmerged"])]
    for system in ("tunelab", "tunelab-unmerged"):
        if system in results:
            summary[f"{system}_generation_share"] = statistics.median(x["generation_share"] for x in results[system])
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
