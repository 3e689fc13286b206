"""The fused LoRA forward (models/fused_lora.py) computes peft's function: same outputs and gradients, and peft's
own forward wherever the layer is not plain LoRA."""

from __future__ import annotations

import pytest
import torch

from tunelab.models import fused_lora


def _model(tiny_model_dir, **lora):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opts = {"r": 4, "lora_alpha": 6, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    return get_peft_model(base, LoraConfig(**opts))


def _step(model, ids, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for both forwards
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def _same(a, b, atol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=1e-5)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], atol=atol, rtol=1e-4, msg=name)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_equals_peft(tiny_model_dir, dropout):
    model = _model(tiny_model_dir, lora_dropout=dropout).train()
    ids = torch.randint(3, 1000, (3, 17), generator=torch.Generator().manual_seed(1))
    reference = _step(model, ids)
    n = fused_lora.install(model)
    assert n == 2 * 7  # every linear of the 2 decoder layers
    assert fused_lora.install(model) == 0  # idempotent
    fused = _step(model, ids)
    _same(fused, reference)
    # it is really another computation (one addmm with alpha=1.5), not peft's forward under another name
    layer = next(m for m in model.modules() if hasattr(m, "_tunelab_peft_forward"))
    assert layer.forward.__func__ is fused_lora._fused_forward
    assert fused_lora.uninstall(model) == n
    _same(_step(model, ids), reference, atol=0)


def test_fused_falls_back_where_not_plain_lora(tiny_model_dir):
    ids = torch.randint(3, 1000, (2, 9), generator=torch.Generator().manual_seed(2))
    dora = _model(tiny_model_dir, use_dora=True).train()
    reference = _step(dora, ids)
    fused_lora.install(dora)
    _same(_step(dora, ids), reference, atol=0)  # DoRA is a variant: peft's own forward, bit for bit
    plain = _model(tiny_model_dir).eval()
    fused_lora.install(plain)
    with torch.no_grad():
        adapted = plain(input_ids=ids).logits
        with plain.disable_adapter():
            base = plain(input_ids=ids).logits
        plain.merge_adapter()
        merged = plain(input_ids=ids).logits
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
