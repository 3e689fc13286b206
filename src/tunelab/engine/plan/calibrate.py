"""The CPU runtime: the memory a CPU training process holds before any model tensor, measured on this machine.

A CPU plan adds to its tensors the resident memory of the process itself: the interpreter, torch, transformers,
peft, accelerate and tokenizers code and heap, a tokenizer and a small dataset (`memory.CPU_RUNTIME_BYTES`, measured
on the reference machine). It changes with library versions, so `calibrate_cpu_runtime` measures it for the machine
at hand: the peak RSS of a real `python -m tunelab train` run on a micro model (the workload is
resources/calibration.json), minus that run's modelled tensors. The result is stored per library versions in
`runtime_cache_path()`, where `cached_cpu_runtime` finds it for later plans.

The peak RSS of the run is measured from this process: `finish_measured` reads all the child's output, then reaps it
with wait4, whose resource usage holds the child's peak RSS (ru_maxrss). On Linux that figure also counts the memory
map the child's exec replaced (a child spawned by vfork, subprocess's default, replaces its parent's map; one
spawned by fork, a copy of it), so a child of a large process (a test session, a planner that has loaded a model)
would report at least its parent's size. `start_measured_train` therefore has the training process forked by a
small launcher (a bare interpreter of a few MiB) that exits at once; this process, a child subreaper for that
moment, inherits the training process as its own child (`_start_measured`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

from tunelab.engine.plan.memory import estimate
from tunelab.engine.plan.model_shape import ModelShape
from tunelab.errors import UserError

# The micro run that measures the runtime: a 1-layer model too small to matter, plain-text rows longer than its
# max_length (every micro-batch is full), 2 steps (the optimizer states appear at step 1), no tokenization cache.
_MICRO_MODEL = dict(hidden=32, layers=1, heads=2, vocab=1000)
_MICRO_TRAIN = dict(batch_size=1, max_length=32)
_PEFT_ADAPTER = {"type": "lora", "r": 8}  # the micro run of a peft-wrapped model (calibrate_cpu_runtime(peft=True))


def _runtime_key(peft: bool = False) -> str:
    """What the runtime depends on: Python, the libraries' versions, glibc's malloc settings, and whether the run
    wraps its model with peft (which imports its quantization back ends: bitsandbytes 0.50.2, say, compiles
    kernels with torch.compile at import, bringing in torch's dynamo and networkx, ~50 MiB more)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}"]
    for pkg in ("torch", "transformers", "peft", "accelerate", "datasets", "tokenizers", "tunelab"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            parts.append(f"{pkg} -")
    import os

    malloc = ",".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_"))
    return " | ".join(parts) + (f" | {malloc}" if malloc else "") + (" | peft" if peft else "")


def runtime_cache_path():
    """$TUNELAB_CACHE/plan-runtime.json, else ~/.cache/tunelab/plan-runtime.json."""
    import os
    from pathlib import Path

    root = os.environ.get("TUNELAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunelab")
    return Path(root) / "plan-runtime.json"


def cached_cpu_runtime(peft: bool = False) -> int | None:
    """The runtime calibrated earlier with exactly these library versions (of a peft-wrapped run, or not), or
    None."""
    import json

    try:
        data = json.loads(runtime_cache_path().read_text(encoding="utf-8"))
        value = data.get(_runtime_key(peft)) if isinstance(data, dict) else None
        return int(value) if isinstance(value, int | float) and value > 0 else None
    except (OSError, ValueError):
        return None

def _workload() -> dict[str, Any]:
    """The calibration run (resources/calibration.json): `rows`, how its training rows are cut from the tiny corpus,
    and `config`, the training config without the paths and the micro-batch geometry the code fills in."""
    import json
    from importlib import resources

    path = resources.files("tunelab") / "resources" / "calibration.json"
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass
class MeasuredRun:
    """A child process started by `start_measured_train`: what `finish_measured` waits for."""

    args: list[str]  # its command line
    pid: int  # a child of this process
    stdout: IO[str]  # its output, stderr merged
    returncode: int | None = None  # set by finish_measured


# Forks argv[2:] and writes the child's pid to file descriptor argv[1], then exits: the launcher's own memory map is
# what the child's exec replaces, a few MiB instead of the parent's.
_LAUNCHER = """
import os, sys
fd = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    os.close(fd)
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    except OSError as e:
        os.write(2, ("cannot run %s: %s\\n" % (sys.argv[2], e)).encode())
    os._exit(127)
os.write(fd, b"%d" % pid)
"""
_PR_SET_CHILD_SUBREAPER = 36
_PR_GET_CHILD_SUBREAPER = 37
_SUBREAPER = threading.Lock()  # the subreaper flag is the process's: one launch at a time


def _prctl():
    """Linux's prctl(2), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _start_measured(argv: list[str], env: dict[str, str] | None = None):
    """Start `argv` as a child of this process whose wait4 ru_maxrss is its own peak RSS: on Linux forked by a small
    launcher while this process is a child subreaper (so the orphaned child is re-parented here, not to init), the
    flag restored as soon as the launcher has exited; elsewhere spawned directly. Returns a `MeasuredRun` (Linux) or
    a `subprocess.Popen`, both with args, pid, stdout and returncode."""
    import ctypes

    streams: dict[str, Any] = dict(env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prctl = _prctl()
    if prctl is None:
        return subprocess.Popen(argv, **streams)
    with _SUBREAPER:
        was = ctypes.c_int(0)
        if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(was), 0, 0, 0) != 0 \
                or prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            return subprocess.Popen(argv, **streams)
        read_fd, write_fd = os.pipe()
        try:
            launcher = subprocess.Popen([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(write_fd), *argv],
                                        pass_fds=(write_fd,), **streams)
            os.close(write_fd)
            write_fd = -1
            with os.fdopen(read_fd, "rb") as f:
                read_fd = -1
                reported = f.read()
            launcher.wait()  # once it has exited, the child is this process's
        finally:
            prctl(_PR_SET_CHILD_SUBREAPER, was.value, 0, 0, 0)
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
    if not reported.strip().isdigit():
        out = launcher.stdout.read() if launcher.stdout else ""
        if launcher.stdout:
            launcher.stdout.close()
        raise OSError(f"cannot start {argv[0]}: the launcher exited with {launcher.returncode}: {out.strip()}")
    assert launcher.stdout is not None
    return MeasuredRun(args=list(argv), pid=int(reported), stdout=launcher.stdout)


def start_measured_train(config_path: str, env: dict[str, str] | None = None):
    """Start `python -m tunelab train CONFIG` (the CLI itself) in a child process whose peak RSS `finish_measured`
    reads."""
    return _start_measured([sys.executable, "-m", "tunelab", "train", str(config_path)], env)


def finish_measured(proc) -> tuple[int, str, int]:
    """Wait for a `start_measured_train` child: (exit code, its output, its peak RSS in bytes).

    Reads all its output (stderr merged), then reaps it with wait4, whose resource usage holds its peak RSS
    (ru_maxrss: KiB on Linux, bytes on macOS); the exit code is a signal's negative number when one killed it."""
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return proc.returncode, out, peak


def calibrate_cpu_runtime(*, save: bool = True, peft: bool = False) -> int:
    """Measure this machine's CPU runtime: the peak RSS (wait4's ru_maxrss) of a real `tunelab train` run on a micro
    model, minus that run's modelled tensors. Takes ~10 s (a child process imports torch and transformers, tokenizes
    and trains two steps). The workload is resources/calibration.json; with `peft`, its adapter is a LoRA of rank 8
    (the runtime of a run whose model peft wraps: peft's adapter code imports more). The result is stored in
    `runtime_cache_path()` keyed by the library versions and the kind (`_runtime_key`)."""
    import json
    import tempfile
    from pathlib import Path

    from tunelab.models.tiny import build_tiny_llama, tiny_corpus

    work = _workload()
    cut, cfg = work["rows"], work["config"]
    adapter = dict(_PEFT_ADAPTER) if peft else cfg["adapter"]
    cfg["adapter"] = adapter
    with tempfile.TemporaryDirectory(prefix="tunelab-calibrate-") as tmp:
        root = Path(tmp)
        model = build_tiny_llama(root / "model", **_MICRO_MODEL)
        text = "\n".join(tiny_corpus(cut["corpus_chars"], seed=cut["seed"]))
        n = cut["chars"]
        rows = [{cut["column"]: text[i:i + n]} for i in range(0, cut["count"] * n, n)]
        (root / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
        cfg.setdefault("model", {})["path"] = str(model)
        cfg["data"]["train"][0]["path"] = str(root / "rows.json")
        cfg["data"]["max_length"] = _MICRO_TRAIN["max_length"]
        cfg["train"]["batch_size"] = _MICRO_TRAIN["batch_size"]
        cfg.setdefault("output", {})["dir"] = str(root / "out")
        (root / "run.json").write_text(json.dumps(cfg), encoding="utf-8")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNELAB_CACHE": str(root / "cache")}
        code, out, peak = finish_measured(start_measured_train(str(root / "run.json"), env))
        if code != 0 or peak <= 0:
            raise UserError("plan --calibrate: the micro training run failed:\n" + out[-2000:])
        shape = ModelShape.from_pretrained(str(model))
    # the template's workload: full fine-tuning (or the LoRA) in fp32, rows longer than max_length, no attention mask
    modelled = estimate(shape, adapter=adapter["type"], lora_r=adapter.get("r", 8), precision="fp32",
                        storage_dtype="fp32", device="cpu", batch_size=_MICRO_TRAIN["batch_size"],
                        seq_len=_MICRO_TRAIN["max_length"], attn_mask=False, runtime_bytes=0).total
    runtime = int(peak - modelled)
    if save:
        path = runtime_cache_path()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[_runtime_key(peft)] = runtime
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_suffix(".tmp")
        tmp_path.write_text(json.dumps(data, indent=1), encoding="utf-8")
        os.replace(tmp_path, path)
    return runtime
