"""The throughput benchmark: a real short run on the tiny model, its numbers and their consistency; FLOP counting."""

from __future__ import annotations

import json

import pytest

from tests.helpers import alpaca_rows, base_config, write_json
from tunelab.engine import bench


def test_run_bench_measures_after_warmup(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "data.json", alpaca_rows(32))
    cfg = base_config(tiny_model_dir, data, tmp_path / "unused", train={"batch_size": 4, "max_steps": 99})
    peak = bench.measure_peak("float32", size=256, repeats=2)
    r = bench.run_bench(cfg, ["data.packing=none"], steps=2, warmup=1)

    assert r["measured_steps"] == 2 and r["warmup"] == 1 and r["steps"] == 2
    assert r["tokens"] > 0 and r["positions"] >= r["tokens"]
    assert 0.0 <= r["padding_ratio"] < 1.0
    assert r["padding_ratio"] == pytest.approx(1 - r["tokens"] / r["positions"])
    assert r["tokens_per_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"])
    assert r["samples_per_s"] == pytest.approx(2 * 4 / r["seconds"])
    assert r["min_step_s"] <= r["median_step_s"] <= r["max_step_s"]
    assert r["peak_memory_bytes"] > 0
    # LoRA: frozen base weights at 4 FLOPs/token, LoRA weights at 6, the LM head only for trained tokens
    f = r["flops"]
    assert f["trained"] > 0 and f["frozen"] > f["trained"] and f["lm_head_factor"] == 4
    assert 0 < f["trained_fraction"] < 1
    every_position = 2 * f["forward_only"] + 4 * f["frozen"] + 6 * f["trained"]
    skipped = 4 * f["lm_head_weights"] * (1 - f["trained_fraction"])  # logits of untrained positions
    assert f["matmul"] == pytest.approx(every_position - skipped)
    assert f["lm_head"] == pytest.approx(4 * f["lm_head_weights"] * f["trained_fraction"])
    assert r["flops_per_token"] == pytest.approx(f["matmul"] + f["attention"])
    assert r["peak_flops"] == pytest.approx(peak)  # the cached peak is reused
    assert 0.0 < r["mfu"] <= 1.0
    assert r["mfu"] == pytest.approx(r["tokens_per_s"] * r["flops_per_token"] / r["peak_flops"])
    json.dumps(r)  # serialisable as it is
    text = bench.format_report(r)
    assert "tokens/s" in text and "MFU" in text
    assert not (tmp_path / "unused").exists()  # the benchmark writes to a temporary folder


def test_peak_is_cached_per_device_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    first = bench.measure_peak("float32", size=128, repeats=1)
    cache = json.loads((tmp_path / "peak.json").read_text())
    assert first > 0 and [k.endswith("| float32") for k in cache] == [True]
    assert bench.measure_peak("float32", size=128) == first  # from the cache, not measured again


def test_flop_counts_full_and_frozen(tiny_model_dir):
    from tunelab.config import load_config

    def flops(adapter):
        cfg = load_config({"model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": "x.json"}]},
                           "adapter": adapter})
        return bench.estimate_flops(cfg, [10, 30])

    full = flops({"type": "full"})
    assert full["frozen"] == full["forward_only"] == 0 and full["lm_head_factor"] == 6
    assert full["matmul"] == 6 * full["trained"]  # the classic 6N, N = matmul weights incl. the LM head
    freeze = flops({"type": "freeze", "layers": 1})
    # layer 0 is below every trainable weight: forward only, and its attention has no backward
    assert freeze["forward_only"] > 0 and freeze["backward_layers"] == 1
    assert freeze["forward_only"] + freeze["frozen"] + freeze["trained"] == full["trained"]
    # causal context of sequences of 10 and 30 tokens: (55 + 465) / 40 keys per token
    assert full["mean_context"] == pytest.approx((55 + 465) / 40)
    assert full["attention"] == pytest.approx(4 * 64 * full["mean_context"] * (2 + 2 * 2))


def test_summarize_steps_uses_only_steps_after_warmup():
    records = [{"step": s, "tokens": 100 * s, "positions": 150 * s, "elapsed": 2.0 * s + (5 if s else 0)}
               for s in range(1, 6)]
    s = bench.summarize_steps(records, 2, rows_per_step=4)
    assert s["measured_steps"] == 3 and s["seconds"] == pytest.approx(6.0)
    assert s["tokens_per_s"] == pytest.approx(50.0) and s["padding_ratio"] == pytest.approx(1 / 3)
    assert s["samples_per_s"] == pytest.approx(2.0) and s["median_step_s"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bench.summarize_steps(records, 5)
