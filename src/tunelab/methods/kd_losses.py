"""Distillation losses as pure functions of log-probabilities (method kd, methods/kd.py).

Every function takes the student's and the teacher's log-probabilities over the same support, [n, S] (one row per
trained position), and returns one value per position, [n]. The support is the whole vocabulary, or with a top-k
teacher the k tokens the teacher ranks highest plus one bucket holding the rest of the mass (`topk_buckets`): the
divergence of the two distributions coarse-grained that way, which is finite for every loss (a teacher that gives
the tokens outside its top k no mass at all would make the reverse KL infinite), never larger than the divergence
over the whole vocabulary, and equal to it when the teacher's mass lies in its top k.

- forward_kl: KL(teacher || student) = sum_v p_t(v) (log p_t(v) - log p_s(v)): mass-covering; Hinton's KD (with
  the teacher's entropy, a constant, removed from the cross-entropy);
- reverse_kl: KL(student || teacher): mode-seeking; MiniLLM's objective;
- jsd: the generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024, eq. 1) with the mixture
  m = beta p_t + (1 - beta) p_s: beta KL(p_t || m) + (1 - beta) KL(p_s || m), beta in (0, 1). As beta goes to 0 or
  1 it vanishes (it does not tend to either KL; TRL's `generalized_jsd_loss` switches to them at exactly 0 and 1).

Terms with zero probability in the first argument of a KL contribute 0 (0 log 0 = 0), with zero gradient.
"""

from __future__ import annotations

import math

import torch

from tunelab.utils.numerics import at_least_fp32


def log_distribution(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T) in at least float32."""
    logits = at_least_fp32(logits)
    return torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities; entries where p = 0 add 0."""
    terms = torch.exp(logp) * (logp - logq)
    return torch.where(torch.isneginf(logp), torch.zeros_like(terms), terms).sum(-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    return _kl(teacher, student)


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    return _kl(student, teacher)


def jsd(student: torch.Tensor, teacher: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs beta in (0, 1), got {beta}")
    mixture = torch.logaddexp(teacher + math.log(beta), student + math.log1p(-beta))
    return beta * _kl(teacher, mixture) + (1 - beta) * _kl(student, mixture)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd}


def topk_indices(teacher_logits: torch.Tensor, k: int) -> torch.Tensor:
    """The k tokens the teacher ranks highest per position, [n, k] (the ranking does not depend on temperature)."""
    return torch.topk(teacher_logits, k, dim=-1).indices


def topk_buckets(logp: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [n, V] coarse-grained to [n, k + 1]: the k tokens of `indices`, then the log of the mass of
    all other tokens (a log-sum-exp over them, exact and stable however small that mass is)."""
    picked = logp.gather(-1, indices)
    rest = torch.logsumexp(logp.scatter(-1, indices, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([picked, rest], dim=-1)


def distill_terms(student_logits: torch.Tensor, teacher: torch.Tensor, *, loss: str, temperature: float,
                  beta: float, indices: torch.Tensor | None = None) -> torch.Tensor:
    """Per position [n]: the divergence `loss` between the student's distribution at `temperature` and the
    teacher's, times temperature^2 (Hinton et al.: the gradients of softened distributions shrink as 1/T^2; the
    factor keeps the term's scale as T changes). `teacher` is its log-probabilities at that temperature: [n, V] over
    the vocabulary, or [n, k + 1] top-k buckets with the student coarse-grained by the same `indices`."""
    student = log_distribution(student_logits, temperature)
    if indices is not None:
        student = topk_buckets(student, indices)
    return DIVERGENCES[loss](student, at_least_fp32(teacher).to(student.dtype), beta) * temperature ** 2
