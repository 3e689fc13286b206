"""The preference-loss math: hand-computed values, gradients, and TRL 1.16 as an oracle on random inputs."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from tests.tolerance import reorder_tol
from tunelab.methods import preference_losses as pl

# Each loss is at most ~16 elementary float32 operations per example on inputs exact in float32 (exp, log, log1p
# and expm1 within an ulp; TRL's per-token sums of up to 8 terms included): 2 gamma(16) ~ 1.9e-6 of the larger of
# 1 and the value's magnitude. A wrong formula (a missing beta, a smoothing term, a length normalisation) moves a
# loss by 1e-2 or more.
TOL = reorder_tol(1.0, 16, torch.float32, cond=1.0)


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _softplus(x: float) -> float:  # -log sigma(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(actual: torch.Tensor, expected: list[float] | float, tol: float = TOL) -> None:
    exp = torch.tensor(expected, dtype=torch.float64)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), exp.expand_as(actual.double()), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------- hand-computed values


def test_bradley_terry_margin_and_centering():
    c, r = _t(2.0, -1.0), _t(0.5, 0.0)
    close(pl.bradley_terry(c, r), [_softplus(-1.5), _softplus(1.0)])
    close(pl.bradley_terry(c, r, margin=_t(1.0, 0.5)), [_softplus(-0.5), _softplus(1.5)])
    close(pl.bradley_terry(c, r, margin=1.0), [_softplus(-0.5), _softplus(2.0)])
    centred = pl.bradley_terry(c, r, center_rewards_coefficient=0.01)
    close(centred, [_softplus(-1.5) + 0.01 * 2.5**2, _softplus(1.0) + 0.01 * 1.0])


def test_dpo_policy_equals_reference():
    x = _t(-3.0, -10.0, -0.5)
    y = _t(-4.0, -2.0, -7.0)
    tok = _t(3, 5, 1)
    for loss_type, expected in [("sigmoid", math.log(2)), ("hinge", 1.0), ("robust", math.log(2))]:
        eps = 0.1 if loss_type == "robust" else 0.0
        losses, rc, rr = pl.dpo_loss(x, y, x, y, beta=0.3, loss_type=loss_type, label_smoothing=eps)
        close(losses, expected)
        close(rc, 0.0)
        close(rr, 0.0)
    losses, _, _ = pl.dpo_loss(x, y, x, y, beta=0.25, loss_type="ipo", chosen_tokens=tok, rejected_tokens=tok)
    close(losses, (1 / (2 * 0.25)) ** 2)
    # cDPO at h = 0: -(1-e) log(1/2) - e log(1/2) = log 2 for any e
    losses, _, _ = pl.dpo_loss(x, y, x, y, beta=0.3, label_smoothing=0.2)
    close(losses, math.log(2))


def test_dpo_small_case_every_variant():
    pc, pr, rc, rr, beta = _t(-1.0), _t(-3.0), _t(-2.0), _t(-2.5), 0.5
    # h = (-1 - -2) - (-3 - -2.5) = 1 - (-0.5) = 1.5, beta h = 0.75
    bh = 0.75
    losses, chosen_r, rejected_r = pl.dpo_loss(pc, pr, rc, rr, beta=beta)
    close(losses, _softplus(-bh))
    close(chosen_r, 0.5 * 1.0)
    close(rejected_r, 0.5 * -0.5)
    losses, _, _ = pl.dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
    close(losses, 0.9 * _softplus(-bh) + 0.1 * _softplus(bh))
    losses, _, _ = pl.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    close(losses, 1 - bh)
    losses, _, _ = pl.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=0.2)
    close(losses, (0.8 * _softplus(-bh) - 0.2 * _softplus(bh)) / (1 - 0.4))
    # IPO: log-ratios averaged per token: 1/3 - (-0.5)/2; target 1/(2 beta) = 1
    losses, chosen_r, _ = pl.dpo_loss(
        pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_tokens=_t(3), rejected_tokens=_t(2)
    )
    close(losses, (1 / 3 + 0.25 - 1.0) ** 2)
    close(chosen_r, 0.5)  # rewards stay on summed log-ratios
    losses, _, _ = pl.dpo_loss(pc, pr, rc, rr, beta=2.0, loss_type="hinge")
    close(losses, 0.0)  # 1 - 2 * 1.5 < 0


def test_nll_term():
    close(pl.nll_term(_t(-6.0, -1.5, 0.0), _t(3, 1, 0)), [2.0, 1.5, 0.0])


def test_kto_desirable_and_undesirable():
    policy, ref = _t(-1.0, -2.0, -4.0), _t(-1.5, -1.0, -4.0)
    desirable = torch.tensor([True, False, True])
    beta, kl = 0.5, torch.tensor(0.2)
    losses, rewards = pl.kto_loss(
        policy, ref, desirable, kl, beta=beta, desirable_weight=2.0, undesirable_weight=3.0
    )
    # r = [0.5, -1, 0]
    close(
        losses,
        [
            2.0 * (1 - _sigmoid(0.5 * (0.5 - 0.2))),
            3.0 * (1 - _sigmoid(0.5 * (0.2 - -1.0))),
            2.0 * (1 - _sigmoid(0.5 * (0.0 - 0.2))),
        ],
    )
    close(rewards, [0.25, -0.5, 0.0])


def test_kto_kl_estimate():
    close(pl.kto_kl_estimate(_t(-1.0, -2.0), _t(-1.5, -2.1)), (0.5 + 0.1) / 2)
    close(pl.kto_kl_estimate(_t(-1.0, -2.0), _t(-0.5, -2.1)), 0.0)  # mean -0.2 clamps to 0
    # cross-process mean is taken before the clamp
    other_rank = torch.tensor(0.6)
    kl = pl.kto_kl_estimate(_t(-1.0), _t(-0.8), all_reduce_mean=lambda t: (t + other_rank) / 2)
    close(kl, (-0.2 + 0.6) / 2)
    p = _t(-1.0, -2.0).requires_grad_()
    assert not pl.kto_kl_estimate(p, _t(-3.0, -3.0)).requires_grad


def test_orpo_odds():
    beta = 0.1
    losses, or_term, rc, rr = pl.orpo_loss(_t(-2.0), _t(-3.0), _t(4), _t(2), beta=beta)
    avg_c, avg_r = -0.5, -1.5
    log_odds_c = avg_c - math.log(1 - math.exp(avg_c))
    log_odds_r = avg_r - math.log(1 - math.exp(avg_r))
    expected_or = _softplus(-(log_odds_c - log_odds_r))
    close(or_term, expected_or)
    close(losses, 0.5 + beta * expected_or)
    close(rc, beta * avg_c)
    close(rr, beta * avg_r)
    # equal averages: odds ratio 1, or_term = log 2
    _, or_term, _, _ = pl.orpo_loss(_t(-2.0), _t(-1.0), _t(4), _t(2), beta=beta)
    close(or_term, math.log(2))


def test_log1mexp_is_stable():
    x = torch.tensor([-1e-6, -0.3, -0.7, -5.0, -60.0], dtype=torch.float32)
    expected = [math.log(-math.expm1(v)) for v in x.double().tolist()]
    close(pl.log1mexp(x), expected)
    assert torch.isfinite(pl.log_odds_ratio(_t(0.0), _t(-1.0))).all()


def test_simpo_margin():
    c_sum, r_sum, c_tok, r_tok = _t(-2.0), _t(-3.0), _t(4), _t(2)  # averages -0.5 and -1.5
    losses, rc, rr = pl.simpo_loss(c_sum, r_sum, c_tok, r_tok, beta=1.0, gamma=0.5)
    z = 1.0 * (-0.5 - -1.5) - 0.5
    close(losses, _softplus(-z))
    close(rc, -0.5)
    close(rr, -1.5)
    losses, _, _ = pl.simpo_loss(c_sum, r_sum, c_tok, r_tok, beta=1.0, gamma=0.5, label_smoothing=0.1)
    close(losses, 0.9 * _softplus(-z) + 0.1 * _softplus(z))
    losses, _, _ = pl.simpo_loss(c_sum, r_sum, c_tok, r_tok, beta=1.0, gamma=0.5, loss_type="hinge")
    close(losses, 1 - z)
    losses, rc, _ = pl.simpo_loss(c_sum, r_sum, c_tok, r_tok, beta=2.5, gamma=1.0)
    close(losses, _softplus(-(2.5 * 1.0 - 1.0)))
    close(rc, 2.5 * -0.5)


def test_cpo_with_bc_term():
    c, r, nll = _t(-1.0, -4.0), _t(-2.0, -1.0), _t(0.7, 1.3)
    losses, rc, rr = pl.cpo_loss(c, r, beta=0.5, chosen_nll=nll)
    close(losses, [_softplus(-0.5) + 0.7, _softplus(1.5) + 1.3])
    close(rc, [-0.5, -2.0])
    close(rr, [-1.0, -0.5])
    losses, _, _ = pl.cpo_loss(c, r, beta=0.5, chosen_nll=nll, cpo_alpha=0.0, loss_type="hinge")
    close(losses, [0.5, 2.5])
    losses, _, _ = pl.cpo_loss(
        c,
        r,
        beta=0.5,
        chosen_nll=nll,
        cpo_alpha=2.0,
        loss_type="ipo",
        chosen_tokens=_t(2, 4),
        rejected_tokens=_t(1, 1),
    )
    close(losses, [(-0.5 - -2.0 - 1.0) ** 2 + 1.4, (-1.0 - -1.0 - 1.0) ** 2 + 2.6])


def test_gradients_only_through_policy():
    beta = 0.5
    pc, pr = _t(-1.0).requires_grad_(), _t(-3.0).requires_grad_()
    rc, rr = _t(-2.0).requires_grad_(), _t(-2.5).requires_grad_()
    losses, chosen_r, rejected_r = pl.dpo_loss(pc, pr, rc, rr, beta=beta)
    losses.sum().backward()
    assert rc.grad is None and rr.grad is None
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    # d/d pi_c of -log sigma(beta h) = -beta sigma(-beta h), h = 1.5
    close(pc.grad, -beta * _sigmoid(-0.75))
    close(pr.grad, beta * _sigmoid(-0.75))

    p, ref = _t(-1.0, -2.0).requires_grad_(), _t(-1.5, -1.0).requires_grad_()
    kl = torch.tensor(0.3, requires_grad=True)
    losses, rewards = pl.kto_loss(p, ref, torch.tensor([True, False]), kl, beta=beta)
    losses.sum().backward()
    assert ref.grad is None and kl.grad is None and not rewards.requires_grad
    assert p.grad is not None and (p.grad != 0).all()

    c, r = _t(-2.0).requires_grad_(), _t(-3.0).requires_grad_()
    losses, or_term, rc_, rr_ = pl.orpo_loss(c, r, _t(4), _t(2), beta=0.1)
    losses.sum().backward()
    assert c.grad is not None and r.grad is not None and not rc_.requires_grad and not rr_.requires_grad


def test_fp32_and_per_example_shape():
    n = 5
    x = torch.randn(n, dtype=torch.bfloat16) - 5
    losses, rc, _ = pl.dpo_loss(x, x - 1, x, x, beta=0.1)
    assert losses.shape == (n,) and losses.dtype == torch.float32 and rc.dtype == torch.float32
    tok = torch.full((n,), 3)
    for out in (
        pl.orpo_loss(x, x - 1, tok, tok, beta=0.1),
        pl.simpo_loss(x, x - 1, tok, tok, beta=2.0, gamma=0.5),
        pl.cpo_loss(x, x - 1, beta=0.1, chosen_nll=pl.nll_term(x, tok)),
    ):
        assert all(t.shape == (n,) and t.dtype == torch.float32 for t in out)
    assert pl.bradley_terry(x, x).dtype == torch.float32


def test_invalid_arguments():
    x = _t(-1.0)
    with pytest.raises(ValueError, match="unknown loss_type"):
        pl.dpo_loss(x, x, x, x, beta=0.1, loss_type="nope")
    with pytest.raises(ValueError, match="token counts"):
        pl.dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        pl.dpo_loss(x, x, x, x, beta=0.1, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        pl.dpo_loss(x, x, x, x, beta=0.1, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown loss_type"):
        pl.simpo_loss(x, x, _t(1), _t(1), beta=2.0, gamma=0.5, loss_type="ipo")
    assert set(pl.DPO_LOSSES) == {"sigmoid", "hinge", "ipo", "robust"}


# ------------------------------------------------------------------------------------------------- TRL oracle
# TRL's trainers compute losses inside instance methods; we call the unbound functions on a stand-in object that
# carries exactly the attributes they read, with a fake model whose per-token log-probs sum to our inputs.

N = 8


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def _stub(**attrs) -> types.SimpleNamespace:
    base = dict(
        accelerator=_Accelerator(),
        model=types.SimpleNamespace(training=True),
        aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    base.update(attrs)
    return types.SimpleNamespace(**base)


def _per_token(sums: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, L-1] per-token log-probs, zero off the (shifted) completion mask, whose rows sum exactly to `sums`:
    the whole sum sits on the first completion position (so sums are exact in fp32)."""
    shifted = mask[:, 1:].float()
    first = shifted.argmax(dim=1)
    out = torch.zeros_like(shifted)
    out[torch.arange(len(sums)), first] = sums
    return out


