"""The reference: a bare PyTorch training loop over full 8 x 512 rows of the same model (tunelab's virtualenv).

What "the hardware can do for this model" means for the ">= 90 % of bare PyTorch" target: no data pipeline, no
padding, no masks, no framework. The workload's rows are rendered with the model's chat template and concatenated
into one token stream (ending each row with the end-of-text token), cut into rows of exactly 512 tokens; every step
trains 8 of them (4,096 real tokens) with LoRA (r 8, alpha 16, dropout 0, all linear layers, through peft), fp32,
the model's own loss over every position (`labels=input_ids`: full logits, the plain way) and AdamW.

Each step is timed from the batch slice to the optimizer's zero_grad; the records (cumulative tokens and seconds per
step) are summarised by tunelab.engine.bench.summarize_steps, like tunelab's own benchmark.
Usage: python benchmarks/bare_pytorch.py --model DIR --data FILE [--steps 60 --warmup 3 --json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from tunelab.engine.bench import peak_rss_bytes, summarize_steps


def token_rows(model_dir: str, data: str, length: int) -> torch.Tensor:
    """The workload as one token stream cut into rows of `length` tokens: [rows, length]."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    stream: list[int] = []
    for r in json.loads(Path(data).read_text(encoding="utf-8")):
        user = "\n".join(part for part in (r["instruction"], r.get("input", "")) if part)
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]
        text = tok.apply_chat_template(messages, tokenize=False)
        stream += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = len(stream) // length
    return torch.tensor(stream[: n * length], dtype=torch.long).view(n, length)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=60, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    rows = token_rows(args.model, args.data, args.length)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    order = torch.randperm(len(rows))

    records = []
    tokens = elapsed = 0.0
    for step in range(1, args.warmup + args.steps + 1):
        t0 = time.perf_counter()
        start = ((step - 1) * args.batch_size) % (len(rows) - args.batch_size + 1)
        batch = rows[order[start:start + args.batch_size]]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed += time.perf_counter() - t0
        tokens += batch.numel()
        records.append({"step": step, "tokens": int(tokens), "positions": int(tokens), "elapsed": elapsed,
                        "sequences": step * args.batch_size, "loss": float(loss)})

    summary = summarize_steps(records, args.warmup)
    import peft
    import transformers

    result = {"system": "bare-pytorch", "warmup": args.warmup, "records": records, "summary": summary,
              "peak_rss_bytes": peak_rss_bytes(), "row_length": args.length,
              "versions": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "peft": peft.__version__}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"bare-pytorch: {summary['tokens_per_s']:,.0f} tokens/s after {args.warmup} warm-up steps, median step "
          f"{summary['median_step_s']:.3f} s, peak RSS {result['peak_rss_bytes'] / 2**20:,.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
