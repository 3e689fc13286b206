"""PPO with a learned critic on the one loop (docs/rl.md).

Each step the rollout samples completions of this process's prompts with the policy (methods/grpo.py's sampling and
scoring), and in one pass without gradients per chunk of rows records, for every completion token, the sampling
policy's log-probability, the critic's value of the state before it and the KL estimate to the reference
(`kl_estimator`, skipped at kl_coef 0). The finish, over the whole global batch on every process, builds per-token
rewards (-kl_coef x KL at each token, plus the sequence's score at its last token; TRL's PPO), optionally whitens
them, runs GAE (`gamma`, `lam`) against the recorded values and whitens the advantages over every completion token
of the global batch (so 2 processes give what 1 does). The loss per token is the clipped surrogate on the token's
advantage plus vf_coef x the clipped value loss against the GAE return, summed over tokens; the loop divides by the
completion tokens of the global batch (TRL's masked mean over the batch).

The critic is either a linear value head on the policy's final hidden states (`critic: head`, the default: no second
model, the value loss also trains the policy's trainable weights, as TRL's old value-head models) or a separate
model with a scalar head (`critic: model`, TRL's value model; from `critic_path`, e.g. an rm run's final/, or the base
model with a new head), trained in full beside the policy. Either trains through the method contract's
`SetupContext.trained` (methods/base.py): optimizer, DDP, gradient clipping and checkpoints are the loop's.

A completion that every reward function abstains on (None) scores 0 here: PPO has no group to leave it out of.
"""

from __future__ import annotations

import math

import torch

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import UserError
from tunelab.methods.base import ExtraModel, LossOutput, Method, Rollout, SetupContext, StepContext
from tunelab.methods.grpo import (
    completion_rows,
    loss_units,
    no_grad_batches,
    per_token_in_order,
    rollout_merges,
    sample_and_score,
    sampled_metrics,
    store_per_token,
)
from tunelab.methods.lm import trained_logprobs, trained_values
from tunelab.methods.preference import reference_model
from tunelab.methods.rewards import build_rewards
from tunelab.methods.rl_losses import (
    clipped_surrogate,
    clipped_value_losses,
    gae,
    kl_penalty,
    token_rewards,
    whiten,
)
from tunelab.models.wrappers import core_model
from tunelab.utils.numerics import at_least_fp32

VALUE_HEAD, CRITIC = "value_head", "critic"


def _models(cfg) -> dict[str, ExtraModel]:
    m = cfg.method
    out = reference_model(cfg) if m.kl_coef > 0 else {}
    if m.critic == "model" and cfg.model.quantization != "none":
        raise UserError("method.critic: model trains a critic in full, which a quantized model "
                        f"(model.quantization {cfg.model.quantization}) cannot; use critic: head")
    if m.critic == "model":
        out[CRITIC] = ExtraModel(source="path" if m.critic_path else "copy", path=m.critic_path, trainable=True,
                                 head="score")
    return out


def _setup(ctx: SetupContext) -> None:
    cfg = ctx.config
    ctx.step.state["rewards"] = build_rewards(cfg.rewards, cfg.max_new_tokens, ctx.step.device)
    if "reference" in ctx.models:
        ctx.step.state["reference"] = ctx.models["reference"]
    if cfg.critic == "head":
        width = core_model(ctx.policy).get_output_embeddings().in_features
        # float32 at least (a half-precision policy's values in full precision), float64 for a float64 policy
        dtype = torch.float64 if next(ctx.policy.parameters()).dtype == torch.float64 else torch.float32
        head = torch.nn.Linear(width, 1, dtype=dtype)
        torch.nn.init.zeros_(head.weight)  # values start at 0: the first returns are the rewards themselves
        torch.nn.init.zeros_(head.bias)
        ctx.trained[VALUE_HEAD] = head
    # the raw modules, for passes without gradients (the DDP-wrapped ones in StepContext.trained are for the loss)
    ctx.step.state["critic"] = ctx.trained[VALUE_HEAD if cfg.critic == "head" else CRITIC]


