"""Quantization-aware training (`train.qat`): the decoder's linear layers compute with fake-quantized weights
(torchao's QAT: FakeQuantizedLinear, the forward rounds each weight to its int4/int8 value and the backward passes
the gradient straight through to the float weights), and the final save writes what the model computed: a
compressed-tensors folder of those integers (models/compressed.py), as `tunelab quantize` writes.

Symmetric schemes only, per output channel or per group of `train.qat_group_size` inputs: there torchao's scale is
compressed-tensors' (max|w| / ((qmax - qmin) / 2), zero point 0), so its fake-quantized weights are integers times a
scale the format stores, which tests/unit/test_qat.py checks bit for bit (convert_qat says how ties are rounded);
torchao's asymmetric scheme has other conventions than the format's. The backward is torchao's: the gradient
passes straight through to every float weight whose rounded value lies inside [qmin, qmax] and is zero for the
few clipped (the largest positive weight of a group, at +7.5 steps for int4, rounds to 8 and is clipped to 7).
Embeddings and the LM head stay in full precision, as `tunelab quantize` leaves them. Checkpoints hold the float weights (an exact resume continues from them); only final/ is quantized.
"""

from __future__ import annotations

import warnings

import torch

from tunelab.models.compressed import QuantSpec, dequantize, quantized_linears


def qat_spec(qat: str, group_size: int) -> QuantSpec:
    """train.qat (int4 | int8) and train.qat_group_size (0: one scale per output channel) as a QuantSpec."""
    bits = {"int4": 4, "int8": 8}[qat]
    return QuantSpec(bits, True, "group" if group_size else "channel", group_size)


def _torchao_qat():
    """torchao's QAT classes, imported without its import-time warnings (its log lines are silenced for every
    tunelab process in tunelab/__init__.py)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization.qat import FakeQuantizedLinear, IntxFakeQuantizeConfig
    return FakeQuantizedLinear, IntxFakeQuantizeConfig


def weight_config(spec: QuantSpec):
    _, config_cls = _torchao_qat()
    dtype = {4: torch.int4, 8: torch.int8}[spec.bits]
    if spec.granularity == "group":
        return config_cls(dtype, "per_group", group_size=spec.group_size, is_symmetric=True)
    return config_cls(dtype, "per_channel", is_symmetric=True)


def prepare_qat(model: torch.nn.Module, spec: QuantSpec) -> int:
    """Swap every decoder linear of `model` for torchao's FakeQuantizedLinear (the same weight and bias
    parameters), in place; returns how many."""
    from tunelab.models.lowrank import replace_with

    fq_cls, _ = _torchao_qat()
    config = weight_config(spec)
    layers = quantized_linears(model)
    for name, linear in layers.items():
        spec.check_layer(linear.in_features, name, key="train.qat_group_size")
        replace_with(model, name, fq_cls.from_linear(linear, weight_config=config))
    return len(layers)


def fake_quantized(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    fq_cls, _ = _torchao_qat()
    return {n: m for n, m in model.named_modules() if isinstance(m, fq_cls)}


def convert_qat(model: torch.nn.Module, spec: QuantSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace each FakeQuantizedLinear by an nn.Linear holding the values its forward computed with, in place;
    returns each one's (scale, zero point) for `save_compressed`.

    The integers come from torchao's own fake quantization, not from tunelab's quantizer: both choose the same
    scale, but torchao rounds w * (1 / scale) where compressed-tensors and `tunelab quantize` round w / scale, and
    the two differ on weights at a rounding tie (about one in a hundred at int4, where the largest weight of a group
    sits at -7.5 steps). The saved model must compute what training computed, so q = fq / scale (exact: fq is q
    times scale) and the stored weight is compressed-tensors' dequantization of that q, which equals fq."""
    from tunelab.models.lowrank import replace_with

    params = {}
    for name, layer in fake_quantized(model).items():
        quantizer = layer.weight_fake_quantizer
        linear = layer.to_linear()
        with torch.no_grad():
            fq = quantizer(linear.weight.data.float())
            rows = fq.shape[0]
            scale = quantizer.scale.reshape(rows, -1).float()
            zero = torch.zeros_like(scale, dtype=torch.int32)
            s = scale.repeat_interleave(fq.shape[1] // scale.shape[1], dim=1)
            q = torch.round(fq / s).to(torch.int32)
            weight = dequantize(q, scale, zero, spec)
            if not torch.equal(weight, fq):  # an invariant of the arithmetic above, not of the input
                raise RuntimeError(f"{name}: the compressed weights differ from the fake-quantized ones")
            linear.weight = torch.nn.Parameter(weight.to(linear.weight.dtype), requires_grad=False)
        replace_with(model, name, linear)
        params[name] = (scale, zero)
    return params
