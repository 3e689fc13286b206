"""A method with a rollout, as a module outside tunelab: best-of-n rejection-sampling fine-tuning.

Each step the policy samples `samples` answers to every prompt of the global batch, a reward scores them against the
row's other columns, and the best answer of each prompt becomes an ordinary SFT row (prompt masked, answer trained).
This is the simplest online method (expert iteration / RAFT / ReST's inner loop): the model generates, a reward
judges, the policy improves.

What it uses of the method contract (tunelab/methods/base.py):
- `data_kind="prompts"`: rows are prompts with their other columns (`EncodedPrompt.extra`: here `answer`);
- `rollout`: called with the global batch of prompts before it is split into micro-batches, it returns the rows that
  train (`rollout_kind="chat"`: `Encoded` rows batched as SFT rows are), so the loss weight (trained tokens) is
  counted on the generated answers;
- `loss` / `weight`: tunelab's SFT loss on those rows.

Use it from Python:

    import tunelab
    from examples.methods import best_of_n   # or copy this file into your project

    best_of_n.register()
    tunelab.train({"model": {"path": "model"}, "method": {"type": "best_of_n_example", "samples": 4},
                   "data": {"train": [{"path": "prompts.jsonl", "format": "alpaca"}]}, "output": {"dir": "runs/bon"}})

where each row of prompts.jsonl is an instruction with an ``answer`` column the reward compares against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tunelab.config.schema import MethodBase, opt
from tunelab.data.kinds import PROMPTS
from tunelab.data.tokenize import IGNORE_INDEX, Encoded
from tunelab.errors import ConfigError
from tunelab.methods import register_method
from tunelab.methods.base import Method, StepContext
from tunelab.methods.lm import causal_lm_loss, trained_tokens

NAME = "best_of_n_example"


@dataclass
class BestOfNConfig(MethodBase):
    """Sample answers, keep the best one per prompt by a reward, fine-tune on it."""

    type: str = opt(NAME, "The training method.")
    samples: int = opt(4, "Answers sampled per prompt.")
    max_new_tokens: int = opt(16, "Longest answer sampled.")
    temperature: float = opt(1.0, "Sampling temperature.")

    def validate(self, prefix: str) -> None:
        if self.samples < 1 or self.max_new_tokens < 1 or self.temperature <= 0:
            raise ConfigError(f"{prefix}: samples and max_new_tokens must be >= 1 and temperature positive")


def reward(answer: str, columns: dict) -> float:
    """The share of the words of the row's ``answer`` column that the sampled answer contains."""
    wanted = str(columns.get("answer", "")).lower().split()
    said = set(answer.lower().split())
    return sum(w in said for w in wanted) / len(wanted) if wanted else 0.0


def _answer_ids(ids: list[int], stop: set[int], pad: int) -> list[int]:
    """A sampled answer up to and including its first stop token (the answer ends there, as at inference)."""
    out = []
    for i in ids:
        out.append(i)
        if i in stop:
            break
    while len(out) > 1 and out[-1] == pad and pad not in stop:
        out.pop()
    return out


def rollout(model, rows: list, ctx: StepContext) -> list[Encoded]:
    cfg, tok = ctx.config, ctx.tokenizer
    stop = ctx.template.stop_token_ids(tok)
    batch = PROMPTS.batch(rows, "none", tok.pad_token_id, ctx.max_length)  # left-padded: answers start together
    inputs = {k: batch[k].to(ctx.device) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, temperature=cfg.temperature, top_k=0,
                             num_return_sequences=cfg.samples, max_new_tokens=cfg.max_new_tokens,
                             eos_token_id=stop, pad_token_id=tok.pad_token_id)
    answers = out[:, inputs["input_ids"].shape[1]:].tolist()
    trainable = []
    for i, row in enumerate(rows):
        sampled = [_answer_ids(answers[i * cfg.samples + j], set(stop), tok.pad_token_id) for j in range(cfg.samples)]
        best = max(sampled, key=lambda ids: reward(tok.decode(ids, skip_special_tokens=True), row.extra))
        ids = (row.prompt_ids + best)[:ctx.max_length]
        labels = ([IGNORE_INDEX] * len(row.prompt_ids) + best)[:ctx.max_length]
        trainable.append(Encoded(ids, labels, len(row.prompt_ids) + len(best) > ctx.max_length, row.source))
    return trainable


METHOD = Method(name=NAME, data_kind="prompts", rollout=rollout, rollout_kind="chat", loss=causal_lm_loss,
                weight=trained_tokens, describe="Best-of-n rejection sampling: fine-tune on the best sampled answer.")


def register() -> None:
    register_method(METHOD, BestOfNConfig, replace=True)
