"""Memory and speed switches: what runs on CPU is checked for equal results; what needs CUDA fails clearly."""

from __future__ import annotations

import pytest
import torch

import tunelab
from tests.helpers import alpaca_rows, base_config, write_json
from tunelab.engine.metrics import read_metrics
from tunelab.errors import UserError

needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_rows(16))


@needs_cpu_only
@pytest.mark.parametrize("override, message", [
    ("model.attn_implementation=flash_attention_2", "flash_attention_2 needs a CUDA GPU"),
    ("model.liger_kernels=true", "Liger's Triton kernels need a CUDA GPU"),
    ("model.offload_activations=true", "a CPU run has nothing to offload"),
])
def test_cuda_only_switches_are_refused_on_cpu(tiny_model_dir, data_path, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        tunelab.train(base_config(tiny_model_dir, data_path, tmp_path / "o"), [override], echo=False)


def test_torch_compile_gives_the_same_losses(tmp_path, data_path):
    """torch.compile on CPU (inductor, C++ codegen): same losses as eager. A 1-layer model keeps compilation short."""
    from tunelab.models.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "m", hidden=32, layers=1, heads=2, vocab=600)
    losses = {}
    for compiled in (False, True):
        out = tmp_path / f"c{compiled}"
        cfg = base_config(model_dir, data_path, out, train={"max_steps": 2})
        cfg["model"]["compile"] = compiled
        tunelab.train(cfg, echo=False)
        losses[compiled] = [r["loss"] for r in read_metrics(out)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


def test_packing_modes_train_identically(tiny_model_dir, data_path, tmp_path, capsys):
    """Through the whole loop (LoRA with its fused forward): padding-free micro-batches (one row each, attention per
    sequence) and padded ones give the same per-step losses, token counts and final adapter weights."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("none", "padding_free"):
        out = tmp_path / mode
        cfg = base_config(tiny_model_dir, data_path, out, data={"packing": mode}, train={"max_steps": 3})
        tunelab.train(cfg, echo=True)
        runs[mode] = (read_metrics(out), load_file(out / "final" / "adapter_model.safetensors"))
    assert "packed micro-batches are one row each" in capsys.readouterr().out
    (m_pad, w_pad), (m_pack, w_pack) = runs["none"], runs["padding_free"]
    assert [r["tokens"] for r in m_pack] == [r["tokens"] for r in m_pad]
    assert [r["loss"] for r in m_pack] == pytest.approx([r["loss"] for r in m_pad], abs=1e-5)
    assert all(r["positions"] == r["tokens"] for r in m_pack)  # no padding at all
    assert any(r["positions"] > r["tokens"] for r in m_pad)
    for name in w_pad:
        torch.testing.assert_close(w_pack[name], w_pad[name], atol=1e-5, rtol=1e-4)
