"""The online RL losses (methods/rl_losses.py): hand-computed values, TRL 1.16's GRPO loss on identical inputs (a
test-only oracle, as for DPO), and a gradient that does not depend on how a rollout batch is split."""

from __future__ import annotations

import collections
import math
import types

import pytest
import torch

from tests.tolerance import reorder_tol
from tunelab.methods.rl_losses import (
    LOG_RATIO_LIMIT,
    VARIANTS,
    group_advantages,
    k3_kl,
    policy_token_losses,
    reduce_tokens,
    rloo_advantages,
    units,
)

F64 = torch.float64


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2], dtype=F64)
    # group 1: mean 1/4, Bessel std sqrt((0.75^2 + 3 x 0.25^2) / 3) = 0.5; group 2: no spread, advantage 0
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=F64) / (0.5 + 1e-4)
    got = group_advantages(r, 4, "group")
    torch.testing.assert_close(got[:4], expected, atol=1e-15, rtol=0)
    assert got[4:].tolist() == [0.0] * 4
    assert group_advantages(r, 4, "none").tolist() == [0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0]
    # batch: one std for all 8 rewards (mean 9/8)
    batch_std = math.sqrt(sum((x - 9 / 8) ** 2 for x in r.tolist()) / 7)
    torch.testing.assert_close(group_advantages(r, 4, "batch")[:4], expected * (0.5 + 1e-4) / (batch_std + 1e-4),
                               atol=1e-15, rtol=0)
    # None (NaN) is no opinion: left out of its group's mean and std, advantage 0
    nan = group_advantages(torch.tensor([1.0, math.nan, 0, 0], dtype=F64), 4, "none")
    torch.testing.assert_close(nan, torch.tensor([2 / 3, 0, -1 / 3, -1 / 3], dtype=F64), atol=1e-15, rtol=0)


def test_rloo_advantages_by_hand():
    got = rloo_advantages(torch.tensor([1.0, 0, 0, 0, 3, 1, 2, 2], dtype=F64), 4)
    # each reward minus the mean of the 3 others: 1 - 0, 0 - 1/3; 3 - 5/3, 1 - 7/3, 2 - 2
    torch.testing.assert_close(got, torch.tensor([1, -1 / 3, -1 / 3, -1 / 3, 4 / 3, -4 / 3, 0, 0], dtype=F64),
                               atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.zeros(3, dtype=F64), 1)


def test_kl_and_ratios_by_hand_and_guarded():
    lp = torch.tensor([-1.0, -2.0], dtype=F64)
    assert k3_kl(lp, lp).tolist() == [0.0, 0.0]
    kl = k3_kl(lp, lp + math.log(2))  # d = ln 2: 2 - ln 2 - 1
    torch.testing.assert_close(kl, torch.full((2,), 1 - math.log(2), dtype=F64), atol=1e-15, rtol=0)
    far = k3_kl(torch.tensor([0.0], dtype=F64), torch.tensor([1e4], dtype=F64))  # clamped, finite
    assert math.isfinite(far.item()) and far.item() == pytest.approx(math.exp(LOG_RATIO_LIMIT) - LOG_RATIO_LIMIT - 1)
    rows = torch.tensor([0, 0, 1])
    adv = torch.tensor([2.0, -1.0], dtype=F64)
    logps = torch.tensor([-1.0, -1.0, -1.0], dtype=F64, requires_grad=True)
    old = logps.detach() - torch.tensor([math.log(1.5), 0.0, math.log(1.5)], dtype=F64)
    loss, clipped = policy_token_losses(logps, old, adv, rows, 2, epsilon=0.2, epsilon_high=0.2)
    # token 0: ratio 1.5, A > 0: clipped at 1.2 -> -2.4; token 1: ratio 1 -> -2; token 2: ratio 1.5, A < 0: the
    # unclipped side is the smaller -> 1.5
    torch.testing.assert_close(loss.detach(), torch.tensor([-2.4, -2.0, 1.5], dtype=F64), atol=1e-14, rtol=0)
    assert clipped.tolist() == [True, False, False]
    loss.sum().backward()  # the clipped token has no gradient; the others -A x ratio
    torch.testing.assert_close(logps.grad, torch.tensor([0.0, -2.0, 1.5], dtype=F64), atol=1e-14, rtol=0)
    # GSPO: one ratio per sequence, the geometric mean of its tokens' ratios
    seq, _ = policy_token_losses(torch.tensor([-1.0, -1.0, -1.0], dtype=F64),
                                 torch.tensor([-1.1, -1.3, -1.0], dtype=F64), adv, rows, 2, epsilon=0.5,
                                 epsilon_high=0.5, importance="sequence")
    torch.testing.assert_close(seq, torch.tensor([-2 * math.exp(0.2)] * 2 + [1.0], dtype=F64), atol=1e-14, rtol=0)