def _fake_lm(per_token_by_width: dict[int, torch.Tensor]):
    def model(input_ids=None, **_kwargs):
        lp = per_token_by_width[input_ids.shape[1]]
        return types.SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros_like(lp),
            mean_logits=torch.zeros_like(lp),
            is_top1=torch.zeros_like(lp, dtype=torch.bool),
        )

    return model


def _completion_mask(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """Position 0 is a prompt token, then `tokens` completion tokens, then padding."""
    pos = torch.arange(width).unsqueeze(0)
    return ((pos >= 1) & (pos <= tokens.unsqueeze(1))).long()


@pytest.fixture(scope="module")
def trl():
    trl = pytest.importorskip("trl")
    assert trl.__version__.startswith("1.")
    return trl


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(4, N, generator=g, dtype=torch.float32) * 20 - 0.5  # pc, pr, rc, rr
    tokens = torch.randint(1, 9, (2, N), generator=g)
    return logps, tokens


def _trl_dpo(trl, loss_types, weights, beta, eps, pc, pr, rc, rr, tc, tr):
    from trl.trainer.dpo_trainer import DPOTrainer

    width = int(max(tc.max(), tr.max())) + 2
    mask = torch.cat([_completion_mask(tc, width), _completion_mask(tr, width)])
    stub = _stub(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=weights,
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
    )
    model = _fake_lm({width: _per_token(torch.cat([pc, pr]), mask)})
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize(
    ("loss_type", "beta", "eps"),
    [("sigmoid", 0.1, 0.0), ("hinge", 0.3, 0.0), ("ipo", 0.4, 0.0), ("robust", 0.2, 0.15)],
)
def test_dpo_matches_trl(trl, loss_type, beta, eps):
    (pc, pr, rc, rr), (tc, tr) = _inputs(1)
    ours, chosen_r, rejected_r = pl.dpo_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_tokens=tc,
        rejected_tokens=tr,
    )
    for i in range(N):  # TRL returns the batch mean: one pair per call gives its per-pair loss
        s = slice(i, i + 1)
        ref, _ = _trl_dpo(trl, [loss_type], [1.0], beta, eps, pc[s], pr[s], rc[s], rr[s], tc[s], tr[s])
        assert abs(ours[i].item() - ref.item()) <= TOL * max(1.0, abs(ref.item()))
    ref, metrics = _trl_dpo(trl, [loss_type], [1.0], beta, eps, pc, pr, rc, rr, tc, tr)
    assert abs(ours.mean().item() - ref.item()) <= TOL * max(1.0, abs(ref.item()))
    assert abs(chosen_r.mean().item() - metrics["rewards/chosen"][-1]) <= TOL
    assert abs(rejected_r.mean().item() - metrics["rewards/rejected"][-1]) <= TOL


