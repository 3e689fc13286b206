"""`make quickstart`: the whole path on an embedded default, offline, in a few minutes on a CPU.

Builds a tiny model, shows its answer before training, LoRA-fine-tunes it on a small bundled dataset, shows the
answer after, exports the merged model and answers a prompt with the exported folder. Exits non-zero if the loss did
not fall clearly: the quickstart is also the smoke test of the whole pipeline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path.cwd()
MODEL_DIR = ROOT / "models" / "tiny-llama"
CONFIG = ROOT / "examples" / "quickstart.yaml"
PROMPT = "What is the capital of France?"


def main(overrides: list[str] | None = None, required_drop: float = 0.5) -> int:
    """The quickstart; `overrides` (section.key=value) change the training config, and the run fails unless the
    loss falls by at least `required_drop` of its first value (the tests use a short run and a lower bar)."""
    from transformers.utils import logging as hf_logging

    import tunelab
    from tunelab.engine.metrics import read_metrics

    hf_logging.disable_progress_bar()  # keep the quickstart's output readable

    t0 = time.time()
    if not (MODEL_DIR / "config.json").exists():
        print(f"[1/5] building a tiny Llama model and tokenizer in {MODEL_DIR}")
        tunelab.init_model("tiny-llama", MODEL_DIR, hidden=256, layers=4, heads=4, vocab=8000)
    else:
        print(f"[1/5] using the tiny model in {MODEL_DIR}")
    before = tunelab.generate(str(MODEL_DIR), PROMPT, max_new_tokens=24)
    print(f"[2/5] before training, Q: {PROMPT}\n      A: {before!r}")

    print(f"[3/5] fine-tuning with LoRA: tunelab train {CONFIG.relative_to(ROOT)}")
    result = tunelab.train(CONFIG, list(overrides or []))
    records = [r for r in read_metrics(result.output_dir) if r.get("loss") is not None]
    first, last = records[0]["loss"], records[-1]["loss"]
    print(f"      loss {first:.3f} -> {last:.3f} over {result.steps} steps; curve: {result.output_dir / 'loss.png'}")
    after = tunelab.generate(str(MODEL_DIR), PROMPT, adapter=str(result.final_dir), max_new_tokens=24)
    print(f"[4/5] after training,  Q: {PROMPT}\n      A: {after!r}")

    exported = tunelab.export(run=result.output_dir, out=result.output_dir / "exported")
    answer = tunelab.generate(str(exported), "Who are you?", max_new_tokens=24)
    print(f"[5/5] exported merged model to {exported}\n      tunelab chat --model {exported} --prompt 'Who are you?'"
          f"\n      A: {answer!r}")
    print(f"done in {time.time() - t0:.0f}s")
    if not last < (1 - required_drop) * first:
        print(f"error: the loss did not fall clearly ({first:.3f} -> {last:.3f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
