"""train.optimizer: each optimizer trains, keeps the decay/LoRA+ groups, and resumes exactly from its state_dict."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from tunelab.config.schema import TrainConfig
from tunelab.engine.checkpoint import load_state_file
from tunelab.engine.optim import build_optimizer, build_scheduler, galore_groups
from tunelab.errors import UserError

OPTIMIZERS = ["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "adafactor", "galore", "sgd"]


class Tiny(torch.nn.Module):
    """Names like a decoder's (attn / mlp / norm / head), and matrices above bitsandbytes' 4096-element floor for
    8-bit states."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(64, 96)
        self.mlp = torch.nn.Linear(96, 64)
        self.norm = torch.nn.LayerNorm(64)
        self.head = torch.nn.Linear(64, 1)

    def forward(self, x):
        return self.head(self.norm(self.mlp(torch.relu(self.attn(x)))))


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 64, generator=g)
    return x, x[:, :1] * 2 - x[:, 1:2]


def _cfg(name: str, **kw) -> TrainConfig:
    base = dict(optimizer=name, lr=0.01 if name != "sgd" else 0.02, weight_decay=0.01, galore_rank=8, galore_gap=3,
                warmup_steps=2, scheduler="cosine")
    return TrainConfig(**{**base, **kw})


def _step(model, opt, sched, x, y) -> float:
    loss = ((model(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_reduces_the_loss(name):
    model, (x, y) = _model(), _data()
    cfg = _cfg(name)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 30)
    losses = [_step(model, opt, sched, x, y) for _ in range(12)]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_dict_round_trip_resumes_exactly(name, tmp_path):
    """Save mid-way the way the loop checkpoints (torch.save of state_dicts), rebuild, load, continue: the next steps
    equal those of the uninterrupted run. The save is at step 4, off GaLore's gap of 3, so the restored projection
    (not a fresh SVD) must be used."""
    cfg = _cfg(name)
    x, y = _data()
    model = _model()
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 20)
    for _ in range(4):
        _step(model, opt, sched, x, y)
    path = tmp_path / "state.pt"
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "model": model.state_dict()}, path)
    straight = [_step(model, opt, sched, x, y) for _ in range(4)]
    expected = copy.deepcopy(model.state_dict())

    ckpt = load_state_file(path)  # the loop's safe reader: every optimizer's state is tensors and plain data
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(resumed, cfg)
    sched2 = build_scheduler(opt2, cfg, 20)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    again = [_step(resumed, opt2, sched2, x, y) for _ in range(4)]
    # the resumed optimizer repeats the same arithmetic in the same order: bit for bit
    assert again == straight
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=0, rtol=0)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_decay_and_lr_scale_groups_are_kept(name):
    model = _model()
    cfg = _cfg(name)
    opt = build_optimizer(model, cfg, lr_scale=lambda n: 4.0 if n.startswith("mlp") else 1.0)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_param[id(named["attn.weight"])]["weight_decay"] == 0.01
    assert by_param[id(named["attn.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["norm.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["mlp.weight"])]["lr"] == pytest.approx(4 * cfg.lr)
    assert by_param[id(named["attn.weight"])]["lr"] == pytest.approx(cfg.lr)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)


def test_adamw_8bit_states_are_uint8_above_min_size():
    model, (x, y) = _model(), _data()
    cfg = _cfg("adamw_8bit")
    opt = build_optimizer(model, cfg)
    _step(model, opt, build_scheduler(opt, cfg, 10), x, y)
    big = opt.state[model.attn.weight]  # 6144 elements
    assert big["state1"].dtype == big["state2"].dtype == torch.uint8
    assert big["absmax1"].numel() == 6144 // 256  # one fp32 scale per block of 256
    small = opt.state[model.head.weight]  # 64 elements < bitsandbytes' min_8bit_size (4096): 32-bit states
    assert small["state1"].dtype == torch.float32


def test_paged_falls_back_to_plain_bitsandbytes_on_cpu():
    import bitsandbytes as bnb

    if torch.cuda.is_available():
        pytest.skip("checks the CPU fallback; on this CUDA machine paged optimizers page")
    for name, cls in (("paged_adamw", bnb.optim.AdamW), ("paged_adamw_8bit", bnb.optim.AdamW8bit)):
        opt = build_optimizer(_model(), _cfg(name))
        assert type(opt) is cls and not opt.is_paged


def test_adafactor_factors_matrices_without_first_moment():
    model, (x, y) = _model(), _data()
    cfg = _cfg("adafactor")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 10)
    # the loop's scheduler drives the learning rate: the first of 2 warm-up steps runs at half of lr
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    _step(model, opt, sched, x, y)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    state = opt.state[model.attn.weight]  # [96, 64]
    assert state["exp_avg_sq_row"].shape == (96,) and state["exp_avg_sq_col"].shape == (64,)
    assert "exp_avg" not in state and "exp_avg_sq" not in state
    assert opt.state[model.attn.bias]["exp_avg_sq"].shape == (96,)


def test_galore_projects_only_targeted_matrices():
    model, (x, y) = _model(), _data()
    cfg = _cfg("galore", galore_rank=8)
    opt = build_optimizer(model, cfg)
    _step(model, opt, build_scheduler(opt, cfg, 10), x, y)
    projected = {n for n, p in model.named_parameters() if "projector" in opt.state[p]}
    assert projected == {"attn.weight", "mlp.weight"}  # not biases, the norm or the (untargeted) head
    # attn.weight [96, 64]: rows >= cols, so the gradient is projected on the right to [96, 8]
    assert opt.state[model.attn.weight]["exp_avg"].shape == (96, 8)
    # mlp.weight [64, 96]: projected on the left to [8, 96]
    assert opt.state[model.mlp.weight]["exp_avg"].shape == (8, 96)
    assert opt.state[model.head.weight]["exp_avg"].shape == (1, 64)
    only_attn = galore_groups(model, [{"params": list(model.parameters()), "weight_decay": 0.0}],
                              _cfg("galore", galore_target=["attn"]))
    assert [len(g["params"]) for g in only_attn if "rank" in g] == [1]
    with pytest.raises(UserError, match="galore_target"):
        build_optimizer(model, _cfg("galore", galore_target=["nothing"]))


def test_sgd_momentum_buffer_only_with_momentum():
    model, (x, y) = _model(), _data()
    for momentum, has_buffer in ((0.9, True), (0.0, False)):
        cfg = _cfg("sgd", momentum=momentum)
        opt = build_optimizer(model, cfg)
        _step(model, opt, build_scheduler(opt, cfg, 10), x, y)
        buf = opt.state[model.attn.weight].get("momentum_buffer")
        assert (buf is not None) is has_buffer


@pytest.mark.parametrize("name, module", [("adamw_8bit", "bitsandbytes"), ("paged_adamw", "bitsandbytes"),
                                          ("galore", "galore_torch")])
def test_missing_optional_package_is_one_line(name, module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(UserError, match=f"train.optimizer: {name} needs the") as e:
        build_optimizer(_model(), _cfg(name))
    assert "\n" not in str(e.value)
