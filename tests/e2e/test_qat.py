"""train.qat end to end: a full fine-tune with int4 fake quantization saves final/ as a compressed-tensors folder
whose weights are the fake-quantized values of the float weights it trained (the last checkpoint holds those), so
the loaded model computes what the training computed; bad settings get one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import tunelab
from tests.helpers import alpaca_rows, base_config, qat_reference, write_json
from tunelab.errors import UserError
from tunelab.models.compressed import QuantSpec


def test_qat_final_folder_holds_what_training_computed(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", alpaca_rows(16))
    cfg = base_config(tiny_model_dir, data, tmp_path / "run", adapter={"type": "full"},
                      train={"qat": "int4", "qat_group_size": 16, "max_steps": 4, "save_every": 4, "lr": 1e-3})
    result = tunelab.train(cfg, echo=False)
    final = result.final_dir
    config = json.loads((final / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert json.loads((final / "tunelab_compression.json").read_text())["method"] == "qat"
    # the float weights the run trained (the last checkpoint), fake-quantized here as the training forward did
    trained = load_file(str(tmp_path / "run" / "checkpoints" / "checkpoint-000004" / "weights" / "model.safetensors"))
    dense = load_file(str(tiny_model_dir / "model.safetensors"))
    spec = QuantSpec(4, True, "group", 16)
    loaded = AutoModelForCausalLM.from_pretrained(final, quantization_config=CompressedTensorsConfig(dequantize=True))
    got = dict(loaded.named_parameters())
    for key, w in trained.items():
        if ".layers." in key and key.endswith("proj.weight"):
            assert not torch.equal(w, dense[key]), key  # it trained
            assert torch.equal(got[key].data, qat_reference(w, spec)[0]), key
        elif key in got:
            assert torch.equal(got[key].data, w), key  # embeddings, norms, head: as trained
    # every tunelab command loads final/ (eval reads it as a quantized model)
    report = tunelab.evaluate_perplexity(model=str(final), data=str(data))
    assert report.tokens > 0 and report.disk_bytes < sum(p.stat().st_size for p in tiny_model_dir.glob("*.safetensors"))


def test_bad_qat_settings_are_refused(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "d.json", alpaca_rows(8))
    for sections, message in (({"train": {"qat": "int4"}}, "train.qat: trains the full-precision weights"),
                              ({"adapter": {"type": "full"}, "train": {"qat": "int4", "qat_group_size": 48}},
                               "train.qat_group_size 48 does not divide the 64 inputs of"),
                              ({"adapter": {"type": "full"}, "train": {"qat": "int4", "qat_group_size": 1}},
                               "train.qat_group_size: 0 (per output channel) or at least 2")):
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            tunelab.train(base_config(tiny_model_dir, data, tmp_path / "bad", **sections), echo=False)


def test_a_resumed_qat_run_repeats_the_uninterrupted_one(tiny_model_dir, tmp_path):
    """Checkpoints hold the float weights; resuming fake-quantizes them again and continues bit for bit."""
    from tunelab.engine.metrics import read_metrics

    data = write_json(tmp_path / "d.json", alpaca_rows(16))
    train = {"qat": "int8", "qat_group_size": 0, "max_steps": 4, "save_every": 2, "log_every": 1, "lr": 1e-3}
    ref = tunelab.train(base_config(tiny_model_dir, data, tmp_path / "ref", adapter={"type": "full"}, train=train),
                        echo=False)
    ckpt = tmp_path / "ref" / "checkpoints" / "checkpoint-000002"
    resumed = tunelab.train(base_config(tiny_model_dir, data, tmp_path / "resumed", adapter={"type": "full"},
                                        train={**train, "resume": str(ckpt)}), echo=False)
    ref_losses, resumed_losses = ([r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r]
                                  for name in ("ref", "resumed"))
    assert len(ref_losses) == 4 and resumed_losses == ref_losses[2:]
    want = load_file(str(ref.final_dir / "model.safetensors"))
    got = load_file(str(resumed.final_dir / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
