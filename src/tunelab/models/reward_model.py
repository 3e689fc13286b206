"""Reward models trained with method rm, loaded for scoring (`tunelab score`, and rewards of online RL methods).

A reward model is a score-head model folder (an rm run's final/ folder after full or freeze training, or any
*ForSequenceClassification with one label), or a base model plus a peft SEQ_CLS adapter (an rm run with LoRA).
Each (conversation, answer) is rendered with the chat template the model was trained with, exactly as rm training
renders a pair's sequence (the answer as the last assistant turn), and scored at its last token.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.errors import UserError


def tokenizer_source(model: str, adapter: str | None) -> str:
    """A training run saves the tokenizer and its chat template next to the adapter; prefer that copy."""
    if adapter and (Path(adapter) / "tokenizer_config.json").exists():
        return adapter
    return model


def load_reward_model(model: str, adapter: str | None = None, *, allow_pickle: bool = False,
                      trust_remote_code: bool = False, model_key: str = "--model", adapter_key: str = "--adapter"):
    """(reward model in eval mode, tokenizer). `model_key`/`adapter_key` name the options in messages (the CLI's
    flags, or a config's keys). `allow_pickle` / `trust_remote_code`: the opt-ins."""
    import torch

    from tunelab.config.schema import ModelConfig
    from tunelab.models.adapters import quiet_peft_warnings
    from tunelab.models.load import (
        CLI_KEYS,
        check_model_path,
        check_weights_format,
        load_model,
        load_tokenizer,
    )
    from tunelab.utils.env import quiet_transformers

    check_model_path(model, model_key)
    check_weights_format(model, allow_pickle=allow_pickle, what=model_key, opt_in=CLI_KEYS.allow_pickle)
    if adapter:
        conf = Path(adapter) / "adapter_config.json"
        if not conf.exists():
            raise UserError(f"{adapter_key}: {adapter} has no adapter_config.json; is it an rm run's final/ folder?")
        if json.loads(conf.read_text()).get("task_type") != "SEQ_CLS":
            raise UserError(f"{adapter_key}: {adapter} is not a reward-model adapter (trained with method.type rm)")
        check_weights_format(adapter, allow_pickle=allow_pickle, what=adapter_key, opt_in=CLI_KEYS.allow_pickle)
    cfg = ModelConfig(path=model, tokenizer=tokenizer_source(model, adapter), allow_pickle=allow_pickle,
                      trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(cfg, keys=CLI_KEYS)
    if not adapter:
        from transformers import AutoConfig

        archs = getattr(AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code), "architectures",
                        None) or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise UserError(f"{model_key}: {model} is not a reward model (no score head); give the base model and "
                            f"{adapter_key} for a LoRA reward model, or an rm run's final/ folder")
    with quiet_transformers():
        base = load_model(cfg, dtype=torch.float32, head="score", pad_token_id=tokenizer.pad_token_id, keys=CLI_KEYS)
    if adapter:
        from peft import PeftModel

        with quiet_peft_warnings():
            base = PeftModel.from_pretrained(base, adapter)
    base.requires_grad_(False)
    return base.eval(), tokenizer


def score_conversations(model, tokenizer, template, conversations: list[list[dict]], *, batch_size: int = 16,
                        device=None) -> list[float]:
    """The reward of each conversation's last (assistant) turn, scored in padded batches of `batch_size`."""
    import torch

    from tunelab.data.collate import pad_collate
    from tunelab.data.conversation import Conversation
    from tunelab.data.tokenize import encode_conversation

    rows = [encode_conversation(Conversation(messages=m), tokenizer, template, max_length=10**9)
            for m in conversations]
    scores: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = pad_collate(rows[start:start + batch_size], tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"].to(device or "cpu"),
                           attention_mask=batch["attention_mask"].to(device or "cpu")).logits
        scores += logits[:, 0].float().tolist()
    return scores
