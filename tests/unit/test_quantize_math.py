"""The quantization math of models/compressed.py: round-to-nearest by hand, scales, zero points and fake
quantization against compressed-tensors' own functions (the format tunelab writes), and GPTQ by hand on two inputs,
as round-to-nearest where the inputs are uncorrelated, and better than it where they are not."""

from __future__ import annotations

import itertools

import pytest
import torch

from tunelab.errors import UserError
from tunelab.models.compressed import QuantSpec, dequantize, gptq, layer_error, qparams, quantize, rtn


def test_round_to_nearest_by_hand():
    w = torch.tensor([[0.3, -1.5, 0.75, 0.1]])
    # symmetric int4, one scale per row: 1.5 / 7.5 = 0.2; w / 0.2 = 1.5, -7.5, 3.75, 0.5 -> half to even: 2, -8, 4, 0
    q, scale, zero = rtn(w, QuantSpec(4, True, "channel"))
    assert scale.tolist() == [[pytest.approx(0.2)]] and zero.tolist() == [[0]]
    assert q.tolist() == [[2, -8, 4, 0]]
    assert dequantize(q, scale, zero, QuantSpec(4, True, "channel"))[0].tolist() == pytest.approx([0.4, -1.6, 0.8, 0])
    # asymmetric: range [-1.5, 0.75] over 15 steps, scale 0.15, zero point -8 + 10 = 2; q = round(w / 0.15 + 2)
    spec = QuantSpec(4, False, "channel")
    q, scale, zero = rtn(w, spec)
    assert scale.tolist() == [[pytest.approx(0.15)]] and zero.tolist() == [[2]]
    assert q.tolist() == [[4, -8, 7, 3]]
    assert dequantize(q, scale, zero, spec)[0].tolist() == pytest.approx([0.3, -1.5, 0.75, 0.15])
    # groups of two: each pair its own scale
    q, scale, zero = rtn(w, QuantSpec(8, True, "group", 2))
    assert scale[0].tolist() == pytest.approx([1.5 / 127.5, 0.75 / 127.5])
    # an all-zero row keeps a usable scale and quantizes to zeros
    q, scale, zero = rtn(torch.zeros(2, 4), QuantSpec(4, True, "channel"))
    assert (scale > 0).all() and (q == 0).all()


SPECS = [QuantSpec(bits, sym, gran, 16 if gran == "group" else 0)
         for bits, sym, gran in itertools.product((4, 8), (True, False), ("tensor", "channel", "group"))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe().replace(" ", "-"))
def test_scales_and_fake_quantization_are_compressed_tensors_own(spec):
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g)
    w[3] = 0.0  # a dead row
    w[5] = w[5].abs()  # a row with no negative weight (asymmetric: zero point at the bottom)
    args = QuantizationArgs(num_bits=spec.bits, type="int", symmetric=spec.symmetric, strategy=spec.granularity,
                            group_size=spec.group_size or None)
    scale, zero = qparams(w, spec)
    if spec.granularity == "tensor":
        lo, hi = w.amin().reshape(1, 1), w.amax().reshape(1, 1)
    else:
        grouped = w.reshape(24, -1, spec.group_size) if spec.group_size else w.reshape(24, 1, 64)
        lo, hi = grouped.amin(-1), grouped.amax(-1)
    ref_scale, ref_zero = calculate_qparams(lo, hi, args)
    # the same float32 operations in the same order: equal, not close
    assert torch.equal(scale, ref_scale.reshape(scale.shape).float())
    assert torch.equal(zero, ref_zero.reshape(zero.shape).to(torch.int32))
    ours = dequantize(quantize(w, scale, zero, spec), scale, zero, spec)
    theirs = fake_quantize(w, ref_scale, ref_zero, args)
    assert torch.equal(ours, theirs)
    q = quantize(w, scale, zero, spec)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    # every weight is within half a step of its value (none clipped: the range covers them all); the step itself
    # is rounded to float32, which moves the value of the largest integer (2^(bits-1) steps) by that many ulps
    step = scale.repeat_interleave(spec.group_size, 1) if spec.group_size else scale.expand_as(w)
    assert ((ours - w).abs() <= step * (0.5 + (spec.qmax + 2) * 2.0 ** -23)).all()


