"""The memory planner: hand-computed bytes, the activation model against autograd, and peak RSS of real CPU runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import base_config
from tunelab.engine.plan import (
    CPU_RUNTIME_BYTES,
    NF4_BYTES_PER_PARAM,
    MiB,
    ModelShape,
    OptimizerSettings,
    calibrate_cpu_runtime,
    estimate,
    finish_measured,
    max_batch_size,
    plan_from_config,
    start_measured_train,
)
from tunelab.errors import UserError

# hidden 16, 2 layers, 4 heads of 4 (2 kv heads), MLP 32, vocab 100
TINY = ModelShape.llama(hidden=16, layers=2, heads=4, kv_heads=2, intermediate=32, vocab=100)
# per layer: q 256 + k 128 + v 128 + o 256 + gate/up/down 3 x 512 + 2 norms x 16 = 2336
LAYER = 16 * 16 + 2 * 16 * 8 + 16 * 16 + 3 * 16 * 32 + 2 * 16
TOTAL = 100 * 16 + 2 * LAYER + 16 + 100 * 16  # embeddings, layers, final norm, lm_head = 7888
# LoRA r=2 on every linear of a layer: r x (in + out) each
LORA_LAYER = 2 * ((16 + 16) + 2 * (16 + 8) + (16 + 16) + 3 * (16 + 32))


def _plan(**kw):
    base = dict(precision="fp32", storage_dtype="fp32", batch_size=1, seq_len=8, device="cpu", lora_r=2)
    return estimate(TINY, **{**base, **kw})


# ------------------------------------------------------------------------------------------ hand-computed bytes
def test_shape_counts():
    assert TINY.total == TOTAL == 7888
    kinds = TINY.by_kind()
    assert kinds == {"embedding": 1600, "attention": 2 * 768, "mlp": 2 * 1536, "norm": 2 * 32 + 16,
                     "lm_head": 1600, "other": 0}
    tied = ModelShape.llama(hidden=16, layers=2, heads=4, kv_heads=2, intermediate=32, vocab=100, tied=True)
    assert tied.total == TOTAL - 1600


@pytest.mark.parametrize("adapter, trainable", [("full", TOTAL), ("freeze", LAYER), ("lora", 2 * LORA_LAYER)])
def test_weights_grads_optimizer_fp32(adapter, trainable):
    p = _plan(adapter=adapter, trainable_layers=1)
    assert p.trainable == trainable
    step = p.moments["optimizer"]
    base_params = TOTAL
    assert step["weights"] == 4 * base_params + (4 * trainable if adapter == "lora" else 0)
    assert step["gradients"] == 4 * trainable
    assert step["optimizer"] == 8 * trainable  # AdamW: exp_avg + exp_avg_sq in fp32
    assert step["activations"] == step["logits"] == 0
    # gradients are set to None after each step: none exist at the loss of the next micro-batch...
    assert p.moments["loss"]["gradients"] == 0
    # ...unless earlier micro-batches of the same step accumulated them
    assert _plan(adapter=adapter, trainable_layers=1, grad_accum=4).moments["loss"]["gradients"] == 4 * trainable


@pytest.mark.parametrize("adapter, trainable", [("full", TOTAL), ("lora", 2 * LORA_LAYER)])
def test_float64_storage_doubles_every_tensor(adapter, trainable):
    """model.dtype float64 (numerical checks): base weights, peft's adapters (which follow a float64 base),
    gradients and AdamW's two states are 8 bytes each."""
    p = _plan(adapter=adapter, storage_dtype="fp64")
    step = p.moments["optimizer"]
    assert step["weights"] == 8 * TOTAL + (8 * trainable if adapter == "lora" else 0)
    assert step["gradients"] == 8 * trainable
    assert step["optimizer"] == 16 * trainable


def test_bf16_storage_lora_keeps_fp32_adapters():
    p = _plan(adapter="lora", precision="bf16", storage_dtype="bf16", device="cuda")
    lora = 2 * LORA_LAYER
    assert p.moments["optimizer"]["weights"] == 2 * TOTAL + 4 * lora
    assert p.moments["optimizer"]["gradients"] == 4 * lora
    assert p.moments["optimizer"]["optimizer"] == 8 * lora


