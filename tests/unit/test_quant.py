"""model.quantization: QLoRA loading on CPU, k-bit preparation, LoftQ, dequantization and the adapter's record."""

from __future__ import annotations

import json
import sys
import warnings

import pytest
import torch

from tests.tolerance import logits_tol, reorder_tol
from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError
from tunelab.models import quant
from tunelab.models.load import load_model

bnb = pytest.importorskip("bitsandbytes")

KINDS = ["nf4", "fp4", "int8"]


def _ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def _load(path, kind: str, dtype=torch.float32, **kw):
    return load_model(ModelConfig(path=str(path), quantization=kind, **kw), dtype=dtype)


def _lora(model, r: int = 4):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _full(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------ configuration
def test_bnb_config_follows_model_config():
    assert quant.bnb_config(ModelConfig(path="x")) is None
    nf4 = quant.bnb_config(ModelConfig(path="x", quantization="nf4"), device_type="cpu")
    assert nf4.load_in_4bit and nf4.bnb_4bit_quant_type == "nf4" and nf4.bnb_4bit_use_double_quant
    assert nf4.bnb_4bit_compute_dtype == torch.float32 and nf4.bnb_4bit_quant_storage == torch.uint8
    fp4 = quant.bnb_config(ModelConfig(path="x", quantization="fp4", double_quant=False, compute_dtype="bfloat16"))
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    assert fp4.bnb_4bit_compute_dtype == torch.bfloat16
    int8 = quant.bnb_config(ModelConfig(path="x", quantization="int8"))
    assert int8.load_in_8bit and not int8.load_in_4bit


def test_compute_dtype_auto():
    assert quant.resolve_compute_dtype("auto", "cpu") == torch.float32
    assert quant.resolve_compute_dtype("float16", "cpu") == torch.float16
    if not torch.cuda.is_available():
        assert quant.resolve_compute_dtype("auto", "cuda") == torch.float32  # no GPU here to run bf16 on
        assert quant.resolve_compute_dtype("auto") == torch.float32


def test_describe_is_plain_json():
    assert quant.describe(ModelConfig(path="x")) is None
    d = quant.describe(ModelConfig(path="x", quantization="nf4"), device_type="cpu")
    assert d["quantization"] == "nf4" and d["double_quant"] is True and d["compute_dtype"] == "float32"
    assert d["quant_storage"] == "uint8" and d["method"] == "bitsandbytes" and d["bitsandbytes_version"]
    assert json.loads(json.dumps(d)) == d
    assert quant.describe(ModelConfig(path="x", quantization="int8"))["quantization"] == "int8"


def test_missing_bitsandbytes_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match="model.quantization: needs the bitsandbytes package") as e:
        quant.bnb_config(ModelConfig(path="x", quantization="nf4"))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", KINDS)
def test_qlora_forward_backward_on_cpu(tiny_model_dir, kind):
    cfg = ModelConfig(path=str(tiny_model_dir), quantization=kind)
    model = load_model(cfg, dtype=torch.float32)
    cls = bnb.nn.Linear8bitLt if kind == "int8" else bnb.nn.Linear4bit
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, cls)
    if kind != "int8":
        assert q_proj.weight.quant_state.quant_type == kind
    assert not isinstance(model.lm_head, cls)  # the output layer stays full precision
    model = quant.prepare_for_training(model, cfg, gradient_checkpointing=True)
    assert not any(p.requires_grad for p in model.parameters())
    peft_model = _lora(model)
    peft_model.train()
    ids = _ids()
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    # every adapter gets a gradient, the bottom layer's included (through checkpointing and frozen embeddings)
    assert all(p.grad is not None for _, p in trainable)
    assert all(p.grad.abs().sum() > 0 for n, p in trainable if "lora_B" in n)  # (A gets 0 while B is 0)


