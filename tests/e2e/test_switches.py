"""Memory and speed switches: what runs on CPU is checked for equal results; what needs CUDA fails clearly."""

from __future__ import annotations

import pytest
import torch

import tunelab
from tests.helpers import alpaca_rows, base_config, write_json
from tests.tolerance import adam_tol, assert_same_metrics, assert_same_weights, chain_length
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
    """torch.compile on CPU (inductor, C++ codegen): same losses as eager. A 1-layer model keeps compilation short.
    Inductor fuses and reorders the arithmetic, so the runs are compared in float64 with the reorder bound."""
    from tunelab.models.tiny import build_tiny_llama

    model_dir = build_tiny_llama(tmp_path / "m", hidden=32, layers=1, heads=2, vocab=600)
    runs = {}
    for compiled in (False, True):
        out = tmp_path / f"c{compiled}"
        cfg = base_config(model_dir, data_path, out, train={"max_steps": 2})
        cfg["model"].update(compile=compiled, dtype="float64")
        tunelab.train(cfg, echo=False)
        runs[compiled] = read_metrics(out)
    assert_same_metrics(runs[True], runs[False], ("loss", "grad_norm"), chain_length(model_dir, 64, tokens=4 * 64))


def test_packing_modes_train_identically(tiny_model_dir, data_path, tmp_path, capsys):
    """Through the whole loop (LoRA with its fused forward): padding-free micro-batches (one row each, attention per
    sequence) and padded ones give the same per-step losses, token counts and final adapter weights."""
    from safetensors.torch import load_file

    runs = {}
    for mode in ("none", "padding_free"):
        out = tmp_path / mode
        cfg = base_config(tiny_model_dir, data_path, out, data={"packing": mode}, train={"max_steps": 3})
        cfg["model"]["dtype"] = "float64"  # an exactness claim: tests/tolerance.py
        tunelab.train(cfg, echo=True)
        runs[mode] = (read_metrics(out), load_file(out / "final" / "adapter_model.safetensors"))
    assert "packed micro-batches are one row each" in capsys.readouterr().out
    (m_pad, w_pad), (m_pack, w_pack) = runs["none"], runs["padding_free"]
    assert [r["tokens"] for r in m_pack] == [r["tokens"] for r in m_pad]
    n = chain_length(tiny_model_dir, 64, tokens=4 * 64)
    assert_same_metrics(m_pack, m_pad, ("loss", "grad_norm"), n)
    assert all(r["positions"] == r["tokens"] for r in m_pack)  # no padding at all
    assert any(r["positions"] > r["tokens"] for r in m_pad)
    assert_same_weights(w_pack, w_pad, adam_tol(1e-2, 3, n))
