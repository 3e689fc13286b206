"""Tolerances derived from the arithmetic a test checks; docs/architecture.md ("Tolerances") states the rules.

Two computations that are equal in exact arithmetic but add their terms in a different order (packed vs padded
rows, accumulation splits, several processes, fused vs unfused kernels, chunked vs whole losses, merged vs separate
adapter weights) differ by rounding alone. For a sum of n terms each evaluation order is within gamma(n) * sum|x_i|
of the exact sum, gamma(n) = n*u / (1 - n*u) with u the unit roundoff of the dtype (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., section 4.2), so two orders are within 2 * gamma(n) * sum|x_i| of each
other. Through a network the reduction lengths on the longest dependency chain add up (`chain_length`), and
sum|x_i| is the value's magnitude times a cancellation factor `cond` (how many times larger the terms are than
their sum).

Training trajectories need one more step. AdamW divides each gradient element by its own running RMS, so a
relative error rho in a gradient element becomes a relative error of about 2 * rho in that element's update,
whose size is about lr (lr * sign(g) on the first step) -- however small the gradient itself. An element whose
gradient nearly cancels (cond ~1e4 was seen) carries rounding noise that float32 cannot resolve: its update, and so
its weight, differs between two float32 runs by a sizeable share of lr, which is as much as a masking bug moves it.
No float32 tolerance separates the two, so claims about trained weights run in float64 (`model.dtype: float64`),
where the same cancellation leaves the weights ~1e-14 apart and a masking bug still moves them by ~1e-2.

COND is the cancellation we budget for in float64 claims: 1e6, two decades above the worst seen (~1e4). With it a
float64 tolerance stays five or more decades below what a one-token masking bug changes (tests/e2e, "sharpness"
notes in docs/architecture.md), and five or more above the float64 noise that was measured.

One caveat of float64 runs: transformers computes RMSNorm in float32 whatever the model dtype. Two float64 runs
round the *same* value there, so their norms still agree bitwise, unless a value sits within float64 noise of a
float32 rounding boundary (a chance of ~1e-8 per element); the COND budget covers such a rare one-ulp step too.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

COND = 1e6  # cancellation budget of float64 claims (module docstring)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one rounding (2^-24 for float32, 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma(n) = n u / (1 - n u): the relative error bound of n roundings in a row (Higham, Lemma 3.1)."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"{n} roundings of {dtype} exceed any bound (n*u = {nu:.2g})")
    return nu / (1 - nu)


def reorder_tol(scale: float, n: int, dtype: torch.dtype = torch.float64, cond: float = COND) -> float:
    """Largest |a - b| between two evaluation orders of a value of magnitude `scale` whose longest chain of summed
    terms has length `n` and whose terms are up to `cond` times larger than the value: 2 gamma(n) cond scale."""
    return 2 * gamma(n, dtype) * cond * scale


def logits_tol(ref: torch.Tensor, model: str | Path | dict, extra: int = 0) -> float:
    """Largest |a - b| between two float32 forwards of a causal LM over `ref`'s positions that reorder sums
    (merged vs separate adapter weights, packed vs padded rows): reorder_tol at the scale of the largest logit, for
    the model's chain over that many positions plus `extra` terms (an adapter's rank, a second dot product).
    cond = 1 here: the linear-in-n bound is ~sqrt(n) (~45 for these chains) times the typical, random-walk error,
    which covers the cancellation of random-sign dot products (~sqrt(hidden) = 8 for hidden 64)."""
    n = chain_length(model, ref.shape[-2]) + extra
    return reorder_tol(float(ref.detach().abs().max()), n, ref.dtype, cond=1.0)


def adam_tol(lr: float, steps: int, n: int, dtype: torch.dtype = torch.float64, cond: float = COND) -> float:
    """Largest difference of a weight trained `steps` AdamW steps of learning rate `lr` in two runs whose gradients
    differ by reordering only (chains of length `n`): each update, of size at most ~2 lr (AdamW's normalised step,
    with room for its early overshoot), moves by 2 rho relative, rho = reorder_tol(1, n, dtype, cond)."""
    return steps * 2 * lr * 2 * reorder_tol(1.0, n, dtype, cond)


def chain_length(model: str | Path | dict, seq: int, tokens: int = 0) -> int:
    """The longest chain of reordered sums behind a causal LM's loss: per decoder layer the q/k/v projections
    (hidden), attention scores (head_dim) and the weighted sum over at most `seq` positions, the output projection
    (hidden), gate/up (hidden) and down (intermediate) projections and two RMSNorms (hidden each); then the final
    norm, the LM head (hidden) and the log-sum-exp over the vocabulary. `tokens` adds a loss summed over that many
    tokens and, for gradients, the weight-gradient sum over them. `model` is a model folder or its config dict.
    (q, k and v are computed side by side: one of them is on the chain.)"""
    cfg = model if isinstance(model, dict) else json.loads((Path(model) / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    per_layer = hidden + head_dim + seq + hidden + hidden + cfg["intermediate_size"] + 2 * hidden
    return layers * per_layer + 2 * hidden + cfg["vocab_size"] + tokens


def assert_same_values(got: list[float], ref: list[float], tol: float, what: str = "values") -> None:
    """|got - ref| <= tol elementwise, with the largest difference and the tolerance in the message."""
    assert len(got) == len(ref) > 0, f"{what}: {len(got)} values against {len(ref)}"
    worst = max(abs(a - b) for a, b in zip(got, ref))
    assert worst <= tol, f"{what}: differ by {worst:.3g} > {tol:.3g}\n got {got}\n ref {ref}"


def assert_same_metrics(got: list[dict], ref: list[dict], keys, n: int, dtype: torch.dtype = torch.float64,
                        cond: float = COND) -> None:
    """Per-step metrics of two runs that are equal in exact arithmetic: each key's values agree within the reorder
    bound at the scale of that key's values (chains of length `n`)."""
    for key in keys:
        a = [r[key] for r in got if key in r]
        b = [r[key] for r in ref if key in r]
        scale = max(abs(v) for v in b) if b else 0.0
        assert_same_values(a, b, reorder_tol(scale, n, dtype, cond), key)


def assert_same_weights(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float,
                        dtype: torch.dtype | None = torch.float64) -> None:
    """Every tensor of `ref` is in `got` and agrees elementwise within `tol`; both are stored in `dtype` (a claim
    derived for float64 must not quietly run in float32)."""
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    for name in ref:
        if dtype is not None:
            assert got[name].dtype == ref[name].dtype == dtype, (name, got[name].dtype, ref[name].dtype)
        torch.testing.assert_close(got[name].double(), ref[name].double(), atol=tol, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


# cancellation budget of DeepSpeed's float32 master update (worst seen: ~70, in LoRA's small A weights)
DS_COND = 1e4


def engine_adam_tol(engine: str, lr: float, steps: int, n: int, ref: dict, *, fp32_update: bool = False) -> float:
    """adam_tol for the reordered gradients; DeepSpeed also keeps its master weights and optimizer in float32
    whatever the model's dtype (ZeRO's fp32 partitions), as peft keeps soft prompts (`fp32_update`): each update
    sees the gradient rounded to float32 and rounds every weight once more (u32 x |w|). DS_COND budgets the
    cancellation in Adam's float32 moments."""
    tol = adam_tol(lr, steps, n)
    if engine.startswith("zero") or fp32_update:  # the gradient rounded to float32 (a one-term chain), and the
        # weight rounded too
        tol += adam_tol(lr, steps, 1, torch.float32, cond=DS_COND)
        tol += steps * unit_roundoff(torch.float32) * max(float(t.abs().max()) for t in ref.values())
    return tol