def test_dpo_plus_nll_matches_trl_sft_term(trl):
    """RPO: TRL 1.16 loss_type=["sigmoid", "sft"]; with equal chosen lengths its token-mean NLL equals ours."""
    (pc, pr, rc, rr), (_, tr) = _inputs(2)
    tc = torch.full((N,), 5)
    alpha = 0.7
    losses, _, _ = pl.dpo_loss(pc, pr, rc, rr, beta=0.1)
    ours = (losses + alpha * pl.nll_term(pc, tc)).mean()
    ref, _ = _trl_dpo(trl, ["sigmoid", "sft"], [1.0, alpha], 0.1, 0.0, pc, pr, rc, rr, tc, tr)
    assert abs(ours.item() - ref.item()) <= TOL * max(1.0, abs(ref.item()))


def _trl_cpo(loss_type, beta, eps, chosen, rejected, simpo_gamma=0.5):
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    stub = _stub(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=simpo_gamma)
    return CPOTrainer.cpo_loss(stub, chosen, rejected)


def test_cdpo_label_smoothing_matches_trl_conservative_form(trl):
    """TRL 1.16's DPO "sigmoid" ignores label_smoothing; its CPO "sigmoid" keeps the cDPO form: feed it h."""
    (pc, pr, rc, rr), _ = _inputs(3)
    ours, _, _ = pl.dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    h = (pc - rc) - (pr - rr)
    ref, _, _ = _trl_cpo("sigmoid", 0.1, 0.2, h, torch.zeros_like(h))
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(
    ("loss_type", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0)]
)
def test_cpo_matches_trl(trl, loss_type, eps):
    (c, r, nll, _), (tc, tr) = _inputs(4)
    nll = -nll / 10
    beta, alpha = 0.2, 1.5
    ours, chosen_r, rejected_r = pl.cpo_loss(
        c,
        r,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=eps,
        chosen_nll=nll,
        cpo_alpha=alpha,
        chosen_tokens=tc,
        rejected_tokens=tr,
    )
    # TRL's CPO feeds length-averaged log-probs to "ipo" (get_batch_logps(average_log_prob=True))
    if loss_type == "ipo":
        c, r = c / tc, r / tr
    ref, ref_c, ref_r = _trl_cpo(loss_type, beta, eps, c, r)
    torch.testing.assert_close(ours, ref + alpha * nll, atol=TOL, rtol=TOL)
    torch.testing.assert_close(chosen_r, ref_c, atol=TOL, rtol=TOL)
    torch.testing.assert_close(rejected_r, ref_r, atol=TOL, rtol=TOL)


