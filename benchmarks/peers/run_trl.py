"""Benchmark TRL's SFTTrainer on the standard workload (run with the TRL virtualenv's python).

The same model folder, data, LoRA (r 8, alpha 16, dropout 0, all linear layers), batch 8, rows of at most 512 tokens,
fp32 and no gradient checkpointing as tunelab's benchmark configs. The alpaca rows become conversational
prompt-completion rows (user: instruction + "\\n" + input, assistant: output), so TRL trains on completions only and
renders them with the model's own chat template, as tunelab does. `padding_free=True` (the default mode here)
concatenates each micro-batch into one row with restarting position ids; `--mode padded` pads instead.

TRL refuses `max_length` with padding-free batches without packing (it would not be enforced), so max_length is
None there; every row of the workload is under 512 tokens, so nothing would be truncated anyway.

Measurement: a ThroughputCallback (peer_common.py) counts the real tokens of the batches the model receives and
times every step; dataset preparation and model loading happen before training starts and are not measured.
Usage: python run_trl.py --model DIR --data FILE [--steps 60 --warmup 3 --json OUT.json]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peer_common import ThroughputCallback, versions, workload_args, write_result  # noqa: E402


def load_rows(path: str) -> list[dict]:
    """Alpaca rows as conversational prompt-completion rows (the user turn joins instruction and input)."""
    with open(path, encoding="utf-8") as f:
        rows = json.load(f)
    out = []
    for r in rows:
        user = "\n".join(part for part in (r["instruction"], r.get("input", "")) if part)
        out.append({"prompt": [{"role": "user", "content": user}],
                    "completion": [{"role": "assistant", "content": r["output"]}]})
    return out


def main(argv: list[str] | None = None) -> int:
    args = workload_args(__doc__.splitlines()[0], ["padding_free", "padded"], argv)

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    padding_free = args.mode == "padding_free"
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    dataset = Dataset.from_list(load_rows(args.data))
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as out:
        config = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps,
            learning_rate=2e-4,
            lr_scheduler_type="cosine",
            max_length=None if padding_free else args.max_length,
            padding_free=padding_free,
            completion_only_loss=True,
            gradient_checkpointing=False,  # TRL's default is on
            bf16=False,  # TRL's default is on
            fp16=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
            seed=args.seed,
        )
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        callback = ThroughputCallback()
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[callback])
        trainer.train()
    write_result(args.json, f"trl-{args.mode}", args.warmup, callback.records,
                 {"versions": versions("trl", "transformers", "peft", "torch", "accelerate", "datasets"),
                  "options": {"padding_free": padding_free, "batch_size": args.batch_size,
                              "max_length": config.max_length, "gradient_checkpointing": False}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
