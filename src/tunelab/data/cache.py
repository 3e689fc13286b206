"""On-disk cache of tokenized datasets.

Tokenizing, templating and masking are pure functions of: the bytes of the data files, the dataset specs, the
tokenizer (its full serialisation, special tokens and chat template), the template, max_length and the masking and
split options. A run whose inputs hash the same loads the token rows from the cache instead of recomputing them.
Entries are written to a temporary folder and renamed, so a killed run never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.tokenize import Encoded

FORMAT_VERSION = 1  # bump when tokenization or masking semantics change


def default_cache_dir() -> Path:
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"]) / "tokenized"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tunelab" / "tokenized"


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def _hash_path(h: Any, path: Path) -> None:
    """Content of a data file, or of every file in a folder (sorted), with names."""
    if path.is_dir():
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            h.update(str(p.relative_to(path)).encode())
            _hash_file(h, p)
    elif path.exists():
        _hash_file(h, path)
    else:
        h.update(f"missing:{path}".encode())


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: their vocabulary is what matters
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({
        "class": type(tokenizer).__name__,
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "added": sorted(str(t) for t in tokenizer.get_added_vocab()),
        "chat_template": str(getattr(tokenizer, "chat_template", None)),
        "add_bos": getattr(tokenizer, "add_bos_token", None),
        "add_eos": getattr(tokenizer, "add_eos_token", None),
    }, sort_keys=True).encode())
    return h.hexdigest()


def cache_key(data_cfg, tokenizer, template_source: str, *, kind: str, seed: int) -> str:
    """A hash of everything the token rows depend on."""
    from tunelab.config.load import config_to_dict
    from tunelab.data.registry import resolve_dataset

    h = hashlib.sha256()
    h.update(f"tunelab-tokenized-v{FORMAT_VERSION}:{kind}:{seed}".encode())
    options = config_to_dict(data_cfg)
    for name in ("packing", "shuffle", "cache", "cache_dir", "num_proc"):  # batching-only options
        options.pop(name, None)
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(template_source.encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    for spec in [*data_cfg.train, *data_cfg.val]:
        if spec.registry:
            _hash_path(h, Path(spec.registry))
        resolved = resolve_dataset(spec)
        if getattr(resolved, "path", None):
            _hash_path(h, Path(resolved.path))
        else:  # hub datasets: identified by name and revision only
            h.update(json.dumps(asdict(resolved), default=str, sort_keys=True).encode())
    return h.hexdigest()[:32]


def _pack(rows: list[Encoded]) -> dict[str, np.ndarray]:
    lengths = np.array([len(r.input_ids) for r in rows], dtype=np.int64)
    ids = np.fromiter((t for r in rows for t in r.input_ids), dtype=np.int64, count=int(lengths.sum()))
    labels = np.fromiter((t for r in rows for t in r.labels), dtype=np.int64, count=int(lengths.sum()))
    return {"lengths": lengths, "ids": ids, "labels": labels,
            "truncated": np.array([r.truncated for r in rows], dtype=bool)}


def _unpack(arrays: dict[str, np.ndarray], sources: list[str]) -> list[Encoded]:
    out = []
    ends = np.cumsum(arrays["lengths"])
    ids, labels = arrays["ids"].tolist(), arrays["labels"].tolist()
    start = 0
    for i, end in enumerate(ends.tolist()):
        out.append(Encoded(ids[start:end], labels[start:end], bool(arrays["truncated"][i]), sources[i]))
        start = end
    return out


def save(root: Path, key: str, splits: dict[str, list[Encoded]], meta: dict[str, Any]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    tmp = root / f".tmp-{key}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, rows in splits.items():
        np.savez(tmp / f"{name}.npz", **_pack(rows))
        (tmp / f"{name}.sources.json").write_text(json.dumps([r.source for r in rows]))
    (tmp / "meta.json").write_text(json.dumps(meta))
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:  # another process (e.g. a DDP rank) wrote the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load(root: Path, key: str, names: tuple[str, ...] = ("train", "val")):
    """(splits, meta) from the cache, or None when there is no complete entry."""
    entry = root / key
    if not (entry / "meta.json").exists():
        return None
    try:
        splits = {}
        for name in names:
            with np.load(entry / f"{name}.npz") as arrays:
                data = {k: arrays[k] for k in arrays.files}
            sources = json.loads((entry / f"{name}.sources.json").read_text())
            splits[name] = _unpack(data, sources)
        return splits, json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError, KeyError):
        return None
