"""The math of reward modelling and preference optimisation, as pure functions.

Every function takes per-sequence log-probabilities *summed* over the completion tokens (and the completion token
counts where a method length-normalises) and returns PER-EXAMPLE losses of shape [n], not reduced: the training loop
sums them and divides by the number of pairs (KTO: examples) of the whole global batch, see `methods/base.py`.
Reward tensors for metrics are returned detached. All arithmetic is done in fp32 whatever the input dtype
(float64 inputs stay float64).
Reference log-probabilities (and the KTO KL estimate) are detached: gradients only flow through policy terms.

Conventions shared by the DPO family: h = (pi_c - ref_c) - (pi_r - ref_r) is the difference of the policy/reference
log-ratios of the chosen and rejected completions; rewards are beta * (pi - ref). The loss variants live in
`DPO_LOSSES`, keyed by the name users write in configs (`loss_type`). The formulas follow TRL 1.16
(`trl/trainer/dpo_trainer.py::DPOTrainer._compute_loss`, `trl/trainer/kto_trainer.py::KTOTrainer._compute_loss`,
`trl/trainer/reward_trainer.py::RewardTrainer.compute_loss`, `trl/experimental/cpo/cpo_trainer.py::CPOTrainer.cpo_loss`,
`trl/experimental/orpo/orpo_trainer.py::ORPOTrainer.odds_ratio_loss`); deviations are stated where they exist.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "DPO_LOSSES",
    "LENGTH_NORMALISED_DPO_LOSSES",
    "SIMPO_LOSSES",
    "bradley_terry",
    "cpo_loss",
    "dpo_loss",
    "kto_kl_estimate",
    "kto_loss",
    "log1mexp",
    "log_odds_ratio",
    "nll_term",
    "orpo_loss",
    "simpo_loss",
]

_LN2 = math.log(2.0)


def _upcast(x: torch.Tensor | float) -> torch.Tensor:
    """fp32 for half-precision, integer and Python inputs; float64 stays float64 (a float64 run's precision)."""
    if isinstance(x, torch.Tensor):
        return x if x.dtype == torch.float64 else x.float()
    return torch.tensor(float(x))


def _avg(logps_sum: torch.Tensor, tokens: torch.Tensor | None, what: str) -> torch.Tensor:
    """Length-average a summed log-prob; token counts are clamped at 1 (as TRL does) so empty completions give 0."""
    if tokens is None:
        raise ValueError(f"{what} needs the completion token counts (chosen_tokens / rejected_tokens)")
    return _upcast(logps_sum) / _upcast(tokens).to(logps_sum.device).clamp(min=1.0)


def _check_smoothing(loss_type: str, label_smoothing: float, upper_inclusive: bool = False) -> None:
    ok = 0.0 <= label_smoothing <= 0.5 if upper_inclusive else 0.0 <= label_smoothing < 0.5
    if not ok:
        bound = "[0, 0.5]" if upper_inclusive else "[0, 0.5)"
        raise ValueError(
            f"label_smoothing must lie in {bound} for loss_type={loss_type!r}, got {label_smoothing}"
        )


# --------------------------------------------------------------------------------------------------- reward model


def bradley_terry(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    *,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Pairwise reward-model loss: -log sigma(r_c - r_r - margin), per pair.

    Matches TRL's `RewardTrainer.compute_loss` (the `margin` column is the Llama-2 style preference margin). With
    `center_rewards_coefficient` c the per-pair term c * (r_c + r_r)^2 is added; its mean over the batch is TRL's
    auxiliary centring loss (Eisenstein et al., 2023).
    """
    diff = _upcast(chosen_scores) - _upcast(rejected_scores)
    if margin is not None:
        diff = diff - _upcast(margin).to(diff.device)
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient is not None:
        losses = losses + center_rewards_coefficient * (_upcast(chosen_scores) + _upcast(rejected_scores)) ** 2
    return losses


# ----------------------------------------------------------------------------------------------------- DPO family
# Each entry maps h (the log-ratio difference; for "ipo" already length-averaged) to per-pair losses.


def _dpo_sigmoid(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (Rafailov et al., 2023): -log sigma(beta h). With eps > 0 the conservative cDPO loss
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h) (Mitchell, 2023; TRL <= 0.2x's "sigmoid", TRL 1.16's CPO)."""
    _check_smoothing("sigmoid", label_smoothing, upper_inclusive=True)
    losses = -F.logsigmoid(beta * h)
    if label_smoothing > 0:
        losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    return losses


def _dpo_hinge(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC-style hinge (Zhao et al., 2023): relu(1 - beta h). No label smoothing."""
    if label_smoothing:
        raise ValueError("label_smoothing is not defined for loss_type='hinge'")
    return torch.relu(1 - beta * h)


def _dpo_ipo(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (Azar et al., 2023, Eq. 17, beta = tau): (h - 1/(2 beta))^2 on length-averaged log-ratios (TRL 1.16)."""
    if label_smoothing:
        raise ValueError("label_smoothing is not defined for loss_type='ipo'")
    return (h - 1 / (2 * beta)) ** 2


def _dpo_robust(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """rDPO (Chowdhury et al., 2024), eps = label flip rate in [0, 0.5):
    ((1 - eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps). Unbiased under flipped labels."""
    _check_smoothing("robust", label_smoothing)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


DpoLossFn = Callable[[torch.Tensor, float, float], torch.Tensor]

DPO_LOSSES: dict[str, DpoLossFn] = {
    "sigmoid": _dpo_sigmoid,
    "hinge": _dpo_hinge,
    "ipo": _dpo_ipo,
    "robust": _dpo_robust,
}
"""loss_type -> fn(h, beta, label_smoothing) -> per-pair losses."""

LENGTH_NORMALISED_DPO_LOSSES: frozenset[str] = frozenset({"ipo"})
"""Loss types whose log-ratios are divided by the completion token counts before the loss (TRL 1.16 IPO)."""


def _lookup(table: dict[str, DpoLossFn], loss_type: str) -> DpoLossFn:
    try:
        return table[loss_type]
    except KeyError:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(table)}") from None


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO-family loss on summed log-probs. Returns (losses [n], chosen_rewards, rejected_rewards).

    h = (pi_c - ref_c) - (pi_r - ref_r); losses = DPO_LOSSES[loss_type](h, beta, label_smoothing);
    rewards = beta * (pi - ref), detached (TRL's rewards/* metrics: always the *summed* log-ratios).
    For loss_type "ipo" each log-ratio is first divided by its completion token count (TRL 1.16, confirmed with the
    IPO authors), so `chosen_tokens` / `rejected_tokens` are required then and ignored otherwise.
    Matches TRL 1.16 `DPOTrainer._compute_loss` (f_divergence_type="reverse_kl", no WPO weighting, no ld_alpha),
    except that TRL 1.16's "sigmoid" ignores label_smoothing while ours is cDPO then.
    """
    fn = _lookup(DPO_LOSSES, loss_type)
    chosen_ratio = _upcast(policy_chosen) - _upcast(ref_chosen).detach()
    rejected_ratio = _upcast(policy_rejected) - _upcast(ref_rejected).detach()
    if loss_type in LENGTH_NORMALISED_DPO_LOSSES:
        h = _avg(chosen_ratio, chosen_tokens, loss_type) - _avg(rejected_ratio, rejected_tokens, loss_type)
    else:
        h = chosen_ratio - rejected_ratio
    losses = fn(h, beta, label_smoothing)
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def nll_term(chosen_logps_sum: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-example mean NLL of the chosen completion: -sum log p / max(tokens, 1).

    The RPO / "DPO + SFT" regulariser (Pang et al., 2024): the DPO method adds `rpo_alpha * nll_term(...)` to the
    per-pair DPO losses (TRL 1.16: loss_type=["sigmoid", "sft"], loss_weights=[1, rpo_alpha]). Weighting: every pair
    counts equally (mean of per-sequence means); TRL averages over all chosen tokens of the batch instead, which is
    the same when the chosen completions have equal length. Also the BC term of CPO (`cpo_loss(chosen_nll=...)`).
    """
    return -_avg(chosen_logps_sum, chosen_tokens, "nll_term")


# --------------------------------------------------------------------------------------------------------- KTO


def kto_kl_estimate(
    policy_kl_logps: torch.Tensor,
    ref_kl_logps: torch.Tensor,
    *,
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """KTO reference point z0: detached scalar max(0, mean(pi_KL - ref_KL)).

    The inputs are summed log-probs of *mismatched* pairs (prompt i with the completion of another example of the
    batch, TRL's KL_* columns). As in TRL 1.16 `KTOTrainer._compute_loss`, the mean is taken over the local batch,
    then averaged over processes (pass `all_reduce_mean`, e.g. an all-reduce AVG over ranks, in distributed runs),
    and only then clamped at 0.
    """
    kl = (_upcast(policy_kl_logps) - _upcast(ref_kl_logps)).mean().detach()
    if all_reduce_mean is not None:
        kl = all_reduce_mean(kl)
    return kl.clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al., 2024, Eq. 7) on unpaired examples. Returns (losses [n], rewards [n]), input order.

    r = pi - ref; desirable: w_d (1 - sigma(beta (r - KL))); undesirable: w_u (1 - sigma(beta (KL - r))).
    Note beta multiplies (r - KL), as in the paper and TRL 1.16 (`loss_type="kto"`). rewards = beta r, detached.
    KL is detached (see `kto_kl_estimate`). TRL averages the weighted losses over all examples (nanmean).
    """
    ratio = _upcast(policy_logps) - _upcast(ref_logps).detach()
    z0 = _upcast(kl).detach().to(ratio.device)
    desirable = desirable.to(device=ratio.device, dtype=torch.bool)
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    return losses, beta * ratio.detach()


# -------------------------------------------------------------------------------------------------------- ORPO


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable: log1p(-exp(x)) below -ln 2, log(-expm1(x)) above (Maechler, 2012)."""
    return torch.where(x < -_LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds_ratio(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor) -> torch.Tensor:
    """log odds(c) - log odds(r), with log odds(x) = avg_logp - log(1 - exp(avg_logp)).

    Average log-probs are clamped at -1e-7 so that a probability of exactly 1 gives a large finite log-odds instead
    of inf (TRL does not clamp; identical for any realistic input).
    """
    c = _upcast(chosen_avg_logps).clamp(max=-1e-7)
    r = _upcast(rejected_avg_logps).clamp(max=-1e-7)
    return (c - r) - (log1mexp(c) - log1mexp(r))


def orpo_loss(
    chosen_logps_sum: torch.Tensor,
    rejected_logps_sum: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO (Hong et al., 2024). Returns (losses, or_term, chosen_rewards, rejected_rewards), all [n].

    avg = logps_sum / tokens; or_term = -log sigma(log_odds_ratio(avg_c, avg_r));
    losses = -avg_c + beta * or_term (paper Eq. 6, beta = lambda); rewards = beta * avg (TRL's metrics), detached.
    The odds term equals TRL 1.16 `ORPOTrainer.odds_ratio_loss` (which returns beta * log sigma, i.e. -beta * or_term).
    The NLL is the paper's length-normalised NLL of the chosen *completion*, one weight per pair; TRL instead uses the
    token-mean cross-entropy over prompt *and* completion of all chosen sequences of the batch.
    """
    chosen_avg = _avg(chosen_logps_sum, chosen_tokens, "orpo")
    rejected_avg = _avg(rejected_logps_sum, rejected_tokens, "orpo")
    or_term = -F.logsigmoid(log_odds_ratio(chosen_avg, rejected_avg))
    losses = -chosen_avg + beta * or_term
    return losses, or_term, beta * chosen_avg.detach(), beta * rejected_avg.detach()


# ------------------------------------------------------------------------------------------------ SimPO and CPO


def _simpo_sigmoid(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    _check_smoothing("sigmoid", label_smoothing, upper_inclusive=True)
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def _simpo_hinge(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if label_smoothing:
        raise ValueError("label_smoothing is not defined for loss_type='hinge'")
    return torch.relu(1 - z)


SIMPO_LOSSES: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "sigmoid": _simpo_sigmoid,
    "hinge": _simpo_hinge,
}
"""loss_type -> fn(z, label_smoothing) with z = beta * (avg_c - avg_r) - gamma."""


def simpo_loss(
    chosen_logps_sum: torch.Tensor,
    rejected_logps_sum: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    *,
    beta: float,
    gamma: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al., 2024), reference-free. Returns (losses, chosen_rewards, rejected_rewards), all [n].

    z = beta * (avg_c - avg_r) - gamma with avg = logps_sum / tokens;
    "sigmoid": -(1 - eps) log sigma(z) - eps log sigma(-z); "hinge": relu(1 - z). rewards = beta * avg, detached.
    `gamma` is the paper's target reward margin gamma, i.e. TRL's `CPOConfig.simpo_gamma` (TRL 1.16
    `CPOTrainer.cpo_loss`, loss_type="simpo", which subtracts simpo_gamma / beta before multiplying by beta). The
    SimPO repository's `gamma_beta_ratio` is gamma / beta. The hinge form is the SimPO repository's.
    """
    fn = SIMPO_LOSSES.get(loss_type)
    if fn is None:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {sorted(SIMPO_LOSSES)}")
    chosen_avg = _avg(chosen_logps_sum, chosen_tokens, "simpo")
    rejected_avg = _avg(rejected_logps_sum, rejected_tokens, "simpo")
    z = beta * (chosen_avg - rejected_avg) - gamma
    return fn(z, label_smoothing), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def cpo_loss(
    chosen_logps_sum: torch.Tensor,
    rejected_logps_sum: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_nll: torch.Tensor | float,
    cpo_alpha: float = 1.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPO (Xu et al., 2024): DPO-style loss without reference plus a BC term. Returns (losses, chosen_rewards,
    rejected_rewards), all [n].

    h = pi_c - pi_r, the policy's own log-probability margin (no reference, so no log-ratio; length-averaged for
    "ipo", as TRL's CPO does); losses = DPO_LOSSES[loss_type](h, beta, eps) + cpo_alpha * chosen_nll, where
    `chosen_nll` is the per-example NLL of the chosen completion (use `nll_term`). The CPO variants are "sigmoid"
    (label_smoothing eps > 0: the conservative form), "hinge" and "ipo", TRL's CPO loss types (its "simpo" is
    `simpo_loss`); "robust" (rDPO) is a DPO variant that `method.type: cpo` does not offer.
    rewards = beta * pi (averaged for "ipo"), detached. Matches TRL 1.16 `CPOTrainer.cpo_loss` (alpha=0, i.e. no
    AlphaPO) plus `cpo_alpha * nll_loss`; TRL's NLL is a token mean over the batch's chosen sequences, ours is one
    weight per pair (equal for equal lengths). For SimPO use `simpo_loss`.
    """
    fn = _lookup(DPO_LOSSES, loss_type)
    chosen = _upcast(chosen_logps_sum)
    rejected = _upcast(rejected_logps_sum)
    if loss_type in LENGTH_NORMALISED_DPO_LOSSES:
        chosen = _avg(chosen, chosen_tokens, loss_type)
        rejected = _avg(rejected, rejected_tokens, loss_type)
    losses = fn(chosen - rejected, beta, label_smoothing)
    if cpo_alpha:
        losses = losses + cpo_alpha * _upcast(chosen_nll).to(losses.device)
    return losses, beta * chosen.detach(), beta * rejected.detach()
