"""The model's shape, and bytes per parameter by dtype and storage format.

Everything the planner computes is arithmetic on a `ModelShape` (parameter names and sizes, read from the model's
config.json by building the model on the meta device, which allocates nothing), so planning a 70B model takes
seconds, most of them importing transformers. Weights are counted in bytes per parameter by dtype; the frozen
decoder linears may be stored in a bitsandbytes format (model.quantization), counted by `quantized_weight_bytes`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Any

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

    def with_score_head(self) -> ModelShape:
        """The same decoder with a one-output score head in place of the LM head (transformers'
        *ForSequenceClassification: a reward model, a critic)."""
        head = self.head + "."
        keep = [i for i, (name, _) in enumerate(self.params) if not name.startswith(head)]
        params = tuple(self.params[i] for i in keep) + (("score.weight", self.hidden),)
        shapes = (tuple(self.shapes[i] for i in keep) + ((1, self.hidden),)) if self.shapes else ()
        linears = tuple(x for x in self.linears if x[0] != self.head) + (("score", self.hidden, 1),)
        return replace(self, params=params, shapes=shapes, linears=linears, head="score", vocab=1, tied=False)

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
