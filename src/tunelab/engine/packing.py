"""Padding-free packing: whether this run packs its rows, and whether the model keeps packed sequences apart."""

from __future__ import annotations

import torch

from tunelab.config.schema import Config
from tunelab.engine.shape import RunShape
from tunelab.errors import UserError
from tunelab.models.varlen import use_varlen
from tunelab.models.wrappers import core_model


def packing_works(model, vocab_size: int) -> bool:
    """One-off check that this model isolates packed sequences: logits of two sequences packed into one row (position
    ids restarting, no attention mask) must equal their logits computed separately."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, vocab_size, (1, 5), generator=g)
    b = torch.randint(0, vocab_size, (1, 7), generator=g)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            sep = [model(input_ids=x.to(device), use_cache=False).logits.double() for x in (a, b)]
            packed = model(input_ids=torch.cat([a, b], 1).to(device),
                           position_ids=torch.cat([torch.arange(5), torch.arange(7)])[None].to(device),
                           use_cache=False).logits.double()
        # Packed and separate rows differ only in summation order: each logit is within a few hundred roundings of
        # the compute dtype, relative to the logits' scale (2^-24 * 1700 ~ 1e-4 for float32, 2^-8 * 5 ~ 2e-2 for
        # bfloat16). A sequence that sees its neighbour moves its logits by a sizeable share of that scale.
        weight_dtype = next(model.parameters()).dtype
        rel = 1e-4 if weight_dtype in (torch.float32, torch.float64) else 2e-2
        expected = torch.cat(sep, 1)
        tol = rel * max(1.0, float(expected.abs().max()))
        return bool(torch.allclose(expected, packed, atol=tol, rtol=0))
    except (TypeError, ValueError, RuntimeError):
        return False
    finally:
        model.train(was_training)


def choose_packing(model, cfg: Config, vocab_size: int, shape: RunShape) -> tuple[str, bool]:
    """The batching mode and whether packed rows attend per sequence: the run shape's mode (engine/shape.py), once
    the model is known to keep packed sequences apart.

    For padding_free the model is switched to per-sequence SDPA (models/varlen.py) unless it is compiled, then
    checked once to isolate packed sequences; a model whose attention layout the varlen path does not fit goes back
    to its masked path and is checked again. A model that fails is refused under data.packing=padding_free and
    trains unpacked under auto."""
    if shape.packing != "padding_free":
        return shape.packing, False
    varlen = not cfg.model.compile and use_varlen(core_model(model))
    works = packing_works(model, vocab_size)
    if varlen and not works:
        core_model(model).set_attn_implementation(cfg.model.attn_implementation)
        varlen, works = False, packing_works(model, vocab_size)
    if works:
        return "padding_free", varlen
    if shape.packing_requested == "padding_free":
        raise UserError(
            f"data.packing: padding_free gives different outputs than unpacked rows on this model "
            f"(attention {cfg.model.attn_implementation}); use data.packing=none or group_by_length"
        )
    return "none", False
