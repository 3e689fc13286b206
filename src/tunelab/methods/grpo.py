"""Online RL on the one loop: grpo and rloo (docs/rl.md).

Each step the rollout (the method contract's hook, methods/base.py) takes this process's share of the global batch
of prompts (data kind prompts), samples `num_generations` completions per prompt with the policy
(methods/sampling.py, seeded per sequence), scores them with the rewards (methods/rewards.py) and returns SFT-shaped
rows, prompt masked and completion trained, each carrying its reward and its share of the loss unit (`row.values`).
The finish then sees the whole global batch on every process: with dynamic sampling (DAPO) it drops the groups
whose rewards are all equal (the loop refills the batch with groups of further prompts), and it turns rewards into
one advantage per completion (relative to the prompt's group: GRPO's group mean and standard deviation, or RLOO's
leave-one-out mean; with scale_rewards batch, the standard deviation of the whole global batch, so 2 processes give
what 1 does). The loop splits the rows into micro-batches, counts the units of the whole global batch and calls the
loss, the clipped policy-gradient surrogate of methods/rl_losses.py plus beta x the k3 KL to the reference.

With num_iterations = 1 (TRL's default) one optimizer step is taken per rollout batch: the policy that sampled is
the policy being differentiated, so the ratio is 1 in value and pi/pi_old carries only its gradient, as in TRL. With
num_iterations = k the loop trains k steps on each rollout (Method.rollout_steps) and the rollout stores the sampling
policy's per-token log-probabilities on its rows, so later steps' ratios move and the clip acts.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tunelab.data.tokenize import IGNORE_INDEX, Encoded
from tunelab.errors import ConfigError
from tunelab.methods.base import ExtraModel, LossOutput, Method, Rollout, SetupContext, StepContext
from tunelab.methods.lm import trained_logprobs, trained_values
from tunelab.methods.preference import reference_model
from tunelab.methods.rewards import build_rewards, columns_for, score
from tunelab.methods.rl_losses import (
    group_advantages,
    k3_kl,
    policy_token_losses,
    reduce_tokens,
    rloo_advantages,
    units,
)
from tunelab.methods.sampling import SamplingOptions, merges_adapter, sample, sequence_seed

SHARDED_PARAMS = ("zero3", "fsdp2")  # train.distributed values that split parameters: LoRA samples unmerged

EVAL_SEED_OFFSET = 1 << 40  # evaluation samples from streams of its own


def _models(cfg) -> dict[str, ExtraModel]:
    """The reference policy, only when the KL penalty is on (beta > 0)."""
    return reference_model(cfg) if cfg.method.beta > 0 else {}


def _setup(ctx: SetupContext) -> None:
    if getattr(ctx.config, "dynamic_sampling", False) and ctx.streaming:
        raise ConfigError("method.dynamic_sampling: refills draw further prompts at random from the training rows; "
                          "they cannot with data.streaming")
    ctx.step.state["rewards"] = build_rewards(ctx.config.rewards, ctx.config.max_new_tokens, ctx.step.device)
    if "reference" in ctx.models:
        ctx.step.state["reference"] = ctx.models["reference"]


def _advantages(method: str, cfg, rewards: torch.Tensor) -> torch.Tensor:
    if method == "rloo":
        return rloo_advantages(rewards, cfg.num_generations)
    return group_advantages(rewards, cfg.num_generations, cfg.scale_rewards)


@dataclass
class Sampled:
    """A rollout's completions of its prompts (num_generations each, in prompt order) and their scores."""

    completions: list[list[int]]
    truncated: list[bool]
    per_function: list[list[float]]  # each reward function's value per completion (NaN: no opinion)
    totals: list[float]  # the weighted sum per completion (NaN: every function abstained)
    generation_s: float


def sample_and_score(model, rows: list, ctx: StepContext) -> Sampled:
    """Sample num_generations completions of each prompt row with the policy (seeded per sequence from the rows'
    place in the global batch) and score them with the method's rewards."""
    cfg, tok = ctx.config, ctx.tokenizer
    group = cfg.num_generations
    seed = ctx.seed + (EVAL_SEED_OFFSET if ctx.evaluating else 0)
    prompts = [r.prompt_ids for r in rows for _ in range(group)]
    seeds = [sequence_seed(seed, ctx.step, ctx.rollout_offset + i, j) for i in range(len(rows))
             for j in range(group)]
    opts = SamplingOptions(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                           top_k=cfg.top_k,
                           merge_adapter=merges_adapter(cfg.merge_adapter, ctx.device) and not ctx.sharded_params)
    t0 = time.perf_counter()
    completions, truncated = sample(model, prompts, seeds, opts, stop_ids=ctx.template.stop_token_ids(tok),
                                    pad_id=tok.pad_token_id, device=ctx.device)
    generation_s = time.perf_counter() - t0
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in completions]
    per_function, totals = score(
        ctx.state["rewards"], [r.messages for r in rows for _ in range(group)],
        [[{"role": "assistant", "content": t}] for t in texts], completions, columns_for(rows, group),
        step=ctx.step, max_steps=ctx.total_steps, first_prompt=ctx.rollout_offset, group=group)
    return Sampled(completions, truncated, per_function, totals, generation_s)


