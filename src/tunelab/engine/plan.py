"""Peak-memory planning: what a training run will hold per device, predicted from config.json alone.

`tunelab plan CONFIG` answers "will this fit, and with which micro-batch?" before any weights are loaded. Everything
here is arithmetic on a `ModelShape` (parameter names and sizes, read from the model's config.json by building the
model on the meta device, which allocates nothing), so planning a 70B model takes seconds, most of them
importing transformers.

The model of memory (docs/plan.md has the formulas and the validation against measured runs):

- weights, gradients and optimizer states: bytes per parameter by dtype, adapter, ZeRO stage and offload; the
  frozen decoder linears in their bitsandbytes format (model.quantization); optimizer states as each
  train.optimizer allocates them (per tensor: 8-bit blocks, Adafactor's factored moments, GaLore's projections);
  adapter types other than full/freeze/lora are counted by applying them to the model on the meta device;
- activations: the tensors autograd saves for backward in a Llama-style decoder layer, counted tensor by tensor
  from the layer's real structure (RMSNorm, q/k/v/o, SDPA or eager attention, gated MLP, LoRA branches, autocast
  casts), checked against torch's saved-tensor hooks in the tests;
- logits: the language-model loss's peak, which depends on how many positions get logits (`train.loss_chunk`);
- the peak itself is the largest of four moments of a step (end of forward, start of backward at the loss, inside
  the decoder backward, optimizer step), because activations are freed while gradients fill in.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.schema import BASE_TRAINING_ADAPTERS, Config
from tunelab.errors import UserError
from tunelab.models.adapters import layer_index

MiB = 2**20
GiB = 2**30

DTYPE_BYTES: dict[str, int] = {
    "fp32": 4, "float32": 4,
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2,
    "fp64": 8, "float64": 8,
}

# Resident memory of a CPU training process before any model tensor: the interpreter, torch, transformers, peft,
# accelerate and tokenizers code and heap, a tokenizer and a small dataset. Measured on the 2-core reference
# machine (Python 3.11, torch 2.13 CPU, transformers 5.24, peft 0.21) by `calibrate_cpu_runtime`: the peak RSS of a
# real run on a micro model, minus that run's modelled tensors (docs/plan.md). It changes with library versions
# (372 MiB with transformers 5.23), so `tunelab plan --calibrate` measures it for the machine at hand and plans use
# that measurement when one exists for the installed versions; tests calibrate before comparing with real runs.
CPU_RUNTIME_BYTES = 456 * MiB

# A CUDA process holds the context (kernels of torch, cuBLAS and cuDNN), library workspaces and the caching
# allocator's rounding slack outside torch's own tensor accounting: a few hundred MB on recent GPUs. Not measured
# here (no GPU); a documented estimate.
CUDA_RUNTIME_BYTES = 512 * MiB

# 4-bit NF4 with double quantization (QLoRA): 4 bits per weight, one 8-bit absmax per 64 weights, and one fp32
# constant per 256 of those absmax values.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# 4-bit (NF4 or FP4) without double quantization: one fp32 absmax per 64 weights.
FOUR_BIT_BYTES_PER_PARAM = 0.5 + 4 / 64
# model.quantization values (bitsandbytes formats of the frozen decoder linears). int8 (LLM.int8()) stores one byte
# per weight plus one fp32 absmax per output row (Int8Params.SCB).
QUANT_FORMATS: tuple[str, ...] = ("none", "nf4", "fp4", "int8")


def quantized_weight_bytes(quantization: str, numel: int, out_features: int, double_quant: bool = True) -> float:
    """Bytes of one linear weight stored in a bitsandbytes format."""
    if quantization in ("nf4", "fp4"):
        return numel * (NF4_BYTES_PER_PARAM if double_quant else FOUR_BIT_BYTES_PER_PARAM)
    if quantization == "int8":
        return numel + 4 * out_features
    raise UserError(f"plan: unknown quantization {quantization!r}; use one of {', '.join(QUANT_FORMATS)}")


def _quant_note(quantization: str, double_quant: bool) -> str:
    if quantization == "int8":
        return "int8 (1 B/param + a fp32 scale per output row)"
    per = NF4_BYTES_PER_PARAM if double_quant else FOUR_BIT_BYTES_PER_PARAM
    return f"{quantization} ({per:.3f} B/param{' with double quantization' if double_quant else ''})"


# Host memory of tokenized rows held as Python lists of ints (input ids and labels): ~50 B/token when built by the
# tokenizer, ~80 when read back from the tokenization cache (separate int objects for labels). The larger is used.
DATASET_BYTES_PER_TOKEN = 80

# DeepSpeed's default reduce bucket (elements); its gradient bucket is allocated at this size, capped here at the
# number of trainable parameters. ZeRO-3 steps the optimizer over sub-groups of this many elements.
DEEPSPEED_BUCKET_ELEMS = 500_000_000
DEEPSPEED_SUB_GROUP_ELEMS = 1_000_000_000

COMPONENTS: tuple[str, ...] = (
    "runtime", "weights", "weight_copies", "gradients", "optimizer", "activations", "logits", "buffers",
)
PHASES: dict[str, str] = {
    "forward": "end of the forward pass",
    "loss": "start of backward, at the loss",
    "backward": "inside the decoder backward",
    "optimizer": "optimizer step",
}

_ATTN_OUT = {"o_proj", "out_proj", "dense", "wo"}
_MLP_OUT = {"down_proj", "fc2", "w2", "dense_4h_to_h"}


def dtype_bytes(name: str) -> int:
    try:
        return DTYPE_BYTES[name]
    except KeyError:
        raise UserError(f"plan: unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


# --------------------------------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The geometry and parameter inventory of a decoder-only model: all the planner needs, no weights."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: tuple[tuple[str, int], ...]  # (name, numel) of every parameter; tied weights once, as torch lists them
    linears: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features) of every nn.Linear
    head: str = "lm_head"  # module name of the output projection
    arch: str = "LlamaForCausalLM"
    shapes: tuple[tuple[int, ...], ...] = ()  # the shape of each of `params`, in the same order (when known)

    @property
    def total(self) -> int:
        return sum(n for _, n in self.params)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def kind(self, name: str) -> str:
        """embedding | lm_head | attention | mlp | norm | other, from a parameter's dotted name."""
        if name.startswith(self.head + "."):
            return "lm_head"
        parts = name.lower().split(".")
        if any("embed" in p or p in ("wte", "wpe") for p in parts):
            return "embedding"
        if any("norm" in p or p.startswith("ln") for p in parts[:-1]):
            return "norm"
        if layer_index(name) is None:
            return "other"
        if any(p in ("self_attn", "attn", "attention", "self_attention") for p in parts):
            return "attention"
        if any(p in ("mlp", "feed_forward", "ffn", "experts", "block_sparse_moe") for p in parts):
            return "mlp"
        return "other"

    @functools.cached_property
    def layer_of(self) -> dict[str, int | None]:
        """Decoder-layer index of every parameter and linear module name (None outside the layers)."""
        names = [n for n, _ in self.params] + [n + "." for n, _, _ in self.linears]
        return {n: layer_index(n) for n in names}

    @functools.cached_property
    def dims(self) -> dict[str, tuple[int, ...]]:
        """The shape of every parameter (what factored and projected optimizer states depend on). Without
        recorded `shapes`: [out, in] for linear weights, [vocab, hidden] for embeddings, 1-D for the rest."""
        if self.shapes:
            return {n: tuple(d) for (n, _), d in zip(self.params, self.shapes, strict=True)}
        linear = {n + ".weight": (o, i) for n, i, o in self.linears}
        out: dict[str, tuple[int, ...]] = {}
        for name, n in self.params:
            if name in linear:
                out[name] = linear[name]
            elif self.kind(name) == "embedding" and n == self.vocab * self.hidden:
                out[name] = (self.vocab, self.hidden)
            else:
                out[name] = (n,)
        return out

    def by_kind(self) -> dict[str, int]:
        out = {k: 0 for k in ("embedding", "attention", "mlp", "norm", "lm_head", "other")}
        for name, n in self.params:
            out[self.kind(name)] += n
        return out

    def layer_params(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for name, n in self.params:
            i = layer_index(name)
            if i is not None:
                out[i] = out.get(i, 0) + n
        return out

    @classmethod
    def llama(cls, *, hidden: int, layers: int, heads: int, intermediate: int, vocab: int,
              kv_heads: int | None = None, head_dim: int | None = None, tied: bool = False) -> ModelShape:
        """A Llama-architecture shape computed by hand (no transformers import); names follow LlamaForCausalLM."""
        kv_heads = kv_heads or heads
        head_dim = head_dim or hidden // heads
        q, kv = heads * head_dim, kv_heads * head_dim
        params: list[tuple[str, int]] = [("model.embed_tokens.weight", vocab * hidden)]
        shapes: list[tuple[int, ...]] = [(vocab, hidden)]
        linears: list[tuple[str, int, int]] = []
        for i in range(layers):
            p = f"model.layers.{i}."
            for name, n_in, n_out in (("self_attn.q_proj", hidden, q), ("self_attn.k_proj", hidden, kv),
                                      ("self_attn.v_proj", hidden, kv), ("self_attn.o_proj", q, hidden),
                                      ("mlp.gate_proj", hidden, intermediate), ("mlp.up_proj", hidden, intermediate),
                                      ("mlp.down_proj", intermediate, hidden)):
                params.append((p + name + ".weight", n_in * n_out))
                shapes.append((n_out, n_in))
                linears.append((p + name, n_in, n_out))
            params += [(p + "input_layernorm.weight", hidden), (p + "post_attention_layernorm.weight", hidden)]
            shapes += [(hidden,), (hidden,)]
        params.append(("model.norm.weight", hidden))
        shapes.append((hidden,))
        if not tied:
            params.append(("lm_head.weight", vocab * hidden))
            shapes.append((vocab, hidden))
        linears.append(("lm_head", hidden, vocab))
        return cls(layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, kv_heads=kv_heads,
                   head_dim=head_dim, vocab=vocab, tied=tied, params=tuple(params), linears=tuple(linears),
                   shapes=tuple(shapes))

    @classmethod
    def from_hf_config(cls, config: Any, *, trust_remote_code: bool = False) -> ModelShape:
        """Read the geometry from a transformers config and the exact parameter inventory by building the model on
        the meta device (no memory is allocated, so this is fast for any size)."""
        import torch
        from transformers import AutoModelForCausalLM

        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, ImportError, TypeError) as e:
            raise UserError(f"plan: cannot build {type(config).__name__} to count its parameters: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        head_module = model.get_output_embeddings()
        head = next((n for n, m in model.named_modules() if m is head_module), "lm_head")
        params = tuple((n, p.numel()) for n, p in model.named_parameters())
        shapes = tuple(tuple(p.shape) for _, p in model.named_parameters())
        linears = tuple((n, m.in_features, m.out_features) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear))
        heads = int(text.num_attention_heads)
        hidden = int(text.hidden_size)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        tied = bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))
        return cls(
            layers=int(text.num_hidden_layers), hidden=hidden,
            intermediate=int(getattr(text, "intermediate_size", None) or 4 * hidden),
            heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
            vocab=int(text.vocab_size), tied=tied, params=params, linears=linears, head=head,
            arch=type(model).__name__, shapes=shapes,
        )

    @classmethod
    def from_pretrained(cls, path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> ModelShape:
        """The shape of a model folder (or hub id) from its config.json."""
        from tunelab.models.load import read_model_config

        config = read_model_config(path, trust_remote_code=trust_remote_code, revision=revision)
        return cls.from_hf_config(config, trust_remote_code=trust_remote_code)


# ------------------------------------------------------------------------------------------------- which train
def _matches(name: str, module: str) -> bool:
    """A dotted module name appears as consecutive components of a dotted parameter name (adapters._freeze's rule)."""
    parts, mparts = name.split("."), module.split(".")
    return any(parts[i:i + len(mparts)] == mparts for i in range(len(parts) - len(mparts) + 1))


def _lora_targets(shape: ModelShape, targets: str | Sequence[str]) -> list[tuple[str, int, int]]:
    """The linear modules peft adapts: all-linear is every nn.Linear but the output layer; a list matches suffixes."""
    if isinstance(targets, str) and targets != "all-linear":
        targets = [targets]
    if isinstance(targets, str) or list(targets) == ["all-linear"]:
        return [lin for lin in shape.linears if lin[0] != shape.head]
    keys = list(targets)
    return [lin for lin in shape.linears if any(lin[0] == k or lin[0].endswith("." + k) for k in keys)]


# Adapters whose branches beside each adapted linear save tensors as wide as the layer (the input and a rank- or
# block-wide product per linear), so the base-layer activation model runs low for them: measured against
# autograd on a 64-wide, 2-layer Llama (fp32, all linears) the plan had 0.65 (adalora), 0.46 (oft) and 0.21 (vera,
# r=256) of the real saved bytes. The others' own saves are small: 0.8-1.04 of the real bytes for ia3, ln,
# prefix, prompt, bottleneck and bitfit; reft (edits after a layer) is over-estimated (1.8).
WIDE_BRANCH_ADAPTERS = frozenset({"adalora", "vera", "oft", "boft"})


@dataclass(frozen=True)
class AdapterParams:
    """What an adapter type other than full, freeze and lora trains, read off the model it builds.

    `adapter_params` counts it by building the model on the meta device and applying the adapter there (shapes
    only). The planner needs no formula per adapter type that way, and stays right when an adapter changes."""

    kind: str  # adapter.type
    trained_base: tuple[str, ...] = ()  # base parameters trained in place (bitfit's biases), named as in ModelShape
    added: tuple[tuple[str, tuple[int, ...]], ...] = ()  # parameters the adapter adds and trains, with shapes
    added_frozen: int = 0  # elements of frozen parameters and buffers it adds (VeRA's shared projections, ...)
    added_frozen_params: int = 0  # the parameters among them (the rest are buffers)
    virtual_tokens: int = 0  # soft-prompt positions prepended to every row (prompt, ptuning)

    @property
    def added_params(self) -> int:
        return sum(math.prod(d) for _, d in self.added)

    def first_layer(self) -> int | None:
        """The lowest decoder layer holding a trained tensor; 0 when one lives outside the layers (soft prompts,
        prefix encoders: their gradient comes through every layer); None when nothing trains."""
        names = list(self.trained_base) + [n for n, _ in self.added]
        if not names:
            return None
        layers = [layer_index(n) for n in names]
        return 0 if any(i is None for i in layers) else min(i for i in layers if i is not None)


@dataclass(frozen=True)
class _Trainable:
    base: frozenset[str]  # base-model parameter names that train (full, freeze, modules_to_save)
    lora: tuple[tuple[str, int, int], ...]  # adapted linears (name, in, out)
    lora_r: int
    save_copies: int  # parameters of peft modules_to_save copies (trained; the originals stay frozen)
    added: tuple[tuple[str, tuple[int, ...]], ...] = ()  # other adapters' own trained parameters

    @property
    def lora_params(self) -> int:
        return sum(self.lora_r * (i + o) for _, i, o in self.lora)

    @property
    def added_params(self) -> int:
        return sum(math.prod(d) for _, d in self.added)


def _trainable(shape: ModelShape, adapter: str, *, lora_r: int, lora_targets: str | Sequence[str],
               trainable_layers: int, trainable_modules: Sequence[str],
               adapter_params: AdapterParams | None = None) -> _Trainable:
    names = [n for n, _ in shape.params]
    if adapter_params is not None and adapter not in ("full", "freeze", "lora", "qlora"):
        known = set(names)
        return _Trainable(frozenset(n for n in adapter_params.trained_base if n in known), (), 0, 0,
                          adapter_params.added)
    if adapter == "full":
        return _Trainable(frozenset(names), (), 0, 0)
    if adapter == "freeze":
        top = set(range(shape.layers - trainable_layers, shape.layers)) if trainable_layers else set()
        chosen = {n for n in names if layer_index(n) in top or any(_matches(n, m) for m in trainable_modules)}
        return _Trainable(frozenset(chosen), (), 0, 0)
    if adapter in ("lora", "qlora"):
        copies = sum(k for n, k in shape.params if any(_matches(n, m) for m in trainable_modules))
        saved = frozenset(n for n in names if any(_matches(n, m) for m in trainable_modules))
        return _Trainable(saved, tuple(_lora_targets(shape, lora_targets)), lora_r, copies)
    raise UserError(f"plan: adapter type {adapter!r} needs its trained parameters counted (adapter_params(), "
                    "which plan_from_config does); estimate() models full, freeze, lora and qlora by itself")


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


# ------------------------------------------------------------------------------------------------------ result
@dataclass
class MemoryPlan:
    """Predicted peak memory of one device (one process): components in bytes at the peak moment, and why."""

    components: dict[str, int]
    notes: dict[str, str]
    phase: str  # key of PHASES: the moment of the step where the peak is
    phases: dict[str, int]  # total bytes at each modelled moment
    moments: dict[str, dict[str, int]] = field(default_factory=dict)  # components at every modelled moment
    host: dict[str, int] = field(default_factory=dict)  # bytes per process kept in host memory (offload)
    params: int = 0
    trainable: int = 0
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def _fmt_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


OPTIMIZERS: dict[str, str] = {
    "adamw": "two states (exp_avg, exp_avg_sq) in the parameter's dtype",
    "adamw_8bit": "two blockwise 8-bit states (bitsandbytes): 1 B each plus a fp32 absmax per block of 256; "
                  "tensors under 4096 elements keep two fp32 states",
    "paged_adamw": "two fp32 states (bitsandbytes, whatever the parameter's dtype); on CUDA they live in unified "
                   "memory and page out to host RAM under pressure instead of failing (plain on CPU)",
    "paged_adamw_8bit": "as adamw_8bit; on CUDA the states live in unified memory and page out to host RAM under "
                        "pressure instead of failing (plain on CPU)",
    "adafactor": "factored fp32 second moment (one value per row and per column of a matrix, full for 1-D "
                 "tensors), no first moment",
    "galore": "AdamW states on the rank-r projection of each targeted matrix plus its projection matrix; AdamW "
              "states for the rest",
    "sgd": "one momentum buffer in the parameter's dtype (none at momentum 0)",
}

# bitsandbytes' 8-bit optimizers: states quantized in blocks of 256 with one fp32 absmax each; tensors smaller than
# min_8bit_size keep 32-bit states; the two 256-entry fp32 quantization maps are shared by all tensors.
BNB_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096
BNB_QMAPS_BYTES = 2 * 256 * 4


@dataclass(frozen=True)
class OptimizerSettings:
    """The train.* settings state memory depends on besides the optimizer's name."""

    momentum: float = 0.9  # sgd
    galore_rank: int = 128
    galore_target: tuple[str, ...] = ("attn", "mlp")


def galore_projected(name: str, dims: Sequence[int], target: Sequence[str]) -> bool:
    """engine.optim.galore_groups' rule: 2-D weights whose name contains one of the targets."""
    return len(dims) == 2 and any(t in name for t in target)


def optimizer_state_bytes(optimizer: str, tensors: Sequence[tuple[str, Sequence[int], float]],
                          settings: OptimizerSettings = OptimizerSettings()) -> float:
    """Bytes of optimizer state for the trained tensors (name, shape, bytes per element of the parameter), as each
    optimizer allocates it (engine/optim.py builds them)."""
    if optimizer not in OPTIMIZERS:
        raise UserError(f"plan: unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")
    total = 0.0
    any_8bit = False
    for name, dims, pb in tensors:
        n = math.prod(dims)
        if optimizer == "adamw":
            total += 2 * pb * n
        elif optimizer == "paged_adamw":
            total += 2 * 4 * n  # bitsandbytes' 32-bit states are fp32 for every parameter dtype
        elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
            if n < BNB_MIN_8BIT_SIZE:
                total += 2 * 4 * n
            else:
                any_8bit = True
                total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK))  # uint8 state + fp32 absmax per block, twice
        elif optimizer == "adafactor":
            # transformers' Adafactor upcasts half-precision gradients, so its states are fp32
            if len(dims) >= 2:
                total += 4 * (math.prod(dims[:-1]) + math.prod(dims[:-2]) * dims[-1])
            else:
                total += 4 * n
        elif optimizer == "galore":
            if galore_projected(name, dims, settings.galore_target):
                small, big = min(dims), max(dims)
                k = min(settings.galore_rank, small)
                # exp_avg and exp_avg_sq [big, k], and the projection [small, k]
                total += pb * (2 * big * k + small * k)
            else:
                total += 2 * pb * n
        elif optimizer == "sgd":
            total += pb * n if settings.momentum > 0 else 0
    return total + (BNB_QMAPS_BYTES if any_8bit else 0)


