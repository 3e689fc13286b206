"""Causal language-model loss shared by sft and pt (and later by methods with an SFT term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def trained_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions whose next token is trained: labels are shifted by one inside the loss."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_logprob_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over trained positions (fp32 for a stable log-softmax)."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )


def causal_lm_loss(model, batch: dict[str, torch.Tensor]):
    from tunelab.methods.base import LossOutput

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return LossOutput(loss_sum=token_logprob_sum(out.logits, batch["labels"]))
