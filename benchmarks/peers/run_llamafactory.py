"""Benchmark LLaMA-Factory on the standard workload (run with the LLaMA-Factory virtualenv's python).

Writes a dataset_info.json registering the workload file (alpaca columns) and the training arguments LLaMA-Factory
reads from its YAML: the same model folder, LoRA rank 8 / alpha 16 / dropout 0 on all linear layers
(`lora_target: all`), the chatml template (the tiny models' own), per-device batch 8, cutoff_len 512, fp32,
gradient checkpointing off (LLaMA-Factory turns it on unless `disable_gradient_checkpointing: true`), logging every
step. `--mode neat_packing` (the default) sets `neat_packing: true` and `packing: true`: rows are packed into
sequences of cutoff_len at preprocessing time, each attending only to itself; `--mode padded` pads rows instead.

It then calls `llamafactory.train.tuner.run_exp` with those arguments, which is exactly what
`llamafactory-cli train CONFIG.yaml` runs on a single device, adding a ThroughputCallback (peer_common.py) that counts
the real tokens of the batches the model receives and times every step. Tokenization and packing happen before
training starts and are not measured. The YAML is also written next to the result for reproduction by hand.
Usage: python run_llamafactory.py --model DIR --data FILE [--steps 60 --warmup 3 --json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peer_common import ThroughputCallback, versions, workload_args, write_result  # noqa: E402

DATASET = "tunelab_bench"


def lf_arguments(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """LLaMA-Factory's training arguments for the standard workload."""
    packing = args.mode == "neat_packing"
    return {
        "model_name_or_path": str(Path(args.model).resolve()),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "lora_target": "all",
        "dataset": DATASET,
        "dataset_dir": str(workdir),
        "template": "chatml",
        "cutoff_len": args.max_length,
        "packing": packing,
        "neat_packing": packing,
        "overwrite_cache": True,
        "output_dir": str(workdir / "output"),
        "overwrite_output_dir": True,
        "per_device_train_batch_size": args.batch_size,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2.0e-4,
        "lr_scheduler_type": "cosine",
        "max_steps": args.warmup + args.steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "plot_loss": False,
        "report_to": "none",
        "bf16": False,
        "fp16": False,
        "disable_gradient_checkpointing": True,
        "flash_attn": "sdpa",
        "dataloader_num_workers": 0,
        "seed": args.seed,
    }


def main(argv: list[str] | None = None) -> int:
    args = workload_args(__doc__.splitlines()[0], ["neat_packing", "padded"], argv)

    import yaml
    from llamafactory.train.tuner import run_exp

    with tempfile.TemporaryDirectory(prefix="bench-llamafactory-") as tmp:
        workdir = Path(tmp)
        info = {DATASET: {"file_name": str(Path(args.data).resolve()), "formatting": "alpaca",
                          "columns": {"prompt": "instruction", "query": "input", "response": "output"}}}
        (workdir / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        lf_args = lf_arguments(args, workdir)
        text = yaml.safe_dump(lf_args, sort_keys=False)
        if args.json:
            Path(args.json).with_suffix(".llamafactory.yaml").write_text(text, encoding="utf-8")
        callback = ThroughputCallback()
        run_exp(lf_args, callbacks=[callback])
    write_result(args.json, f"llamafactory-{args.mode}", args.warmup, callback.records,
                 {"versions": versions("llamafactory", "transformers", "peft", "torch", "accelerate", "datasets"),
                  "options": {k: lf_args[k] for k in ("packing", "neat_packing", "per_device_train_batch_size",
                                                      "cutoff_len", "disable_gradient_checkpointing", "template")}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
