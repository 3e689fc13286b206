"""Engine pieces checked against hand-computed values: schedules, decay groups, collation, checkpoints, adapters."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.config.schema import FreezeAdapter, LoraAdapter, TrainConfig
from tunelab.data.collate import pad_collate
from tunelab.data.tokenize import Encoded
from tunelab.engine import checkpoint as ck
from tunelab.engine.optim import build_scheduler, decay_groups, lr_lambda
from tunelab.errors import UserError


def test_cosine_with_warmup_hand_values():
    f = lr_lambda("cosine", total=10, warmup=2, min_ratio=0.0)
    assert [f(0), f(1)] == [0.5, 1.0]  # linear warm-up reaches the peak on the last warm-up step
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f(10) == pytest.approx(0.0)
    g = lr_lambda("cosine", total=10, warmup=0, min_ratio=0.1)
    assert g(10) == pytest.approx(0.1) and g(0) == pytest.approx(1.0)


def test_linear_and_constant():
    f = lr_lambda("linear", total=4, warmup=0, min_ratio=0.0)
    assert [f(i) for i in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    c = lr_lambda("constant", total=4, warmup=1, min_ratio=0.0)
    assert [c(i) for i in range(4)] == [1.0, 1.0, 1.0, 1.0]


def test_scheduler_uses_warmup_ratio():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(lr=1.0, warmup_ratio=0.25, scheduler="linear"), total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:2] == pytest.approx([0.5, 1.0]) and lrs[-1] == pytest.approx(1 / 6)


def test_weight_decay_skips_biases_and_norms():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 3)
            self.norm = torch.nn.LayerNorm(3)
            self.frozen = torch.nn.Linear(3, 3)
            self.frozen.requires_grad_(False)

    m = M()
    groups = decay_groups(m, 0.1)
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert [id(p) for p in groups[0]["params"]] == [id(m.proj.weight)]
    assert {id(p) for p in groups[1]["params"]} == {id(m.proj.bias), id(m.norm.weight), id(m.norm.bias)}


def test_pad_collate():
    rows = [Encoded([1, 2, 3], [-100, 2, 3], False), Encoded([4], [4], False)]
    b = pad_collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        tmp = ck.begin_save(root, step)
        (tmp / "payload").write_text(str(step))
        ck.finish_save(tmp, root, step, ck.TrainState(step=step), keep=2)
    assert [s for s, _ in ck.list_checkpoints(root)] == [4, 6]
    # a save killed half-way leaves a temp folder without state.json: it is never taken as the latest
    tmp = ck.begin_save(root, 8)
    (tmp / "payload").write_text("partial")
    assert ck.latest_checkpoint(root).name == "checkpoint-000006"
    ck.clean_partial(root)
    assert not tmp.exists()
    assert ck.read_state(ck.latest_checkpoint(root)).step == 6


def test_rng_state_round_trip():
    state = ck.rng_state()
    a = torch.rand(3)
    ck.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)


@pytest.fixture()
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def _measured(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_options_reach_peft(tiny_model):
    from tunelab.models.adapters import apply_adapter, count_parameters

    model = apply_adapter(tiny_model, LoraAdapter(r=4, alpha=8, target=["q_proj", "v_proj"], rslora=True))
    cfg = model.peft_config["default"]
    assert cfg.use_rslora and set(cfg.target_modules) == {"q_proj", "v_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    assert not hasattr(model.base_model.model.model.layers[0].mlp.up_proj, "lora_A")
    hidden = tiny_model.config.hidden_size
    kv = tiny_model.config.num_key_value_heads * (hidden // tiny_model.config.num_attention_heads)
    layers = tiny_model.config.num_hidden_layers
    expected = layers * (4 * (hidden + hidden) + 4 * (hidden + kv))
    assert count_parameters(model).trainable == _measured(model) == expected


def test_dora_and_modules_to_save(tiny_model):
    from tunelab.models.adapters import apply_adapter, count_parameters

    model = apply_adapter(tiny_model, LoraAdapter(r=2, dora=True, modules_to_save=["lm_head"]))
    assert model.peft_config["default"].use_dora
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names)
    assert any("modules_to_save" in n and "lm_head" in n for n in names)
    assert count_parameters(model).trainable == _measured(model)


def test_freeze_validates_names(tiny_model):
    from tunelab.models.adapters import apply_adapter

    with pytest.raises(UserError, match="adapter.modules: no parameter matches 'nonexistent'"):
        apply_adapter(tiny_model, FreezeAdapter(layers=1, modules=["nonexistent"]))
    with pytest.raises(UserError, match="exceeds the model's 2 decoder layers"):
        apply_adapter(tiny_model, FreezeAdapter(layers=3))


def test_precision_rules():
    from tunelab.engine.shape import resolve_precision

    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(UserError, match="fp16 mixed precision needs a CUDA GPU"):
        resolve_precision("fp16", "cpu")
    # planning for another machine: a CUDA target is assumed to have bf16, and nothing is refused
    assert resolve_precision("auto", "cuda", check_hardware=False) == "bf16"
    assert resolve_precision("fp16", "cpu", check_hardware=False) == "fp16"


def test_lr_scale_groups_parameters_by_learning_rate():
    """LoRA+: the B matrices get lr x lr_ratio; decay grouping is unchanged."""
    from tunelab.config.schema import LoraAdapter
    from tunelab.models.adapters import lr_scale

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(3, 2, bias=False)})
            self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 3, bias=False)})
            self.norm = torch.nn.LayerNorm(3)

    m = torch.nn.Module()
    m.layer = M()
    assert lr_scale(LoraAdapter()) is None  # plain LoRA: one learning rate
    groups = decay_groups(m, 0.1, lr=1e-3, lr_scale=lr_scale(LoraAdapter(lr_ratio=16)))
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(m.layer.lora_B["default"].weight)]["lr"] == pytest.approx(16e-3)
    assert "lr" not in by_param[id(m.layer.lora_A["default"].weight)]  # the optimizer's default lr
    assert by_param[id(m.layer.norm.weight)]["weight_decay"] == 0.0
    assert by_param[id(m.layer.lora_B["default"].weight)]["weight_decay"] == 0.1


def test_the_streamed_safetensors_writer_writes_what_safetensors_reads(tmp_path):
    """Every dtype a checkpoint holds, a scalar and an empty tensor read back bit for bit with their metadata; the
    side file is gone; a failure while writing leaves no file behind."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {"param/w": torch.randn(3, 5, generator=g), "state/w/exp_avg": torch.randn(7, generator=g).double(),
               "b": torch.randn(2, 3, generator=g).to(torch.bfloat16), "h": torch.randn(4, generator=g).half(),
               "empty": torch.zeros(0), "step": torch.tensor(3.0), "ids": torch.arange(5),
               "strided": torch.randn(4, 6, generator=g).t()}
    path = tmp_path / "rank-00000-of-00001.safetensors"
    with ck.SafetensorsWriter(path, {"world": "1"}) as out:
        for name, t in tensors.items():
            out.add(name, t)
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"world": "1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]

    broken = tmp_path / "broken.safetensors"
    with pytest.raises(ValueError, match="written twice"):
        with ck.SafetensorsWriter(broken, {}) as out:
            out.add("x", torch.zeros(2))
            out.add("x", torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
