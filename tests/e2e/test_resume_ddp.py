"""Exact resume after SIGKILL, checkpoint on SIGTERM, and DDP equivalence, through the real CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import ROOT, alpaca_rows, base_config, kill_family, launch_configs, run_cli, write_json
from tests.tolerance import adam_tol, assert_same_metrics, assert_same_weights, chain_length
from tunelab.engine.metrics import read_metrics


def _write_cfg(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


def _weights(out):
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def _start(cfg_path):
    # the thread count run_cli gives the runs this one is compared with: the same arithmetic in the same order
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg_path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(out, step, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        recs = read_metrics(out) if (out / "metrics.jsonl").exists() else []
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.communicate()}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training steps")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_rows(48))


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_model_dir, data_path, tmp_path):
    # dropout on, so the restored RNG state matters too
    common = {"train": {"max_steps": 12, "save_every": 2, "log_every": 1, "batch_size": 4, "grad_accum": 2}}
    ref_out, run_out = tmp_path / "ref", tmp_path / "killed"
    ref_cfg = base_config(tiny_model_dir, data_path, ref_out, **common,
                          adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1})
    run_cfg = base_config(tiny_model_dir, data_path, run_out, **common,
                          adapter={"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1})
    ref_cfg["train"]["epochs"] = run_cfg["train"]["epochs"] = 3
    run_cli("train", str(_write_cfg(tmp_path / "ref.yaml", ref_cfg)), check=True)

    cfg_path = _write_cfg(tmp_path / "run.yaml", run_cfg)
    proc = _start(cfg_path)
    _wait_for_step(run_out, 7, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_out / "final").exists()
    resumed = run_cli("train", str(cfg_path), check=True)
    assert "resume: continuing from" in resumed.stdout

    ref = read_metrics(ref_out)
    got = read_metrics(run_out)
    assert [r["step"] for r in got] == list(range(1, 13))
    # The resumed process repeats the uninterrupted run's arithmetic in the same order (same shapes, rows, dropout
    # masks and thread count), so exact resume means bitwise: any difference is state the checkpoint lost.
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [r["grad_norm"] for r in got] == [r["grad_norm"] for r in ref]
    assert [r["tokens"] for r in got] == [r["tokens"] for r in ref]
    assert_same_weights(_weights(run_out), _weights(ref_out), 0.0, dtype=torch.float32)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tiny_model_dir, data_path, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, train={"max_steps": 400, "save_every": 0, "log_every": 1})
    cfg_path = _write_cfg(tmp_path / "c.yaml", cfg)
    proc = _start(cfg_path)
    _wait_for_step(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "checkpoint saved to" in stderr and "Traceback" not in stderr
    ckpts = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "state.json").exists()
    assert (ckpts[0] / "adapter_model.safetensors").exists() or (ckpts[0] / "weights" / "adapter_model.safetensors").exists()
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt", "config.yaml"):
        assert (ckpts[0] / name).exists(), name


DDP_ADAPTERS = {
    "lora": {"type": "lora", "r": 4, "alpha": 8},
    # AdaLoRA: orthogonality penalty added once per step, rank budget updated from the averaged gradients
    "adalora": {"type": "adalora", "r": 6, "target_r": 2, "warmup": 1, "final": 1, "interval": 1},
    "reft": {"type": "reft", "r": 2},  # prompt positions set per micro-batch
}


@pytest.fixture(scope="module")
def ddp_runs(tiny_model_dir, data_path, tmp_path_factory):
    """Each adapter's run on 2 processes x batch 2 x accum 1 (one torchrun launch for all: tests/e2e/run_configs.py)
    and on 1 process x batch 2 x accum 2: the same global batches."""
    from tunelab import api

    root = tmp_path_factory.mktemp("ddp")
    configs = []
    for name, adapter in DDP_ADAPTERS.items():
        for procs in (1, 2):
            c = base_config(tiny_model_dir, data_path, root / f"{name}-{procs}", adapter=adapter,
                            train={"batch_size": 2, "grad_accum": 2 // procs, "max_steps": 5})
            c["model"]["dtype"] = "float64"  # an exactness claim across processes: tests/tolerance.py
            if procs == 1:
                api.train(c, echo=False)
            else:
                configs.append(_write_cfg(root / f"{name}.yaml", c))
    return root, launch_configs(configs)


@pytest.mark.parametrize("adapter", list(DDP_ADAPTERS))
def test_two_process_ddp_matches_one_process(tiny_model_dir, ddp_runs, adapter):
    """2 processes x batch 2 x accum 1 == 1 process x batch 2 x accum 2: same global batches, same losses and
    weights, for LoRA and for the adapters with loop hooks. The gradients of the two halves meet in an all-reduce
    instead of in .grad: float64 runs, reorder bound."""
    root, stdout = ddp_runs
    assert "2 processes" in stdout
    m1, m2 = read_metrics(root / f"{adapter}-1"), read_metrics(root / f"{adapter}-2")
    assert len(m1) == 5
    n = chain_length(tiny_model_dir, 64, tokens=4 * 64)
    assert_same_metrics(m2, m1, ("loss", "grad_norm"), n)
    w1, w2 = _weights(root / f"{adapter}-1"), _weights(root / f"{adapter}-2")
    assert w1
    assert_same_weights(w2, w1, adam_tol(1e-2, 5, n))


def test_ddp_sigkill_then_resume_matches_uninterrupted_ddp_run(tiny_model_dir, data_path, tmp_path):
    """Every process of a 2-process run killed at once (SIGKILL, as an OOM killer or a lost node does), then resumed
    with 2 processes: it loads its CPU checkpoint and repeats the uninterrupted run exactly."""
    ref_out, run_out = tmp_path / "ref", tmp_path / "killed"
    common = {"train": {"batch_size": 2, "grad_accum": 1, "max_steps": 16, "save_every": 2, "log_every": 1}}
    env = {"OMP_NUM_THREADS": "1"}
    run_cli("train", str(_write_cfg(tmp_path / "ref.yaml", base_config(tiny_model_dir, data_path, ref_out, **common))),
            "--nproc", "2", check=True, env=env)
    cfg_path = _write_cfg(tmp_path / "run.yaml", base_config(tiny_model_dir, data_path, run_out, **common))
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **env}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg_path), "--nproc", "2"], cwd=ROOT,
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(run_out, 3, proc)
    kill_family(proc)  # the launcher, torchrun and both ranks
    assert not (run_out / "final").exists()
    resumed = run_cli("train", str(cfg_path), "--nproc", "2", check=True, env=env)
    assert "resume: continuing from" in resumed.stdout and "Traceback" not in resumed.stderr
    ref, got = read_metrics(ref_out), read_metrics(run_out)
    assert [r["step"] for r in got] == list(range(1, 17))
    # the same processes, shapes, rows and all-reduce order as the uninterrupted run: bitwise the same
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert_same_weights(_weights(run_out), _weights(ref_out), 0.0, dtype=torch.float32)
