"""PPO's pieces: per-token rewards, GAE, whitening and the clipped value loss by hand; the PPO loss's gradient (policy
and critic, value head or critic model) independent of the micro-batch split; stored per-token values lining up
with the loss's tokens; and DAPO's dynamic sampling in the GRPO finish."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.tolerance import chain_length, reorder_tol
from tunelab.config import load_config
from tunelab.data.tokenize import IGNORE_INDEX, Encoded
from tunelab.methods.base import StepContext
from tunelab.methods.rl_losses import clipped_value_losses, gae, kl_penalty, token_rewards, whiten

F64 = torch.float64


def _t(values):
    return torch.tensor(values, dtype=F64)


# ------------------------------------------------------------------------------------------------ by hand
def test_token_rewards_fold_the_kl_in_and_put_the_score_last():
    kl = [_t([0.1, -0.2, 0.3]), _t([0.5]), _t([])]
    got = token_rewards(_t([1.0, -2.0, 7.0]), kl, kl_coef=0.5)
    assert torch.allclose(got[0], _t([-0.05, 0.1, -0.15 + 1.0]))
    assert torch.allclose(got[1], _t([-0.25 - 2.0]))
    assert got[2].numel() == 0


def test_kl_estimators_by_hand():
    lp, ref = _t([-1.0, -2.0]), _t([-1.5, -1.0])
    assert torch.allclose(kl_penalty(lp, ref, "k1"), _t([0.5, -1.0]))
    d = ref - lp  # k3 = exp(d) - d - 1
    assert torch.allclose(kl_penalty(lp, ref, "k3"), torch.exp(d) - d - 1)
    assert bool(torch.isfinite(kl_penalty(_t([0.0]), _t([-1e4]), "k3")).all())  # clamped, not inf


def test_gae_by_hand_and_its_two_limits():
    r, v, gamma, lam = [_t([0.0, 0.5, 1.0])], [_t([0.2, 0.4, 0.6])], 0.9, 0.8
    deltas = [0.0 + 0.9 * 0.4 - 0.2, 0.5 + 0.9 * 0.6 - 0.4, 1.0 + 0.0 - 0.6]
    expected = [deltas[0] + 0.72 * deltas[1] + 0.72 ** 2 * deltas[2], deltas[1] + 0.72 * deltas[2], deltas[2]]
    adv, ret = gae(r, v, gamma, lam)
    assert torch.allclose(adv[0], _t(expected)) and torch.allclose(ret[0], adv[0] + v[0])
    # lam 1: the discounted return minus the value; lam 0: the one-step TD error
    adv1, ret1 = gae(r, v, gamma, 1.0)
    assert torch.allclose(ret1[0], _t([0.9 * 0.5 + 0.81 * 1.0, 0.5 + 0.9 * 1.0, 1.0]))
    assert torch.allclose(gae(r, v, gamma, 0.0)[0][0], _t(deltas))
    # sequences of unequal length are independent of each other and of the padding between them
    two, _ = gae([_t([1.0]), r[0]], [_t([0.3]), v[0]], gamma, lam)
    assert torch.allclose(two[0], _t([0.7])) and torch.allclose(two[1], adv[0])


def test_whiten_over_every_token_of_the_batch():
    seqs = [_t([1.0, 2.0]), _t([3.0]), _t([4.0, 6.0])]
    flat = torch.cat(seqs)
    out = torch.cat(whiten(seqs))
    assert abs(float(out.mean())) < 1e-12 and abs(float(out.var(unbiased=True)) - 1) < 1e-6
    kept = torch.cat(whiten(seqs, shift_mean=False))
    assert torch.allclose(kept, out + flat.mean())
    assert torch.equal(whiten([_t([5.0])])[0], _t([5.0]))  # one token: nothing to whiten by


def test_the_value_loss_clips_around_the_rollouts_value():
    v, old, ret = _t([1.0, 0.0, 0.9]), _t([0.0, 0.0, 0.4]), _t([2.0, 1.0, 0.5])
    loss, clipped = clipped_value_losses(v, old, ret, clip=0.2)
    # token 0: V moved 1.0 from the rollout's 0.0; clipped to 0.2: max((1-2)^2, (0.2-2)^2)/2 = 1.62, the clip side;
    # token 2: clipped to 0.6, but the unclipped error (0.9-0.5)^2 is the larger: 0.08, not the clip side
    assert torch.allclose(loss, _t([0.5 * 1.8 ** 2, 0.5 * 1.0, 0.5 * 0.16]))
    assert clipped.tolist() == [True, False, False]


# ------------------------------------------------------------------------------------------ split invariance
@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64)


def _ppo_cfg(tiny_model_dir, **method):
    return load_config({"model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": "x.json"}]},
                        "method": {"type": "ppo", "max_new_tokens": 8, "rewards": [{"function": "exact_match"}],
                                   **method}}).method


def _ppo_rows(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 1000, (3 + i % 3,), generator=g).tolist()
        completion = torch.randint(3, 1000, (2 + (5 * i) % 7,), generator=g).tolist()
        k = len(completion)

        def rand(scale=1.0, k=k):
            return tuple((scale * torch.randn(k, generator=g, dtype=F64)).tolist())

        rows.append(Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, False, values={
            "old_logps_per_token": tuple(v - 7.0 for v in rand(0.1)), "old_values_per_token": rand(0.1),
            "advantages_per_token": rand(), "returns_per_token": rand(), "unit": (float(k),)}))
    return rows


def _critic(kind, tiny_model_dir):
    if kind == "head":
        head = torch.nn.Linear(64, 1, dtype=F64)
        torch.nn.init.normal_(head.weight, std=0.1, generator=torch.Generator().manual_seed(1))
        return "value_head", head
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=F64)
    model.config.pad_token_id = 0
    return "critic", model


@pytest.mark.parametrize("critic", ["head", "model"])
def test_the_ppo_gradient_does_not_depend_on_the_split(policy, tiny_model_dir, critic):
    """One rollout batch of 8 completions of unequal lengths as 1 x 8, 2 x 4, 4 x 2 and 8 x 1 micro-batches, each
    micro-batch's summed loss divided by the completion tokens of the whole batch: the same gradients of the policy
    and the critic (float64, to the reorder bound), with clipping active on both losses."""
    from tunelab.data.kinds import CHAT
    from tunelab.methods.grpo import loss_units
    from tunelab.methods.ppo import ppo_loss

    cfg = _ppo_cfg(tiny_model_dir, critic=critic, epsilon=0.05, value_clip=0.05, vf_coef=0.5)
    role, module = _critic(critic, tiny_model_dir)
    ctx = StepContext(config=cfg, loss_chunk=0, trained={role: module}, state={"critic": module})
    rows = _ppo_rows()
    params = {**{f"policy.{n}": p for n, p in policy.named_parameters()},
              **{f"critic.{n}": p for n, p in module.named_parameters()}}
    grads, clip = {}, {}
    for size in (8, 4, 2, 1):
        for p in params.values():
            p.grad = None
        batches = [CHAT.batch(rows[i:i + size], "none", 0, 64) for i in range(0, 8, size)]
        total = sum(loss_units(b) for b in batches)
        clip[size] = 0.0
        for b in batches:
            out = ppo_loss(policy, b, ctx)
            (out.loss_sum / total).backward()
            clip[size] += float(out.metrics["clip_ratio"] + out.metrics["value_clip_ratio"])
        grads[size] = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert clip[8] > 0  # the clips are on for some tokens
    n = chain_length({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "intermediate_size": 176, "vocab_size": 1000}, 16, tokens=8 * 16)
    assert any(k.startswith("critic.") for k in grads[8]) and any(k.startswith("policy.") for k in grads[8])
    for size in (4, 2, 1):
        assert clip[size] == clip[8]
        for name, g in grads[size].items():
            ref_g = grads[8][name]
            torch.testing.assert_close(g, ref_g, atol=reorder_tol(float(ref_g.abs().max()), n), rtol=0, msg=name)


@pytest.mark.parametrize("critic", ["head", "model"])
@pytest.mark.parametrize("packing", ["none", "padding_free"])
def test_the_rollouts_stored_values_line_up_with_the_losss_tokens(policy, tiny_model_dir, critic, packing):
    """What the rollout stores per token (the policy's log-probabilities and the critic's values, computed in
    chunks of padded rows) reaches the loss in the order of its tokens, packed batches included: with nothing
    changed since, every ratio is 1 and every value equals its stored value (no clip even at 1e-9)."""
    from tunelab.data.kinds import CHAT
    from tunelab.methods.grpo import no_grad_batches, store_per_token
    from tunelab.methods.ppo import policy_and_values, ppo_loss

    cfg = _ppo_cfg(tiny_model_dir, critic=critic, epsilon=1e-9, value_clip=1e-9)
    role, module = _critic(critic, tiny_model_dir)
    ctx = StepContext(config=cfg, loss_chunk=0, device="cpu", tokenizer=SimpleNamespace(pad_token_id=0),
                      trained={role: module}, state={"critic": module})
    rows = _ppo_rows(n=6)
    policy.eval()
    with torch.no_grad():
        for chunk, batch in no_grad_batches(rows, ctx, size=4):
            logps, _, values, seq = policy_and_values(policy, batch, ctx, module)
            store_per_token(chunk, "old_logps_per_token", logps, seq)
            store_per_token(chunk, "old_values_per_token", values, seq)
        out = ppo_loss(policy, CHAT.batch(rows, packing, 0, 64, capacity=64 * 6), ctx)
    assert out.metrics["clip_ratio"].item() == 0 and out.metrics["value_clip_ratio"].item() == 0
    assert out.metrics["approx_kl"].item() < 1e-20


def test_the_ppo_finish_whitens_gae_advantages_over_the_whole_batch(tiny_model_dir):
    from tunelab.methods.ppo import _finish

    cfg = _ppo_cfg(tiny_model_dir, kl_coef=0.1, gamma=0.9, lam=0.8)
    rows = [Encoded([1, 2, 3], [IGNORE_INDEX, 2, 3], False,
                    values={"score": (1.0,), "kl_per_token": (0.1, 0.2), "old_values_per_token": (0.3, 0.1)}),
            Encoded([1, 4], [IGNORE_INDEX, 4], False,
                    values={"score": (-1.0,), "kl_per_token": (0.5,), "old_values_per_token": (0.2,)})]
    _finish(rows, StepContext(config=cfg), 2, True)
    rewards = [_t([-0.01, -0.02 + 1.0]), _t([-0.05 - 1.0])]
    adv, ret = gae(rewards, [_t([0.3, 0.1]), _t([0.2])], 0.9, 0.8)
    white = whiten(adv)
    for row, a, r in zip(rows, white, ret):
        assert torch.allclose(_t(row.values["advantages_per_token"]), a)
        assert torch.allclose(_t(row.values["returns_per_token"]), r)


# ------------------------------------------------------------------------------------------ dynamic sampling
def _group_rows(rewards):
    return [Encoded([1, 2], [IGNORE_INDEX, 2], False, values={"reward": (r,), "advantage": (0.0,), "unit": (1.0,)})
            for r in rewards]


def test_dynamic_sampling_drops_groups_without_spread_and_tops_up_at_the_last_try(tiny_model_dir):
    """Groups of 2: [1, 1] and [NaN, 0] carry no signal and are dropped; a short batch is returned short until the
    last try, which tops it up with dropped groups (advantage 0: no policy gradient)."""
    from tunelab.methods.grpo import _finish

    cfg = load_config({"model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": "x.json"}]},
                       "method": {"type": "grpo", "num_generations": 2, "dynamic_sampling": True,
                                  "rewards": [{"function": "exact_match"}]}}).method
    finish = _finish("grpo")
    rows = _group_rows([1.0, 1.0, 0.0, 1.0, math.nan, 0.0, 2.0, 0.0])
    short = finish(rows, StepContext(config=cfg), 8, False)
    assert [r.values["reward"][0] for r in short.rows] == [0.0, 1.0, 2.0, 0.0]
    assert short.metrics["signal_ratio"] == (2.0, 2.0)
    assert [round(r.values["advantage"][0], 3) for r in short.rows] == [-0.707, 0.707, 0.707, -0.707]
    full = finish(rows, StepContext(config=cfg), 8, True)
    assert len(full.rows) == 8 and full.metrics["signal_ratio"] == (2.0, 4.0)
    assert [r.values["advantage"][0] for r in full.rows[4:]] == [0.0] * 4
    # at most `limit` rows, in sampling order; evaluation never drops
    assert len(finish(rows, StepContext(config=cfg), 2, False).rows) == 2
    assert len(finish(rows, StepContext(config=cfg, evaluating=True), 8, False).rows) == 8


def test_a_critic_model_on_a_quantized_base_is_refused_in_one_line(tiny_model_dir):
    from tunelab.errors import UserError
    from tunelab.methods import METHODS

    cfg = load_config({"model": {"path": str(tiny_model_dir), "quantization": "nf4"},
                       "data": {"train": [{"path": "x.json"}]}, "adapter": {"type": "lora"},
                       "method": {"type": "ppo", "critic": "model", "rewards": [{"function": "exact_match"}]}})
    with pytest.raises(UserError, match="method.critic: model trains a critic in full.*use critic: head"):
        METHODS["ppo"].extra_models(cfg)
    cfg.method.critic = "head"
    assert "critic" not in METHODS["ppo"].extra_models(cfg)
