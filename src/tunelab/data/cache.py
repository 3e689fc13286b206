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

from tunelab.data.tokenize import Encoded, EncodedKTO, EncodedPair, EncodedPrompt

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


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged int lists as (lengths, concatenation)."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    return lengths, np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))


def _ragged(lengths: np.ndarray, flat: np.ndarray) -> list[list[int]]:
    values, out, start = flat.tolist(), [], 0
    for end in np.cumsum(lengths).tolist():
        out.append(values[start:end])
        start = end
    return out


def _pack(rows: list[Encoded] | list[EncodedPair]) -> dict[str, np.ndarray]:
    """A split as flat arrays. Pairs store the prompt once and each answer's ids and labels; KTO rows add their
    label. The array names tell `_unpack` which kind of row to rebuild."""
    truncated = np.array([r.truncated for r in rows], dtype=bool)
    if rows and isinstance(rows[0], EncodedPrompt):  # the other columns as one JSON string (no pickled objects)
        lengths, ids = _flat([r.prompt_ids for r in rows])
        return {"prompt_lengths": lengths, "prompt": ids, "truncated": truncated,
                "extra_json": np.array(json.dumps([[r.extra, r.messages] for r in rows]))}
    if rows and isinstance(rows[0], EncodedPair):
        arrays = {"truncated": truncated}
        for name in ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
            arrays[f"{name}_lengths"], arrays[name] = _flat([getattr(r, name) for r in rows])
        return arrays
    lengths, ids = _flat([r.input_ids for r in rows])
    _, labels = _flat([r.labels for r in rows])
    arrays = {"lengths": lengths, "ids": ids, "labels": labels, "truncated": truncated}
    if rows and isinstance(rows[0], EncodedKTO):
        arrays["desirable"] = np.array([r.desirable for r in rows], dtype=bool)
    return arrays


def _unpack(arrays: dict[str, np.ndarray], sources: list[str]) -> list[Encoded] | list[EncodedPair]:
    truncated = arrays["truncated"].tolist()
    if "extra_json" in arrays:
        prompts, extra = _ragged(arrays["prompt_lengths"], arrays["prompt"]), json.loads(str(arrays["extra_json"]))
        return [EncodedPrompt(prompts[i], truncated[i], sources[i], *extra[i]) for i in range(len(prompts))]
    if "prompt_ids" in arrays:
        names = ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
        columns = [_ragged(arrays[f"{name}_lengths"], arrays[name]) for name in names]
        return [EncodedPair(*fields, truncated[i], sources[i]) for i, fields in enumerate(zip(*columns))]
    ids, labels = _ragged(arrays["lengths"], arrays["ids"]), _ragged(arrays["lengths"], arrays["labels"])
    if "desirable" in arrays:
        desirable = arrays["desirable"].tolist()
        return [EncodedKTO(ids[i], labels[i], truncated[i], sources[i], desirable=desirable[i])
                for i in range(len(ids))]
    return [Encoded(ids[i], labels[i], truncated[i], sources[i]) for i in range(len(ids))]


def save(root: Path, key: str, splits: dict[str, list[Any]], meta: dict[str, Any]) -> Path:
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
