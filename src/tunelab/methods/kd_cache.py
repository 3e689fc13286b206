"""The teacher cache of method kd (method.teacher_cache): the teacher's top-k distributions of every row, on disk.

A cache folder holds `cache.json` (what the distributions were computed with: the teacher's fingerprint, top_k,
temperature and the vocabulary width) and shards, `teacher-*.safetensors`, each with two tensors over the trained
positions of the rows it covers, in row order and each row's positions in order:

- `indices` [N, k] int32: the teacher's k most likely tokens at each position;
- `logprobs` [N, k + 1] float32: their log-probabilities at the temperature, then the log of the rest of the mass
  (methods/kd_losses.py: topk_buckets);

and in its metadata `rows`, a JSON list of [row key, first position, positions] (the key hashes the row's token ids
and which of them are trained). A run looks every row up by its key and computes only the rows no shard holds, so
a second run on the same data computes nothing, a run on more data computes only the new rows, and a run killed
while computing keeps the shards it finished (each is written to a temporary name and renamed when complete).
Nothing in the folder is deleted or rewritten; a folder written for another teacher, top_k or temperature is
refused, not mixed. Shards are memory-mapped: a micro-batch reads only its rows' positions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import UserError

FORMAT = "tunelab-kd-teacher-cache"
VERSION = 1
SHARD_ROWS = 512  # rows per shard: an interrupted computation loses at most this many rows' work


def row_key(row) -> str:
    """A row's identity for the cache: its token ids and which next tokens are trained (what the teacher's
    distributions at its trained positions depend on)."""
    h = hashlib.sha1()
    h.update(torch.tensor(row.input_ids, dtype=torch.int64).numpy().tobytes())
    h.update(bytes(int(label != IGNORE_INDEX) for label in row.labels[1:]))
    return h.hexdigest()


def trained_count(row) -> int:
    """The positions whose next token is trained: the positions the cache holds for the row."""
    return sum(label != IGNORE_INDEX for label in row.labels[1:])


def _file_digest(path: Path, edge: int = 1 << 20) -> str:
    """A cheap identity of a weights file: its size and a hash of its first and last MiB (a safetensors header
    names every tensor and its offsets; the edges hold real weights): retraining or replacing it changes it."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(edge))
        if size > 2 * edge:
            f.seek(size - edge)
            h.update(f.read(edge))
    return h.hexdigest()


def fingerprint(*folders: str) -> str:
    """The identity of a teacher (its model folder and adapter): every config and weights file's digest."""
    h = hashlib.sha256()
    for folder in folders:
        if not folder:
            continue
        for path in sorted(Path(folder).iterdir()):
            if path.suffix in (".safetensors", ".json") and path.is_file():
                h.update(path.name.encode())
                h.update(_file_digest(path).encode())
    return h.hexdigest()


def shard_number(name: str) -> int:
    """A shard's number, derived from its file name (the same on every process; exact in a float64 batch value)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:12], 16)


class TeacherCache:
    def __init__(self, folder: str | os.PathLike, meta: dict, *, what: str = "method.teacher_cache"):
        self.folder, self.meta, self.what = Path(folder), {"format": FORMAT, "version": VERSION, **meta}, what
        self._index: dict[str, tuple[int, int, int]] = {}
        self._shards: dict[int, object] = {}

    # ------------------------------------------------------------------------------------------------ opening
    def open(self, *, main: bool, barrier) -> None:
        """Create the folder and its cache.json (the main process), or check that an existing one was written with
        the same teacher and options."""
        if main:
            self._create()
        barrier()
        self._check()

    def _create(self) -> None:
        header = self.folder / "cache.json"
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.what}: {self.folder} exists and is not a folder")
        if header.exists():
            return
        if self.folder.exists() and any(self.folder.iterdir()):
            raise UserError(f"{self.what}: {self.folder} is a folder of other files (no cache.json); give an empty "
                            "or new folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = header.with_name(f".cache.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.meta, indent=1))
        os.replace(tmp, header)

    def _check(self) -> None:
        try:
            found = json.loads((self.folder / "cache.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{self.what}: {self.folder}/cache.json cannot be read ({e})") from None
        if found.get("format") != FORMAT:
            raise UserError(f"{self.what}: {self.folder} is not a tunelab teacher cache")
        differ = [k for k in ("version", "teacher", "top_k", "temperature", "width") if found.get(k) != self.meta[k]]
        if differ:
            what = ", ".join(f"{k} {found.get(k)!r} (this run: {self.meta[k]!r})" for k in differ
                             if k != "teacher") or "another teacher (its weights or adapter differ)"
            if "teacher" in differ and len(differ) > 1:
                what = "another teacher and " + what
            raise UserError(f"{self.what}: {self.folder} was computed with {what}; give another folder")

    # -------------------------------------------------------------------------------------------------- index
    def refresh(self) -> dict[str, tuple[int, int, int]]:
        """Read every complete shard's row list: key -> (shard number, first position, positions)."""
        from safetensors import safe_open

        index: dict[str, tuple[int, int, int]] = {}
        for path in sorted(self.folder.glob("teacher-*.safetensors")):
            number = shard_number(path.name)
            if number not in self._shards:
                self._shards[number] = safe_open(str(path), framework="pt")
            for key, start, count in json.loads(self._shards[number].metadata()["rows"]):
                index.setdefault(key, (number, start, count))
        self._index = index
        return index

    def lookup(self, row) -> tuple[int, int, int] | None:
        return self._index.get(row_key(row))

    # ------------------------------------------------------------------------------------------------ writing
    def write_shard(self, keys: list[str], counts: list[int], indices: torch.Tensor, logprobs: torch.Tensor,
                    rank: int) -> None:
        """One shard of rows (their keys, positions each, and the teacher's values over all of them), written
        under a temporary name and renamed when complete."""
        from safetensors.torch import save_file

        rows, at = [], 0
        for key, count in zip(keys, counts):
            rows.append([key, at, count])
            at += count
        if at != indices.shape[0] or at != logprobs.shape[0]:
            raise RuntimeError(f"a teacher shard of {at} positions got {indices.shape[0]} values")
        name = f"teacher-{time.time_ns():020d}-{rank}-{os.getpid()}.safetensors"
        tmp = self.folder / f".{name}.tmp"
        save_file({"indices": indices.to(torch.int32).contiguous(), "logprobs": logprobs.float().contiguous()},
                  str(tmp), metadata={"rows": json.dumps(rows)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)

    # ------------------------------------------------------------------------------------------------ reading
    def read(self, shard: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (indices [count, k] int64, log-probabilities [count, k + 1] float32) of one row."""
        f = self._shards[shard]
        return (f.get_slice("indices")[start:start + count].long(),
                f.get_slice("logprobs")[start:start + count])
