"""Atomic checkpoints that capture everything needed for an exact resume.

A checkpoint folder holds: the trained weights (the PEFT adapter for LoRA, else the HF model folder), the optimizer
and scheduler states, every rank's RNG states, the training position (state.json) and the resolved config. Under a
sharded engine (zero1-3, fsdp2) the weights and optimizer states are instead every rank's share of whole tensors,
shards/rank-R-of-W.safetensors (engine/engines.py).
It is written to a temporary folder and renamed into place, so a crash mid-save never leaves a half-written
checkpoint where the latest good one is looked for; state.json is written last and marks it complete.

Nothing in a checkpoint runs code when it is read: weights are safetensors, the position is JSON, and the optimizer,
scheduler, loop and RNG states are read with `torch.load(weights_only=True)`, which accepts tensors and plain data
only. A file holding anything else is refused (it could have been crafted to run code). `read_checkpoint` reads and
checks every file before anything is applied, so a truncated or damaged checkpoint is found before the run changes
state, and `resume: auto` can fall back to the previous good one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import UserError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
SHARDS = "shards"  # a sharded checkpoint's folder of per-rank safetensors (engine/engines.py writes them)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # real (non-pad) tokens trained so far, all ranks
    positions: int = 0  # token positions computed so far, padding included (tokens / positions = 1 - padding ratio)
    elapsed: float = 0.0  # training seconds so far (excludes model loading and data preparation)
    world_size: int = 1
    total_steps: int = 0


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"checkpoint-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with state.json), oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "state.json").exists():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def clean_partial(root: Path) -> None:
    """Remove temporary folders left by a save that was killed."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain data (so it loads with weights_only=True)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npst = state["numpy"]
    if isinstance(npst, dict):
        np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                             npst["cached_gaussian"]))
    else:  # written by tunelab before RNG states were plain data: a numpy array inside
        np.random.set_state(npst)
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class DamagedCheckpoint(UserError):
    """A checkpoint file that is missing, truncated or unreadable."""


def _allowed_globals() -> list:
    """The classes a checkpoint state may hold beside tensors and plain data; rebuilding each sets data attributes
    only and calls none of its methods, so no code from the file runs:
    - numpy arrays, in RNG files written before RNG states were plain data;
    - galore-torch's GaLoreProjector (rank, gap, scale and the projection matrix), in GaLore's optimizer state,
      when galore-torch is installed (the optimizer `train.optim: galore` needs it)."""
    import importlib.util

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    allowed = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    if importlib.util.find_spec("galore_torch") is not None:
        from galore_torch.galore_projector import GaLoreProjector

        if "__setstate__" not in vars(GaLoreProjector) and "__reduce__" not in vars(GaLoreProjector):
            allowed.append(GaLoreProjector)
    return allowed


