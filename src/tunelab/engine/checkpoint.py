"""Atomic checkpoints that capture everything needed for an exact resume.

A checkpoint folder holds: the trained weights (the PEFT adapter for LoRA, else the HF model folder), the optimizer
and scheduler states, every rank's RNG states, the training position (state.json) and the resolved config.
It is written to a temporary folder and renamed into place, so a crash mid-save never leaves a half-written
checkpoint where the latest good one is looked for; state.json is written last and marks it complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import UserError

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


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
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
        raise UserError(f"{ckpt}: not a complete tunelab checkpoint ({e})") from None


def load_rng(ckpt: Path, rank: int) -> None:
    path = ckpt / f"rng-rank{rank}.pt"
    if path.exists():
        set_rng_state(torch.load(path, weights_only=False))
