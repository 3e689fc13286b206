"""The run folder (output.dir): what tunelab writes there, what it may delete, its lock and its history.

tunelab deletes only what it wrote itself. A run folder is recognised by `run.json`, which tunelab writes when a
run starts (folders written before run.json existed are recognised by their config.yaml beside metrics.jsonl or a
checkpoint). `output.overwrite` then removes only the entries a run writes (RUN_ENTRIES) and keeps anything else
the user put there; a folder that is not empty and not a run is refused, never emptied.

One run at a time: the main process holds an exclusive `flock` on `.tunelab.lock` for the whole run. The operating
system releases it on any exit, SIGKILL included, so a lock left by a dead run is never in the way; a second run on
the same folder is refused with the holder's PID.

run.json also keeps the run's history: one entry per start or resume, with the config keys that changed since the
checkpoint it resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

RUN_FILE = "run.json"
LOCK_FILE = ".tunelab.lock"
# Everything a run writes into output.dir; output.overwrite deletes these and nothing else.
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "checkpoints", "final", ".tmp-final", "loss.png", "tensorboard",
               "adapter_init", RUN_FILE)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def is_run_folder(out: Path) -> bool:
    """Whether tunelab wrote this folder: run.json, or the layout of a run written before run.json existed."""
    if (out / RUN_FILE).is_file():
        return True
    if not (out / "config.yaml").is_file():
        return False
    return (out / "metrics.jsonl").is_file() or (out / "checkpoints").is_dir() or (out / "final").is_dir()


def _user_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and p.name != LOCK_FILE)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output.dir tunelab must not write into: a file, or a non-empty folder that is not a run."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output.dir: {out} is a file; choose a folder")
    if not out.is_dir() or is_run_folder(out):
        return
    foreign = _user_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        action = "delete" if overwrite else "write into"
        raise UserError(f"output.dir: {out.resolve()} is not empty ({shown}) and is not a tunelab run folder; "
                        f"tunelab will not {action} it: choose a new or empty folder")


def inputs_inside(out: Path, paths: list[str]) -> str | None:
    """The first input path (data, model, resume checkpoint) lying inside an entry that overwrite would delete."""
    doomed = [(out / name).resolve() for name in RUN_ENTRIES]
    for p in paths:
        if not p:
            continue
        rp = Path(p).expanduser().resolve()
        for d in doomed:
            if rp == d or d in rp.parents:
                return p
    return None


def clear_run(out: Path) -> list[str]:
    """Delete what an earlier run wrote into `out` (RUN_ENTRIES), nothing else; returns the names deleted."""
    if not out.is_dir():
        return []
    if not is_run_folder(out) and _user_entries(out):  # checked before, but never delete on a guess
        raise UserError(f"output.dir: {out} is not a tunelab run folder; refusing to delete it")
    removed = []
    for name in RUN_ENTRIES:
        p = out / name
        if p.is_symlink() or p.is_file():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            continue
        removed.append(name)
    return removed


class RunLock:
    """An exclusive lock on output.dir for the lifetime of a run (main process only)."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"output.dir: {self.path.parent} is in use by another tunelab run ({holder}); wait "
                            "for it to finish or choose another output.dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"PID {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_run(out: Path) -> dict[str, Any]:
    try:
        data = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def record_start(out: Path, *, version: str, resumed_from: Path | None, step: int,
                 changes: dict[str, tuple[Any, Any]] | None = None) -> None:
    """Append this start (or resume) to run.json's history, written atomically."""
    data = read_run(out)
    data.setdefault("tunelab_run", 1)
    data.setdefault("created", _now())
    entry: dict[str, Any] = {"time": _now(), "tunelab": version, "pid": os.getpid()}
    if resumed_from is None:
        entry["event"] = "start"
    else:
        entry.update(event="resume", checkpoint=str(resumed_from), step=step)
    if changes:
        entry["changes"] = {k: {"was": a, "now": b} for k, (a, b) in changes.items()}
    data.setdefault("history", []).append(entry)
    tmp = out / f".tmp-{RUN_FILE}"
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / RUN_FILE)


# Keys a resumed run may change: they do not change what is trained (logging, checkpoint cadence, where results go,
# memory and speed switches that compute the same function) or they only extend or shorten the run (max_steps,
# epochs). Everything else is compared with the checkpoint's config, and a difference is refused.
RESUMABLE_CHANGES = (
    "train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
    "train.save_total_limit", "train.resume", "train.loss_chunk",
    "train.batch_size", "train.grad_accum",  # compared as the global batch instead (see config_changes)
    "model.gradient_checkpointing", "model.offload_activations", "model.compile", "model.liger_kernels",
    "data.cache", "data.cache_dir", "data.num_proc", "output.",
    # how processes share the work (one checkpoint layout for every sharded engine; ddp's is refused by the loop)
    "train.distributed", "train.offload", "train.deepspeed", "train.accelerate_config",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        out[f"{prefix}#len"] = len(tree)
        return out
    return {prefix: tree}


def _same(key: str, old: Any, new: Any) -> bool:
    if old == new:
        return True
    is_path = key.endswith(".path") or key in ("model.tokenizer", "data.cache_dir") or key.endswith(".registry")
    if is_path and isinstance(old, str) and isinstance(new, str) and old and new:
        return os.path.realpath(os.path.expanduser(old)) == os.path.realpath(os.path.expanduser(new))
    if isinstance(old, (int, float)) and isinstance(new, (int, float)) and not isinstance(old, bool):
        return float(old) == float(new)
    return False


def config_changes(old: dict, new: dict, *, old_world: int, new_world: int) -> tuple[dict, dict]:
    """(refused, allowed): the keys whose values differ between a checkpoint's config and this run's, as
    {dotted key: (checkpoint's value, this run's value)}. Keys missing from the checkpoint's config (options added
    to tunelab since) are not compared."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    refused: dict[str, tuple[Any, Any]] = {}
    allowed: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(flat_old) | set(flat_new)):
        if key not in flat_old:
            continue
        a, b = flat_old.get(key), flat_new.get(key)
        if _same(key, a, b):
            continue
        free = any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_CHANGES)
        (allowed if free else refused)[key] = (a, b)
    # The trajectory depends on the global batch, not on how it is split into micro-batches and processes.
    try:
        old_global = int(flat_old["train.batch_size"]) * int(flat_old["train.grad_accum"]) * old_world
        new_global = int(flat_new["train.batch_size"]) * int(flat_new["train.grad_accum"]) * new_world
    except (KeyError, TypeError, ValueError):
        old_global = new_global = 0
    if old_global != new_global:
        refused["global batch (batch_size x grad_accum x processes)"] = (old_global, new_global)
    return refused, allowed


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 4) -> str:
    items = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items()]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more
