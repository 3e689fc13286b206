"""Reward modelling (rm): a scalar score head on the decoder, trained with the pairwise Bradley-Terry loss.

The model is the base model's decoder with a one-output score head in place of the LM head (transformers'
*ForSequenceClassification, loaded by the loop because this method asks for `head="score"`), so the result is a
standard reward-model folder (or a peft SEQ_CLS adapter that carries the trained head) that RL methods and other
tools load with AutoModelForSequenceClassification. A sequence's score is the head's output at its last real token.
Pairs come as one concatenated batch (chosen rows, then rejected rows), scored in one forward pass.

Metrics, summed over pairs: rewards/chosen, rewards/rejected, rewards/margin and rewards/accuracy (pairs whose chosen
answer scores higher: the eval accuracy of a reward model).
"""

from __future__ import annotations

import torch

from tunelab.data.collate import model_inputs
from tunelab.methods.base import LossOutput, Method, SetupContext, StepContext
from tunelab.methods.preference import pairs_in
from tunelab.methods.preference_losses import bradley_terry
from tunelab.models.adapters import is_peft
from tunelab.models.wrappers import core_model
from tunelab.utils.numerics import at_least_fp32


def reward_scores(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One scalar per row (fp32, float64 for a float64 model): the score head at the row's last real token (transformers pools right-padded
    rows by the pad id, which the loop sets on the model config)."""
    return at_least_fp32(model(**model_inputs(batch), use_cache=False).logits[:, 0])


def train_score_head(ctx: SetupContext) -> None:
    """The new score head always trains: peft's SEQ_CLS task marks it trainable; full/freeze need it done here."""
    if not is_peft(ctx.policy):
        for p in core_model(ctx.policy).score.parameters():
            p.requires_grad_(True)


def rm(model, batch, ctx: StepContext) -> LossOutput:
    cfg = ctx.config
    scores = reward_scores(model, batch)
    n = scores.shape[0] // 2
    chosen, rejected = scores[:n], scores[n:]
    margin = torch.full_like(chosen, cfg.margin) if cfg.margin else None
    losses = bradley_terry(chosen, rejected, margin, center_rewards_coefficient=cfg.center_rewards or None)
    c, r = chosen.detach(), rejected.detach()
    metrics = {"rewards/chosen": c.sum(), "rewards/rejected": r.sum(), "rewards/margin": (c - r).sum(),
               "rewards/accuracy": (c > r).float().sum()}
    return LossOutput(losses.sum(), metrics)


RM = Method(name="rm", data_kind="pairs", loss=rm, weight=pairs_in, head="score", setup=train_score_head,
            progress=(("rewards/margin", "margin"), ("rewards/accuracy", "acc")), describe="Reward model: a scalar score head trained so chosen answers score above rejected ones.")
