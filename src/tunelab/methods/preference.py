"""Preference optimisation on chosen/rejected pairs (dpo, orpo, simpo, cpo) and on labelled answers (kto).

Each method scores both answers of a pair in one forward pass: the batch holds the chosen sequences first and the
rejected ones second (data.collate.collate_pairs; packed padding-free by collate_pairs_packed, where sequence ids
keep them apart), and `sequence_logprobs` gives every sequence's summed log-probability of its answer through the
same trained-positions-only path as sft. The losses are the pure
functions of methods/preference_losses.py, per pair; a method returns their sum and its unit (`weight`) is the
pair, so the loop normalises by the pairs of the whole global batch like it normalises sft by tokens.

DPO and KTO need the reference policy's log-probabilities of the same sequences: they ask for a frozen "reference"
model (`reference_model`: the policy with its adapter disabled, or a frozen copy, per method.reference) and
`setup_reference` turns it into `StepContext.reference`. DPO's `precompute_reference` scores every pair once before
training (`precompute_reference`) and keeps the numbers on the rows, so the copy is let go before the first step.

Metrics, each summed over pairs (the loop logs their per-pair mean): rewards/chosen, rewards/rejected,
rewards/margin, rewards/accuracy (the share of pairs whose chosen reward is higher), logps/chosen and
logps/rejected (summed log-probabilities of the answers under the policy).
"""

from __future__ import annotations

import time

import torch

from tunelab.errors import UserError
from tunelab.methods.base import ExtraModel, LossOutput, Method, SetupContext, StepContext
from tunelab.methods.lm import sequence_logprobs
from tunelab.methods.preference_losses import (
    cpo_loss,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    nll_term,
    orpo_loss,
    simpo_loss,
)
from tunelab.models.adapters import ADAPTERS
from tunelab.models.wrappers import unwrap
from tunelab.utils.numerics import at_least_fp32


def pairs_in(batch: dict[str, torch.Tensor]) -> int:
    """The unit of preference losses: pairs (half the sequences of a pair batch, packed or not)."""
    if "num_sequences" in batch:
        return int(batch["num_sequences"]) // 2
    return int(batch["input_ids"].shape[0]) // 2


def _split(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = values.shape[0] // 2
    return values[:n], values[n:]


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict[str, torch.Tensor]:
    c, r = at_least_fp32(chosen_rewards.detach()), at_least_fp32(rejected_rewards.detach())
    return {
        "rewards/chosen": c.sum(),
        "rewards/rejected": r.sum(),
        "rewards/margin": (c - r).sum(),
        "rewards/accuracy": (c > r).float().sum(),
        "logps/chosen": at_least_fp32(chosen_logps.detach()).sum(),
        "logps/rejected": at_least_fp32(rejected_logps.detach()).sum(),
    }


def _policy(model, batch, ctx: StepContext):
    sums, counts = sequence_logprobs(model, batch, ctx)
    (pc, pr), (nc, nr) = _split(sums), _split(counts)
    return pc, pr, nc, nr


# ------------------------------------------------------------------------------------------------- reference
def reference_model(cfg) -> dict[str, ExtraModel]:
    """The reference policy per method.reference: adapter_off (auto with a peft adapter) or a frozen copy; and for
    DPO with precompute_reference, only before training."""
    mode = cfg.method.reference
    disables = ADAPTERS[cfg.adapter.type].disables
    if mode == "auto":
        mode = "adapter_off" if disables else "copy"
    if mode == "adapter_off" and not disables:
        raise UserError(f"method.reference: adapter_off needs a peft adapter, and adapter.type {cfg.adapter.type} "
                        "is not one; use method.reference=copy")
    before_only = bool(getattr(cfg.method, "precompute_reference", False))
    return {"reference": ExtraModel(source=mode, during_training=not before_only)}


def setup_reference(ctx: SetupContext) -> None:
    """StepContext.reference: batch -> each sequence's summed log-probability of its trained tokens under the
    frozen reference model."""
    frozen = ctx.models["reference"]
    step = ctx.step

    def score(batch):
        with frozen() as model:
            return sequence_logprobs(model, batch, step)[0]

    step.reference = score


def _dpo_setup(ctx: SetupContext) -> None:
    if ctx.config.precompute_reference and ctx.streaming:
        raise UserError("method.precompute_reference: needs the whole dataset; not available with data.streaming")
    setup_reference(ctx)


def _precomputed(batch):
    return batch["ref_logps"]


def precompute_reference(ctx: SetupContext, splits: list[list]) -> None:
    """With method.precompute_reference: every pair's reference log-probabilities (chosen, rejected), computed
    once and stored on the row (``values["ref_logps"]``); the reference model is let go afterwards."""
    if not ctx.config.precompute_reference:
        return
    t0 = time.perf_counter()
    n = 0
    for rows in splits:
        for chunk, batch in ctx.batches(rows):
            values = ctx.step.reference(batch).tolist()
            for i, row in enumerate(chunk):
                row.values["ref_logps"] = (values[i], values[len(chunk) + i])
            n += len(chunk)
    ctx.step.reference = _precomputed  # no reference forward passes during training
    ctx.say(f"reference: log-probabilities of {n} pairs precomputed in {time.perf_counter() - t0:.1f} s")


# ------------------------------------------------------------------------------------------------------- losses
def dpo(model, batch, ctx: StepContext) -> LossOutput:
    cfg = ctx.config
    if ctx.reference is None:
        raise RuntimeError("dpo needs a reference policy (StepContext.reference); its setup provides it")
    pc, pr, nc, nr = _policy(model, batch, ctx)
    with torch.no_grad():
        rc, rr = _split(ctx.reference(batch).to(pc.dtype))
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
        chosen_tokens=nc, rejected_tokens=nr)
    if cfg.sft_weight:
        losses = losses + cfg.sft_weight * nll_term(pc, nc)
    return LossOutput(losses.sum(), _metrics(chosen_rewards, rejected_rewards, pc, pr))


