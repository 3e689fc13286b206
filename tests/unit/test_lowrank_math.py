"""The low-rank math of models/lowrank.py: truncated SVD is Eckart-Young's best approximation (by hand on a
diagonal matrix, and its error the discarded energy), the rank rules, and whitening: the factors fit the layer's
outputs on its inputs, with the output error the discarded energy of W L, below plain SVD's."""

from __future__ import annotations

import pytest
import torch

from tunelab.models.lowrank import LowRankLinear, energy_rank, factor, ratio_rank, saves_parameters


def test_truncated_svd_by_hand():
    w = torch.diag(torch.tensor([3.0, -2.0, 1.0]))
    b, a, facts = factor(w, rank=2)
    assert b.shape == (3, 2) and a.shape == (2, 3)
    assert torch.allclose(b @ a, torch.diag(torch.tensor([3.0, -2.0, 0.0])), atol=1e-6)
    assert facts == {"rank": 2, "energy": pytest.approx(13 / 14), "discarded": pytest.approx(1.0)}
    # the two factors carry the singular values evenly: ||B|| = ||A||
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1))


def test_rank_rules():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 0.9) == 2 and energy_rank(s, 0.6) == 1 and energy_rank(s, 1.0) == 3
    assert energy_rank(s, 9 / 14) == 1  # exactly reached counts
    # r (out + in) <= ratio out in: 64 x 176, half -> floor(0.5 * 11264 / 240) = 23
    assert ratio_rank(64, 176, 0.5) == 23 and 23 * 240 <= 0.5 * 64 * 176 < 24 * 240
    assert saves_parameters(64, 64, 31) and not saves_parameters(64, 64, 32)


def test_eckart_young_error_is_the_discarded_energy():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    s = torch.linalg.svdvals(w.double())
    for r in (1, 5, 12):
        b, a, facts = factor(w, rank=r)
        err = float(((w.double() - b.double() @ a.double()) ** 2).sum())
        # float32 factors of a float32 matrix: the error of storing them is ~1e-7 x ||W||^2, well below these gaps
        assert err == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4, abs=1e-4 * float((s ** 2).sum()))
        assert facts["discarded"] == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-9)


def test_whitened_factors_fit_the_outputs_on_the_calibration_inputs():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    # correlated inputs with very different scales: plain SVD spends its rank where the inputs are not
    x = (torch.randn(512, 32, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 32, dtype=torch.float64)) \
        @ torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    h = x.T @ x

    def out_err(b, a):
        return float((((w - b @ a) @ x.T) ** 2).sum())

    b, a, facts = factor(w, rank=6, hessian=h, damp=0.0)
    # the output error is what the discarded singular values of W L leave: Eckart-Young in the whitened space
    s = torch.linalg.svdvals(w @ torch.linalg.cholesky(h))
    assert out_err(b, a) == pytest.approx(float((s[6:] ** 2).sum()), rel=1e-8)
    assert facts["discarded"] == pytest.approx(float((s[6:] ** 2).sum()), rel=1e-8)
    plain_b, plain_a, _ = factor(w, rank=6)
    assert out_err(b, a) < 0.5 * out_err(plain_b, plain_a)
    # full rank, whitened or not, is W itself
    b, a, _ = factor(w, rank=16, hessian=h, damp=0.0)
    assert torch.allclose(b @ a, w, atol=1e-9)


def test_low_rank_linear_computes_b_of_a_and_densifies_to_the_same():
    layer = LowRankLinear(8, 6, 3, bias=True, dtype=torch.float64)  # float64: only the order of sums differs
    x = torch.randn(5, 8, dtype=torch.float64)
    dense = layer.dense()
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ (layer.b.weight @ layer.a.weight).T + layer.b.bias, atol=1e-12)
        assert torch.allclose(dense(x), layer(x), atol=1e-12)