def completion_rows(rows: list, sampled: Sampled, cfg, values: Callable[[int, bool], dict]) -> list[Encoded]:
    """SFT-shaped rows of the sampled completions: prompt masked, completion trained (all masked when
    mask_truncated drops a cut completion), each with the values `values(k, trained)` gives."""
    group = cfg.num_generations
    out = []
    for k, (ids, cut) in enumerate(zip(sampled.completions, sampled.truncated)):
        prompt = rows[k // group].prompt_ids
        trained = not (cfg.mask_truncated and cut)
        labels = [IGNORE_INDEX] * len(prompt) + (list(ids) if trained else [IGNORE_INDEX] * len(ids))
        out.append(Encoded(prompt + list(ids), labels, cut, rows[k // group].source, values=values(k, trained)))
    return out


def sampled_metrics(ctx: StepContext, sampled: Sampled) -> dict[str, tuple[float, float]]:
    metrics = _rollout_metrics(ctx.state["rewards"], sampled.per_function, sampled.totals, sampled.completions,
                               sampled.truncated, ctx.config.num_generations)
    # generated tokens per second of sampling (sums over processes and steps: tokens / seconds)
    metrics["generation_tokens_per_s"] = (float(sum(len(c) for c in sampled.completions)), sampled.generation_s)
    return metrics


def _rollout(method: str):
    def rollout(model, rows: list, ctx: StepContext) -> Rollout:
        cfg = ctx.config
        sampled = sample_and_score(model, rows, ctx)
        shares = units(cfg.loss, [len(c) for c in sampled.completions])
        out = completion_rows(rows, sampled, cfg, lambda k, trained: {
            "reward": (sampled.totals[k],), "unit": (shares[k] if trained else 0.0,)})  # advantage: the finish
        if cfg.num_iterations > 1:  # the sampling policy's log-probabilities, for the later steps' ratios
            _old_logps(model, out, ctx)
        return Rollout(out, sampled_metrics(ctx, sampled))

    return rollout


def _has_spread(group: list[Encoded]) -> bool:
    """The group's rewards differ (at least two given, not all equal): it carries a learning signal."""
    given = [r.values["reward"][0] for r in group if not math.isnan(r.values["reward"][0])]
    return len(given) >= 2 and max(given) > min(given)


def _finish(method: str):
    def finish(rows: list[Encoded], ctx: StepContext, limit: int, last: bool) -> Rollout:
        """Over the whole rolled-out batch: dynamic sampling's choice of groups (training only), then advantages."""
        cfg = ctx.config
        group = cfg.num_generations
        groups = [rows[i:i + group] for i in range(0, len(rows), group)]
        metrics = {}
        if cfg.dynamic_sampling and not ctx.evaluating:
            wanted = limit // group
            kept = [g for g in groups if _has_spread(g)][:wanted]
            if last and len(kept) < wanted:  # still short: topped up with groups of zero advantage
                kept += [g for g in groups if not _has_spread(g)][:wanted - len(kept)]
            metrics["signal_ratio"] = (float(sum(_has_spread(g) for g in kept)), float(len(kept)))
            groups = kept
        rows = [r for g in groups for r in g]
        rewards = torch.tensor([r.values["reward"][0] for r in rows], dtype=torch.float64)
        for row, a in zip(rows, _advantages(method, cfg, rewards).tolist()):
            row.values["advantage"] = (a,)
        return Rollout(rows, metrics)

    return finish


def _refills(cfg) -> int:
    return cfg.method.max_refills if cfg.method.dynamic_sampling else 0


MODEL_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


def no_grad_batches(rows: list[Encoded], ctx: StepContext, size: int = 16):
    """The rows as padded batches of `size` on the device (the model's inputs and labels only), with the rows each
    holds: for passes over rolled-out rows without gradients."""
    from tunelab.data.kinds import CHAT

    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        batch = CHAT.batch(chunk, "none", ctx.tokenizer.pad_token_id, 10**9)
        yield chunk, {k: v.to(ctx.device) for k, v in batch.items() if k in MODEL_KEYS}


def store_per_token(chunk: list[Encoded], name: str, values: torch.Tensor, seq: torch.Tensor) -> None:
    """Each row's values of its trained tokens (position order), from flat [n] values and their rows [n]."""
    for i, row in enumerate(chunk):
        row.values[name] = tuple(values[seq == i].tolist())


def _old_logps(model, rows: list[Encoded], ctx: StepContext) -> None:
    """Each rolled-out row's completion-token log-probabilities under the policy that sampled them (eval mode: no
    dropout), stored as ``values["old_logps_per_token"]``."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for chunk, batch in no_grad_batches(rows, ctx):
                logps, seq = trained_logprobs(model, batch, ctx)
                store_per_token(chunk, "old_logps_per_token", logps, seq)
    finally:
        model.train(was_training)


def per_token_in_order(batch, name: str, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The batch's ``<name>`` values (row order, each row's tokens in position order) in the order of
    `trained_logprobs` (batch-major; in a packed batch rows are interleaved by bin)."""
    flat = batch[name].to(like.dtype)
    if flat.numel() != like.numel():
        raise RuntimeError(f"{name} does not match the batch's completion tokens")
    order = torch.argsort(rows, stable=True)  # token positions sorted by row, position order kept within a row
    out = torch.empty_like(flat)
    out[order] = flat
    return out


def _rollout_metrics(rewards, per_function, totals, completions, truncated, group) -> dict[str, tuple[float, float]]:
    """Sums and counts (the loop averages them over processes and steps): the reward overall and per function,
    its spread within groups, completion lengths and the share cut at max_new_tokens."""
    n = len(totals)
    scored = [t for t in totals if not math.isnan(t)]
    groups = [totals[i:i + group] for i in range(0, n, group)]
    spreads = [statistics.stdev(g) for g in groups if group > 1 and sum(not math.isnan(x) for x in g) == len(g)]
    lengths = [len(c) for c in completions]
    metrics = {
        "reward": (sum(scored), len(scored)),
        "completion_length": (sum(lengths), n),
        "completion_length_max": (max(lengths), 1),
        "completion_length_min": (min(lengths), 1),
        "clipped_ratio": (sum(truncated), n),
    }
    if group > 1:  # the spread of rewards within each prompt's group
        metrics["reward_std"] = (sum(spreads), len(spreads))
        metrics["zero_std_ratio"] = (sum(s == 0 for s in spreads), len(spreads))
    for r, values in zip(rewards, per_function):
        given = [v for v in values if not math.isnan(v)]
        metrics[f"rewards/{r.name}"] = (sum(given), len(given))
    return metrics


def loss_units(batch: dict[str, torch.Tensor]) -> int:
    """The loss's units in a batch: sequences (grpo, dr_grpo) or completion tokens (bnpo, dapo), as the rollout
    marked them on its rows."""
    return int(round(float(batch["unit"].sum())))


def policy_loss(model, batch, ctx: StepContext) -> LossOutput:
    cfg = ctx.config
    values, rows = trained_values(model, batch, ctx, entropy=True)
    logps, entropy = values[0], values[1]
    n_rows = int(batch["advantage"].numel())
    # the policy that sampled: the one being trained on a rollout's first step, else its stored log-probabilities
    old = per_token_in_order(batch, "old_logps_per_token", rows, logps) if "old_logps_per_token" in batch \
        else logps.detach()
    per_token, clipped = policy_token_losses(
        logps, old, batch["advantage"], rows, n_rows, epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high or cfg.epsilon, importance=cfg.importance_sampling)

    def reduce(values):
        return reduce_tokens(values, rows, n_rows, cfg.loss, cfg.max_new_tokens)

    metrics = {"clip_ratio": reduce(clipped.to(logps.dtype)), "entropy": reduce(entropy.detach())}
    frozen = ctx.state.get("reference")
    if frozen is not None:
        with frozen() as ref_model:
            ref_logps, _ = trained_logprobs(ref_model, batch, ctx)
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = reduce(kl.detach())
    return LossOutput(reduce(per_token), metrics)


_PROGRESS = (("reward", "reward"), ("kl", "kl"))

def _rollout_steps(cfg) -> int:
    return cfg.method.num_iterations


def rollout_merges(cfg, device: str) -> bool:
    """Sampling merges plain LoRA into temporary weight copies (method.merge_adapter; not for DoRA)."""
    return cfg.adapter.type == "lora" and not getattr(cfg.adapter, "dora", False) \
        and merges_adapter(cfg.method.merge_adapter, device) and cfg.train.distributed not in SHARDED_PARAMS


def _rollout_shape(cfg) -> tuple[int, int]:
    """num_generations rows per prompt, each at most max_length + max_new_tokens tokens (a process samples all its
    prompts' completions at once)."""
    return cfg.method.num_generations, cfg.data.max_length + cfg.method.max_new_tokens


GRPO = Method(name="grpo", data_kind="prompts", rollout=_rollout("grpo"), rollout_kind="chat", loss=policy_loss,
              weight=loss_units, models=_models, setup=_setup, progress=_PROGRESS, rollout_steps=_rollout_steps,
              rollout_shape=_rollout_shape, rollout_merges=rollout_merges, finish_rollout=_finish("grpo"), rollout_refills=_refills,
              describe="Group relative policy optimisation: sampled completions, advantages within each group.")
RLOO = Method(name="rloo", data_kind="prompts", rollout=_rollout("rloo"), rollout_kind="chat", loss=policy_loss,
              weight=loss_units, models=_models, setup=_setup, progress=_PROGRESS, rollout_steps=_rollout_steps,
              rollout_shape=_rollout_shape, rollout_merges=rollout_merges, finish_rollout=_finish("rloo"), rollout_refills=_refills,
              describe="REINFORCE leave-one-out: each completion's baseline is the mean of the others.")
