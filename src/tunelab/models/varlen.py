"""Variable-length attention for padding-free packed rows, without flash-attention.

A packed row holds several sequences whose position ids restart at 0. transformers' SDPA path isolates them with a
block-diagonal [B, 1, T, T] mask, and a masked kernel computes attention over the whole row: T^2 work per row where
the sequences need only the sum of their squared lengths, and the mask rules out the causal kernel's skipping of
the upper triangle. The attention here cuts each row at its sequence starts and runs causal SDPA on each sequence
(views, no copies), then joins the outputs: the cost is that of the sequences, as with flash-attention's varlen
kernel on CUDA. On the benchmark workload's packed rows it is about 2x faster than the masked kernel, forward and
backward.

It is registered with transformers as `tunelab_sdpa_varlen` (an attention function and its mask function) and the
training loop switches a model to it for `data.packing: padding_free` when the model uses `sdpa`. Anything else —
a padding mask, a KV cache, rows without restarting positions — goes through transformers' own SDPA attention.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "tunelab_sdpa_varlen"


def sequence_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each sequence: a sequence starts where the position does not follow the last."""
    pos = position_ids.detach()
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    width = pos.shape[1]
    out = []
    for row in starts.cpu().tolist():
        cuts = [i for i, s in enumerate(row) if s] + [width]
        out.append([(cuts[i], cuts[i + 1]) for i in range(len(cuts) - 1)])
    return out


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, T, D], key/value [B, Hkv, S, D]; returns ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None or position_ids is None or q_len != kv_len or position_ids.shape[-1] != q_len:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = sequence_bounds(position_ids.expand(query.shape[0], -1))
    if all(len(b) == 1 for b in bounds):  # nothing packed: one causal call for the whole batch
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    gqa = key.shape[1] != query.shape[1]
    p = dropout if module.training else 0.0
    # split/unbind rather than slicing: their backward joins the pieces' gradients in one pass, where each slice's
    # backward would write its gradient into a zeroed tensor of the whole row
    rows = []
    for row, q, k, v in zip(bounds, query.unbind(0), key.unbind(0), value.unbind(0), strict=True):
        lengths = [e - s for s, e in row]
        parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], dropout_p=p, is_causal=len(qs[0]) > 1,
                                                scale=scaling, enable_gqa=gqa)[0]
                 for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)]
        rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
    out = torch.stack(rows)
    return out.transpose(1, 2).contiguous(), None


def varlen_mask(*args: Any, **kwargs: Any):
    """Mask for `tunelab_sdpa_varlen`: none without a padding mask (the attention cuts packed rows itself and is
    causal), else exactly transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the attention and its mask with transformers (idempotent); returns the implementation's name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


def use_varlen(model: torch.nn.Module) -> bool:
    """Switch a model that uses SDPA to the varlen attention; False when it cannot (then nothing changed)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    try:
        model.set_attn_implementation(NAME)
    except (AttributeError, ValueError, TypeError, ImportError, KeyError):
        return False
    return getattr(model.config, "_attn_implementation", None) == NAME
