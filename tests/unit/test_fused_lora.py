"""The fused LoRA forward (models/fused_lora.py) computes peft's function: same outputs and gradients, and peft's
own forward wherever the layer is not plain LoRA.

One addmm instead of two products and a sum reorders the arithmetic: compared in float64 within the reorder bound
of tests/tolerance.py. Where the same code runs (peft's own forward), the outputs are compared bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.tolerance import chain_length, reorder_tol
from tunelab.models import fused_lora

F64 = torch.float64


def _model(tiny_model_dir, dtype=F64, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    opts = {"r": 4, "lora_alpha": 6, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    return get_peft_model(base, LoraConfig(**opts))


def _step(model, ids, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both forwards
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _same(a, b, tiny_model_dir=None):
    """Logits and gradients equal: bitwise without `tiny_model_dir`, else within the float64 reorder bound of that
    model's chain (17 positions, a loss over 3 x 17 tokens, the rank-4 product) at each tensor's scale."""
    n = chain_length(tiny_model_dir, 17, tokens=3 * 17) + 4 if tiny_model_dir is not None else 0

    def close(x, y, what):
        tol = reorder_tol(float(y.abs().max()), n) if n else 0.0
        assert x.dtype == y.dtype == F64
        torch.testing.assert_close(x, y, atol=tol, rtol=0, msg=what)

    close(a[0], b[0], "logits")
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        close(a[1][name], b[1][name], name)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_equals_peft(tiny_model_dir, dropout):
    model = _model(tiny_model_dir, lora_dropout=dropout).train()
    ids = torch.randint(3, 1000, (3, 17), generator=torch.Generator().manual_seed(1))
    reference = _step(model, ids)
    n = fused_lora.install(model)
    assert n == 2 * 7  # every linear of the 2 decoder layers
    assert fused_lora.install(model) == 0  # idempotent
    fused = _step(model, ids)
    _same(fused, reference, tiny_model_dir)
    # it is really another computation (one addmm with alpha=1.5), not peft's forward under another name
    layer = next(m for m in model.modules() if hasattr(m, "_tunelab_peft_forward"))
    assert layer.forward.__func__ is fused_lora._fused_forward
    assert fused_lora.uninstall(model) == n
    _same(_step(model, ids), reference)


def test_fused_falls_back_where_not_plain_lora(tiny_model_dir):
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(2))
    dora = _model(tiny_model_dir, use_dora=True).train()
    reference = _step(dora, ids)
    fused_lora.install(dora)
    _same(_step(dora, ids), reference)  # DoRA is a variant: peft's own forward, bit for bit
    plain = _model(tiny_model_dir).eval()
    fused_lora.install(plain)
    with torch.no_grad():
        adapted = plain(input_ids=ids).logits
        with plain.disable_adapter():
            base = plain(input_ids=ids).logits
        plain.merge_adapter()
        merged = plain(input_ids=ids).logits
    tol = reorder_tol(float(adapted.abs().max()), chain_length(tiny_model_dir, 9) + 4)
    assert not torch.allclose(adapted, base, atol=tol, rtol=0)
    torch.testing.assert_close(merged, adapted, atol=tol, rtol=0)


@pytest.mark.parametrize("fused", [False, True], ids=["peft", "fused"])
def test_merged_for_sampling_is_the_adapted_function_and_leaves_the_base_untouched(tiny_model_dir, fused):
    """Inside `merged_for_sampling` every plain LoRA linear computes x (W + s B A)^T with a merged copy of its weight:
    the same logits as the adapter path within the float64 reorder bound of one more rank-4 product per layer; on
    leaving, every parameter is the same object with the same bits, and the layers answer through the adapter again
    (a changed adapter changes the output). DoRA layers are left on their own path."""
    model = _model(tiny_model_dir).eval()
    if fused:
        fused_lora.install(model)
    ids = torch.randint(3, 1000, (3, 17), generator=torch.Generator().manual_seed(1))
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    with torch.no_grad():
        adapter = model(input_ids=ids).logits
        with fused_lora.merged_for_sampling(model) as merged:
            assert len(merged._saved) == len(fused_lora.adapted_linears(model)) == 14  # 7 linears x 2 layers
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    n = chain_length(tiny_model_dir, 17, tokens=3 * 17) + 4
    torch.testing.assert_close(inside, adapter, atol=reorder_tol(float(adapter.abs().max()), n), rtol=0)
    assert torch.equal(after, adapter)
    for name, (p, saved) in params.items():
        assert dict(model.named_parameters())[name] is p and torch.equal(p, saved), name
    dora = _model(tiny_model_dir, use_dora=True)
    assert fused_lora.adapted_linears(dora) == []
    with fused_lora.merged_for_sampling(dora) as merged:
        assert merged._saved == []