@pytest.mark.parametrize(("beta", "gamma", "eps"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.1)])
def test_simpo_matches_trl(trl, beta, gamma, eps):
    (c, r, _, _), (tc, tr) = _inputs(5)
    ours, chosen_r, rejected_r = pl.simpo_loss(c, r, tc, tr, beta=beta, gamma=gamma, label_smoothing=eps)
    ref, ref_c, ref_r = _trl_cpo("simpo", beta, eps, c / tc, r / tr, simpo_gamma=gamma)
    torch.testing.assert_close(ours, ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(chosen_r, ref_c, atol=TOL, rtol=TOL)
    torch.testing.assert_close(rejected_r, ref_r, atol=TOL, rtol=TOL)


def test_orpo_matches_trl(trl):
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    (c, r, _, _), (tc, tr) = _inputs(6)
    c, r = c / 10, r / 10  # average log-probs near 0 as well, where log1mexp matters
    beta = 0.25
    ours, or_term, chosen_r, rejected_r = pl.orpo_loss(c, r, tc, tr, beta=beta)
    ref, ref_c, ref_r, _, _ = ORPOTrainer.odds_ratio_loss(_stub(beta=beta), c / tc, r / tr)
    torch.testing.assert_close(beta * or_term, -ref, atol=TOL, rtol=TOL)  # TRL returns beta * log sigma
    torch.testing.assert_close(ours, -(c / tc) - ref, atol=TOL, rtol=TOL)
    torch.testing.assert_close(chosen_r, ref_c, atol=TOL, rtol=TOL)
    torch.testing.assert_close(rejected_r, ref_r, atol=TOL, rtol=TOL)


def _trl_kto(beta, wd, wu, logps, ref, labels, kl_logps, ref_kl):
    from trl.trainer.kto_trainer import KTOTrainer

    b, k = len(logps), len(kl_logps)
    width, kl_width = 4, 5  # the fake model tells the KL forward from the main one by the width
    mask, kl_mask = (
        _completion_mask(torch.full((b,), 2), width),
        _completion_mask(torch.full((k,), 3), kl_width),
    )
    model = _fake_lm({width: _per_token(logps, mask), kl_width: _per_token(kl_logps, kl_mask)})
    stub = _stub(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=wd,
        undesirable_weight=wu,
    )
    stub._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, stub)
    inputs = {
        "input_ids": torch.zeros_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "KL_input_ids": torch.zeros_like(kl_mask),
        "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask,
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }
    loss = KTOTrainer._compute_loss(stub, model, inputs, return_outputs=False)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("kl_shift", [0.0, 3.0])  # 3.0 pushes the raw KL mean below 0: clamped