def test_reductions_by_hand():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=F64)
    rows = torch.tensor([0, 0, 0, 1])
    assert reduce_tokens(values, rows, 2, "grpo", 8).item() == 2.0 + 10.0  # per-sequence means, summed
    assert reduce_tokens(values, rows, 2, "dr_grpo", 8).item() == 16.0 / 8
    assert reduce_tokens(values, rows, 2, "dapo", 8).item() == reduce_tokens(values, rows, 2, "bnpo", 8).item() == 16
    assert units("grpo", [3, 1]) == units("dr_grpo", [3, 1]) == [1.0, 1.0] and units("dapo", [3, 1]) == [3.0, 1.0]


# ------------------------------------------------------------------------------------------------- TRL oracle
@pytest.fixture(scope="module")
def trl_compute_loss():
    trl = pytest.importorskip("trl")
    assert trl.__version__.startswith("1.")
    from trl.trainer.grpo_trainer import GRPOTrainer

    return GRPOTrainer._compute_loss


def _trl(compute_loss, variant, importance, beta, logps, old, ref, adv, mask, eps, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss on given per-token log-probabilities: one micro-batch, one process, no
    accumulation (its normaliser is then the batch's), the trainer's state replaced by the attributes it reads."""
    class Accelerator:
        num_processes = 1
        sync_gradients = True

        def gather(self, x):
            return x

        gather_for_metrics = gather

        def reduce(self, x, reduction="sum"):
            return x

    stub = types.SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=importance, beta=beta,
        loss_type=variant, epsilon_low=eps, epsilon_high=eps_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, accelerator=Accelerator(),
        _entropy_bonus_enabled=False, aux_loss_enabled=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    stub._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    b, t = logps.shape
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask, "advantages": adv,
              "old_per_token_logps": old, "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    return compute_loss(stub, None, inputs)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("importance", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_losses_equal_trls_grpo_loss(trl_compute_loss, variant, importance, beta):
    """Per-token log-probabilities that differ from the sampling policy's (so clipping acts) and the reference's,
    sequences of unequal length: TRL's loss equals tunelab's summed loss over its units (sequences or tokens)."""
    torch.manual_seed(0)
    b, t = 6, 7
    logps = -torch.rand(b, t, dtype=F64) * 3
    old = logps + 0.3 * torch.randn(b, t, dtype=F64)
    ref = logps + 0.2 * torch.randn(b, t, dtype=F64)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    mask[4, 5:] = 0
    adv = torch.randn(b, dtype=F64)
    expected = _trl(trl_compute_loss, variant, importance, beta, logps, old, ref, adv, mask, 0.2, 0.28, t)
    keep = mask.bool()
    rows = keep.nonzero()[:, 0]
    per_token, _ = policy_token_losses(logps[keep], old[keep], adv, rows, b, epsilon=0.2, epsilon_high=0.28,
                                       importance=importance)
    per_token = per_token + beta * k3_kl(logps[keep], ref[keep])
    total = reduce_tokens(per_token, rows, b, variant, t)
    n_units = sum(units(variant, mask.sum(1).tolist()))
    assert abs(total.item() / n_units - expected.item()) <= reorder_tol(abs(expected.item()) + 1, b * t)