def _optimizer_detail(optimizer: str, settings: OptimizerSettings) -> str:
    if optimizer == "galore":
        return f" (rank {settings.galore_rank}, targets {', '.join(settings.galore_target)})"
    if optimizer == "sgd":
        return f" (momentum {settings.momentum:g})"
    return ""


def _step_temp(optimizer: str, tensors: Sequence[tuple[str, Sequence[int], float]], *, cpu: bool,
               settings: OptimizerSettings) -> float:
    """Transient memory of one optimizer step (tunelab's loop, not DeepSpeed): what the update allocates beside the
    states. torch AdamW: sqrt(v) and its quotient for the largest tensor on CPU (single-tensor loop), for every
    tensor at once on CUDA (foreach); bitsandbytes: nothing on CUDA (fused kernels), on CPU an fp32 gradient, the
    denominator and the update of one tensor at a time (8-bit: with both states dequantized to fp32); Adafactor:
    the squared gradient and the factored estimate of the largest tensor; GaLore: the projected-back update of the
    largest tensor and, on the steps that refresh the projection, the fp32 SVD of the largest projected gradient;
    SGD: updates in place."""
    if not tensors:
        return 0.0
    biggest = max(math.prod(d) * pb for _, d, pb in tensors)
    biggest_elems = max(math.prod(d) for _, d, _ in tensors)
    if optimizer == "sgd":
        return 0.0
    if optimizer == "adamw":
        return 2 * biggest if cpu else sum(math.prod(d) * pb for _, d, pb in tensors)
    if optimizer == "paged_adamw":  # CPU: fp32 gradient copy, sqrt(v) + eps, the update
        return 3 * 4 * biggest_elems if cpu else 0.0
    if optimizer in ("adamw_8bit", "paged_adamw_8bit"):  # CPU: both states in fp32 too
        return 5 * 4 * biggest_elems if cpu else 0.0
    if optimizer == "adafactor":
        return 2 * 4 * biggest_elems
    svd = max((4 * (min(d) * sum(d) + min(d)) for n, d, _ in tensors
               if galore_projected(n, d, settings.galore_target)), default=0)
    return 2 * biggest + svd


