"""GRPO throughput and memory: tunelab against TRL 1.16's GRPOTrainer on the same workload, interleaved.

Workload (both systems): the benchmark's tiny-7m model (benchmarks/make_workload.py), 64 arithmetic prompts
(examples/data/rl_prompts.json), 2 prompts per step x 8 completions per prompt, 128 new tokens, temperature 1, top-k
and top-p off, LoRA r 8 / alpha 16 on every linear layer of the decoder, fp32, the dapo loss, beta 0 (no
reference), lr 1e-5, one reward function (examples/rewards.py:correct). The random model never stops early, so both
sample all 128 tokens of every completion. Each run is a fresh process; rounds alternate tunelab and TRL.

Measured: prompts per second over the steps after the warm-up (wall time of those optimizer steps, generation
included), the share of a step spent generating (tunelab's rollout_s / step; TRL does not split it), and the
process's peak RSS (VmHWM, model loading included).

Usage: python benchmarks/grpo.py [--rounds 2 --steps 6 --warmup 2 --json OUT.json]   (from the repository root)
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
MODEL = ROOT / "benchmarks" / "models" / "tiny-7m"
PROMPTS = ROOT / "examples" / "data" / "rl_prompts.json"
PER_STEP, GROUP, NEW_TOKENS = 2, 8, 128


def peak_rss() -> int:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_tunelab(steps: int, warmup: int, out: str) -> dict:
    import tunelab

    cfg = {
        "model": {"path": str(MODEL)},
        "data": {"train": [{"path": str(PROMPTS), "format": "alpaca"}], "max_length": 256, "cache": False},
        "adapter": {"type": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "method": {"type": "grpo", "num_generations": GROUP, "max_new_tokens": NEW_TOKENS, "temperature": 1.0,
                   "loss": "dapo", "rewards": [{"file": str(ROOT / "examples" / "rewards.py"), "function": "correct"}]},
        "train": {"batch_size": PER_STEP, "grad_accum": 1, "lr": 1e-5, "max_steps": warmup + steps, "log_every": 1,
                  "save_every": 0, "precision": "fp32"},
        "output": {"dir": out, "plot": False},
    }
    tunelab.train(cfg, echo=False)
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl", encoding="utf-8")]
    measured = records[warmup:]
    seconds = records[-1]["elapsed"] - records[warmup - 1]["elapsed"]
    rollout = sum(r["rollout_s"] for r in measured)
    return {"prompts_per_s": PER_STEP * steps / seconds, "step_s": seconds / steps,
            "generation_share": rollout / seconds, "peak_rss": peak_rss()}


def run_trl(steps: int, warmup: int, out: str) -> dict:
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

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    args = GRPOConfig(output_dir=out, use_cpu=True, bf16=False, per_device_train_batch_size=PER_STEP * GROUP,
                      gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=NEW_TOKENS,
                      temperature=1.0, top_k=0, top_p=1.0, loss_type="dapo", beta=0.0, learning_rate=1e-5,
                      max_steps=warmup + steps, logging_steps=1, save_strategy="no", report_to=[],
                      dataloader_num_workers=0, seed=42)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = GRPOTrainer(model=model, reward_funcs=[correct], args=args, train_dataset=data,
                          processing_class=tok, peft_config=lora, callbacks=[Timer()])
    trainer.train()
    seconds = sum(times[warmup:])
    return {"prompts_per_s": PER_STEP * steps / seconds, "step_s": seconds / steps, "generation_share": None,
            "peak_rss": peak_rss()}


def child(system: str, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"grpo-bench-{system}-") as tmp:
        out = str(Path(tmp) / "out")
        return run_tunelab(steps, warmup, out) if system == "tunelab" else run_trl(steps, warmup, out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="")
    p.add_argument("--child", choices=["tunelab", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("@@result " + json.dumps(child(a.child, a.steps, a.warmup)))
        return 0
    if not MODEL.exists():
        print(f"{MODEL} is missing: run python benchmarks/make_workload.py first", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, list[dict]] = {"tunelab": [], "trl": []}
    for r in range(a.rounds):
        for system in ("tunelab", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--child", system, "--steps", str(a.steps),
                                   "--warmup", str(a.warmup)], cwd=ROOT, env=env, capture_output=True, text=True)
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
    share = [x["generation_share"] for x in results["tunelab"]]
    summary["tunelab_generation_share"] = statistics.median(share)
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps({"rounds": results, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
