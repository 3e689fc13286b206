"""`tunelab bench` and `tunelab plan` end to end through the CLI."""

from __future__ import annotations

import json

import yaml

from tests.helpers import alpaca_rows, base_config, run_cli, run_main, write_json


def _config(tmp_path, model_dir, name="run", adapter=None):
    data = write_json(tmp_path / "rows.json", alpaca_rows(48))
    cfg = base_config(model_dir, data, tmp_path / "out", train={"batch_size": 4},
                      adapter=adapter or {"type": "lora", "r": 4, "alpha": 8})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bench_prints_and_writes_json(tiny_model_dir, tmp_path):
    config = _config(tmp_path, tiny_model_dir)
    out = tmp_path / "bench.json"
    proc = run_cli("bench", str(config), "data.packing=padding_free", "--steps", "3", "--warmup", "1",
                   "--json", str(out), check=True)
    for words in ("real tokens/s", "samples/s", "step time", "padding", "peak RSS", "MFU"):
        assert words in proc.stdout, proc.stdout
    r = json.loads(out.read_text())
    assert r["measured_steps"] == 3 and r["warmup"] == 1 and r["packing"] == "padding_free"
    # measured steps only: 3 steps of 4 rows; tokens are the real (non-pad) ones, fewer than the positions
    assert r["samples"] == 12 and 0 < r["tokens"] <= r["positions"]
    assert r["padding_ratio"] == 1 - r["tokens"] / r["positions"]  # the same double expression, exact through JSON
    assert r["tokens_per_s"] > 0 and r["peak_memory_kind"] == "peak_rss" and r["peak_memory_bytes"] > 100 * 2**20
    assert 0 < r["mfu"] < 1 and r["peak_flops"] > 0
    assert not (tmp_path / "out").exists()  # a benchmark writes no run folder


def test_bench_peak_and_bad_arguments(tmp_path):
    cache = tmp_path / "cache"
    proc = run_cli("bench", "--peak", env={"TUNELAB_CACHE": str(cache)}, check=True)
    assert "GFLOP/s in float32" in proc.stdout
    assert "float32" in next(iter(json.loads((cache / "peak.json").read_text())))
    proc = run_cli("bench")
    assert proc.returncode == 2 and proc.stderr.startswith("error: bench: give a CONFIG"), proc.stderr
    proc = run_cli("bench", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_text_and_json(tiny_model_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_model_dir)
    proc = run_main(capsys, "plan", str(config), "--device", "cpu", "--memory-gb", "2", check=True)
    for words in ("weights", "gradients", "optimizer", "activations", "logits", "buffers", "total",
                  "fits", "largest micro-batch that fits"):
        assert words in proc.stdout, proc.stdout
    one = json.loads(run_main(capsys, "plan", str(config), "--device", "cpu", "--memory-gb", "2", "--json", check=True).stdout)
    assert one["total"] == sum(one["components"].values())
    assert one["settings"]["batch_size"] == 4 and one["max_batch"] >= 4
    # overrides reach the plan: a bigger micro-batch needs more activations, full fine-tuning needs gradients
    big = json.loads(run_main(capsys, "plan", str(config), "train.batch_size=16", "--device", "cpu", "--json",
                             check=True).stdout)
    assert big["components"]["activations"] > one["components"]["activations"]
    full_config = _config(tmp_path, tiny_model_dir, "full", {"type": "full"})
    full = json.loads(run_main(capsys, "plan", str(full_config), "--device", "cpu", "--json", check=True).stdout)
    assert full["trainable"] == full["params"] > one["trainable"]
    # ZeRO-3 over 4 GPUs shards the optimizer: fp32 master + 2 states (12 B/param) / 4, against AdamW's 8 B/param
    z3 = json.loads(run_main(capsys, "plan", str(full_config), "--device", "cuda", "--devices", "4",
                            "--zero", "3", "--json", check=True).stdout)
    assert z3["components"]["optimizer"] == full["components"]["optimizer"] * 12 // 4 // 8


def test_plan_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys):
    config = _config(tmp_path, tiny_model_dir)
    for args, words in ((["--offload"], "--offload needs DeepSpeed ZeRO"),
                        (["--devices", "0"], "--devices must be >= 1"),
                        (["--memory-gb", "-1"], "--memory-gb must be > 0"),
                        (["train.batch_siz=2"], "batch_size")):
        proc = run_main(capsys, "plan", str(config), *args)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    # a missing model folder that looks like a hub id fails at once, offline
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["path"] = "nowhere/model"
    config.write_text(yaml.safe_dump(cfg))
    proc = run_main(capsys, "plan", str(config))
    assert proc.returncode == 2 and "model.path" in proc.stderr and "nowhere/model" in proc.stderr, proc.stderr