def estimate(
    shape: ModelShape,
    *,
    adapter: str = "lora",
    lora_r: int = 8,
    lora_targets: str | Sequence[str] = "all-linear",
    trainable_layers: int = 0,
    trainable_modules: Sequence[str] = (),
    precision: str = "bf16",
    storage_dtype: str = "bf16",
    batch_size: int = 1,
    seq_len: int = 1024,
    grad_ckpt: bool = False,
    loss_chunk: int = 4096,
    zero_stage: int = 0,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    devices: int = 1,
    optimizer: str = "adamw",
    device: str = "cuda",
    attn_impl: str = "sdpa",
    attn_mask: bool = True,
    positions: int | None = None,
    trained_tokens: int | None = None,
    grad_accum: int = 1,
    dataset_tokens: int = 0,
    runtime_bytes: int | None = None,
    quantization: str = "none",
    double_quant: bool = True,
    optimizer_settings: OptimizerSettings | None = None,
    adapter_params: AdapterParams | None = None,
) -> MemoryPlan:
    """Predict the peak memory of one device (one process) for one training configuration.

    adapter: full | freeze (the last `trainable_layers` layers plus `trainable_modules`) | lora (`trainable_modules`
    are peft's modules_to_save) | qlora (lora with quantization nf4) | any other adapter type, whose trained
    tensors `adapter_params` lists. quantization: none | nf4 | fp4 | int8, the bitsandbytes format of the frozen
    decoder linears (`double_quant`: 4-bit scales quantized too). optimizer: a key of `OPTIMIZERS`, with
    `optimizer_settings` (sgd's momentum, GaLore's rank and targets). precision: compute dtype (fp32 | bf16 | fp16);
    storage_dtype: dtype the base weights are loaded in. A micro-batch is `batch_size` rows of `seq_len` positions
    (`positions` overrides the product, e.g. for packed rows); `trained_tokens` (default: every position but the
    last of each row) get logits when `loss_chunk` > 0, at most `loss_chunk` at a time; 0 is the naive path that
    computes logits everywhere. attn_mask: the batch carries a mask (padding or packed sequences) — SDPA then keeps
    a [B, 1, T, T] mask per layer. zero_stage 0 is tunelab's loop (accelerate autocast, DDP replicas over
    `devices`); 1-3 are DeepSpeed ZeRO, which holds the model in the compute dtype and fp32 master weights in the
    optimizer. device: cuda | cpu (on CPU, host and device memory are the same and offload is moot).
    runtime_bytes: the process's memory before any model tensor (default: `CPU_RUNTIME_BYTES` or
    `CUDA_RUNTIME_BYTES`; `calibrate_cpu_runtime` measures it with this machine's libraries).
    """
    if device not in ("cuda", "cpu"):
        raise UserError(f"plan: device must be cuda or cpu, got {device!r}")
    if zero_stage not in (0, 1, 2, 3):
        raise UserError(f"plan: zero_stage must be 0-3, got {zero_stage}")
    if offload_params and zero_stage != 3:
        raise UserError("plan: offloading parameters needs ZeRO stage 3")
    if batch_size < 0 or seq_len < 1 or devices < 1 or grad_accum < 1:
        raise UserError("plan: batch_size >= 0, seq_len >= 1, devices >= 1 and grad_accum >= 1 are required")
    cpu = device == "cpu"
    if cpu:
        offload_optimizer = offload_params = False
    n_dev = devices
    deepspeed = zero_stage >= 1
    s_store = dtype_bytes(storage_dtype)
    c_prec = dtype_bytes(precision)
    mixed = c_prec != 4
    kind = "lora" if adapter == "qlora" else adapter
    if adapter == "qlora" and quantization == "none":
        quantization = "nf4"  # the historical name: LoRA on a 4-bit NF4 base
    if quantization not in QUANT_FORMATS:
        raise UserError(f"plan: unknown quantization {quantization!r}; use one of {', '.join(QUANT_FORMATS)}")
    quantized = quantization != "none"
    if quantized and kind in ("full", "freeze"):
        raise UserError(f"plan: {quantization} base weights are frozen; adapter {kind} trains them")
    opt_settings = optimizer_settings or OptimizerSettings()
    generic = kind not in ("full", "freeze", "lora")
    # soft prompts lengthen every row (their positions carry no labels)
    virtual = adapter_params.virtual_tokens if adapter_params is not None and generic else 0
    if virtual > 0:
        seq_len += virtual
        if positions is not None:
            positions += batch_size * virtual
    # DeepSpeed casts the module to the compute dtype and keeps fp32 masters itself; tunelab's loop keeps the stored
    # dtype and lets autocast cast per operation.
    s = c_prec if deepspeed else s_store
    num = _Numerics(s=s, c=2 if mixed else s, autocast=mixed and not deepspeed)

    tr = _trainable(shape, kind, lora_r=lora_r, lora_targets=lora_targets, trainable_layers=trainable_layers,
                    trainable_modules=() if kind == "full" else trainable_modules, adapter_params=adapter_params)
    # base parameters trained in place (for lora, tr.base are modules_to_save originals: frozen, copies train)
    in_place = kind != "lora"
    quant_linears = {name: o for name, _, o in shape.linears if name != shape.head} if quantized else {}
    sizes = dict(shape.params)

    # ---- weights, gradients, optimizer states (bytes per device)
    frozen_bytes = 0.0
    trainable_base = 0
    for name, n in shape.params:
        if name in tr.base and in_place:
            trainable_base += n
            continue
        module = name.rsplit(".", 1)[0]
        if module in quant_linears and name.endswith(".weight"):
            frozen_bytes += quantized_weight_bytes(quantization, n, quant_linears[module], double_quant)
        else:
            frozen_bytes += n * s
    # peft's adapters (and modules_to_save copies) are fp32 for a half-precision base and follow a float64 one;
    # DeepSpeed casts them to c
    adapter_bytes = max(4, s) if not deepspeed else s
    n_extra = tr.lora_params + tr.save_copies + tr.added_params
    added_frozen = adapter_params.added_frozen if adapter_params is not None and generic else 0
    trainable = trainable_base + n_extra
    param_bytes = s if kind in ("full", "freeze") else adapter_bytes
    weights = frozen_bytes + trainable_base * s + (n_extra + added_frozen) * adapter_bytes
    grad_bytes = trainable_base * s + n_extra * adapter_bytes
    # every tensor the optimizer steps: (name, shape, bytes per element)
    dims = shape.dims
    tensors: list[tuple[str, tuple[int, ...], float]] = [(n, dims[n], s) for n, _ in shape.params
                                                         if n in tr.base and in_place]
    for name, n_in, n_out in tr.lora:
        tensors += [(f"{name}.lora_A.weight", (tr.lora_r, n_in), adapter_bytes),
                    (f"{name}.lora_B.weight", (n_out, tr.lora_r), adapter_bytes)]
    if kind == "lora":
        tensors += [(n, dims[n], adapter_bytes) for n, _ in shape.params if n in tr.base]  # modules_to_save copies
    tensors += [(n, tuple(d), adapter_bytes) for n, d in tr.added]
    if deepspeed:
        # DeepSpeed's optimizer works on fp32 copies: master weights (under mixed precision) and fp32 states
        state = optimizer_state_bytes(optimizer, [(n, d, 4) for n, d, _ in tensors], opt_settings) \
            + (4 * trainable if mixed else 0)
    else:
        state = optimizer_state_bytes(optimizer, tensors, opt_settings)
    grad_total = grad_bytes  # one replica's, before ZeRO partitions them
    if zero_stage >= 3:
        weights /= n_dev
    if zero_stage >= 2:
        grad_bytes /= n_dev
    if zero_stage >= 1:
        state /= n_dev
    host: dict[str, int] = {}
    if offload_optimizer:
        host["optimizer"] = int(state)
        host["gradients"] = int(4 * trainable / n_dev)  # ZeRO-Offload's fp32 gradient partition
        state = 0
    if offload_params:
        host["weights"] = int(weights)
        weights = 0

    # ---- the micro-batch
    tokens = batch_size * seq_len if positions is None else positions
    rows = batch_size
    if trained_tokens is None:
        trained_tokens = max(0, tokens - rows)
    if loss_chunk > 0:
        logit_rows = min(trained_tokens, loss_chunk)
        head_in_forward = trained_tokens <= loss_chunk  # else the loss runs the head itself, outside autocast
        path = (f"logits for {trained_tokens:,} trained positions" if head_in_forward
                else f"logits in chunks of {loss_chunk:,} of {trained_tokens:,} trained positions")
    else:
        logit_rows, head_in_forward = tokens, True
        path = f"full logits for all {tokens:,} positions (loss_chunk 0)"
    masked = attn_mask and attn_impl in ("sdpa", "eager")

    # ---- which layers save what
    embed_trains = any(shape.kind(n) == "embedding" for n in tr.base)
    head_trains = shape.head + ".weight" in tr.base or (shape.tied and embed_trains)
    # tunelab enables input grads when checkpointing a frozen-embedding model (adapters.apply_adapter)
    grad_flows = embed_trains or (grad_ckpt and kind != "full")
    # other adapters: the gradient runs through every layer from the lowest one holding a trained tensor down to
    # it (from the input for soft prompts); their own tensors' saves are not modelled (small next to the layer's)
    first_generic = adapter_params.first_layer() if adapter_params is not None and generic else None
    per_token = 0.0
    per_row = 0.0
    ckpt_inputs = 0.0
    top_layer = _LayerSaves()
    copies_saved = 0.0  # autocast copies autograd keeps until backward (no checkpointing)
    copies_cached = 0.0  # trainable copies held by autocast's cache until the forward ends
    train_norm_layers = {shape.layer_of[n] for n in tr.base if shape.kind(n) == "norm"}
    for i in range(shape.layers):
        norms_train = i in train_norm_layers
        gi = grad_flows or (first_generic is not None and i >= first_generic)
        saves = _layer_saves(_layer_linears(shape, tr, i), shape, gi=gi, norms_train=norms_train,
                             r=tr.lora_r, num=num, attn_impl=attn_impl, masked=masked, seq_len=seq_len,
                             quantization=quantization)
        copies_saved += saves.copies
        copies_cached += saves.cached
        if saves.grad_out and saves.per_token >= top_layer.per_token:
            top_layer = saves
        if grad_ckpt:
            ckpt_inputs += s * shape.hidden if saves.grad_out else 0  # a checkpointed layer keeps only its input
        else:
            per_token += saves.per_token
            per_row += saves.per_row
        grad_flows = grad_flows or saves.grad_out

    # ---- non-layer activations: embedding ids, final norm, the head's input, rotary tables
    final_norm_trains = any(layer_index(n) is None and shape.kind(n) == "norm" for n in tr.base)
    fixed = (8 * tokens if embed_trains else 0) + _norm_saves(grad_flows, final_norm_trains, shape.hidden, num) * tokens
    head_kind = "train" if head_trains else "frozen"
    # cross-entropy saves its int64 targets
    if loss_chunk <= 0:
        extra, share = _consumer_saves(head_kind, s, shape.hidden, num)
        fixed += (extra + (s * shape.hidden if share else 0)) * tokens + 8 * (tokens - rows)
    elif head_in_forward:
        # transformers gathers the kept rows ([n, hidden], a copy); indexing keeps the boolean mask
        extra, share = _consumer_saves(head_kind, s, shape.hidden, num)
        fixed += (extra + (s * shape.hidden if share else 0) + 8) * logit_rows + tokens
    else:
        # the loss gathers the trained rows; the checkpointed chunks keep them and their targets; the model's own
        # (empty) gather keeps its all-false mask
        fixed += (s * shape.hidden + 8) * trained_tokens + 2 * tokens
    fixed += 2 * shape.head_dim * s * (tokens if positions is not None else seq_len)  # cos and sin
    activations = per_token * tokens + per_row * rows + ckpt_inputs * tokens + fixed

    head_copy = (num.c * shape.hidden * shape.vocab
                 if num.autocast and head_in_forward and s != num.c and (head_trains or grad_flows) else 0)
    mask_bytes = rows * seq_len * seq_len * (s if attn_impl == "eager" else 1) if masked else 0

    # ---- logits: the loss's peak is at the start of backward: cross-entropy's saved fp32 log-probabilities, the
    # incoming gradient and the gradient it produces ([rows, vocab] each, fp32) for every position that gets logits
    logits = 3 * 4 * logit_rows * shape.vocab
    logits_fwd = 2 * 4 * logit_rows * shape.vocab  # log-probs + the fp32 logits they came from
    if loss_chunk <= 0:
        logits_fwd = 3 * 4 * logit_rows * shape.vocab  # logits, the shifted fp32 copy and the log-probs
    elif not head_in_forward:
        logits_fwd = 0  # the chunks run after the forward pass, one at a time (counted in the loss moment)
    in_forward_logits = num.c * logit_rows * shape.vocab if num.autocast and head_in_forward else 0

    # ---- backward working set: the residual-stream gradient coming in and the one going out, plus one
    # MLP-width gradient in flight; with checkpointing, the top layer's recomputed activations (and weight copies)
    workset = tokens * (2 * shape.hidden * s + shape.intermediate * num.c)
    recompute = (top_layer.per_token * tokens + top_layer.per_row * rows + top_layer.copies) if grad_ckpt else 0
    head_grads = (sizes.get(shape.head + ".weight", 0) or (shape.vocab * shape.hidden if shape.tied else 0)) \
        * (s if in_place else adapter_bytes) if head_trains else 0
    if zero_stage >= 2:
        head_grads /= n_dev

    # ---- buffers that persist, and per-moment transients
    persistent_buffers = 0.0
    buf_notes = []
    if not deepspeed and n_dev > 1:
        persistent_buffers += grad_total  # DDP's flat gradient buckets (gradient_as_bucket_view off)
        buf_notes.append("DDP gradient buckets")
    if deepspeed:
        persistent_buffers += min(DEEPSPEED_BUCKET_ELEMS, trainable) * s
        buf_notes.append("ZeRO gradient bucket")
        if zero_stage == 3:
            largest_layer = max(shape.layer_params().values(), default=0)
            largest_other = max((n for name, n in shape.params if layer_index(name) is None), default=0)
            persistent_buffers += max(2 * largest_layer, largest_other) * s
            buf_notes.append("ZeRO-3 gathered parameters (current + prefetched layer)")
    if quantized:
        # bitsandbytes multiplies by one dequantized weight at a time (4-bit, and int8's CPU training path)
        biggest = max((i * o for name, i, o in shape.linears if name in quant_linears), default=0)
        persistent_buffers += biggest * num.c
        buf_notes.append(f"one dequantized {quantization} weight")
    if deepspeed:
        # the step converts this rank's gradient partition to fp32 (ZeRO-3: one sub-group of 1e9 elements at a time)
        partition = trainable / n_dev if zero_stage < 3 else min(trainable / n_dev, DEEPSPEED_SUB_GROUP_ELEMS)
        step_temp = 0 if offload_optimizer else 4 * partition
    else:
        step_temp = _step_temp(optimizer, tensors, cpu=cpu, settings=opt_settings)

    runtime = runtime_bytes if runtime_bytes is not None else (CPU_RUNTIME_BYTES if cpu else CUDA_RUNTIME_BYTES)
    dataset = dataset_tokens * DATASET_BYTES_PER_TOKEN if cpu else 0
    accum_grads = grad_bytes if grad_accum > 1 else 0  # earlier micro-batches' gradients stay during forward

    base = {"runtime": runtime + dataset, "weights": weights, "optimizer": state}
    moments: dict[str, dict[str, float]] = {
        "forward": {**base, "weight_copies": (copies_cached if grad_ckpt else copies_saved) + head_copy,
                    "gradients": accum_grads, "activations": activations,
                    "logits": max(logits_fwd, in_forward_logits), "buffers": persistent_buffers + mask_bytes},
        "loss": {**base, "weight_copies": (0 if grad_ckpt else copies_saved) + head_copy,
                 "gradients": accum_grads, "activations": activations, "logits": logits,
                 "buffers": persistent_buffers + mask_bytes},
        "backward": {**base, "weight_copies": 0 if grad_ckpt else copies_saved,
                     "gradients": max(accum_grads, head_grads), "activations": activations + recompute,
                     "logits": 0, "buffers": persistent_buffers + mask_bytes + workset},
        "optimizer": {**base, "weight_copies": 0, "gradients": grad_bytes, "activations": 0, "logits": 0,
                      "buffers": persistent_buffers + step_temp},
    }
    moments_int = {k: {c: int(v.get(c, 0)) for c in COMPONENTS} for k, v in moments.items()}
    totals = {k: sum(v.values()) for k, v in moments_int.items()}
    peak = max(totals, key=lambda k: totals[k])
    components = dict(moments_int[peak])

    # ---- what each component is made of (for the table)
    n_total = sum(n for _, n in shape.params) + n_extra \
        + (adapter_params.added_frozen_params if adapter_params is not None and generic else 0)
    if kind == "full":
        weight_note = f"{_fmt_count(shape.total)} params x {s} B"
    elif kind == "freeze":
        weight_note = f"{_fmt_count(shape.total)} params x {s} B ({_fmt_count(trainable_base)} of them train)"
    else:
        weight_note = (f"decoder linear weights {_quant_note(quantization, double_quant)}, other base params "
                       f"x {s} B" if quantized else f"{_fmt_count(shape.total)} base params x {s} B")
        weight_note += f" + {_fmt_count(n_extra)} adapter params x {adapter_bytes} B"
        if added_frozen:
            weight_note += f" + {_fmt_count(added_frozen)} frozen adapter tensors x {adapter_bytes} B"
        if trainable_base:
            weight_note += f" ({_fmt_count(trainable_base)} base params train in place)"
    if zero_stage >= 3:
        weight_note += f", / {n_dev} devices (ZeRO-3)"
    if offload_params:
        weight_note = "offloaded to host memory (ZeRO-3 parameter offload)"
    state_note = f"{optimizer}{_optimizer_detail(optimizer, opt_settings)}: {OPTIMIZERS.get(optimizer, '')} for " \
        f"{_fmt_count(trainable)} trainable params"
    if deepspeed:
        state_note = f"{optimizer} states in fp32" + (" + fp32 master weights" if mixed else "") + \
            f" for {_fmt_count(trainable)} trainable params"
    if zero_stage >= 1:
        state_note += f", / {n_dev} devices (ZeRO-{zero_stage})"
    if offload_optimizer:
        state_note = "offloaded to host memory (ZeRO optimizer offload)"
    grads_note = {
        "forward": "earlier micro-batches' gradients (grad_accum > 1)" if accum_grads else "none yet (set to None)",
        "loss": "earlier micro-batches' gradients (grad_accum > 1)" if accum_grads else "none yet (set to None)",
        "backward": "the output layer's gradient, computed first" if head_grads >= accum_grads and head_grads
        else ("accumulated gradients" if accum_grads else "none yet"),
        "optimizer": (f"{_fmt_count(trainable)} trainable params x {param_bytes} B"
                      if not (trainable_base and n_extra) else
                      f"{_fmt_count(trainable_base)} base params x {s} B + {_fmt_count(n_extra)} adapter "
                      f"params x {adapter_bytes} B")
        + (f", / {n_dev} devices (ZeRO-{zero_stage})" if zero_stage >= 2 else ""),
    }[peak]
    act_note = (f"saved for backward: {_fmt_count(tokens)} positions x "
                + (f"{shape.layers} checkpointed layer inputs x {s} B x hidden" if grad_ckpt
                   else f"{per_token / 1024:.1f} KiB/position over {shape.layers} layers")
                + (f" + attention masks {_fmt_bytes(per_row * rows)}" if per_row else ""))
    if peak == "backward" and grad_ckpt:
        act_note += f" + the top layer recomputed ({_fmt_bytes(recompute)})"
    if generic:
        act_note += (f"; {kind}: the base layers' saves from layer {first_generic} up (the gradient passes through "
                     "them to the adapter), the adapter's own tensors not counted"
                     if first_generic is not None else f"; {kind}: nothing trains")
        if kind in WIDE_BRANCH_ADAPTERS:
            act_note += " (its branches save layer-wide tensors: expect more)"
        if virtual > 0:
            act_note += f", {virtual} soft-prompt positions per row included"
        if kind == "prefix":
            act_note += ", the prefixes' extra keys/values not counted"
    copies_note = ("autocast's compute-dtype copies of fp32 weights"
                   + (" (cached for the whole forward)" if peak == "forward" and grad_ckpt else "")
                   if components["weight_copies"] else "none (weights already in the compute dtype)")
    logits_note = {
        "forward": "fp32 logits and log-probabilities" if logits_fwd >= in_forward_logits
        else "compute-dtype logits inside the forward",
        "loss": f"{path}: fp32 log-probs + 2 gradients, {_fmt_count(logit_rows)} x {_fmt_count(shape.vocab)} vocab "
                "x 4 B x 3",
        "backward": "freed",
        "optimizer": "freed",
    }[peak]
    buf_parts = list(buf_notes)
    if peak != "optimizer" and mask_bytes:
        buf_parts.append("attention mask")
    if peak == "backward":
        buf_parts.append("backward working set (residual gradients in and out + one MLP-width gradient)")
    if peak == "optimizer" and step_temp:
        buf_parts.append("optimizer step temporaries")
    if cpu:
        runtime_note = ("Python, torch, transformers and peft, a tokenizer and the data (baseline RSS "
                        + ("calibrated on this machine)" if runtime_bytes is not None else "of the reference machine; "
                           "`tunelab plan --calibrate` measures it here)"))
    else:
        runtime_note = "CUDA context, library workspaces and allocator slack (estimate)"
    if dataset:
        runtime_note += f" + tokenized dataset ({_fmt_count(dataset_tokens)} tokens)"
    notes = {
        "runtime": runtime_note,
        "weights": weight_note,
        "weight_copies": copies_note,
        "gradients": grads_note,
        "optimizer": state_note,
        "activations": act_note if components["activations"] else "freed",
        "logits": logits_note,
        "buffers": ", ".join(buf_parts) or "none",
    }
    inputs = dict(adapter=adapter, lora_r=lora_r, lora_targets=lora_targets if isinstance(lora_targets, str)
                  else list(lora_targets), trainable_layers=trainable_layers,
                  trainable_modules=list(trainable_modules), precision=precision, storage_dtype=storage_dtype,
                  batch_size=batch_size, seq_len=seq_len, positions=tokens, trained_tokens=trained_tokens,
                  grad_ckpt=grad_ckpt, loss_chunk=loss_chunk, loss_path=path, zero_stage=zero_stage,
                  offload_optimizer=offload_optimizer, offload_params=offload_params, devices=devices,
                  optimizer=optimizer, device=device, attn_impl=attn_impl, attn_mask=masked, grad_accum=grad_accum,
                  runtime=runtime, quantization=quantization, double_quant=double_quant,
                  optimizer_settings=dict(momentum=opt_settings.momentum, galore_rank=opt_settings.galore_rank,
                                          galore_target=list(opt_settings.galore_target)),
                  adapter_params=None if adapter_params is None else dict(
                      trained_base=len(adapter_params.trained_base), added=adapter_params.added_params,
                      added_frozen=adapter_params.added_frozen, virtual_tokens=adapter_params.virtual_tokens))
    return MemoryPlan(components=components, notes=notes, phase=peak, phases=totals, moments=moments_int, host=host,
                      params=n_total, trainable=trainable, inputs=inputs)


