"""Per-phase peak resident memory of a tunelab training process, for benchmarks/distributed.py.

Python imports this module at start-up when its folder is on PYTHONPATH; it does nothing unless TUNELAB_MEMPROBE
names a folder (and the process is a rank: RANK is set). Then a thread reads the process's resident set every
millisecond and files it under the phase the process is in: setup (and between steps), forward/backward, optimizer
step, checkpoint (the sharded save of weights and optimizer states), final save; and "after backward" is the
resident set read right after each micro-batch's backward, what stays between micro-batches. The phases are marked by wrapping the loop's
functions once they are imported (engine/loop.py: _train_step, save_checkpoint, _save_final; the engines' step),
not by reading the main thread's stack from this thread (which, at this rate, broke DeepSpeed's start-up).
At exit it writes rank-R.json: {phase: peak MiB}. A sample can miss a peak shorter than the period; the process's
exact high-water mark (VmHWM) is the run's own summary line.
"""

import atexit
import functools
import json
import os
import sys
import threading
import time

_DIR = os.environ.get("TUNELAB_MEMPROBE")
_phase = ["setup"]  # the innermost marked phase is last
_PEAKS: dict[str, float] = {}


def _marked(fn, phase):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _phase.append(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            _phase.pop()

    wrapper.__memprobe__ = True
    return wrapper


def _patch() -> bool:
    """Wrap the loop's phase functions once both modules are fully imported; True when done."""
    loop, engines = sys.modules.get("tunelab.engine.loop"), sys.modules.get("tunelab.engine.engines")
    if loop is None or engines is None or not hasattr(loop, "_save_final") or not hasattr(engines, "save_shards"):
        return False
    for name, phase in (("_train_step", "forward/backward"), ("save_checkpoint", "checkpoint"),
                        ("_save_final", "final save")):
        setattr(loop, name, _marked(getattr(loop, name), phase))
    for cls in vars(engines).values():
        if isinstance(cls, type) and cls.__module__ == engines.__name__:
            if "step" in vars(cls):
                cls.step = _marked(vars(cls)["step"], "optimizer step")
            if "backward" in vars(cls):
                cls.backward = _after(vars(cls)["backward"])
    return True


def _rss() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _after(fn):
    """The resident set right after each micro-batch's backward (read in the main thread): what stays between
    micro-batches (weights, gradients or their partitions, optimizer states), without the backward's own
    working set."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        _PEAKS["after backward"] = max(_PEAKS.get("after backward", 0.0), _rss())
        return out

    return wrapper


def _start() -> None:
    peaks = _PEAKS
    page = os.sysconf("SC_PAGE_SIZE")

    def sample() -> None:
        patched = False
        with open("/proc/self/statm") as f:
            while True:
                if not patched:
                    patched = _patch()
                f.seek(0)
                rss = int(f.read().split()[1]) * page / 2 ** 20
                phase = _phase[-1]
                if rss > peaks.get(phase, 0.0):
                    peaks[phase] = rss
                time.sleep(0.001)

    def write() -> None:
        with open(os.path.join(_DIR, f"rank-{os.environ['RANK']}.json"), "w") as f:
            json.dump({k: round(v, 1) for k, v in peaks.items()}, f)

    threading.Thread(target=sample, daemon=True).start()
    atexit.register(write)


if _DIR and os.environ.get("RANK") is not None:
    _start()
