"""Low-rank linear layers (`tunelab lowrank`): the math of the factorisation and the folder format it writes.

A decoder linear W [out, in] is replaced by two, x -> B (A x), A [r, in] and B [out, r], from its truncated SVD
W ~ U_r S_r V_r^T (Eckart-Young: the best rank-r approximation in the Frobenius norm, whose squared error is the sum
of the discarded S_i^2), split evenly: B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T. Activation-whitened (SVD-LLM's
idea, Wang et al. 2024): with the layer's inputs X on calibration tokens, H = X^T X = L L^T (Cholesky), the output
error ||(W - W') X^T||^2 = ||(W - W') L||^2, so the SVD of W L gives the best rank-r W' for those inputs:
W' = U_r S_r V_r^T L^-1, B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T L^-1; its output error is the sum of the discarded
singular values of W L squared.

The rank of a layer: `rank` (the same for every layer), `energy` (the smallest r keeping that share of sum S_i^2),
or `ratio` (r(out + in) <= ratio x out x in: the layer keeps that share of its parameters). A layer whose rank would
not make it smaller (r(out + in) >= out x in) stays dense.

Format: a model folder of the original architecture (its config.json unchanged) whose factored layers are stored as
`<layer>.a.weight` [r, in] and `<layer>.b.weight` [out, r] (`<layer>.b.bias` if the layer had one), beside
`tunelab_lowrank.json` with every factored layer's rank. No library has a standard low-rank linear layer, and a
folder that needs its own modelling code would be remote code, which tunelab does not run; so tunelab's loading
(train, chat, eval, export, every command) builds the architecture from its config, swaps in the two-matrix layers
and loads the weights strictly. transformers alone would load such a folder with those layers missing (it warns
and initialises them at random): `tunelab export --model FOLDER --out DENSE` multiplies the factors back into a
standard folder that every tool loads (the same function, no smaller).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

LOWRANK_FILE = "tunelab_lowrank.json"


class LowRankLinear(torch.nn.Module):
    """x -> b(a(x)): a [rank, in] without bias, b [out, rank] with the original layer's bias. Two nn.Linear, so
    LoRA (target all-linear) adapts each factor, and merging an adapter into them is exact."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = torch.nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.b = torch.nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.b(self.a(x))

    def dense(self) -> torch.nn.Linear:
        """The nn.Linear computing the same function (W = B A)."""
        a, b = self.a.weight, self.b.weight
        layer = torch.nn.Linear(self.in_features, self.out_features, bias=self.b.bias is not None, dtype=a.dtype,
                                device=a.device)
        with torch.no_grad():
            layer.weight.copy_((b.double() @ a.double()).to(a.dtype))
            if self.b.bias is not None:
                layer.bias.copy_(self.b.bias)
        return layer


# ---------------------------------------------------------------------------------------------- the math (pure)
def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest r whose first r singular values keep at least `energy` of sum s_i^2."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(e, 0) / total
    # the first r with kept >= energy (a relative 1e-12 below it counts: the sums round)
    return int(torch.searchsorted(kept, torch.tensor([energy - 1e-12], dtype=torch.float64))[0]) + 1


def ratio_rank(out_features: int, in_features: int, ratio: float) -> int:
    """The largest r with r (out + in) <= ratio x out x in (at least 1)."""
    return max(1, math.floor(ratio * out_features * in_features / (out_features + in_features)))


def saves_parameters(out_features: int, in_features: int, rank: int) -> bool:
    return rank * (out_features + in_features) < out_features * in_features


