"""The record a compression command (`tunelab prune`, `tunelab quantize`, ...) leaves in the model folder it writes:
`tunelab_compression.json`, what was done and measured. Readers use it to keep what the command made (a merge
into a pruned base keeps its zeros)."""

from __future__ import annotations

import json
from pathlib import Path

RECORD = "tunelab_compression.json"
UNSTRUCTURED = ("magnitude", "wanda")  # prune methods that keep shapes and leave zeros in dense weights


def record_text(kind: str, info: dict) -> str:
    """The record's text for a command `kind` ('prune', 'quantize', ...) and what it reports."""
    return json.dumps({"tunelab_compression": kind, **info}, indent=1)


def read_record(model: str) -> dict | None:
    """The record in the model folder `model`, or None (none there, or unreadable)."""
    path = Path(model) / RECORD
    try:
        record = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "tunelab_compression" in record else None


def sparsity_record(model: str) -> dict | None:
    """What `tunelab prune` recorded in a model folder it pruned without changing its shape (magnitude, wanda:
    zeros in dense weights), or None."""
    record = read_record(model)
    if record and record.get("tunelab_compression") == "prune" and record.get("method") in UNSTRUCTURED:
        return record
    return None
