"""Dataset specs -> where the rows are and how to read them, through an optional registry file.

A dataset's ``path`` that looks like a hub id (``org/name``, not a local file or folder, no data-file suffix) is a hub
dataset, as it is for model paths.

A registry maps names to datasets. Its format is LLaMA-Factory's ``dataset_info.json``, accepted as-is: each entry
has ``file_name`` (a file or folder relative to the registry's own folder) or ``hf_hub_url``, and optionally
``formatting`` (default alpaca), ``columns``, ``tags``, ``ranking``, ``subset``, ``split``, ``folder``, ``revision``
and ``num_samples``. An entry with ``formatting: sharegpt`` and OpenAI-style tags (``role``/``content``/``user``/
``assistant``) needs nothing special: tags are just remapped names.

Differences from LLaMA-Factory, on purpose: columns and tags an entry does not list keep their default names (LF
turns them off); ``num_samples`` takes the first rows (LF samples at random); unknown entry keys are errors.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config.schema import DatasetSpec
from tunelab.data.formats import FORMATS
from tunelab.errors import UserError

# Every key LLaMA-Factory documents for a dataset_info.json entry; anything else is most likely a typo.
ENTRY_KEYS = (
    "file_name",
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
    "file_sha1",
    "formatting",
    "ranking",
    "subset",
    "split",
    "folder",
    "revision",
    "num_samples",
    "columns",
    "tags",
)
_UNSUPPORTED_SOURCES = ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass
class ResolvedDataset:
    """A dataset ready to read: a local file or folder (`path`) or a hub dataset (`hub_id`), and its format."""

    path: str | None = None
    hub_id: str | None = None
    subset: str | None = None  # hub only: the dataset's configuration name
    split: str = "train"  # hub only
    folder: str | None = None  # hub only: a folder inside the hub repository
    revision: str | None = None  # hub only
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    max_samples: int | None = None
    ranking: bool = False  # preference pairs (chosen/rejected): read only by methods of data kind "pairs"
    from_path: bool = False  # hub only: the id was written as a dataset's `path` (errors say it is not local)


def _is_hub_path(path: str) -> bool:
    """A dataset `path` that names a hub dataset: ``org/name``, not an existing local path, with no data-file
    suffix (``dat/train.jsonl`` with a mistyped folder is a missing file, not a hub id). The rule model paths use."""
    from tunelab.data.readers import SUFFIXES
    from tunelab.utils.hub import looks_like_hub_id

    return looks_like_hub_id(path) and not path.lower().endswith(SUFFIXES)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        self.key = key


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice in one object is an error (json.loads keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def load_registry(path: str | Path) -> dict[str, Any]:
    """Read a registry file (JSON object of name -> entry)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError as e:
        raise UserError(f"{path}: registry file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the registry ({e})") from e
    try:
        registry = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
    except _DuplicateKey as e:
        found = [text.count("\n", 0, m.start()) + 1 for m in re.finditer(re.escape(json.dumps(e.key)) + r"\s*:", text)]
        lines = f" (the key appears at lines {', '.join(map(str, found[:4]))})" if len(found) > 1 else ""
        raise UserError(f"{path}: {json.dumps(e.key)} given twice in one object{lines}; json keeps only the last, "
                        "so one of them would be ignored") from None
    if not isinstance(registry, dict):
        raise UserError(f"{path}: expected a JSON object mapping dataset names to entries")
    return registry


def resolve_dataset(spec: DatasetSpec) -> ResolvedDataset:
    """A spec with `path` as it is; a spec with `name` through its registry entry, the spec's own settings on top."""
    if not spec.name:
        if not spec.path:
            raise UserError("dataset: give 'path' (a data file) or 'name' (a registry entry)")
        if _is_hub_path(spec.path):
            return ResolvedDataset(
                hub_id=spec.path, from_path=True, format=spec.format, columns=dict(spec.columns),
                tags=dict(spec.tags), max_samples=spec.max_samples,
            )
        return ResolvedDataset(
            path=spec.path,
            format=spec.format,
            columns=dict(spec.columns),
            tags=dict(spec.tags),
            max_samples=spec.max_samples,
        )
    if not spec.registry:
        raise UserError(
            f"dataset '{spec.name}': 'registry' is required with 'name' (the dataset_info.json defining it)"
        )

    registry = load_registry(spec.registry)
    entry = registry.get(spec.name)
    if entry is None:
        close = difflib.get_close_matches(spec.name, list(registry), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f" (it defines {len(registry)} datasets)"
        raise UserError(f"dataset '{spec.name}' is not defined in {spec.registry}{hint}")
    where = f"{spec.registry}: '{spec.name}'"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in entry:
        if key not in ENTRY_KEYS:
            close = difflib.get_close_matches(key, ENTRY_KEYS, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f" (expected {', '.join(ENTRY_KEYS)})"
            raise UserError(f"{where}: unknown key '{key}'{hint}")

    formatting = entry.get("formatting", "alpaca")  # LLaMA-Factory's default
    if formatting not in FORMATS:
        raise UserError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATS)}")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (
        not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0
    ):
        raise UserError(f"{where}: num_samples must be a positive whole number, got {num_samples!r}")
    limits = [n for n in (spec.max_samples, num_samples) if n is not None]

    resolved = ResolvedDataset(
        format=formatting if spec.format == "auto" else spec.format,
        columns={**_names(entry, "columns", where), **spec.columns},
        tags={**_names(entry, "tags", where), **spec.tags},
        max_samples=min(limits) if limits else None,
        ranking=bool(entry.get("ranking", False)),
    )
    if "hf_hub_url" in entry:  # LLaMA-Factory prefers the HF hub over every other source too
        resolved.hub_id = _string(entry, "hf_hub_url", where)
        resolved.subset = entry.get("subset")
        resolved.split = entry.get("split", "train")
        resolved.folder = entry.get("folder")
        resolved.revision = entry.get("revision")
    elif any(key in entry for key in _UNSUPPORTED_SOURCES):
        key = next(key for key in _UNSUPPORTED_SOURCES if key in entry)
        raise UserError(
            f"{where}: {key} datasets are not supported; download the data and set file_name to the local file"
        )
    elif "file_name" in entry:
        resolved.path = str(Path(spec.registry).parent / _string(entry, "file_name", where))
    else:
        raise UserError(f"{where}: needs file_name (a file or folder next to the registry) or hf_hub_url")
    return resolved


def _string(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _names(entry: dict[str, Any], key: str, where: str) -> dict[str, str]:
    """An entry's `columns` or `tags` mapping (checked against the format later, once it is known)."""
    value = entry.get(key, {})
    if not isinstance(value, dict):
        raise UserError(f"{where}: {key} must be an object mapping names, got {type(value).__name__}")
    return dict(value)
