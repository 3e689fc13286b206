"""Distillation losses (methods/kd_losses.py) by hand and against TRL's GKD `generalized_jsd_loss` (a test-only
oracle), top-k buckets, and the chunked KD loss against the naive whole-logits one."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.tolerance import reorder_tol
from tunelab.methods.kd_losses import (
    distill_terms,
    forward_kl,
    jsd,
    log_distribution,
    reverse_kl,
    topk_buckets,
    topk_indices,
)

P = [0.5, 0.25, 0.25]  # teacher
Q = [0.25, 0.25, 0.5]  # student


def _log(p):
    return torch.tensor([p], dtype=torch.float64).log()


def test_divergences_by_hand():
    t, s = _log(P), _log(Q)
    # KL(P || Q) = 0.5 ln 2 + 0 + 0.25 ln 0.5 = 0.25 ln 2; by symmetry of these two, KL(Q || P) is the same
    assert float(forward_kl(s, t)[0]) == pytest.approx(0.25 * math.log(2), abs=1e-15)
    assert float(reverse_kl(s, t)[0]) == pytest.approx(0.25 * math.log(2), abs=1e-15)
    # beta 1/2: the Jensen-Shannon divergence; M = (0.375, 0.25, 0.375)
    m = [0.375, 0.25, 0.375]
    kl_pm = sum(p * math.log(p / q) for p, q in zip(P, m))
    kl_qm = sum(p * math.log(p / q) for p, q in zip(Q, m))
    assert float(jsd(s, t, 0.5)[0]) == pytest.approx(0.5 * kl_pm + 0.5 * kl_qm, abs=1e-15)
    # beta 0.2: the mixture leans on the student
    m2 = [0.2 * p + 0.8 * q for p, q in zip(P, Q)]
    want = 0.2 * sum(p * math.log(p / q) for p, q in zip(P, m2)) + 0.8 * sum(p * math.log(p / q) for p, q in zip(Q, m2))
    assert float(jsd(s, t, 0.2)[0]) == pytest.approx(want, abs=1e-15)
    assert float(forward_kl(t, t)[0]) == 0 and float(jsd(t, t, 0.3)[0]) == pytest.approx(0, abs=1e-16)
    with pytest.raises(ValueError):
        jsd(s, t, 1.0)


def test_zero_teacher_probability_adds_nothing_and_no_nan_gradient():
    teacher = torch.tensor([[0.0, float("-inf"), 0.0]], dtype=torch.float64).log_softmax(-1)  # (1/2, 0, 1/2)
    logits = torch.tensor([[0.3, -0.2, 0.1]], dtype=torch.float64, requires_grad=True)
    loss = forward_kl(logits.log_softmax(-1), teacher).sum()
    loss.backward()
    s = logits.detach().log_softmax(-1)[0].tolist()
    assert float(loss.detach()) == pytest.approx(0.5 * (math.log(0.5) - s[0]) + 0.5 * (math.log(0.5) - s[2]),
                                                 abs=1e-15)
    assert torch.isfinite(logits.grad).all()


def test_topk_buckets_keep_the_mass_and_never_exceed_the_full_divergence():
    torch.manual_seed(0)
    t_logits, s_logits = torch.randn(6, 50, dtype=torch.float64) * 3, torch.randn(6, 50, dtype=torch.float64)
    t, s = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
    idx = topk_indices(t_logits, 8)
    tb, sb = topk_buckets(t, idx), topk_buckets(s, idx)
    assert tb.shape == (6, 9)
    assert torch.allclose(tb.exp().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(sb.exp().sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-14)
    for div in (forward_kl, reverse_kl, lambda a, b: jsd(a, b, 0.4)):  # data processing: merging outcomes
        assert (div(sb, tb) <= div(s, t) + 1e-14).all()
    # with every token but one kept, the buckets are the whole distribution
    full = topk_indices(t_logits, 49)
    assert torch.allclose(forward_kl(topk_buckets(s, full), topk_buckets(t, full)), forward_kl(s, t), atol=1e-13)


def test_against_trl_generalized_jsd_loss():
    """TRL's loss averages over the unmasked positions and has no T^2 factor; beta 0 and 1 are its KLs."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    gkd = pytest.importorskip("trl.experimental.gkd.gkd_trainer")
    oracle = gkd.GKDTrainer.generalized_jsd_loss
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 5, 40, dtype=torch.float64), torch.randn(2, 5, 40, dtype=torch.float64) * 2
    labels = torch.randint(0, 40, (2, 5))
    labels[0, :2] = -100
    mask = labels != -100
    for loss, beta in (("jsd", 0.3), ("jsd", 0.5), ("forward_kl", 0.0), ("reverse_kl", 1.0)):
        for temperature in (1.0, 2.0):
            ours = distill_terms(student[mask], log_distribution(teacher[mask], temperature), loss=loss,
                                 temperature=temperature, beta=beta if loss == "jsd" else 0.5)
            want = oracle(student, teacher, labels=labels, beta=beta, temperature=temperature, reduction="sum")
            n = int(mask.sum())
            assert float(ours.sum()) == pytest.approx(float(want) * temperature ** 2, rel=1e-12, abs=1e-14), \
                (loss, beta, temperature, n)