def factor(w: torch.Tensor, rank: int | None = None, energy: float | None = None, ratio: float | None = None,
           hessian: torch.Tensor | None = None, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(B [out, r], A [r, in], facts) for w [out, in] (module docstring), whitened by the inputs' H = X^T X when
    `hessian` is given (`damp` x its mean diagonal is added first, so that inputs never seen cannot make it
    singular). facts: the rank, the singular values' kept energy, and the squared error the discarded ones make
    (of W, or of the outputs on the calibration inputs when whitened)."""
    wd = w.double()
    out_features, in_features = w.shape
    if hessian is not None:
        h = hessian.double().clone()
        h += (damp * float(torch.mean(torch.diag(h))) or 1e-8) * torch.eye(in_features, dtype=torch.float64)
        chol = torch.linalg.cholesky(h)
        u, s, vh = torch.linalg.svd(wd @ chol, full_matrices=False)
    else:
        chol = None
        u, s, vh = torch.linalg.svd(wd, full_matrices=False)
    if rank is not None:
        r = rank
    elif energy is not None:
        r = energy_rank(s, energy)
    else:
        r = ratio_rank(out_features, in_features, ratio)
    r = max(1, min(r, s.numel()))
    root = torch.sqrt(s[:r])
    b = u[:, :r] * root[None, :]
    a = root[:, None] * vh[:r]
    if chol is not None:  # A = S^(1/2) V^T L^-1, solving L^T Y = A^T
        a = torch.linalg.solve_triangular(chol.T, a.T, upper=True).T
    e = s ** 2
    facts = {"rank": r, "energy": float(e[:r].sum() / e.sum()) if float(e.sum()) else 1.0,
             "discarded": float(e[r:].sum())}
    return b.to(w.dtype), a.to(w.dtype), facts


# --------------------------------------------------------------------------------------------- the folder
def lowrank_ranks(path) -> dict[str, int] | None:
    """The factored layers' ranks recorded in a low-rank folder, or None for any other folder."""
    file = Path(path) / LOWRANK_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    ranks = data.get("ranks") if isinstance(data, dict) else None
    if not isinstance(ranks, dict) or not all(isinstance(r, int) and r > 0 for r in ranks.values()):
        return None
    return ranks


def swap_in(model: torch.nn.Module, ranks: dict[str, int]) -> None:
    """Replace each nn.Linear named in `ranks` by an (untrained) LowRankLinear of that rank, in place."""
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        old = modules.get(name)
        if not isinstance(old, torch.nn.Linear):
            raise ValueError(f"{name} is not a linear layer of this architecture")
        parent_name, _, child = name.rpartition(".")
        new = LowRankLinear(old.in_features, old.out_features, rank, old.bias is not None, dtype=old.weight.dtype,
                            device=old.weight.device)
        setattr(modules[parent_name] if parent_name else model, child, new)


def replace_with(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def factored(model: torch.nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def densify(model: torch.nn.Module) -> int:
    """Multiply every LowRankLinear back into an nn.Linear (a standard model again); returns how many."""
    layers = factored(model)
    for name, layer in layers.items():
        replace_with(model, name, layer.dense())
    return len(layers)


def write_ranks(model: torch.nn.Module, folder) -> None:
    """tunelab_lowrank.json beside a saved model that has factored layers (nothing otherwise)."""
    layers = factored(model)
    if layers:
        (Path(folder) / LOWRANK_FILE).write_text(json.dumps(
            {"format": "tunelab low-rank: <layer>.a.weight [rank, in], <layer>.b.weight [out, rank]",
             "ranks": {n: m.rank for n, m in layers.items()}}, indent=1) + "\n")


def load_lowrank(path, ranks: dict[str, int], *, dtype=None, trust_remote_code: bool = False,
                 attn_implementation: str | None = None, what: str = "model.path"):
    """Build the folder's architecture from its config, swap in its factored layers and load every weight
    strictly (a tied LM head is tied again)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from tunelab.errors import UserError

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs = {"trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_config(config, **kwargs)
    try:
        swap_in(model, ranks)
    except ValueError as e:
        raise UserError(f"{what}: {path}/{LOWRANK_FILE}: {e}") from None
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.missing_keys if k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        which = f"lacks {missing[0]}" if missing else f"has {result.unexpected_keys[0]}, which the model does not"
        raise UserError(f"{what}: the low-rank folder {path} {which}; was it written by tunelab lowrank?")
    if tied:
        model.tie_weights()
    if (Path(path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
