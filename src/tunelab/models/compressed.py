"""Integer weight quantization (tunelab quantize, train.qat) and the compressed-tensors folders it writes.

A `QuantSpec` is the scheme: 4 or 8 bits, symmetric or asymmetric, one scale per tensor, per output channel or
per group of `group_size` consecutive inputs of a row. The conventions are those of compressed-tensors (the format
written, which llm-compressor writes and vLLM and transformers load; its own fake_quantize is the tests' oracle),
and train.qat's fake quantization uses the same functions, so a model trained with it is saved as exactly what it
computed:

- integers q in [-2^(b-1), 2^(b-1) - 1] (signed, as compressed-tensors stores them);
- symmetric: scale = max|w| / ((qmax - qmin) / 2) (max|w| / 7.5 at 4 bits), zero point 0;
- asymmetric: the range [min(w, 0), max(w, 0)] (so that 0 stays exact) over qmax - qmin steps, zero point
  round(qmin - min / scale) clamped to the integer range;
- q = clamp(round(w / scale + zero point)), w' = (q - zero point) x scale (round half to even, as torch.round).

Two ways to choose q: round-to-nearest (`rtn`), and GPTQ (Frantar et al., 2022: `gptq`), which quantizes a layer's
columns one at a time and moves each column's rounding error onto the columns not yet quantized, weighted by the
inverse Hessian H = X^T X of the layer's inputs on calibration tokens, so that the layer's outputs on those inputs
change as little as possible. With H = I it is round-to-nearest.

Format (chosen by test, tests/e2e/test_quantize.py): symmetric schemes are written as compressed-tensors
`pack-quantized` (4-bit values packed eight to an int32, 8-bit four to one: the WNA16 checkpoints vLLM runs with its
Marlin/Machete kernels, and transformers loads and decompresses); asymmetric ones as `int-quantized` (one int8 per
weight), because transformers (5.24 with compressed-tensors 0.20) cannot load the packed zero points of an
asymmetric pack-quantized folder (llm-compressor#1618): an asymmetric 4-bit folder is then no smaller than an 8-bit
one. Embeddings and the LM head stay in full precision (`ignore`), as llm-compressor's W4A16/W8A16 schemes leave
them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tunelab.errors import UserError

GRANULARITIES = ("tensor", "channel", "group")


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    symmetric: bool = True
    granularity: str = "channel"  # tensor | channel | group
    group_size: int = 0  # granularity group: inputs per scale

    def check(self) -> None:
        if self.bits not in (4, 8):
            raise UserError(f"--bits: 4 or 8, got {self.bits}")
        if self.granularity not in GRANULARITIES:
            raise UserError(f"--granularity: one of {', '.join(GRANULARITIES)}, got {self.granularity!r}")
        if self.group_size < 0 or self.group_size == 1:
            raise UserError(f"--group-size: at least 2, got {self.group_size}")
        if (self.granularity == "group") != (self.group_size > 0):
            raise UserError("--group-size: needed with --granularity group (and only then), e.g. 128")

    def check_layer(self, in_features: int, where: str, key: str = "--group-size") -> None:
        if self.granularity == "group" and in_features % self.group_size:
            raise UserError(f"{key} {self.group_size} does not divide the {in_features} inputs of {where}")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def storage(self) -> str:
        """The compressed-tensors format (module docstring)."""
        return "pack-quantized" if self.symmetric else "int-quantized"

    def describe(self) -> str:
        grain = f"groups of {self.group_size}" if self.granularity == "group" else f"per {self.granularity}"
        return f"int{self.bits} {'symmetric' if self.symmetric else 'asymmetric'}, {grain}"


# ---------------------------------------------------------------------------------------------- the math (pure)
def _groups(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """w [rows, cols] viewed as [rows, groups, inputs per group] for the spec's scale granularity."""
    rows, cols = w.shape
    if spec.granularity == "tensor":
        return w.reshape(1, 1, rows * cols)
    if spec.granularity == "channel":
        return w.reshape(rows, 1, cols)
    return w.reshape(rows, cols // spec.group_size, spec.group_size)


def qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero point int) per scale group: [1, 1] per tensor, [rows, 1] per channel, [rows, groups]."""
    g = _groups(w.float(), spec)
    lo = torch.clamp(g.amin(-1), max=0.0)
    hi = torch.clamp(g.amax(-1), min=0.0)
    eps = torch.finfo(torch.float32).eps
    if spec.symmetric:
        scale = torch.maximum(-lo, hi) / ((spec.qmax - spec.qmin) / 2)
        scale = torch.clamp(scale, min=eps)
        zero = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((hi - lo) / (spec.qmax - spec.qmin), min=eps)
        zero = torch.clamp(torch.round(spec.qmin - lo / scale), spec.qmin, spec.qmax).to(torch.int32)
        zero = torch.where(hi > lo, zero, 0)  # an all-zero group: zero point 0 (compressed-tensors' choice)
    return scale, zero


def _expand(t: torch.Tensor, w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group values broadcast to w's shape."""
    rows, cols = w.shape
    if spec.granularity == "tensor":
        return t.reshape(1, 1).expand(rows, cols)
    if spec.granularity == "channel":
        return t.reshape(rows, 1).expand(rows, cols)
    return t.repeat_interleave(spec.group_size, dim=1)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    s, z = _expand(scale, w, spec), _expand(zero, w, spec)
    return torch.clamp(torch.round(w.float() / s + z), spec.qmin, spec.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return (q - _expand(zero, q, spec)).float() * _expand(scale, q, spec)


def rtn(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (q, scale, zero point)."""
    scale, zero = qparams(w, spec)
    return quantize(w, scale, zero, spec), scale, zero


def gptq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, block: int = 128,
         damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (module docstring) on w [rows, cols] with the inputs' H = sum x x^T [cols, cols]: (q, scale, zero
    point). Per-tensor and per-channel scales come from the original weights; a group's from the weights as the
    earlier columns' errors left them when its first column is reached (the reference implementation's order).
    `damp` x the mean of diag(H) is added to the diagonal. An input never seen (H_jj = 0) is rounded as it is and
    passes no error on. `block` columns are updated at a time (rounded up to whole groups)."""
    w = w.double().clone()
    rows, cols = w.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros((rows, cols), dtype=torch.int32)
    if spec.granularity == "group":
        scale = torch.zeros((rows, cols // spec.group_size), dtype=torch.float32)
        zero = torch.zeros((rows, cols // spec.group_size), dtype=torch.int32)
    else:
        scale, zero = qparams(w, spec)
    col_spec = QuantSpec(spec.bits, spec.symmetric, "channel")
    if spec.granularity == "group":
        block = spec.group_size * math.ceil(block / spec.group_size)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].clone()
        err = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if spec.granularity == "group" and col % spec.group_size == 0:
                g = col // spec.group_size
                block_w = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :spec.group_size]
                s, z = qparams(block_w, col_spec)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            if spec.granularity == "group":
                s, z = scale[:, col // spec.group_size], zero[:, col // spec.group_size]
            elif spec.granularity == "channel":
                s, z = scale[:, 0], zero[:, 0]
            else:
                s, z = scale.reshape(1).expand(rows), zero.reshape(1).expand(rows)
            x = w1[:, i]
            qi = torch.clamp(torch.round(x.float() / s + z), spec.qmin, spec.qmax).to(torch.int32)
            q[:, col] = qi
            deq = (qi - z).double() * s.double()
            e = (x - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q, scale, zero


def layer_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """The change of a layer's outputs on the calibration inputs: sum over them of ||(W - W') x||^2 =
    tr((W - W') H (W - W')^T)."""
    d = (w.double() - w_hat.double())
    return float(torch.einsum("ij,jk,ik->", d, hessian.double(), d))


# ---------------------------------------------------------------------------------- a loaded compressed layer
def dequantizing_config(path) -> object | None:
    """For a compressed-tensors model folder, the quantization_config that has transformers load it with its
    weights decompressed at load ((q - zero point) x scale, exactly what the folder stands for), inside tunelab's
    quiet loading; None for any other folder. Kept compressed, transformers decompresses them at the first forward
    instead (the same numbers, with progress bars in the middle of a command's output)."""
    import inspect
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quant, dict) or quant.get("quant_method") != "compressed-tensors":
        return None
    from transformers import CompressedTensorsConfig

    if "dequantize" in inspect.signature(CompressedTensorsConfig.__init__).parameters:
        return CompressedTensorsConfig(dequantize=True)
    return CompressedTensorsConfig(run_compressed=False)  # transformers before `dequantize`
def compressed_weight_count(module) -> tuple[int, int] | None:
    """For a linear layer loaded compressed from a compressed-tensors folder (transformers keeps the integers:
    weight_packed or an int8 weight, with weight_scale and weight_zero_point, until its first forward decompresses
    them in place), (the weights it stands for, how many of them are nonzero); None for any other module."""
    scheme = getattr(module, "quantization_scheme", None)
    args = getattr(scheme, "weights", None)
    if not isinstance(module, torch.nn.Linear) or args is None:
        return None
    packed = getattr(module, "weight_packed", None)
    if packed is not None:
        from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

        q = unpack_from_int32(packed.data, args.num_bits, torch.Size(module.weight_shape.tolist()))
    elif module.weight.dtype in (torch.int8, torch.int32):
        q = module.weight.data
    else:  # decompressed in place (transformers does so at the first forward): float weights beside the scales
        return module.weight.numel(), int((module.weight != 0).sum())
    spec = QuantSpec(args.num_bits, bool(args.symmetric), str(args.strategy.value if hasattr(args.strategy, "value")
                                                               else args.strategy), int(args.group_size or 0))
    zero = getattr(module, "weight_zero_point", None)
    z = _expand(zero.data.to(torch.int32), q, spec) if zero is not None else 0
    return q.numel(), int((q.to(torch.int32) != z).sum())


# --------------------------------------------------------------------------------------------- the folder
def quantized_linears(model) -> dict[str, torch.nn.Linear]:
    """The linear layers quantized: those of the decoder layers (embeddings and the LM head stay as they are)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}."}


def _scheme(spec: QuantSpec):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig

    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=spec.granularity,
                            group_size=spec.group_size or None)
    return args, QuantizationConfig


def save_compressed(model, folder, spec: QuantSpec, qparams_of: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    targets: list[str]) -> None:
    """Write `model` as a compressed-tensors folder: each linear named in `qparams_of` (its weight already the
    dequantized values) with its (scale, zero point); config.json gets the quantization_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationScheme, apply_quantization_config

    args, config_cls = _scheme(spec)
    config = config_cls(config_groups={"group_0": QuantizationScheme(targets=targets, weights=args)},
                        ignore=[n for n, m in model.named_modules()
                                if isinstance(m, torch.nn.Linear) and n not in qparams_of])
    apply_quantization_config(model, config)
    for name, module in model.named_modules():
        if name in qparams_of:
            scale, zero = qparams_of[name]
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=spec.storage)
    compressor.compress_model(model)
    model.save_pretrained(folder, safe_serialization=True)
    compressor.update_config(str(folder))
