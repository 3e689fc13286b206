"""train.qat's fake quantization (torchao's FakeQuantizedLinear) computes with exactly the weights tunelab's
quantizer and compressed-tensors store, and passes gradients straight through to the float weights."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import qat_reference
from tunelab.models.compressed import QuantSpec, dequantize, qparams, rtn
from tunelab.models.qat import convert_qat, fake_quantized, prepare_qat, qat_spec


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "group", 16), QuantSpec(4, True, "channel"),
                                  QuantSpec(8, True, "group", 32), QuantSpec(8, True, "channel")],
                         ids=lambda s: s.describe().replace(" ", "-"))
def test_fake_quantized_weights_are_the_stored_ones(spec):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].proj = torch.nn.Linear(64, 24)
    with torch.no_grad():
        model.layers[0].proj.weight.copy_(torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g))
    original = model.layers[0].proj.weight
    w = original.detach().clone()
    assert prepare_qat(model, spec) == 1
    layer = model.layers[0].proj
    # the same parameter, now inside torchao's layer: an optimizer made afterwards trains it
    assert list(fake_quantized(model).values()) == [layer] and layer.weight is original
    # torchao chooses tunelab's (and compressed-tensors') scale and rounds w * (1 / scale), not w / scale
    want, rounded, s = qat_reference(w, spec)
    scale, _ = qparams(w, spec)
    assert torch.equal(layer.weight_fake_quantizer(layer.weight), want)
    # tunelab quantize's rounding of w / scale differs only at ties: w / scale a half-integer to within the few
    # roundings of a quotient up to qmax + 1 in size
    differ = want != dequantize(*rtn(w, spec), spec)
    tie = 4 * torch.finfo(torch.float32).eps * (spec.qmax + 1)
    assert (((w / s).abs() % 1 - 0.5).abs()[differ] <= tie).all()
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, want, layer.bias))
    # straight through to the float weights, except where the rounded value was clipped (torchao's backward: the
    # largest positive weight of a group sits at qmax + 1/2 steps, rounds up and is clipped)
    out.sum().backward()
    inside = (rounded >= spec.qmin) & (rounded <= spec.qmax)
    assert (~inside).any() and inside.float().mean() > 0.5
    full = torch.ones(5, 24).T @ x.detach()
    # both sides sum the same 5 products, perhaps in another order: 5 roundings of at most the largest partial sum
    tol = 5 * torch.finfo(torch.float32).eps * x.detach().abs().sum(0).max()
    assert torch.allclose(layer.weight.grad, full * inside, rtol=0, atol=float(tol))
    params = convert_qat(model, spec)
    assert type(model.layers[0].proj) is torch.nn.Linear and torch.equal(model.layers[0].proj.weight, want)
    got_scale, got_zero = params["layers.0.proj"]
    assert torch.equal(got_scale, scale) and not got_zero.any()
    # the stored integers dequantize (compressed-tensors' arithmetic) to what the training forward computed
    assert torch.equal(dequantize(torch.round(want / s).to(torch.int32), got_scale, got_zero, spec), want)


def test_qat_keys():
    assert qat_spec("int4", 32) == QuantSpec(4, True, "group", 32)
    assert qat_spec("int8", 0) == QuantSpec(8, True, "channel", 0)
