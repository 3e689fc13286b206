"""`tunelab score`: rewards from a trained reward model (method rm) for answers to a prompt.

Each (prompt, answer) is rendered with the chat template the model was trained with, exactly as rm training renders
a pair's sequence (the answer as the last assistant turn), and scored at its last token.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import UserError


def load_reward_model(model: str, adapter: str | None = None, *, allow_pickle: bool = False,
                      trust_remote_code: bool = False):
    """(reward model, tokenizer): a score-head model folder, or a base model plus a peft SEQ_CLS adapter from rm.
    `allow_pickle` / `trust_remote_code`: the opt-ins of `--allow-pickle` / `--trust-remote-code`."""
    import json

    import torch

    from tunelab.config.schema import ModelConfig
    from tunelab.infer.loading import tokenizer_source
    from tunelab.models.adapters import quiet_peft_warnings
    from tunelab.models.load import (
        CLI_KEYS,
        check_model_path,
        check_weights_format,
        load_model,
        load_tokenizer,
    )
    from tunelab.utils.env import quiet_transformers

    check_model_path(model, "--model")
    check_weights_format(model, allow_pickle=allow_pickle, what="--model", opt_in=CLI_KEYS.allow_pickle)

    if adapter is not None:
        conf = Path(adapter) / "adapter_config.json"
        if not conf.exists():
            raise UserError(f"--adapter: {adapter} has no adapter_config.json; is it an rm run's final/ folder?")
        if json.loads(conf.read_text()).get("task_type") != "SEQ_CLS":
            raise UserError(f"--adapter: {adapter} is not a reward-model adapter (trained with method.type rm)")
        check_weights_format(adapter, allow_pickle=allow_pickle, what="--adapter", opt_in=CLI_KEYS.allow_pickle)
    cfg = ModelConfig(path=model, tokenizer=tokenizer_source(model, adapter), allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(cfg, keys=CLI_KEYS)
    if adapter is None:
        from transformers import AutoConfig

        archs = getattr(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), "architectures",
                        None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise UserError(f"--model: {model} is not a reward model (no score head); give the base model and "
                            "--adapter for a LoRA reward model, or an rm run's final/ folder")
    with quiet_transformers():
        base = load_model(cfg, dtype=torch.float32, head="score", pad_token_id=tokenizer.pad_token_id, keys=CLI_KEYS)
    if adapter is not None:
        from peft import PeftModel

        with quiet_peft_warnings():
            base = PeftModel.from_pretrained(base, adapter)
    return base.eval(), tokenizer


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
