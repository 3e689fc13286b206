"""Activations: the tensors autograd saves for backward in one Llama-style decoder layer.

Counted tensor by tensor from the layer's real structure (RMSNorm, q/k/v/o, SDPA or eager attention, gated MLP,
LoRA branches, autocast casts), following requires-grad through the layer; checked against torch's saved-tensor
hooks in the tests (docs/plan.md lists the tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.engine.plan.model_shape import ModelShape
from tunelab.engine.plan.trainable import _Trainable

_ATTN_OUT = {"o_proj", "out_proj", "dense", "wo"}
_MLP_OUT = {"down_proj", "fc2", "w2", "dense_4h_to_h"}


# ------------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class _Numerics:
    """Byte sizes of the tensors in a step.

    s: the residual stream and norm outputs (the dtype the decoder's weights are stored in);
    c: linear outputs and attention (the compute dtype: autocast's dtype under mixed precision, else s);
    autocast: torch.autocast is active (accelerate's mixed precision), so every linear casts its input and its
    weight to c, each call making its own copy.
    """

    s: int
    c: int
    autocast: bool


def _consumer_saves(kind: str, in_bytes: int, n: int, num: _Numerics) -> tuple[int, bool]:
    """What a linear (kind train | lora | frozen) reading an n-wide input of `in_bytes` per element saves for
    backward: (bytes of its own new copy, whether it saves the input tensor itself)."""
    if kind == "train":
        # grad of the weight needs the input: the input itself, or autocast's cast of it when dtypes differ
        if num.autocast and in_bytes != num.c:
            return num.c * n, False
        return 0, True
    if kind == "lora":
        # peft casts the input to the adapter's dtype (fp32) before lora_A; under autocast lora_A casts it back to c,
        # so it always saves a fresh copy; without autocast it saves the input when that is already fp32
        if num.autocast:
            return num.c * n, False
        return (0, True) if in_bytes == 4 else (4 * n, False)
    return 0, False  # a frozen linear keeps only its weight


def _lora_branch(kind: str, r: int, num: _Numerics) -> int:
    """lora_B saves lora_A's r-wide output."""
    return r * (num.c if num.autocast else 4) if kind == "lora" else 0


def _layer_linears(shape: ModelShape, tr: _Trainable, index: int) -> list[tuple[str, str, int, int]]:
    """The linears of layer `index` as (role, kind, in, out). role says what a linear reads: attn_in (norm 1
    output), attn_out (attention output), mlp_in (norm 2 output), mlp_out (the MLP product); kind is train | lora |
    frozen."""
    lora = {name for name, _, _ in tr.lora}
    out = []
    for name, n_in, n_out in shape.linears:
        if shape.layer_of[name + "."] != index:
            continue
        last = name.rsplit(".", 1)[-1]
        if shape.kind(name + ".weight") == "attention":
            role = "attn_out" if last in _ATTN_OUT else "attn_in"
        else:
            role = "mlp_out" if last in _MLP_OUT else "mlp_in"
        kind = "train" if name + ".weight" in tr.base else ("lora" if name in lora else "frozen")
        out.append((role, kind, n_in, n_out))
    return out


def _norm_saves(gi: bool, wt: bool, hidden: int, num: _Numerics) -> int:
    """Llama's RMSNorm: x.to(fp32).pow(2) and x * rsqrt(...) save the fp32 input and the rsqrt (per token) when the
    input needs grad; weight * normed saves the normed tensor (in s) when the weight trains."""
    return (4 * hidden + 4 if gi else 0) + (num.s * hidden if wt else 0)


@dataclass(frozen=True)
class _LayerSaves:
    per_token: int = 0  # bytes saved per position
    per_row: int = 0  # bytes saved per row: the terms in seq_len^2 (SDPA's mask, eager attention's probabilities)
    copies: int = 0  # autocast's compute-dtype weight copies autograd keeps for backward
    cached: int = 0  # autocast's copies of trainable weights, held by its cache until the forward ends
    grad_out: bool = False  # the layer's output requires grad


def _layer_saves(linears: list[tuple[str, str, int, int]], shape: ModelShape, *, gi: bool, norms_train: bool,
                 r: int, num: _Numerics, attn_impl: str, masked: bool, seq_len: int,
                 quantization: str = "none") -> _LayerSaves:
    """Bytes autograd saves for one Llama-style decoder layer, tensor by tensor (docs/plan.md lists them).

    Follows requires-grad through the layer: a tensor is saved when an op whose backward needs it has an input
    that requires grad. Storage shared by several ops (a norm output read by q, k and v) counts once.
    `quantization`: the frozen linears are bitsandbytes layers, whose autograd functions keep only the packed weight
    and dequantize it again in backward (no autocast copy is saved); 4-bit layers return their input's dtype, not
    autocast's, so under autocast the MLP's intermediate tensors stay in the storage dtype.
    """
    quantized = quantization != "none"
    kinds = [k for _, k, _, _ in linears]
    if not gi and not norms_train and all(k == "frozen" for k in kinds):
        return _LayerSaves()
    hid, inter, q, kv, nh, c = shape.hidden, shape.intermediate, shape.q_dim, shape.kv_dim, shape.heads, num.c
    total = per_row = copies = cached = 0

    def readers(role: str, in_bytes: int, in_grad: bool) -> tuple[int, bool, bool]:
        """Bytes the linears of `role` save, whether one saves the input itself, whether any output needs grad."""
        nonlocal copies, cached
        saved, shared, grad = 0, False, in_grad
        for role_, kind, n_in, n_out in linears:
            if role_ != role:
                continue
            extra, share = _consumer_saves(kind, in_bytes, n_in, num)
            saved += extra + _lora_branch(kind, r, num)
            shared |= share
            grad |= kind != "frozen"
            if num.autocast:
                # autograd keeps a weight's cast copy when the input needs grad (grad_input = grad_output @ W);
                # autocast's cache holds the copies of trainable weights until the forward ends anyway
                if num.s != c:
                    copies += c * n_in * n_out if in_grad and not (quantized and kind != "train") else 0
                    cached += c * n_in * n_out if kind == "train" else 0
                if kind == "lora":  # fp32 adapter weights: lora_B's input always needs grad, lora_A's only if x does
                    copies += c * r * (n_out + (n_in if in_grad else 0))
                    cached += c * r * (n_in + n_out)
        return saved, shared, grad

    total += _norm_saves(gi, norms_train, hid, num)
    saved, shared, core_grad = readers("attn_in", num.s, gi or norms_train)
    total += saved + (num.s * hid if shared else 0)
    if core_grad:
        if attn_impl == "eager":
            # matmul(q, k^T) saves q and the repeated k; softmax saves fp32 probabilities (plus their cast to c);
            # matmul(probs, v) saves the repeated v; o_proj reads a contiguous copy of the output
            total += 4 * q * c
            per_row += nh * seq_len * seq_len * (4 + (c if c != 4 else 0))
        else:
            # SDPA (flash/efficient kernels on CUDA, the flash kernel on CPU) and flash_attention_2 save q, k, v, the
            # output (which o_proj reads in place) and a fp32 log-sum-exp per head. With a mask SDPA cannot use
            # enable_gqa, so transformers repeats k and v to all heads first; and SDPA saves the boolean mask
            # converted to c, [B, 1, T, T], in every layer.
            repeat = masked and attn_impl == "sdpa" and kv < q
            total += (2 * q + 2 * (q if repeat else kv)) * c + 4 * nh
            if masked and attn_impl == "sdpa":
                per_row += c * seq_len * seq_len
    saved, shared, out_grad = readers("attn_out", c, core_grad)
    # the attention output is already saved by the attention kernel whenever it needs grad
    total += saved + (c * q if shared and not core_grad else 0)
    h1_grad = gi or out_grad

    total += _norm_saves(h1_grad, norms_train, hid, num)
    mlp_c = num.s if quantization in ("nf4", "fp4") else c
    saved, shared, act_grad = readers("mlp_in", num.s, h1_grad or norms_train)
    total += saved + (num.s * hid if shared else 0)
    if act_grad:
        total += 3 * inter * mlp_c  # act(gate) saves gate's output; gate * up saves act's output and up's output
    saved, shared, _ = readers("mlp_out", mlp_c, act_grad)
    total += saved + (mlp_c * inter if shared else 0)
    return _LayerSaves(total, per_row, copies, cached, True)