def _tiny_pair(tmp_path):
    from tunelab.models.tiny import build_tiny_llama

    t = build_tiny_llama(tmp_path / "t", hidden=48, layers=1, heads=4, vocab=300, seed=1)
    s = build_tiny_llama(tmp_path / "s", hidden=32, layers=1, heads=4, vocab=300, seed=0)
    return t, s


@pytest.mark.parametrize("loss,top_k", [("forward_kl", 0), ("jsd", 0), ("reverse_kl", 7)])
def test_chunked_kd_loss_equals_the_whole_logits_loss(tmp_path, loss, top_k):
    """The KD loss through the chunked head (loss_chunk 3: several chunks recomputed under checkpointing) equals,
    in value and gradient, the one over whole logits (loss_chunk 0), float64."""
    from transformers import AutoModelForCausalLM

    from tunelab.config.schema import KDMethod, TeacherSpec
    from tunelab.methods.base import FrozenModel, StepContext
    from tunelab.methods.kd import kd_loss

    t_dir, s_dir = _tiny_pair(tmp_path)
    teacher = AutoModelForCausalLM.from_pretrained(t_dir, dtype=torch.float64).eval()
    student = AutoModelForCausalLM.from_pretrained(s_dir, dtype=torch.float64)
    torch.manual_seed(0)
    ids = torch.randint(3, 300, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    cfg = KDMethod(teacher=TeacherSpec(path=str(t_dir)), loss=loss, beta=0.3, temperature=1.5, alpha=0.25,
                   top_k=top_k)
    results = []
    for chunk in (0, 3):
        student.zero_grad()
        ctx = StepContext(loss_chunk=chunk, config=cfg, state={"kd": {"width": 300, "teacher": FrozenModel(teacher)}})
        out = kd_loss(student, batch, ctx)
        out.loss_sum.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results.append((out.loss_sum.detach(), out.metrics["nll"], grads))
    (l0, n0, g0), (l1, n1, g1) = results
    n_tok = int((labels[:, 1:] != -100).sum())
    tol = reorder_tol(float(l0.abs()) + 1.0, 300 + n_tok)
    assert abs(float(l0 - l1)) <= tol and abs(float(n0 - n1)) <= reorder_tol(float(n0), 300 + n_tok)
    assert float((g0 - g1).abs().max()) <= reorder_tol(float(g0.abs().max()) + 1.0, 300 + 32 + n_tok)
    # the loss is alpha x NLL + (1 - alpha) x the divergence
    assert float(l0) == pytest.approx(0.25 * float(n0) + 0.75 * float(out.metrics["divergence"]), rel=1e-10)


def test_on_policy_steps_are_a_seeded_share_and_prompts_end_before_the_last_answer():
    from tunelab.data.tokenize import Encoded
    from tunelab.methods.kd import on_policy_step, prompt_of

    draws = [on_policy_step(7, s, 0.3) for s in range(4000)]
    assert draws == [on_policy_step(7, s, 0.3) for s in range(4000)]
    share = sum(draws) / len(draws)
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)  # four standard deviations
    assert draws != [on_policy_step(8, s, 0.3) for s in range(4000)]
    assert not any(on_policy_step(7, s, 0.0) for s in range(50)) and all(on_policy_step(7, s, 1.0) for s in range(50))
    row = Encoded([1, 2, 3, 4, 5, 6, 7, 8], [-100, -100, 3, 4, -100, -100, 7, 8], False)
    assert prompt_of(row) == [1, 2, 3, 4, 5, 6]