def test_kto_matches_trl(trl, kl_shift):
    (p, ref, kl_p, kl_ref), _ = _inputs(7)
    kl_p = kl_p - kl_shift
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    beta, wd, wu = 0.3, 1.0, 1.33
    kl = pl.kto_kl_estimate(kl_p, kl_ref)
    ours, rewards = pl.kto_loss(p, ref, labels, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    for i in range(N):  # one example per call, the KL still over the whole batch
        s = slice(i, i + 1)
        trl_loss, metrics = _trl_kto(beta, wd, wu, p[s], ref[s], labels[s], kl_p, kl_ref)
        assert abs(ours[i].item() - trl_loss.item()) <= TOL
        assert abs(kl.item() - metrics["kl"][-1]) <= TOL
    trl_loss, metrics = _trl_kto(beta, wd, wu, p, ref, labels, kl_p, kl_ref)
    assert abs(ours.mean().item() - trl_loss.item()) <= TOL
    assert abs(rewards[labels].mean().item() - metrics["rewards/chosen"][-1]) <= TOL
    assert abs(rewards[~labels].mean().item() - metrics["rewards/rejected"][-1]) <= TOL


def test_bradley_terry_matches_trl(trl):
    from trl.trainer.reward_trainer import RewardTrainer

    g = torch.Generator().manual_seed(8)
    c, r, margin = (torch.randn(N, generator=g) * 3 for _ in range(3))
    for coef in (None, 0.01):
        ours = pl.bradley_terry(c, r, margin, center_rewards_coefficient=coef)
        stub = _stub(args=types.SimpleNamespace(center_rewards_coefficient=coef))

        def model(**_kwargs):
            return types.SimpleNamespace(logits=torch.cat([c, r]).unsqueeze(-1))

        inputs = {"attention_mask": torch.ones(2 * N, 3, dtype=torch.long), "margin": margin}
        ref = RewardTrainer.compute_loss(stub, model, inputs)
        assert abs(ours.mean().item() - ref.item()) <= TOL * max(1.0, abs(ref.item()))