def load_state_file(path: Path) -> Any:
    """A checkpoint's .pt state, read without running code (tensors and plain data only), onto the CPU."""
    if not path.is_file():
        raise DamagedCheckpoint(f"{path}: missing")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) or "Unsupported" in str(e):
            raise UserError(f"{path}: holds objects other than tensors and plain data; not loaded, since reading "
                            "it could run code (a tunelab checkpoint never holds them)") from None
        raise DamagedCheckpoint(f"{path}: unreadable ({_first_line(e)})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path}: truncated or damaged ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


@dataclass
class CheckpointData:
    """Everything read from a checkpoint, checked, before any of it is applied."""

    path: Path
    state: TrainState
    optimizer: dict
    scheduler: dict
    extra: dict
    rng: dict | None  # this rank's RNG states (None: the checkpoint has none for this rank)
    config: dict = field(default_factory=dict)  # the config it was trained with (config.yaml), {} if absent


def _check_weights(ckpt: Path) -> None:
    from safetensors import safe_open

    files = sorted((ckpt / "weights").glob("*.safetensors")) if (ckpt / "weights").is_dir() else []
    if not files:
        raise DamagedCheckpoint(f"{ckpt / 'weights'}: no safetensors weights")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:  # checks the header against the file's size
                list(handle.keys())
        except Exception as e:  # safetensors raises its own error type
            raise DamagedCheckpoint(f"{f}: truncated or damaged ({_first_line(e)})") from None


def read_checkpoint(ckpt: Path, rank: int) -> CheckpointData:
    """Read and check every file of a checkpoint: DamagedCheckpoint if one is missing or unreadable, UserError if
    one holds more than tensors and plain data."""
    import yaml

    state = read_state(ckpt)
    if shard_files(ckpt) or (ckpt / "shards").is_dir():  # a sharded engine's: every rank's share of the tensors
        check_shards(ckpt)
        optimizer: dict = {}
    else:
        _check_weights(ckpt)
        optimizer = load_state_file(ckpt / "optimizer.pt")
    scheduler = load_state_file(ckpt / "scheduler.pt")
    extra = load_state_file(ckpt / "extra.pt")
    rng_files = sorted(ckpt.glob("rng-rank*.pt"))
    rng = None
    for f in rng_files:  # every rank's file, so all ranks reach the same verdict on the same checkpoint
        loaded = load_state_file(f)
        if f.name == f"rng-rank{rank}.pt":
            rng = loaded
    if not isinstance(extra, dict) or not isinstance(extra.get("window"), dict):
        raise DamagedCheckpoint(f"{ckpt / 'extra.pt'}: not a tunelab loop state")
    config: dict = {}
    if (ckpt / "config.yaml").is_file():
        try:
            loaded_cfg = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
            config = loaded_cfg if isinstance(loaded_cfg, dict) else {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise DamagedCheckpoint(f"{ckpt / 'config.yaml'}: unreadable ({_first_line(e)})") from None
    return CheckpointData(ckpt, state, optimizer, scheduler, extra, rng, config)


def newest_readable(root: Path, rank: int, say=print) -> CheckpointData | None:
    """The newest checkpoint under `root` that reads back whole; damaged ones are named and skipped."""
    found = list_checkpoints(root)
    damaged = []
    for _, path in reversed(found):
        try:
            data = read_checkpoint(path, rank)
        except DamagedCheckpoint as e:
            damaged.append(e.message)
            say(f"resume: {path.name} is damaged ({e.message}); trying the one before")
            continue
        if damaged:
            say(f"resume: continuing from {path.name}, the newest checkpoint that reads back whole")
        return data
    if damaged:
        raise UserError(f"train.resume: no checkpoint in {root} reads back whole (newest: {damaged[0]}); start over "
                        "with output.overwrite=true")
    return None


def _fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def begin_save(root: Path, step: int) -> Path:
    """Create the temporary folder a checkpoint is written into (rank 0; other ranks wait on a barrier)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-checkpoint-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_rng(tmp: Path, rank: int) -> None:
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def finish_save(tmp: Path, root: Path, step: int, state: TrainState, keep: int) -> Path:
    """Mark the checkpoint complete, move it into place and prune old ones (rank 0)."""
    (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1))
    _fsync_tree(tmp)
    final = checkpoint_dir(root, step)
    if final.exists():  # the same step saved again (e.g. after a resume): replace it
        old = root / f".tmp-old-{final.name}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    if keep > 0:
        for _, p in list_checkpoints(root)[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> TrainState:
    try:
        return TrainState(**json.loads((ckpt / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise DamagedCheckpoint(f"{ckpt}: not a complete tunelab checkpoint ({e})") from None


def load_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng-rank{rank}.pt"
    if path.exists():
        set_rng_state(load_state_file(path))


# ------------------------------------------------------------------------------------- sharded checkpoints
def shard_files(ckpt: Path) -> list[Path]:
    return sorted((ckpt / SHARDS).glob("rank-*-of-*.safetensors"))


def check_shards(ckpt: Path) -> None:
    """Every shard file of a sharded checkpoint is there and reads back (DamagedCheckpoint otherwise)."""
    from safetensors import safe_open

    files = shard_files(ckpt)
    if not files:
        raise DamagedCheckpoint(f"{ckpt / SHARDS}: no shard files")
    worlds = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                worlds.add((handle.metadata() or {}).get("world"))
                list(handle.keys())
        except Exception as e:  # safetensors raises its own error type
            raise DamagedCheckpoint(f"{f}: truncated or damaged ({str(e).splitlines()[0][:160]})") from None
    if len(worlds) != 1 or str(len(files)) not in worlds:
        raise DamagedCheckpoint(f"{ckpt / SHARDS}: {len(files)} shard files of a {sorted(map(str, worlds))[0]}-"
                                "process save")


def shard_engine(ckpt: Path) -> str | None:
    from safetensors import safe_open

    files = shard_files(ckpt)
    if not files:
        return None
    with safe_open(str(files[0]), framework="pt") as handle:
        return (handle.metadata() or {}).get("engine")


# safetensors' names of the dtypes tunelab checkpoints hold
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class SafetensorsWriter:
    """A safetensors file written one tensor at a time, so that only the tensor being written is in memory
    (`safetensors.torch.save_file` takes every tensor at once and copies them all to bytes first: under a sharded
    engine a rank's whole share of the weights and optimizer states, twice). The format lists every tensor in a
    header before the data: the data goes to a side file as the tensors come, then the header and that data to
    `path`; the side file is removed. Readers see an ordinary safetensors file."""

    def __init__(self, path: Path, metadata: dict[str, str]):
        self.path, self.metadata = Path(path), dict(metadata)
        self._side_path = self.path.with_name(self.path.name + ".data")
        self._side = open(self._side_path, "wb")
        self._header: dict[str, Any] = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header or name == "__metadata__":
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{self.path}: {name} has dtype {t.dtype}, which tunelab does not write")
        n = t.numel() * t.element_size()
        if n:
            self._side.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        self._header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + n]}
        self._offset += n

    def close(self) -> None:
        self._side.close()
        header = json.dumps({"__metadata__": self.metadata, **self._header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
        with open(self.path, "wb") as out, open(self._side_path, "rb") as side:
            out.write(len(header).to_bytes(8, "little"))
            out.write(header)
            shutil.copyfileobj(side, out, 16 << 20)  # (the checkpoint's commit syncs the folder to disk)
        self._side_path.unlink()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self._side.close()
            self._side_path.unlink(missing_ok=True)


def checkpoint_weights(run: str, last: int) -> list[Path]:
    """The weights/ folders of the newest `last` checkpoints of a run, oldest first."""
    root = Path(run) / "checkpoints"
    found = list_checkpoints(root)
    if not found:
        raise UserError(f"--run: {run} has no checkpoints (train.save_every writes them to {root})")
    if last < 2 or last > len(found):
        raise UserError(f"--last: between 2 and the {len(found)} checkpoints of {run}, got {last}")
    chosen = [path for _, path in found[-last:]]
    for path in chosen:
        if shard_files(path) or (path / SHARDS).is_dir():
            raise UserError(f"--run: {path} is a sharded engine's checkpoint (every rank's share of the tensors); "
                            "write it whole first with `tunelab export --run` from it, then average those")
    return [path / "weights" for path in chosen]
