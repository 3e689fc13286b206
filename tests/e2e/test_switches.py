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