def test_gptq_by_hand_on_two_correlated_inputs():
    # one row [1.5, 0.5], int4 symmetric per channel: scale 0.2. H = [[1, .5], [.5, 1]] (inputs correlated)
    w = torch.tensor([[1.5, 0.5]])
    h = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    spec = QuantSpec(4, True, "channel")
    # column 0: 7.5 rounds to 8, clamped to 7 -> 1.4, error e = 0.1; the best change of column 1 to make up for it
    # is e x H01 / H11 = 0.05: 0.55 / 0.2 = 2.75 -> 3 (0.6), where round-to-nearest gives 2.5 -> 2 (0.4)
    q, scale, _ = gptq(w, h, spec, damp=0.0)
    assert q.tolist() == [[7, 3]] and rtn(w, spec)[0].tolist() == [[7, 2]]
    # output error d H d^T: GPTQ (0.1, -0.1) -> 0.01; round-to-nearest (0.1, 0.1) -> 0.03
    zero = torch.zeros(1, 1, dtype=torch.int32)
    assert layer_error(w, dequantize(q, scale, zero, spec), h) == pytest.approx(0.01, rel=1e-5)
    assert layer_error(w, dequantize(*rtn(w, spec), spec), h) == pytest.approx(0.03, rel=1e-5)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "channel"), QuantSpec(4, False, "group", 8),
                                  QuantSpec(8, True, "tensor")], ids=lambda s: s.describe().replace(" ", "-"))
def test_gptq_is_round_to_nearest_with_uncorrelated_inputs_and_better_with_correlated_ones(spec):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g)
    diag = torch.diag(torch.rand(32, generator=g) + 0.5)  # uncorrelated inputs: nothing to move errors onto
    q, scale, zero = gptq(w, diag, spec, block=8)
    assert torch.equal(q, rtn(w, spec)[0])
    # correlated inputs (a shared factor) from 256 tokens: GPTQ's outputs move less than round-to-nearest's
    x = torch.randn(256, 4, generator=g) @ torch.randn(4, 32, generator=g) + 0.3 * torch.randn(256, 32, generator=g)
    h = x.T.double() @ x.double()
    q, scale, zero = gptq(w, h, spec, block=8)
    err_gptq = layer_error(w, dequantize(q, scale, zero, spec), h)
    err_rtn = layer_error(w, dequantize(*rtn(w, spec), spec), h)
    assert err_gptq < 0.8 * err_rtn
    # the block size only changes when the pending updates are applied, not what they are
    q2, scale2, zero2 = gptq(w, h, spec, block=32)
    assert torch.equal(q2, q) and torch.allclose(scale2, scale)


def test_an_input_never_seen_is_rounded_as_it_is():
    w = torch.tensor([[0.3, -0.9, 0.45], [0.1, 0.2, -0.6]])
    h = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 2.0]])  # input 1 is always zero
    q, scale, zero = gptq(w, h, QuantSpec(8, True, "channel"))
    assert torch.isfinite(scale).all()
    assert torch.equal(q[:, 1], rtn(w, QuantSpec(8, True, "channel"))[0][:, 1])


def test_bad_schemes_are_refused():
    for spec, message in ((QuantSpec(3), "--bits: 4 or 8"), (QuantSpec(4, True, "row"), "--granularity"),
                          (QuantSpec(4, True, "group", 0), "--group-size: needed"),
                          (QuantSpec(4, True, "channel", 32), "--group-size: needed")):
        with pytest.raises(UserError, match=message):
            spec.check()
    with pytest.raises(UserError, match="does not divide the 48 inputs of layer 0 mlp.down_proj"):
        QuantSpec(4, True, "group", 32).check_layer(48, "layer 0 mlp.down_proj")
