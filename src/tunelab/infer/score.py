"""`tunelab score`: rewards from a trained reward model (method rm) for answers to a prompt.

Each (prompt, answer) is rendered with the chat template the model was trained with, exactly as rm training renders
a pair's sequence (the answer as the last assistant turn), and scored at its last token.
"""

from __future__ import annotations


def load_reward_model(model: str, adapter: str | None = None, *, allow_pickle: bool = False,
                      trust_remote_code: bool = False):
    """(reward model, tokenizer): a score-head model folder, or a base model plus a peft SEQ_CLS adapter from rm
    (models/reward_model.py). `allow_pickle` / `trust_remote_code`: the opt-ins of `--allow-pickle` /
    `--trust-remote-code`."""
    from tunelab.models.reward_model import load_reward_model as load

    return load(model, adapter, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)


def score_answers(model, tokenizer, template, prompt: str, answers: list[str], system: str | None = None) -> list[float]:
    """The reward of each answer to `prompt`, in order."""
    import torch

    from tunelab.data.conversation import Conversation
    from tunelab.data.tokenize import encode_conversation

    scores = []
    for answer in answers:
        conv = Conversation(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
        enc = encode_conversation(conv, tokenizer, template, max_length=10**9, system=system)
        ids = torch.tensor([enc.input_ids])
        with torch.no_grad():
            scores.append(float(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0]))
    return scores


def run_score(*, model: str, adapter: str | None, prompt: str, answers: list[str], template: str = "auto",
              system: str | None = None, allow_pickle: bool = False, trust_remote_code: bool = False) -> list[float]:
    from tunelab.data.templates import resolve_template

    rm, tokenizer = load_reward_model(model, adapter, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    return score_answers(rm, tokenizer, resolve_template(template, tokenizer), prompt, answers, system)