def test_prepare_for_training_upcasts_small_params(tiny_model_dir):
    cfg = ModelConfig(path=str(tiny_model_dir), quantization="nf4", compute_dtype="float32")
    model = load_model(cfg, dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    model = quant.prepare_for_training(model, cfg, gradient_checkpointing=False)
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.layers[0].input_layernorm.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8  # the 4-bit weights stay packed
    assert not any(p.requires_grad for p in model.parameters())
    plain = _full(tiny_model_dir)
    assert quant.prepare_for_training(plain, ModelConfig(path=str(tiny_model_dir)), True) is plain
    assert all(p.requires_grad for p in plain.parameters())  # "none": untouched


def test_eval_forward_keeps_the_training_layout(tiny_model_dir):
    """bitsandbytes would repack 4-bit weights for its bf16 CPU kernel on the first eval forward without grad;
    load_model pins the training layout, so evaluation computes exactly what training does."""
    model = _load(tiny_model_dir, "nf4")
    ids = _ids()
    model.train()
    train_logits = _logits(model, ids)
    model.eval()
    first, second = _logits(model, ids), _logits(model, ids)
    state = model.model.layers[0].self_attn.q_proj.weight.quant_state
    assert not getattr(state, "packing_format_for_cpu", False)
    torch.testing.assert_close(first, train_logits, atol=0, rtol=0)
    torch.testing.assert_close(second, first, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------ LoftQ
@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_loftq_fits_the_quantization_error(tiny_model_dir, kind):
    from safetensors.torch import load_file

    original = load_file(str(tiny_model_dir / "model.safetensors"))
    ids = _ids()
    reference = _logits(_full(tiny_model_dir), ids)

    plain = _lora(_load(tiny_model_dir, kind), r=8).eval()
    plain_logits = _logits(plain, ids)

    model = _lora(_load(tiny_model_dir, kind), r=8).eval()
    quant.loftq_init(model, str(tiny_model_dir))
    from peft.tuners.lora import LoraLayer

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 2 * 7  # every decoder linear of both layers
    for name, layer in layers:
        w = original[name.removeprefix("base_model.model.") + ".weight"].float()
        d = quant.dequantized_weight(layer.get_base_layer(), torch.float32)
        ba = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert torch.linalg.norm(w - (d + ba)) < torch.linalg.norm(w - d), name
        # it is the best rank-8 fit: what is left is the tail of the residual's singular values
        residual = w - d
        tail = torch.linalg.svdvals(residual)[8:]
        # Eckart-Young: |R - R_8| = |tail| exactly. Both sides come from float32 SVDs of R (out x in), backward
        # stable to about (out + in) roundings of |R|, plus one rounding of d + ba per element
        tol = reorder_tol(float(torch.linalg.norm(residual)), sum(residual.shape) + 1, torch.float32, cond=1.0)
        got = torch.linalg.norm(w - (d + ba))
        assert abs(float(got) - float(torch.linalg.norm(tail))) <= tol, (name, float(got), tol)
    loftq_logits = _logits(model, ids)
    assert torch.linalg.norm(loftq_logits - reference) < torch.linalg.norm(plain_logits - reference)


def test_loftq_needs_the_original_weights(tiny_model_dir, tmp_path):
    model = _lora(_load(tiny_model_dir, "nf4"))
    with pytest.raises(UserError, match="loftq"):
        quant.loftq_init(model, str(tmp_path))


# ------------------------------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wrapped", [False, True])
def test_dequantize_keeps_the_function(tiny_model_dir, tmp_path, kind, wrapped):
    """Logits are unchanged (to fp32 rounding) when every quantized linear becomes an nn.Linear of its dequantized
    weight. Compared in training mode: that is the function the adapter learns on, and for int8 bitsandbytes'
    CPU inference path additionally quantizes the activations (so eval logits of int8 differ by that error)."""
    from transformers import AutoModelForCausalLM

    model = _load(tiny_model_dir, kind)
    if wrapped:
        model = _lora(model)
        with torch.no_grad():  # a non-zero adapter, so the merge below has something to merge
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    model.train()
    ids = _ids()
    before = _logits(model, ids)
    out = quant.dequantize(model)
    assert out is model
    assert not quant.is_quantized(model)
    after = _logits(model, ids)
    # the same dequantized values through a plain matmul: at most one rounding per weight apart (bitsandbytes may
    # scale in another order), and reordered sums
    tol = logits_tol(before, tiny_model_dir, extra=8)
    torch.testing.assert_close(after, before, atol=tol, rtol=0)
    if wrapped:
        from peft.tuners.lora.layer import Linear as LoraLinear

        assert type(model.base_model.model.model.layers[0].self_attn.q_proj) is LoraLinear
        model = model.merge_and_unload()
        torch.testing.assert_close(_logits(model, ids), before, atol=tol, rtol=0)
    assert not hasattr(model.config, "quantization_config")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_loaded_in_4bit", False)
    model.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in saved
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert type(back.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    back.train()
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), atol=0, rtol=0)  # same weights, same code