def orpo(model, batch, ctx: StepContext) -> LossOutput:
    pc, pr, nc, nr = _policy(model, batch, ctx)
    losses, or_term, chosen_rewards, rejected_rewards = orpo_loss(pc, pr, nc, nr, beta=ctx.config.beta)
    metrics = _metrics(chosen_rewards, rejected_rewards, pc, pr)
    metrics["odds_ratio_loss"] = at_least_fp32(or_term.detach()).sum()
    return LossOutput(losses.sum(), metrics)


def simpo(model, batch, ctx: StepContext) -> LossOutput:
    cfg = ctx.config
    pc, pr, nc, nr = _policy(model, batch, ctx)
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        pc, pr, nc, nr, beta=cfg.beta, gamma=cfg.gamma, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing)
    return LossOutput(losses.sum(), _metrics(chosen_rewards, rejected_rewards, pc, pr))


def cpo(model, batch, ctx: StepContext) -> LossOutput:
    cfg = ctx.config
    pc, pr, nc, nr = _policy(model, batch, ctx)
    losses, chosen_rewards, rejected_rewards = cpo_loss(
        pc, pr, beta=cfg.beta, loss_type=cfg.loss, label_smoothing=cfg.label_smoothing,
        chosen_nll=nll_term(pc, nc), cpo_alpha=cfg.alpha, chosen_tokens=nc, rejected_tokens=nr)
    return LossOutput(losses.sum(), _metrics(chosen_rewards, rejected_rewards, pc, pr))


def rows_in(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["input_ids"].shape[0])


def kto(model, batch, ctx: StepContext) -> LossOutput:
    """KTO: each row's reward beta (pi - ref) against the reference point z0, a KL estimate from the batch's
    mismatched prompt/answer pairs (collate_kto), computed without gradients as in TRL. z0 is estimated per
    micro-batch, so like TRL's it depends on the micro-batch size.

    Metrics (summed over rows): kl (z0), rewards/signed (the reward, negated for undesirable rows: it grows as the
    model separates them), rewards/accuracy (rows whose reward has the sign of their label), logps."""
    cfg = ctx.config
    if ctx.reference is None:
        raise RuntimeError("kto needs a reference policy (StepContext.reference); its setup provides it")
    logps, _ = sequence_logprobs(model, batch, ctx)
    kl_batch = {"input_ids": batch["kl_input_ids"], "attention_mask": batch["kl_attention_mask"],
                "labels": batch["kl_labels"]}
    with torch.no_grad():
        ref = ctx.reference(batch)
        policy_kl, _ = sequence_logprobs(unwrap(model), kl_batch, ctx)
        ref_kl = ctx.reference(kl_batch)
    z0 = kto_kl_estimate(policy_kl, ref_kl)
    desirable = batch["desirable"]
    losses, rewards = kto_loss(logps, ref, desirable, z0, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                               undesirable_weight=cfg.undesirable_weight)
    sign = desirable.float() * 2 - 1
    n = logps.shape[0]
    metrics = {"kl": z0 * n, "rewards/signed": (rewards * sign).sum(),
               "rewards/accuracy": ((rewards * sign) > 0).float().sum(),
               "logps": at_least_fp32(logps.detach()).sum()}
    return LossOutput(losses.sum(), metrics)


# margin and accuracy of the implicit rewards: how far, and how often, chosen answers are ranked above rejected ones
PAIR_PROGRESS = (("rewards/margin", "margin"), ("rewards/accuracy", "acc"))

DPO = Method(name="dpo", data_kind="pairs", loss=dpo, weight=pairs_in, models=reference_model, setup=_dpo_setup,
             prepare_rows=precompute_reference, progress=PAIR_PROGRESS,
             describe="Direct preference optimisation against a frozen reference policy.")
KTO = Method(name="kto", data_kind="kto", loss=kto, weight=rows_in, models=reference_model, setup=setup_reference,
             progress=(("rewards/accuracy", "acc"), ("kl", "kl")),
             describe="Kahneman-Tversky optimisation on answers labelled desirable or undesirable.")
ORPO = Method(name="orpo", data_kind="pairs", loss=orpo, weight=pairs_in, progress=PAIR_PROGRESS,
              describe="Odds-ratio preference optimisation: NLL on chosen plus an odds-ratio term.")
SIMPO = Method(name="simpo", data_kind="pairs", loss=simpo, weight=pairs_in, progress=PAIR_PROGRESS,
               describe="Length-normalised preference optimisation with a target margin, no reference.")
CPO = Method(name="cpo", data_kind="pairs", loss=cpo, weight=pairs_in, progress=PAIR_PROGRESS,
             describe="Contrastive preference optimisation: DPO-style loss without a reference plus NLL on chosen.")