def max_batch_size(shape: ModelShape, budget_bytes: float, *, limit: int = 1 << 16, **kwargs: Any) -> int:
    """The largest micro-batch (rows) whose predicted peak fits in `budget_bytes`; 0 if even one row does not.
    `kwargs` are estimate()'s, without batch_size; memory grows with the batch, so a bisection finds it."""
    kwargs.pop("positions", None)
    kwargs.pop("trained_tokens", None)

    def fits(b: int) -> bool:
        return estimate(shape, batch_size=b, **kwargs).total <= budget_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi > limit:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# -------------------------------------------------------------------------------------------- from a config
@dataclass
class PlanReport:
    """A plan for one config: the prediction, the settings it assumed, and what fits a memory budget."""

    model: str
    shape: ModelShape
    plan: MemoryPlan
    settings: dict[str, Any]
    budget: int | None = None  # bytes available to the run (all processes on a CPU machine, else per device)
    budget_source: str = ""
    max_batch: int | None = None
    data: dict[str, int] = field(default_factory=dict)

    @property
    def processes_total(self) -> int:
        """Bytes the budget must hold: all processes' on one CPU machine, one device's on GPUs."""
        return self.plan.total * (self.settings["devices"] if self.settings["device"] == "cpu" else 1)

    def text(self) -> str:
        p, st, sh = self.plan, self.settings, self.shape
        heads = f"{sh.heads}/{sh.kv_heads} heads (q/kv)"
        lines = [
            f"model: {self.model} ({sh.arch}: {sh.layers} layers, hidden {sh.hidden}, {heads}, intermediate "
            f"{sh.intermediate}, vocab {sh.vocab}{', tied embeddings' if sh.tied else ''})",
            f"parameters: {_fmt_count(p.params)} total, {_fmt_count(p.trainable)} trainable ({st['adapter']})",
            f"setup: {st['device']} x {st['devices']}, precision {st['precision']}, weights stored "
            f"{st['storage_dtype']}"
            + (f" (decoder linears {st['quantization']})" if st.get("quantization", "none") != "none" else "")
            + f", optimizer {st.get('optimizer', 'adamw')}, ZeRO {st['zero_stage']}"
            + (" + optimizer offload" if st["offload_optimizer"] else "")
            + (" + parameter offload" if st["offload_params"] else ""),
            f"micro-batch: {st['batch_size']} rows, max_length {st['seq_len']}: {st['positions']:,} positions"
            + (" in the heaviest measured batch" if self.data else "") + f" ({st['packing']}), activation "
            f"checkpointing {'on' if st['grad_ckpt'] else 'off'}, attention {st['attn_impl']}"
            + (" with a mask" if st["attn_mask"] else ""),
            f"loss: {p.inputs['loss_path']}",
        ]
        if self.data:
            lines.append(f"data (measured): {self.data['rows']:,} rows, longest {self.data['longest']:,} tokens, "
                         f"mean {self.data['mean']:,}; worst micro-batch {self.data['positions']:,} positions, "
                         f"{self.data['trained']:,} trained")
        lines += ["", f"{'component':<14}{'GiB':>9}  made of"]
        for key in COMPONENTS:
            lines.append(f"{key:<14}{p.components[key] / GiB:>9.3f}  {p.notes[key]}")
        lines.append(f"{'total':<14}{p.total / GiB:>9.3f}  per {'process' if st['device'] == 'cpu' else 'device'},"
                     f" peak: {PHASES[p.phase]}")
        others = ", ".join(f"{PHASES[k]} {v / GiB:.2f}" for k, v in p.phases.items() if k != p.phase)
        lines.append(f"{'':<25}other moments (GiB): {others}")
        if p.host:
            lines.append(f"host memory per process: {p.host_total / GiB:.2f} GiB ("
                         + ", ".join(f"{k} {v / GiB:.2f}" for k, v in p.host.items()) + ")")
        if st["device"] == "cpu":
            lines.append("note: with glibc's default malloc, peak RSS measured 16-62 % above this (freed activation "
                         "buffers fragment the heap); MALLOC_MMAP_THRESHOLD_=65536 brings it to the prediction at a "
                         "throughput cost (docs/plan.md)")
        if self.budget is not None:
            need = self.processes_total
            verdict = "fits" if need <= self.budget else "does NOT fit"
            where = f"{st['devices']} processes" if st["device"] == "cpu" and st["devices"] > 1 else "the run"
            lines.append("")
            lines.append(f"budget: {self.budget / GiB:.1f} GiB ({self.budget_source}); {where} needs "
                         f"{need / GiB:.2f} GiB: {verdict}")
            if self.max_batch is not None:
                lines.append(f"largest micro-batch that fits (rows of max_length): {self.max_batch}"
                             + (" (even one row does not fit)" if self.max_batch == 0 else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "shape": {k: getattr(self.shape, k) for k in ("arch", "layers", "hidden", "intermediate", "heads",
                                                          "kv_heads", "head_dim", "vocab", "tied")}
            | {"params": self.shape.total, "params_by_kind": self.shape.by_kind()},
            "settings": dict(self.settings),
            "components": dict(self.plan.components),
            "notes": dict(self.plan.notes),
            "total": self.plan.total,
            "phase": self.plan.phase,
            "phases": dict(self.plan.phases),
            "moments": {k: dict(v) for k, v in self.plan.moments.items()},
            "host": dict(self.plan.host),
            "params": self.plan.params,
            "trainable": self.plan.trainable,
            "budget": self.budget,
            "budget_source": self.budget_source,
            "max_batch": self.max_batch,
            "data": dict(self.data),
        }


# ------------------------------------------------------------------------------------- CPU runtime calibration
# The micro run that measures the runtime: a 1-layer model too small to matter, plain-text rows longer than its
# max_length (every micro-batch is full), 2 steps (the optimizer states appear at step 1), no tokenization cache.
_MICRO_MODEL = dict(hidden=32, layers=1, heads=2, vocab=1000)
_MICRO_TRAIN = dict(batch_size=1, max_length=32)


def _runtime_key() -> str:
    """What the runtime depends on: Python, the libraries' versions and glibc's malloc settings."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "tunelab"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} -")
    import os

    malloc = ",".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    return " | ".join(parts) + (f" | {malloc}" if malloc else "")


def runtime_cache_path():
    """$TUNELAB_CACHE/plan-runtime.json, else ~/.cache/tunelab/plan-runtime.json."""
    import os
    from pathlib import Path

    root = os.environ.get("TUNELAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunelab")
    return Path(root) / "plan-runtime.json"


def cached_cpu_runtime() -> int | None:
    """The runtime calibrated earlier with exactly these library versions, or None."""
    import json

    try:
        data = json.loads(runtime_cache_path().read_text(encoding="utf-8"))
        value = data.get(_runtime_key()) if isinstance(data, dict) else None
        return int(value) if isinstance(value, int | float) and value > 0 else None
    except (OSError, ValueError):
        return None


# `tunelab train ARGS` in a child that reports its own peak RSS (VmHWM) on its last line. wait4's ru_maxrss cannot be
# used: Linux carries the launching process's RSS over fork and exec, so a child of a large process (a test run)
# would report at least its parent's size.
_MEASURED_TRAIN = """
import sys
from tunelab.cli import main
code = 1
try:
    code = main(["train", *sys.argv[1:]])
finally:
    peak = 0
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                peak = int(line.split()[1]) * 1024
    sys.stdout.write("\\n@@peak-rss %d\\n" % peak)
    sys.stdout.flush()
sys.exit(code)
"""


def start_measured_train(config_path: str, env: dict[str, str] | None = None):
    """Start `tunelab train CONFIG` in a child process that reports its peak RSS; finish with `finish_measured`."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", _MEASURED_TRAIN, str(config_path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_measured(proc) -> tuple[int, str, int]:
    """Wait for a `start_measured_train` child: (exit code, its output, its peak RSS in bytes; 0 if unknown)."""
    out, _ = proc.communicate()
    peak = 0
    for line in reversed(out.splitlines()):
        if line.startswith("@@peak-rss "):
            peak = int(line.split()[1])
            break
    return proc.returncode, out, peak


def calibrate_cpu_runtime(*, save: bool = True) -> int:
    """Measure this machine's CPU runtime: the peak RSS (VmHWM, Linux) of a real `tunelab train` run on a micro model,
    minus that run's modelled tensors. Takes ~10 s (a child process imports torch and transformers, tokenizes and trains two
    steps). The result is stored in `runtime_cache_path()` keyed by the library versions (`_runtime_key`)."""
    import json
    import os
    import tempfile
    from pathlib import Path

    from tunelab.models.tiny import build_tiny_llama, tiny_corpus

    with tempfile.TemporaryDirectory(prefix="tunelab-calibrate-") as tmp:
        root = Path(tmp)
        model = build_tiny_llama(root / "model", **_MICRO_MODEL)
        text = "\n".join(tiny_corpus(150_000, seed=3))
        rows = [{"text": text[i:i + 5000]} for i in range(0, 24 * 5000, 5000)]
        (root / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
        cfg = {
            "model": {"path": str(model)},
            "adapter": {"type": "full"},
            "method": {"type": "pt"},
            "data": {"train": [{"path": str(root / "rows.json"), "format": "text"}],
                     "max_length": _MICRO_TRAIN["max_length"], "packing": "none", "cache": False},
            "train": {"batch_size": _MICRO_TRAIN["batch_size"], "max_steps": 2, "precision": "fp32",
                      "save_every": 0, "log_every": 1},
            "output": {"dir": str(root / "out"), "plot": False},
        }
        (root / "run.json").write_text(json.dumps(cfg), encoding="utf-8")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_CACHE": str(root / "cache")}
        code, out, peak = finish_measured(start_measured_train(str(root / "run.json"), env))
        if code != 0 or peak <= 0:
            raise UserError("plan --calibrate: the micro training run failed:\n" + out[-2000:])
        shape = ModelShape.from_pretrained(str(model))
    modelled = estimate(shape, adapter="full", precision="fp32", storage_dtype="fp32", device="cpu",
                        batch_size=_MICRO_TRAIN["batch_size"], seq_len=_MICRO_TRAIN["max_length"],
                        attn_mask=False, runtime_bytes=0).total
    runtime = int(peak - modelled)
    if save:
        path = runtime_cache_path()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[_runtime_key()] = runtime
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_suffix(".tmp")
        tmp_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp_path, path)
    return runtime


def _local_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _local_memory(device: str) -> tuple[int | None, str]:
    """Memory of this machine's device: the first GPU's, or the RAM."""
    if device == "cuda":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return int(props.total_memory), f"{props.name} on this machine"
        return None, ""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024, "this machine's RAM"
    except OSError:
        pass
    return None, ""


def _resolve_dtypes(cfg: Config, device: str) -> tuple[str, str]:
    """train.precision and model.dtype as the loop resolves them (loop.resolve_precision, load.resolve_dtype),
    for `device` rather than this machine: a CUDA target is assumed to support bf16."""
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    storage = cfg.model.dtype
    if cfg.model.quantization != "none":
        # quant.prepare_for_training (peft's k-bit preparation) upcasts every non-quantized base parameter to fp32
        return precision, "fp32"
    if storage == "auto":
        trains_base = cfg.adapter.type in BASE_TRAINING_ADAPTERS
        storage = "bf16" if device == "cuda" and not trains_base else "fp32"
    return precision, {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16",
                       "float64": "fp64"}.get(storage, storage)


# Models of at most this many parameters may be built on the CPU when an adapter cannot be applied on the meta
# device (BOFT's initialisation reads tensor values): a few hundred MB at fp32, seconds to build.
CPU_FALLBACK_MAX_PARAMS = 50_000_000


def adapter_params(cfg: Config, shape: ModelShape | None = None) -> AdapterParams:
    """Count what `cfg.adapter` trains by building the model on the meta device and applying the adapter there
    (`adapters.apply_adapter`, the loop's own code, so every adapter type is counted the way it trains).

    Base parameters that train in place are told apart from the adapter's own by identity (a wrapper keeps the
    base's parameter objects). An adapter whose setup needs real tensor values cannot be applied on meta; for a
    model of at most `CPU_FALLBACK_MAX_PARAMS` parameters it is then applied to a CPU build instead, otherwise
    this says which adapter type could not be counted.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.models.adapters import AdapterSetup, apply_adapter, virtual_tokens
    from tunelab.models.load import read_model_config

    hf_config = read_model_config(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                                  revision=cfg.model.revision)
    setup = AdapterSetup(model_path=cfg.model.path, tokenizer_path=cfg.model.tokenizer or cfg.model.path)

    def build(device: str) -> AdapterParams:
        with torch.device(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.model.trust_remote_code)
            base_names = {id(p): n for n, p in model.named_parameters()}
            base_buffers = sum(b.numel() for b in model.buffers())
            model = apply_adapter(model, cfg.adapter, setup)
        trained_base, added, seen = [], [], set()
        frozen_elems = 0
        for name, p in model.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if id(p) in base_names:
                if p.requires_grad:
                    trained_base.append(base_names[id(p)])
            elif p.requires_grad:
                added.append((name, tuple(p.shape)))
            else:
                frozen_elems += p.numel()
        # frozen tensors the adapter brings: its frozen parameters and the buffers it added
        extra_buffers = max(0, sum(b.numel() for b in model.buffers()) - base_buffers)
        return AdapterParams(kind=cfg.adapter.type, trained_base=tuple(trained_base), added=tuple(added),
                             added_frozen=frozen_elems + extra_buffers, added_frozen_params=frozen_elems,
                             virtual_tokens=virtual_tokens(model))

    error: Exception
    try:
        return build("meta")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure of an adapter's setup on meta tensors
        error = e
    if shape is not None and shape.total <= CPU_FALLBACK_MAX_PARAMS:
        try:
            return build("cpu")
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001
            error = e
    reason = str(error).splitlines()[0] if str(error) else ""
    raise UserError(f"plan: cannot count the trainable parameters of adapter {cfg.adapter.type} for "
                    f"{cfg.model.path}: {type(error).__name__}: {reason}") from None


def _measure_data(cfg: Config) -> tuple[list[int], list[int], int]:
    """Tokenize the training data (through the tokenization cache) and return row lengths and trained counts."""
    from tunelab.data.prepare import prepare_data
    from tunelab.methods import METHODS
    from tunelab.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    from tunelab.data.collate import sequences
    from tunelab.data.tokenize import IGNORE_INDEX

    data = prepare_data(cfg.data, tokenizer, kind=METHODS[cfg.method.type].data_kind, seed=cfg.train.seed)
    train = sequences(data.train)  # a preference pair is two sequences
    lengths = [len(r.input_ids) for r in train]
    # the first position of a row never gets a target (labels are shifted inside the loss)
    trained = [sum(1 for x in r.labels[1:] if x != IGNORE_INDEX) for r in train]
    return lengths, trained, sum(lengths) + sum(len(r.input_ids) for r in sequences(data.val))


def _worst_batch(lengths: Sequence[int], trained: Sequence[int], batch: int, max_length: int,
                 packing: str) -> dict[str, int]:
    """The heaviest micro-batch of `batch` rows: the longest rows together (padded to the longest, or packed)."""
    longest = sorted(lengths, reverse=True)[:batch]
    most_trained = sum(sorted(trained, reverse=True)[:batch])
    if packing == "padding_free":
        positions = sum(longest)
        rows = max(1, math.ceil(positions / max_length))
        width = min(max_length, max(positions, 1))
    else:
        rows, width = len(longest), (longest[0] if longest else 1)
        positions = rows * width
    return {"rows": rows, "width": width, "positions": positions, "trained": min(most_trained, positions),
            "uniform": int(len(set(lengths)) <= 1)}


def plan_from_config(cfg: Config, *, devices: int = 1, memory_gb: float | None = None, zero_stage: int = 0,
                     offload: bool = False, device: str | None = None, measure_data: bool = False,
                     calibrate: bool = False) -> PlanReport:
    """Plan the run a config describes. device: cuda | cpu (default: this machine's). memory_gb: the budget per
    device (per machine on CPU; default: this machine's device memory when planning for it). offload: ZeRO
    optimizer offload, plus parameter offload at stage 3. measure_data: tokenize the training data and plan for its
    heaviest micro-batch instead of data.max_length (the worst case). calibrate: measure the CPU runtime on this
    machine first (`calibrate_cpu_runtime`); a CPU plan otherwise uses an earlier calibration with the same
    libraries when there is one, else `CPU_RUNTIME_BYTES`."""
    from tunelab.models.load import check_model_path

    check_model_path(cfg.model.path)
    device = device or _local_device()
    runtime_bytes = None
    if device == "cpu":
        runtime_bytes = calibrate_cpu_runtime() if calibrate else cached_cpu_runtime()
    shape = ModelShape.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code,
                                       revision=cfg.model.revision)
    precision, storage = _resolve_dtypes(cfg, device)
    from tunelab.models.adapters import ADAPTERS

    a = cfg.adapter
    adapter = a.type
    target = getattr(a, "target", "all-linear")
    packing = cfg.data.packing
    if packing == "auto":
        # what the loop picks for Llama-style models (it checks the model at start), unless the adapter needs each
        # row's own positions (loop.choose_packing)
        packing = "padding_free" if getattr(ADAPTERS.get(adapter), "packs", True) else "none"
    attn = cfg.model.attn_implementation
    packed_unmasked = attn.startswith("flash") or (attn == "sdpa" and not cfg.model.compile)
    if adapter == "freeze":
        modules = list(a.modules)
        if getattr(a, "embeddings", False):  # the input embeddings and the output head
            modules += [n.rsplit(".", 1)[0] for n, _ in shape.params
                        if shape.kind(n) in ("embedding", "lm_head")]
        if getattr(a, "norms", False):
            modules += [n.rsplit(".", 1)[0] for n, _ in shape.params if shape.kind(n) == "norm"]
    else:
        modules = list(getattr(a, "modules_to_save", None) or [])
    t = cfg.train
    kwargs: dict[str, Any] = dict(
        adapter=adapter,
        lora_r=getattr(a, "r", 8),
        lora_targets=target,
        trainable_layers=a.layers if adapter == "freeze" else 0,
        trainable_modules=modules,
        adapter_params=None if adapter in ("full", "freeze", "lora") else adapter_params(cfg, shape),
        quantization=cfg.model.quantization,
        double_quant=cfg.model.double_quant,
        optimizer=t.optimizer,
        optimizer_settings=OptimizerSettings(momentum=t.momentum, galore_rank=t.galore_rank,
                                             galore_target=tuple(t.galore_target)),
        precision=precision,
        storage_dtype=storage,
        seq_len=cfg.data.max_length,
        grad_ckpt=cfg.model.gradient_checkpointing,
        loss_chunk=cfg.train.loss_chunk,
        zero_stage=zero_stage,
        offload_optimizer=offload and zero_stage >= 1,
        offload_params=offload and zero_stage == 3,
        devices=devices,
        device=device,
        attn_impl="flash" if attn.startswith("flash") else attn,
        # padded batches of unequal rows carry a mask; packed rows do only with eager attention or compiled SDPA
        # (tunelab's varlen SDPA and flash attention attend per sequence), flash attention unpads padded rows
        attn_mask=not packed_unmasked if packing == "padding_free" else True,
        grad_accum=cfg.train.grad_accum,
        runtime_bytes=runtime_bytes,
    )
    data_stats: dict[str, int] = {}
    from tunelab.data.kinds import get_kind
    from tunelab.methods import METHODS

    # a micro-batch of preference pairs is twice as many sequences
    per_row = get_kind(METHODS[cfg.method.type].batch_kind).sequences_per_row
    batch = cfg.train.batch_size * per_row
    if measure_data and not cfg.data.streaming:
        lengths, trained, total_tokens = _measure_data(cfg)
        worst = _worst_batch(lengths, trained, batch, cfg.data.max_length, packing)
        kwargs["dataset_tokens"] = total_tokens
        kwargs["attn_mask"] = (not packed_unmasked) if packing == "padding_free" else not worst["uniform"]
        data_stats = {"rows": len(lengths), "longest": max(lengths, default=0),
                      "mean": round(sum(lengths) / max(len(lengths), 1)), "positions": worst["positions"],
                      "trained": worst["trained"], "packed_rows": worst["rows"], "width": worst["width"]}
        plan = estimate(shape, batch_size=worst["rows"], positions=worst["positions"],
                        trained_tokens=worst["trained"], **{**kwargs, "seq_len": worst["width"]})
    else:
        plan = estimate(shape, batch_size=batch, **kwargs)

    if memory_gb is not None:
        budget: int | None = int(memory_gb * GiB)
        source = "--memory-gb"
    else:
        budget, source = _local_memory(device) if device == _local_device() else (None, "")
    max_batch = None
    if budget is not None:
        per_process = budget / devices if device == "cpu" else budget
        max_batch = max_batch_size(shape, per_process, **kwargs)
        if max_batch is not None:
            max_batch //= per_row  # in the config's unit: pairs for preference methods
    settings = {**kwargs, "batch_size": cfg.train.batch_size, "packing": packing, "attn_mask": plan.inputs["attn_mask"],
                "positions": plan.inputs["positions"], "trained_tokens": plan.inputs["trained_tokens"]}
    settings.pop("dataset_tokens", None)
    settings["runtime_calibrated"] = settings.pop("runtime_bytes") is not None
    settings["optimizer_settings"] = plan.inputs["optimizer_settings"]  # plain dicts: to_dict() is JSON
    settings["adapter_params"] = plan.inputs["adapter_params"]
    return PlanReport(model=cfg.model.path, shape=shape, plan=plan, settings=settings, budget=budget,
                      budget_source=source, max_batch=max_batch, data=data_stats)