def critic_token_values(critic, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A critic model's value at every trained position (the state before each completion token), [n] in the
    order of `trained_logprobs`: its scalar head's output at each position, captured inside its forward."""
    from tunelab.data.collate import model_inputs

    captured: list[torch.Tensor] = []
    handle = core_model(critic).score.register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        critic(**model_inputs(batch), use_cache=False)
    finally:
        handle.remove()
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return at_least_fp32(captured[-1][..., 0][keep])


def policy_and_values(model, batch, ctx: StepContext, critic, *, entropy: bool = False):
    """One pass of the policy (and the critic): per trained token its log-probability, entropy (when asked), the
    critic's value and the row it belongs to."""
    cfg = ctx.config
    if cfg.critic == "head":
        values, rows, states = trained_values(model, batch, ctx, entropy=entropy, hidden=True)
        dtype = next(critic.parameters()).dtype
        v = at_least_fp32(critic(states.to(dtype))[:, 0])
    else:
        values, rows = trained_values(model, batch, ctx, entropy=entropy)
        v = critic_token_values(critic, batch)
    return values[0], (values[1] if entropy else None), v.to(values.dtype), rows


def _rollout(model, rows: list, ctx: StepContext) -> Rollout:
    cfg = ctx.config
    sampled = sample_and_score(model, rows, ctx)
    out = completion_rows(rows, sampled, cfg, lambda k, trained: {
        "score": (0.0 if math.isnan(sampled.totals[k]) else sampled.totals[k],),
        "unit": (float(len(sampled.completions[k])) if trained else 0.0,)})
    critic, frozen = ctx.state["critic"], ctx.state.get("reference")
    modes = [(m, m.training) for m in (model, critic)]
    kl_sum = 0.0
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            for chunk, batch in no_grad_batches(out, ctx):
                logps, _, values, seq = policy_and_values(model, batch, ctx, critic)
                store_per_token(chunk, "old_logps_per_token", logps, seq)
                store_per_token(chunk, "old_values_per_token", values, seq)
                if frozen is not None:
                    with frozen() as ref_model:
                        ref_logps, _ = trained_logprobs(ref_model, batch, ctx)
                    kl = kl_penalty(logps, ref_logps, cfg.kl_estimator)
                    kl_sum += float(kl.sum())
                else:
                    kl = torch.zeros_like(logps)
                store_per_token(chunk, "kl_per_token", kl, seq)
    finally:
        for m, was in modes:
            m.train(was)
    metrics = sampled_metrics(ctx, sampled)
    # TRL's objective/kl: the KL summed over a completion's tokens, averaged over completions
    metrics["kl"] = (kl_sum, len(out))
    metrics["non_score_reward"] = (-cfg.kl_coef * kl_sum, len(out))
    return Rollout(out, metrics)


def _finish(rows: list, ctx: StepContext, limit: int, last: bool) -> list:
    """Per-token rewards, GAE and whitening over the whole rolled-out batch."""
    cfg = ctx.config
    scores = torch.tensor([r.values["score"][0] for r in rows], dtype=torch.float64)
    kls = [torch.tensor(r.values["kl_per_token"], dtype=torch.float64) for r in rows]
    values = [torch.tensor(r.values["old_values_per_token"], dtype=torch.float64) for r in rows]
    rewards = token_rewards(scores, kls, cfg.kl_coef)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, shift_mean=False)
    advantages, returns = gae(rewards, values, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages)
    for row, a, r in zip(rows, advantages, returns):
        row.values["advantages_per_token"] = tuple(a.tolist())
        row.values["returns_per_token"] = tuple(r.tolist())
    return rows


def ppo_loss(model, batch, ctx: StepContext) -> LossOutput:
    cfg = ctx.config
    # with gradients through the DDP-wrapped critic; without (evaluation) through the module itself
    critic = ctx.trained[VALUE_HEAD if cfg.critic == "head" else CRITIC] if torch.is_grad_enabled() \
        else ctx.state["critic"]
    logps, entropy, values, rows = policy_and_values(model, batch, ctx, critic, entropy=True)

    def stored(name):
        return per_token_in_order(batch, name, rows, logps)

    old_logps, advantages = stored("old_logps_per_token"), stored("advantages_per_token")
    log_ratio = logps - old_logps
    policy, clipped = clipped_surrogate(log_ratio, advantages, cfg.epsilon, cfg.epsilon_high or cfg.epsilon)
    value, value_clipped = clipped_value_losses(values, stored("old_values_per_token"),
                                                stored("returns_per_token"), cfg.value_clip)
    metrics = {"policy_loss": policy.detach().sum(), "value_loss": value.detach().sum(),
               "clip_ratio": clipped.to(logps.dtype).sum(), "value_clip_ratio": value_clipped.to(logps.dtype).sum(),
               "entropy": entropy.sum(), "approx_kl": (0.5 * log_ratio.detach() ** 2).sum()}
    return LossOutput(policy.sum() + cfg.vf_coef * value.sum(), metrics)


def _rollout_steps(cfg) -> int:
    return cfg.method.num_iterations


def _rollout_shape(cfg) -> tuple[int, int]:
    return cfg.method.num_generations, cfg.data.max_length + cfg.method.max_new_tokens


PPO = Method(name="ppo", data_kind="prompts", rollout=_rollout, rollout_kind="chat", loss=ppo_loss,
             weight=loss_units, models=_models, setup=_setup, finish_rollout=_finish,
             progress=(("reward", "reward"), ("kl", "kl"), ("value_loss", "vf")), rollout_steps=_rollout_steps,
             rollout_shape=_rollout_shape, rollout_merges=rollout_merges,
             describe="Proximal policy optimisation with a critic: per-token KL-penalised rewards, GAE advantages, "
                      "clipped policy and value losses.")
