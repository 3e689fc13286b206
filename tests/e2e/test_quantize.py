"""`tunelab quantize` on a tiny model: the folder it writes is compressed-tensors that transformers loads with
from_pretrained, and the loaded model is the original with every decoder linear replaced by its quantized values
(round-to-nearest here, computed in the test; GPTQ from the Hessians of the sequentially quantized model); 4-bit
symmetric folders are packed (smaller); eval ppl reads them; bad input gets one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, CompressedTensorsConfig

import tunelab
from tests.helpers import CALIB, alpaca_rows, calib_windows, run_main, write_json
from tunelab.infer.calibration import input_hessians
from tunelab.models.compressed import QuantSpec, dequantize, gptq, rtn


def _decoder_bytes(folder):
    """Bytes the folder's safetensors spend on the decoder layers (weights, scales, zero points)."""
    return sum(t.numel() * t.element_size() for path in folder.glob("*.safetensors")
               for k, t in load_file(str(path)).items() if ".layers." in k)


@pytest.mark.parametrize("spec", [QuantSpec(4, True, "group", 16), QuantSpec(8, False, "channel")],
                         ids=["int4-sym-group16-packed", "int8-asym-channel"])
def test_round_to_nearest_folder_loads_as_the_fake_quantized_original(tiny_model_dir, tmp_path, capsys, spec):
    out = tmp_path / "q"
    args = ["--bits", str(spec.bits), "--granularity", spec.granularity]
    args += ["--group-size", str(spec.group_size)] if spec.group_size else []
    args += [] if spec.symmetric else ["--asymmetric"]
    proc = run_main(capsys, "quantize", "--model", str(tiny_model_dir), "--out", str(out), *args, check=True)
    assert f"int{spec.bits}" in proc.stdout and "14 linear layers" in proc.stdout
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == spec.storage
    record = json.loads((out / "tunelab_compression.json").read_text())
    assert record["tunelab_compression"] == "quantize" and record["method"] == "rtn" and record["bits"] == spec.bits
    # the original with each decoder linear replaced by its round-to-nearest values, computed here
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                p.copy_(dequantize(*rtn(p.data, spec), spec))
    # decompressed on load: (q - zero point) x scale, as computed here
    dense = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    got = dict(dense.named_parameters())
    for name, p in ref.named_parameters():
        assert torch.equal(got[name].data, p.data), name
    # kept compressed (the default: each linear decompresses its weights in its forward), computing the same
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        assert torch.equal(dense(input_ids=ids).logits, want)
        assert torch.equal(loaded(input_ids=ids).logits, want)
    # against float32: 4 bits packed eight to an int32 and a float32 scale per 16 weights (0.75 bytes a weight);
    # 8 bits one to an int8 with a scale and zero point per row (~1 byte)
    share = _decoder_bytes(out) / _decoder_bytes(tiny_model_dir)
    assert share < (0.75 if spec.bits == 4 else 1.05) / 4 + 0.01, share
    # a quantized folder is a model folder: eval ppl reads it, and scores what the fake-quantized original does
    ref.save_pretrained(tmp_path / "ref")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "ref")
    data = str(write_json(tmp_path / "ev.json", alpaca_rows(8)))
    got, want = (tunelab.evaluate_perplexity(model=str(m), data=data) for m in (out, tmp_path / "ref"))
    assert got.ppl == pytest.approx(want.ppl, rel=1e-6) and got.tokens == want.tokens > 0
    assert got.parameters == want.parameters and got.disk_bytes < want.disk_bytes


def test_gptq_quantizes_each_layer_on_the_inputs_of_the_quantized_layers_before(tiny_model_dir, calib, tmp_path):
    out = tmp_path / "gptq"
    spec = QuantSpec(4, True, "channel")
    info = tunelab.quantize(model=str(tiny_model_dir), out=str(out), bits=4, granularity="channel", method="gptq",
                            calibration=str(calib), echo=False, **CALIB)
    loaded = AutoModelForCausalLM.from_pretrained(
        out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    got = dict(loaded.named_parameters())
    # layer by layer, as the command: Hessians on the model whose earlier layers are already quantized
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    windows = calib_windows(tiny_model_dir, calib)
    for index in range(2):
        hessians = input_hessians(model, windows, index)
        with torch.no_grad():
            for short, h in hessians.items():
                key = f"model.layers.{index}.{short}.weight"
                p = dict(model.named_parameters())[key]
                want = dequantize(*gptq(p.data, h, spec, damp=0.01), spec)
                # the same float64 computation on the same Hessian: equal but for the last bits of H's sums,
                # which may round a weight that lies on a half step the other way (one step, rarely)
                diff = (got[key].data - want).abs()
                step = want.abs().amax(1, keepdim=True) / 7.5
                assert (diff <= step * 1.001).all() and (diff > 0).float().mean() < 0.01, key
                p.copy_(got[key].data)  # quantized as the command did, before the next layer is measured
    errors = info["relative_output_error"]
    assert len(errors) == 2 and set(errors[0]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "mlp.down_proj"}
    # GPTQ moves each layer's outputs on the calibration tokens less than rounding would have, in total
    assert sum(e["gptq"] for row in errors for e in row.values()) < sum(e["rtn"] for row in errors
                                                                         for e in row.values())
    assert json.loads((out / "tunelab_compression.json").read_text())["calibration"]["windows"] == 6


def test_bad_input_gets_one_line_and_writes_nothing(tiny_model_dir, calib, tmp_path, capsys):
    for args, message in (
            (["--group-size", "32"], "error: --group-size 32 does not divide the 176 inputs of layer 0 "
                                     "mlp.down_proj"),
            (["--method", "gptq"], "needs --calibration"),
            (["--granularity", "channel", "--group-size", "32"], "--group-size: only with --granularity group"),
            (["--method", "gptq", "--damp", "1.5", "--calibration", str(calib)], "--damp: in [0, 1)")):
        proc = run_main(capsys, "quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "bad"), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert message in lines[0], lines[0]
    assert not (tmp_path / "bad").exists()
