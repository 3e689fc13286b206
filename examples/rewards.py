"""Reward functions for examples/grpo_lora.yaml, examples/rloo_lora.yaml and examples/ppo_lora.yaml (docs/rl.md).

Each is called with TRL GRPOTrainer's keyword arguments: prompts, completions ([{"role": "assistant", "content":
TEXT}] each), completion_ids, every other column of the prompt rows (here `answer`) and trainer_state; it returns one
number per completion, or None for no opinion.
"""

import re


def correct(prompts, completions, completion_ids, answer, **kwargs):
    """1 when the last number in the answer is the right sum, else 0."""
    out = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", completion[0]["content"])
        out.append(1.0 if numbers and numbers[-1] == str(expected) else 0.0)
    return out


def brief(prompts, completions, completion_ids, **kwargs):
    """A small bonus for answering in a few tokens: 1 at one token, falling to 0 at 16."""
    return [max(0.0, 1.0 - (len(ids) - 1) / 15) for ids in completion_ids]
