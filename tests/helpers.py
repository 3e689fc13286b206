"""Shared helpers for tests: tiny datasets and configs, running the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def alpaca_rows(n: int = 32) -> list[dict]:
    """Rows of varied lengths (so padding and token normalisation matter)."""
    rows = []
    for i in range(n):
        rows.append({
            "instruction": f"Repeat the word number {i}" + " please" * (i % 5),
            "input": "",
            "output": ("word " * (1 + i % 7)).strip() + f" {i}.",
        })
    return rows


def write_json(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def base_config(model_dir, data_path, out_dir, **sections) -> dict:
    cfg = {
        "model": {"path": str(model_dir)},
        "data": {"train": [{"path": str(data_path), "format": "alpaca"}], "max_length": 64},
        "adapter": {"type": "lora", "r": 4, "alpha": 8},
        "method": {"type": "sft"},
        "train": {"batch_size": 4, "lr": 1e-2, "max_steps": 6, "log_every": 1, "save_every": 0, "seed": 0},
        "output": {"dir": str(out_dir), "plot": False},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values} if name != "adapter" else values
    return cfg


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            check: bool = False) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                     "OMP_NUM_THREADS": full_env.get("OMP_NUM_THREADS", "2")})
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd or ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"tunelab {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_main(capsys, *args: str, stdin: str | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """The CLI run in this process (no interpreter start: seconds quicker than run_cli), its output captured by
    pytest's capsys; the result looks like run_cli's. For what only a real process shows (import-time library output,
    signals, exit codes of the interpreter) use run_cli."""
    import io

    from tunelab.cli import main

    capsys.readouterr()
    saved = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(args))
    except SystemExit as e:  # argparse: --help, usage errors
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    finally:
        sys.stdin = saved
    out = capsys.readouterr()
    if check and code != 0:
        raise AssertionError(f"tunelab {' '.join(args)} failed ({code}):\n{out.out}\n{out.err}")
    return subprocess.CompletedProcess(["tunelab", *args], code, out.out, out.err)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_configs(configs, *, nproc: int = 2, timeout: int = 600) -> str:
    """Train `configs` one after another in the processes of one torchrun launch (tests/e2e/run_configs.py); the
    launch's stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "tests/e2e/run_configs.py",
                           *map(str, configs)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def kill_family(proc) -> None:
    """SIGKILL a launched run and every process under it at once (the launcher, torchrun or deepspeed's runner, and
    each rank, which the launchers start in sessions of their own), as an OOM killer or a lost node does."""
    import signal

    import psutil  # accelerate's dependency

    family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    for p in family:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.communicate()


CALIB = {"samples": 6, "length": 24}  # calibration windows the compression tests draw (prune, quantize, lowrank)


def calib_windows(model_dir, calib):
    """The calibration windows a compression command draws from the data file `calib` with CALIB and seed 0."""
    from transformers import AutoTokenizer

    from tunelab.api import _data_source
    from tunelab.infer.calibration import calibration_windows

    tok = AutoTokenizer.from_pretrained(model_dir)
    return calibration_windows(_data_source(calib, model=str(model_dir)), tok, seed=0, **CALIB)


def qat_reference(w, spec):
    """What train.qat's forward computes from float weights w (torchao's symmetric fake quantization, written out):
    the symmetric scale of tunelab quantize, q = clamp(round(w * (1 / scale))); returns (fake-quantized weights,
    the rounded values before clipping, the scale broadcast to w's shape)."""
    import torch

    from tunelab.models.compressed import qparams

    scale, _ = qparams(w, spec)
    s = scale.repeat_interleave(w.shape[1] // scale.shape[1], dim=1)
    rounded = torch.round(w * (1.0 / s))
    return torch.clamp(rounded, spec.qmin, spec.qmax) * s, rounded, s