def test_qlora_weights():
    p = _plan(adapter="qlora", precision="bf16", storage_dtype="bf16", device="cuda")
    linears = 2 * (LAYER - 32)  # every decoder-layer linear is 4-bit; embeddings, norms and lm_head stay bf16
    expected = linears * NF4_BYTES_PER_PARAM + 2 * (TOTAL - linears) + 4 * 2 * LORA_LAYER
    assert abs(p.moments["optimizer"]["weights"] - expected) <= 1


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_divides_the_right_terms(stage):
    kw = dict(adapter="full", precision="bf16", storage_dtype="fp32", device="cuda", zero_stage=stage, devices=4)
    step = _plan(**kw).moments["optimizer"]
    # tunelab keeps the weights (and so the gradients) in their stored dtype under every engine, autocast computing
    # in bf16; DeepSpeed adds an fp32 master copy to the two fp32 states (12 B) per trainable param
    assert step["optimizer"] == 12 * TOTAL // 4
    assert step["gradients"] == (4 * TOTAL // 4 if stage >= 2 else 4 * TOTAL)
    assert step["weights"] == (4 * TOTAL // 4 if stage == 3 else 4 * TOTAL)


def test_deepspeed_buckets_count_as_the_config_sets_them():
    """ZeRO's reduce bucket holds up to reduce_bucket_size gradient elements; ZeRO-3 gathers the layer in use and
    up to stage3_prefetch_bucket_size parameters ahead, at most stage3_max_live_parameters (but a whole layer).
    tunelab's defaults are sized to the model (hidden^2 = 256, 0.9 hidden^2, 30 hidden^2); DeepSpeed's own (5e8,
    5e7, 1e9), which a train.deepspeed file may set, hold every gradient and every parameter of this model."""
    kw = dict(adapter="full", precision="fp32", storage_dtype="fp32", device="cuda", devices=4, zero_stage=3)
    tunelab = _plan(**kw).moments["optimizer"]["buffers"]
    assert tunelab == _plan(bucket_elems=256, prefetch_elems=230, live_elems=7680, **kw).moments["optimizer"][
        "buffers"]
    ds = _plan(bucket_elems=500_000_000, prefetch_elems=50_000_000, live_elems=10 ** 9, **kw).moments["optimizer"]
    layer = 768 + 1536 + 32  # the largest decoder layer (its norms too); tunelab gathers it and the next one
    assert ds["buffers"] - tunelab == 4 * (TOTAL - 256) + 4 * (TOTAL - 2 * layer)
    no_prefetch = _plan(bucket_elems=1000, prefetch_elems=0, **kw).moments["optimizer"]["buffers"]
    assert no_prefetch == _plan(bucket_elems=1000, prefetch_elems=10, **kw).moments["optimizer"]["buffers"]
    capped = _plan(bucket_elems=1000, prefetch_elems=10, live_elems=1, **kw).moments["optimizer"]["buffers"]
    assert no_prefetch - capped == 4 * layer  # at most the live limit, but a whole layer


def test_fsdp2_divides_weights_gradients_and_states_without_master_copies():
    kw = dict(adapter="full", precision="fp32", storage_dtype="fp32", device="cuda", devices=4)
    ddp, fsdp = _plan(**kw).moments["optimizer"], _plan(fsdp2=True, **kw).moments["optimizer"]
    assert fsdp["optimizer"] == 8 * TOTAL // 4 and ddp["optimizer"] == 8 * TOTAL  # AdamW's two fp32 states
    assert fsdp["gradients"] == 4 * TOTAL // 4 and fsdp["weights"] == 4 * TOTAL // 4
    with pytest.raises(UserError, match="two engines"):
        _plan(fsdp2=True, zero_stage=3, **kw)


def test_offload_moves_states_and_params_to_host():
    kw = dict(adapter="full", precision="bf16", storage_dtype="fp32", device="cuda", devices=4)
    p = _plan(zero_stage=2, offload_optimizer=True, **kw)
    assert p.moments["optimizer"]["optimizer"] == 0
    assert p.host == {"optimizer": 12 * TOTAL // 4, "gradients": 4 * TOTAL // 4}
    p3 = _plan(zero_stage=3, offload_optimizer=True, offload_params=True, **kw)
    assert p3.moments["optimizer"]["weights"] == 0
    assert p3.host["weights"] == 4 * TOTAL // 4  # the stored fp32 weights
    with pytest.raises(UserError, match="stage 3"):
        _plan(zero_stage=2, offload_params=True, **kw)


def test_ddp_replicas_add_gradient_buckets():
    one = _plan(adapter="full", devices=1).moments["optimizer"]
    two = _plan(adapter="full", devices=2).moments["optimizer"]
    assert two["weights"] == one["weights"] and two["optimizer"] == one["optimizer"]
    assert two["buffers"] - one["buffers"] == 4 * TOTAL


def test_logits_follow_the_loss_path():
    # B x T = 4 x 64: 252 trained positions; 3 fp32 [positions, vocab] tensors at the start of backward
    kw = dict(adapter="lora", batch_size=4, seq_len=64)
    assert _plan(loss_chunk=0, **kw).moments["loss"]["logits"] == 12 * 256 * 100
    assert _plan(loss_chunk=4096, **kw).moments["loss"]["logits"] == 12 * 252 * 100
    assert _plan(loss_chunk=32, **kw).moments["loss"]["logits"] == 12 * 32 * 100


def test_checkpointing_keeps_layer_inputs_only():
    kw = dict(adapter="full", batch_size=4, seq_len=64, attn_mask=False)
    full = _plan(**kw).moments["loss"]["activations"]
    ckpt = _plan(grad_ckpt=True, **kw).moments["loss"]["activations"]
    # per layer: 4 B x hidden per position instead of every saved tensor of the layer
    assert full - ckpt == 2 * 256 * (_layer_bytes_fp32_full() - 4 * 16)


def _layer_bytes_fp32_full() -> int:
    """Hand count of one full-FT fp32 layer (TINY, no mask), bytes per position."""
    hidden, inter, q, kv, heads = 16, 32, 16, 8, 4
    norm = 4 * hidden + 4 + 4 * hidden  # fp32 input + rsqrt + normalized (weight trains)
    attn = 4 * (q + kv + kv + q) + 4 * heads  # q, k, v, output, log-sum-exp
    mlp = 4 * 4 * inter  # gate out, act out, up out, product
    return 2 * norm + 4 * hidden + attn + 4 * hidden + mlp  # + norm outputs read by the linears


def test_max_batch_size_is_the_boundary():
    budget = CPU_RUNTIME_BYTES + 64 * MiB
    kw = dict(adapter="full", precision="fp32", storage_dtype="fp32", seq_len=256, device="cpu")
    b = max_batch_size(TINY, budget, **kw)
    assert b >= 1
    assert estimate(TINY, batch_size=b, **kw).total <= budget < estimate(TINY, batch_size=b + 1, **kw).total
    assert max_batch_size(TINY, 1 * MiB, **kw) == 0


# ---------------------------------------------------------------------------------- activations vs autograd

def _saved_activation_bytes(model, inputs, chunk, vocab, hidden) -> int:
    """Bytes of the tensors autograd saves for tunelab's loss (saved-tensor hooks), parameters and the chunked
    cross-entropy's recomputed log-probabilities excluded."""
    import torch

    from tunelab.methods.base import StepContext
    from tunelab.methods.lm import causal_lm_loss

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        is_logprobs = t.dim() == 2 and t.shape[-1] == vocab and t.shape[0] != hidden
        if storage.data_ptr() not in params and not is_logprobs:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, inputs, StepContext(loss_chunk=chunk))
    return sum(seen.values())


def _saved_bytes(*, adapter="full", targets="all-linear", kv=2, ckpt=False, chunk=4096, store="fp32",
                 prec="fp32", attn="sdpa", mask=False, trained=None):
    """Bytes autograd saves in tunelab's real loss (adapters, checkpointing and loss paths included), counted with
    saved-tensor hooks, each storage once; parameters and the loss's [positions, vocab] log-probs excluded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.config.schema import FreezeAdapter, FullAdapter, LoraAdapter
    from tunelab.models.adapters import apply_adapter
    from tunelab.models.kernels import enable_activation_checkpointing

    hidden, vocab, batch, seq = 64, 500, 2, 24
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv, tie_word_embeddings=False)
    config._attn_implementation = attn
    model = LlamaForCausalLM(config).to(torch.bfloat16 if store == "bf16" else torch.float32)
    if ckpt:
        enable_activation_checkpointing(model)
    acfg = {"full": FullAdapter(), "lora": LoraAdapter(r=4, target=targets), "freeze": FreezeAdapter(layers=1)}
    model = apply_adapter(model, acfg[adapter])
    model.train()
    if prec == "bf16":  # what accelerate's mixed precision does to forward
        from accelerate.utils import convert_outputs_to_fp32

        model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    ids = torch.randint(3, vocab, (batch, seq))
    labels = ids.clone()
    if trained is not None:
        labels[:, : seq - trained // batch] = -100
    inputs = {"input_ids": ids, "labels": labels}
    if mask:
        inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long)
        inputs["attention_mask"][-1, seq // 2:] = 0
        labels[-1, seq // 2:] = -100
    saved = _saved_activation_bytes(model, inputs, chunk, vocab, hidden)
    n_trained = int((labels[:, 1:] != -100).sum())
    shape = ModelShape.llama(hidden=hidden, layers=2, heads=4, kv_heads=kv, intermediate=176, vocab=vocab)
    plan = estimate(shape, adapter=adapter, lora_r=4, lora_targets=targets, trainable_layers=1, precision=prec,
                    storage_dtype=store, batch_size=batch, seq_len=seq, grad_ckpt=ckpt, loss_chunk=chunk,
                    device="cpu", attn_impl=attn, attn_mask=mask, trained_tokens=n_trained)
    loss = plan.moments["loss"]
    predicted = loss["activations"] + loss["weight_copies"]
    if ckpt:
        # the checkpoint keeps the rotary cos/sin as arguments of its recomputation, invisible to these hooks
        predicted -= 2 * (hidden // 4) * (2 if store == "bf16" else 4) * seq
    return saved, predicted


@pytest.mark.parametrize("case", [
    {}, {"kv": 4}, {"adapter": "lora"}, {"adapter": "lora", "targets": ["q_proj", "v_proj"]}, {"adapter": "freeze"},
    {"mask": True}, {"attn": "eager", "mask": True}, {"ckpt": True}, {"ckpt": True, "adapter": "lora"},
    {"chunk": 0}, {"chunk": 16, "adapter": "lora"}, {"trained": 20},
    {"prec": "bf16"}, {"prec": "bf16", "adapter": "lora"}, {"prec": "bf16", "store": "bf16", "adapter": "lora"},
    {"prec": "bf16", "mask": True}, {"prec": "bf16", "ckpt": True},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "full")
def test_activation_model_matches_autograd(case):
    counted, predicted = _saved_bytes(**case)
    # exact up to the loss's scalar normaliser and, in the chunked path, a [B, T] boolean mask
    assert abs(predicted - counted) <= 64, (counted, predicted)


# ------------------------------------------------------------------------------------ measured CPU peak RSS
@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    from tunelab.models.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("plan") / "small", hidden=256, layers=4, heads=4, vocab=8000)


@pytest.fixture(scope="module")
def long_rows(tmp_path_factory) -> Path:
    """Plain-text rows longer than any max_length used here, so every micro-batch is exactly batch x max_length."""
    from tunelab.models.tiny import tiny_corpus

    text = "\n".join(tiny_corpus(150_000, seed=3))
    rows = [{"text": text[i:i + 5000]} for i in range(0, 24 * 5000, 5000)]
    path = tmp_path_factory.mktemp("plan") / "rows.json"
    path.write_text(json.dumps(rows))
    return path


# name: (model fixture, adapter, batch, max_length, extra model / train options)
RUNS = {
    "tiny-full": ("tiny", {"type": "full"}, 8, 128, {}, {}),
    "small-full": ("small", {"type": "full"}, 4, 256, {}, {}),
    "small-lora-ckpt": ("small", {"type": "lora", "r": 8}, 4, 256, {"gradient_checkpointing": True}, {}),
    "small-lora-chunked": ("small", {"type": "lora", "r": 8}, 8, 256, {}, {"loss_chunk": 512}),
}


def _start(name, model_dir, data, out_dir):
    _, adapter, batch, length, model_opts, train_opts = RUNS[name]
    cfg = base_config(model_dir, data, out_dir / name, adapter=adapter,
                      # every run tokenizes (as the runtime baseline was measured): no tokenization cache
                      data={"train": [{"path": str(data), "format": "text"}], "max_length": length,
                            "packing": "none", "cache": False},
                      method={"type": "pt"}, model=model_opts,
                      train={"batch_size": batch, "max_steps": 2, "precision": "fp32", **train_opts})
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(cfg))
    # glibc's dynamic mmap threshold lets freed activation buffers fragment the heap, which adds 16-62 % of RSS
    # that no tensor owns; a fixed threshold returns them to the system (docs/plan.md, "Measuring on CPU")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    return start_measured_train(str(path), env), cfg


def _finish(proc) -> int:
    """Wait for the child and return its peak RSS in bytes (wait4's ru_maxrss)."""
    code, out, peak = finish_measured(proc)
    assert code == 0 and peak > 0, out[-3000:]
    return peak


def _predict(cfg, shape, runtime) -> int:
    t, m = cfg["train"], cfg.get("model", {})
    a = cfg["adapter"]
    return estimate(shape, adapter=a["type"], lora_r=a.get("r", 8), precision="fp32", storage_dtype="fp32",
                    batch_size=t["batch_size"], seq_len=cfg["data"]["max_length"],
                    grad_ckpt=m.get("gradient_checkpointing", False), loss_chunk=t.get("loss_chunk", 4096),
                    device="cpu", attn_mask=False, runtime_bytes=runtime).total


@pytest.mark.slow
def test_plan_matches_measured_peak_rss(tiny_model_dir, small_model_dir, long_rows, tmp_path, monkeypatch):
    # the runtime (interpreter, libraries, tokenizer) changes with library versions: calibrate it here, the way
    # `tunelab plan --calibrate` does, with a real micro run under the same settings as the runs below
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    # a peft-wrapped model's run imports more (peft's quantization back ends): its runtime is calibrated apart
    runtimes = {"full": calibrate_cpu_runtime(save=False), "lora": calibrate_cpu_runtime(save=False, peft=True)}
    for runtime in runtimes.values():
        assert 150 * MiB < runtime < 1500 * MiB, runtime / MiB  # Python + torch + transformers: hundreds of MiB
    assert runtimes["lora"] >= runtimes["full"] - 8 * MiB, runtimes  # the same code and more
    dirs = {"tiny": tiny_model_dir, "small": small_model_dir}
    shapes = {k: ModelShape.from_pretrained(str(v)) for k, v in dirs.items()}
    results = {}
    names = list(RUNS)
    for pair in (names[i:i + 2] for i in range(0, len(names), 2)):  # two at a time on two cores
        started = [(n, *_start(n, dirs[RUNS[n][0]], long_rows, tmp_path)) for n in pair]
        for name, proc, cfg in started:
            results[name] = (_finish(proc), _predict(cfg, shapes[RUNS[name][0]], runtimes[cfg["adapter"]["type"]]))
    report = {n: f"measured {m / MiB:.0f} MiB, predicted {p / MiB:.0f} MiB" for n, (m, p) in results.items()}
    report["runtime"] = {k: f"{v / MiB:.0f} MiB" for k, v in runtimes.items()}
    print(report)
    for name, (measured, predicted) in results.items():
        assert abs(predicted - measured) <= 0.2 * measured, report
        dynamic = predicted - runtimes[RUNS[name][1]["type"]]  # what the model adds to the runtime baseline
        if dynamic > 100 * MiB:
            assert abs(predicted - measured) <= 0.3 * dynamic, report


# 200 MB of touched pages: the child's peak RSS is at least that, plus an interpreter (~10 MiB), far below 200 MB more
ALLOC = 200_000_000
ALLOCATE = f"b = bytearray({ALLOC})\nfor i in range(0, len(b), 4096):\n    b[i] = 1\nprint('allocated')"


def test_measured_peak_is_the_childs_own_whatever_the_parents_size():
    """finish_measured's peak is the kernel's ru_maxrss of the child (wait4), and only the child's: this process
    holds 500 MB more than the upper bound while it launches, which a child spawned straight from it would report
    (Linux counts the memory map a child's exec replaces, here the parent's)."""
    import sys

    from tunelab.engine.plan import calibrate

    ballast = bytearray(500_000_000)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    try:
        proc = calibrate._start_measured([sys.executable, "-c", ALLOCATE])
        code, out, peak = finish_measured(proc)
    finally:
        del ballast
    assert code == 0 == proc.returncode and "allocated" in out, out
    assert ALLOC <= peak < ALLOC + 200_000_000, peak


def test_measured_train_is_the_cli(tmp_path):
    """start_measured_train runs `python -m tunelab train CONFIG`: the CLI's own error for a missing config, its exit
    code 2, and the signal's negative number when the child is killed."""
    import signal
    import sys

    missing = tmp_path / "missing.json"
    proc = start_measured_train(str(missing))
    assert proc.args == [sys.executable, "-m", "tunelab", "train", str(missing)]
    code, out, peak = finish_measured(proc)
    assert code == 2 == proc.returncode and "missing.json" in out and "Traceback" not in out, out
    assert peak > 0
    proc = start_measured_train(str(missing))
    os.kill(proc.pid, signal.SIGKILL)
    assert finish_measured(proc)[0] == -signal.SIGKILL


def test_calibration_runs_the_cli_on_the_workload(monkeypatch):
    """calibrate_cpu_runtime trains through `python -m tunelab train` on resources/calibration.json's workload: a
    micro model, continued pre-training on 24 rows of 5,000 characters, full fine-tuning in fp32, 2 steps. The child
    is killed at once here (the real run is test_plan_matches_measured_peak_rss's); its failure is reported."""
    import signal
    import sys

    from tunelab.config import load_config
    from tunelab.engine.plan import calibrate

    seen = {}

    def spy(config_path, env=None):
        proc = start_measured_train(config_path, env)
        seen["args"] = proc.args
        seen["config"] = json.loads(Path(config_path).read_text())
        seen["rows"] = json.loads(Path(seen["config"]["data"]["train"][0]["path"]).read_text())
        seen["strict"] = load_config(config_path)  # a valid config for the CLI
        os.kill(proc.pid, signal.SIGKILL)
        return proc

    monkeypatch.setattr(calibrate, "start_measured_train", spy)
    with pytest.raises(UserError, match="micro training run failed"):
        calibrate_cpu_runtime(save=False)
    assert seen["args"][:4] == [sys.executable, "-m", "tunelab", "train"]
    cfg = seen["config"]
    assert (cfg["method"]["type"], cfg["adapter"]["type"], cfg["data"]["train"][0]["format"]) == ("pt", "full", "text")
    assert (cfg["train"]["precision"], cfg["train"]["max_steps"], cfg["train"]["batch_size"]) == ("fp32", 2, 1)
    assert (cfg["data"]["max_length"], cfg["data"]["packing"], cfg["data"]["cache"]) == (32, "none", False)
    assert len(seen["rows"]) == 24 and all(set(r) == {"text"} and len(r["text"]) == 5000 for r in seen["rows"])


# ----------------------------------------------------------------------------------------------- from a config
def test_plan_from_config(tiny_model_dir, tmp_path):
    from tests.helpers import alpaca_rows, write_json
    from tunelab.config import load_config

    data = write_json(tmp_path / "rows.json", alpaca_rows(16))
    cfg = load_config(base_config(tiny_model_dir, data, tmp_path / "out", train={"batch_size": 4}))
    report = plan_from_config(cfg, device="cpu", memory_gb=2.0)
    shape = ModelShape.from_pretrained(str(tiny_model_dir))
    by_hand = ModelShape.llama(hidden=64, layers=2, heads=4, intermediate=176, vocab=1000)
    assert shape.params == by_hand.params and shape.linears == by_hand.linears
    text = report.text()
    for word in ("weights", "optimizer", "activations", "logits", "total", "largest micro-batch"):
        assert word in text
    d = report.to_dict()
    assert d["total"] == sum(d["components"].values()) == report.plan.total
    assert d["max_batch"] >= 4 and d["budget"] == 2 * 2**30
    json.dumps(d)  # serialisable
    # measured data: the alpaca rows are far shorter than max_length, so the heaviest real batch is lighter
    measured = plan_from_config(cfg, device="cpu", measure_data=True)
    assert measured.data["longest"] < cfg.data.max_length
    assert measured.plan.moments["loss"]["activations"] < report.plan.moments["loss"]["activations"]
    # CPU processes share the machine: two of them need twice the memory of one
    two = plan_from_config(cfg, device="cpu", memory_gb=2.0, devices=2)
    assert two.processes_total == 2 * two.plan.total
    assert two.max_batch <= report.max_batch


# ------------------------------------------------------------------------------------ optimizers' state bytes
def _full_states(optimizer, **kw):
    return _plan(adapter="full", optimizer=optimizer, **kw).moments["optimizer"]["optimizer"]


def test_state_bytes_adamw_paged_sgd():
    assert _full_states("adamw") == 8 * TOTAL
    # bitsandbytes' 32-bit states are fp32 whatever the parameter dtype; torch AdamW's follow the parameter
    assert _full_states("adamw", storage_dtype="bf16") == 4 * TOTAL
    assert _full_states("paged_adamw", storage_dtype="bf16") == 8 * TOTAL
    assert _full_states("sgd", optimizer_settings=OptimizerSettings(momentum=0.9)) == 4 * TOTAL
    assert _full_states("sgd", optimizer_settings=OptimizerSettings(momentum=0.0)) == 0


def test_state_bytes_8bit_blocks_and_small_tensors():
    # every TINY tensor is under bitsandbytes' min_8bit_size (4096): all keep two fp32 states
    assert _full_states("adamw_8bit") == _full_states("paged_adamw_8bit") == 8 * TOTAL
    # hidden 64, intermediate 128, vocab 100: q/k/v/o 4096, gate/up/down 8192, embeddings and head 6400 go 8-bit
    shape = ModelShape.llama(hidden=64, layers=1, heads=4, intermediate=128, vocab=100)
    plan = estimate(shape, adapter="full", optimizer="adamw_8bit", precision="fp32", storage_dtype="fp32",
                    batch_size=1, seq_len=8, device="cpu")
    blocks = 4 * 2 * (4096 + 4 * 16) + 3 * 2 * (8192 + 4 * 32) + 2 * 2 * (6400 + 4 * 25)  # uint8 + fp32 per 256
    small = 8 * (3 * 64)  # the three norms: fp32 states
    assert plan.moments["optimizer"]["optimizer"] == blocks + small + 2 * 256 * 4  # + the two shared qmaps


def test_state_bytes_adafactor_is_factored():
    # 2-D: one fp32 value per row and per column; 1-D (norms): a full fp32 second moment; no first moment
    matrices = (100 + 16) * 2 + 2 * ((16 + 16) + 2 * (8 + 16) + (16 + 16) + 2 * (32 + 16) + (16 + 32))
    vectors = 2 * 2 * 16 + 16
    assert _full_states("adafactor") == 4 * (matrices + vectors)
    assert _full_states("adafactor", storage_dtype="bf16") == 4 * (matrices + vectors)  # upcast gradients


def test_state_bytes_galore_projects_targets_only():
    settings = OptimizerSettings(galore_rank=4, galore_target=("attn", "mlp"))

    def projected(rows, cols, k=4):  # exp_avg and exp_avg_sq [max, k] + the projection [min, k]
        return 2 * max(rows, cols) * k + min(rows, cols) * k

    per_layer = 2 * projected(16, 16) + 2 * projected(8, 16) + 2 * projected(32, 16) + projected(16, 32)
    rest = 2 * (100 * 16 + 100 * 16 + 2 * 2 * 16 + 16)  # embeddings, head, norms: AdamW
    assert _full_states("galore", optimizer_settings=settings) == 4 * (2 * per_layer + rest)
    attn_only = OptimizerSettings(galore_rank=4, galore_target=("attn",))
    mlp_as_adamw = 2 * 2 * (3 * 512)
    per_layer_attn = 2 * projected(16, 16) + 2 * projected(8, 16)
    assert _full_states("galore", optimizer_settings=attn_only) == 4 * (2 * per_layer_attn + mlp_as_adamw + rest)


def test_unknown_optimizer_is_refused():
    with pytest.raises(UserError, match="unknown optimizer"):
        _full_states("lion")


@pytest.mark.parametrize("name", ["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit", "adafactor", "galore",
                                  "sgd"])
def test_state_bytes_match_the_real_optimizer(tiny_model_dir, name):
    """The planner's per-tensor formulas against the states engine.optim's optimizers really allocate (one step of
    full fine-tuning of the tiny Llama, whose q/k/v/o are exactly 4096 elements: bitsandbytes' 8-bit floor)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.config.schema import TrainConfig
    from tunelab.engine.optim import build_optimizer

    cfg = TrainConfig(optimizer=name, galore_rank=8, galore_target=["attn", "mlp"], momentum=0.9)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    opt = build_optimizer(model, cfg)
    ids = torch.randint(0, 1000, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    seen: set[int] = set()
    real = 0
    for state in opt.state.values():
        for value in state.values():
            tensors = [value] if torch.is_tensor(value) else []
            if hasattr(value, "ortho_matrix"):  # GaLore's projector keeps the projection matrix
                tensors.append(value.ortho_matrix)
            for t in tensors:
                if t.dim() == 0 or t.untyped_storage().data_ptr() in seen:  # step counters; shared qmaps once
                    continue
                seen.add(t.untyped_storage().data_ptr())
                real += t.numel() * t.element_size()
    shape = ModelShape.from_pretrained(str(tiny_model_dir))
    plan = estimate(shape, adapter="full", optimizer=name, precision="fp32", storage_dtype="fp32", batch_size=1,
                    seq_len=8, device="cpu",
                    optimizer_settings=OptimizerSettings(momentum=0.9, galore_rank=8,
                                                         galore_target=("attn", "mlp")))
    assert plan.moments["optimizer"]["optimizer"] == real


# -------------------------------------------------------------------------------------------- quantization
def test_int8_and_fp4_weights():
    linears = [(o, i) for _, i, o in TINY.linears if _ != "lm_head"]
    n_linear = sum(o * i for o, i in linears)
    others = TOTAL - n_linear
    adapters = 4 * 2 * LORA_LAYER
    int8 = _plan(adapter="lora", quantization="int8").moments["optimizer"]["weights"]
    assert int8 == n_linear + 4 * sum(o for o, _ in linears) + 4 * others + adapters  # 1 B + fp32 per out row
    fp4 = _plan(adapter="lora", quantization="fp4", double_quant=False).moments["optimizer"]["weights"]
    assert abs(fp4 - (n_linear * (0.5 + 4 / 64) + 4 * others + adapters)) <= 1
    nf4 = _plan(adapter="lora", quantization="nf4").moments["optimizer"]["weights"]
    assert nf4 == _plan(adapter="qlora").moments["optimizer"]["weights"]
    with pytest.raises(UserError, match="frozen"):
        _plan(adapter="full", quantization="nf4")


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_quantized_activation_model_matches_autograd(tiny_model_dir, kind, prec, ckpt):
    """QLoRA's saved tensors, counted with saved-tensor hooks on a bitsandbytes model prepared the way the loop does
    (quant.prepare_for_training: fp32 non-quantized weights), against the plan."""
    pytest.importorskip("bitsandbytes")
    import torch

    from tunelab.config.schema import LoraAdapter, ModelConfig
    from tunelab.models import quant
    from tunelab.models.adapters import apply_adapter
    from tunelab.models.load import load_model

    vocab, hidden, batch, seq = 1000, 64, 2, 24
    mcfg = ModelConfig(path=str(tiny_model_dir), quantization=kind, gradient_checkpointing=ckpt)
    model = quant.prepare_for_training(load_model(mcfg, dtype=torch.float32), mcfg, ckpt)
    model = apply_adapter(model, LoraAdapter(r=4))
    model.train()
    if prec == "bf16":
        from accelerate.utils import convert_outputs_to_fp32

        model.forward = convert_outputs_to_fp32(torch.autocast("cpu", dtype=torch.bfloat16)(model.forward))
    ids = torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    saved = _saved_activation_bytes(model, {"input_ids": ids, "labels": ids.clone()}, 4096, vocab, hidden)
    shape = ModelShape.from_pretrained(str(tiny_model_dir))
    plan = estimate(shape, adapter="lora", lora_r=4, quantization=kind, precision=prec, storage_dtype="fp32",
                    batch_size=batch, seq_len=seq, grad_ckpt=ckpt, device="cpu", attn_mask=False)
    predicted = plan.moments["loss"]["activations"] + plan.moments["loss"]["weight_copies"]
    if ckpt:  # the rotary cos/sin kept as arguments of the recomputation, invisible to the hooks
        predicted -= 2 * (hidden // 4) * 4 * seq
    assert abs(predicted - saved) <= 64, (saved, predicted)


# ------------------------------------------------------------------------------------ every adapter type
OTHER_ADAPTERS = [("adalora", {}), ("ia3", {}), ("ln", {}), ("vera", {"r": 16}), ("oft", {}), ("boft", {}),
                  ("prefix", {}), ("prompt", {}), ("ptuning", {}), ("bottleneck", {}),
                  ("bitfit", {"add_bias": True}), ("reft", {})]


@pytest.mark.parametrize("kind, options", OTHER_ADAPTERS, ids=[k for k, _ in OTHER_ADAPTERS])
def test_every_adapter_type_plans(tiny_model_dir, tmp_path, kind, options):
    """Each adapter type plans on a tiny model folder, its trainable parameters counted exactly as the real model
    built on the CPU has them (boft cannot be applied on the meta device: the CPU fallback counts it)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from tests.helpers import alpaca_rows, write_json
    from tunelab.config import load_config
    from tunelab.models.adapters import apply_adapter, count_parameters

    data = write_json(tmp_path / "rows.json", alpaca_rows(8))
    cfg = load_config(base_config(tiny_model_dir, data, tmp_path / "out", adapter={"type": kind, **options},
                                  train={"optimizer": "adamw"}))
    report = plan_from_config(cfg, device="cpu", memory_gb=2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = apply_adapter(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32),
                             cfg.adapter)
    counts = count_parameters(real)
    plan = report.plan
    assert plan.trainable == counts.trainable > 0
    assert plan.params == counts.total
    step = plan.moments["optimizer"]
    assert step["optimizer"] == 8 * counts.trainable  # AdamW, fp32 adapter tensors
    assert step["gradients"] == 4 * counts.trainable
    assert plan.moments["loss"]["activations"] > 0  # the gradient runs through the base layers to the adapter
    assert kind in plan.notes["activations"]
    json.dumps(report.to_dict())
    assert report.settings["adapter_params"]["added"] + report.settings["adapter_params"]["trained_base"] >= 0


def test_plan_from_config_passes_optimizer_and_quantization(tiny_model_dir, tmp_path):
    from tests.helpers import alpaca_rows, write_json
    from tunelab.config import load_config

    data = write_json(tmp_path / "rows.json", alpaca_rows(8))

    def plan(**sections):
        return plan_from_config(load_config(base_config(tiny_model_dir, data, tmp_path / "out", **sections)),
                                device="cuda")

    plain = plan()
    sgd = plan(train={"optimizer": "sgd", "momentum": 0.0})
    assert sgd.settings["optimizer"] == "sgd" and sgd.plan.moments["optimizer"]["optimizer"] == 0
    galore = plan(adapter={"type": "full"},
                  train={"optimizer": "galore", "galore_rank": 8, "galore_target": ["mlp"]})
    assert galore.settings["optimizer_settings"] == {"momentum": 0.9, "galore_rank": 8, "galore_target": ["mlp"]}
    full = plan(adapter={"type": "full"})
    assert galore.plan.moments["optimizer"]["optimizer"] < full.plan.moments["optimizer"]["optimizer"]
    nf4 = plan(model={"quantization": "nf4"})
    assert nf4.settings["quantization"] == "nf4"
    # prepare_for_training keeps the non-quantized weights in fp32, whatever model.dtype says
    assert nf4.settings["storage_dtype"] == "fp32" and plain.settings["storage_dtype"] == "bf16"
    assert "nf4" in nf4.plan.notes["weights"] and "nf4" in nf4.text()
    int8 = plan(model={"quantization": "int8"})
    assert nf4.plan.moments["optimizer"]["weights"] < int8.plan.moments["optimizer"]["weights"]
    freeze = plan(adapter={"type": "freeze", "layers": 0, "embeddings": True, "norms": True})
    # embeddings + head + 5 norms of 64
    assert freeze.plan.trainable == 2 * 1000 * 64 + 5 * 64
