"""Dataset specs -> validated `Conversation`s, with every bad row reported by location.

This is the data layer's entry point: resolve each spec (registry entries included), read its rows, detect or apply
its format, convert and validate every row, and collect each bad row as ``LOCATION: reason``. Bad rows either stop
the run, all of them counted and the first ones listed (``on_bad_row="error"``), or are dropped and counted
(``"skip"``). Nothing is tokenized here; templates do that later.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.schema import DatasetSpec
from tunelab.data.conversation import Conversation
from tunelab.data.formats import RowError, check_mapping, convert, detect_format, json_type
from tunelab.data.readers import BadRow, read_hub, read_rows
from tunelab.data.registry import ResolvedDataset, resolve_dataset
from tunelab.errors import UserError

# The data kinds a method declares (`Method.data_kind`):
#   chat: conversations ending on an assistant turn; text: plain text or conversations (every token trained);
#   pairs: a prompt plus chosen and rejected answers (preference methods); kto: a conversation plus a desirable label.
KINDS = ("chat", "text", "pairs", "kto")
MAX_LISTED = 10  # bad rows shown in an error; the rest are counted


@dataclass
class LoadReport:
    """What loading found: rows kept, every bad row as ``LOCATION: reason``, rows skipped, rows kept per dataset."""

    rows: int = 0
    bad: list[str] = field(default_factory=list)
    skipped: int = 0
    per_dataset: dict[str, int] = field(default_factory=dict)


def dataset_name(spec: DatasetSpec) -> str:
    """How reports name a dataset: its registry name, else its path."""
    return spec.name or spec.path or "<unnamed dataset>"


def load_conversations(
    specs: list[DatasetSpec], *, on_bad_row: str = "error", kind: str = "chat"
) -> tuple[list[Conversation], LoadReport]:
    """Load and validate every row of the datasets, concatenated in order.

    kind="chat" wants conversations (format text is refused); kind="text" takes text rows and conversations alike
    (the caller renders conversations into text with the chat template); kind="pairs" wants preference rows
    (`Conversation.chosen`/`rejected` set) and kind="kto" conversations with a `Conversation.label`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")

    conversations: list[Conversation] = []
    report = LoadReport()
    empty: list[str] = []  # datasets that contributed no row, with why
    for spec in specs:
        name = dataset_name(spec)
        rows, bad = _load_dataset(name, resolve_dataset(spec), kind)
        conversations += rows
        report.bad += bad
        report.per_dataset[name] = report.per_dataset.get(name, 0) + len(rows)
        if not rows:
            empty.append(f"{name} (all {len(bad)} rows invalid)" if bad else f"{name} (no rows)")

    if report.bad and on_bad_row == "error":
        raise UserError(
            f"{len(report.bad)} invalid row(s) in the training data; fix them or set data.on_bad_row=skip",
            details=report.bad[:MAX_LISTED],
        )
    if empty:
        raise UserError(f"no usable rows in dataset(s): {', '.join(empty)}", details=report.bad[:MAX_LISTED])
    report.skipped = len(report.bad)
    report.rows = len(conversations)
    return conversations, report


def _load_dataset(name: str, dataset: ResolvedDataset, kind: str) -> tuple[list[Conversation], list[str]]:
    """Convert one dataset's rows: the good ones as conversations, the bad ones as ``LOCATION: reason`` lines."""
    conversations: list[Conversation] = []
    bad: list[str] = []
    for item in iter_dataset(name, dataset, kind):
        if isinstance(item, str):
            bad.append(item)
        else:
            conversations.append(item)
    return conversations, bad


def iter_dataset(name: str, dataset: ResolvedDataset, kind: str) -> Iterator[Conversation | str]:
    """Convert one dataset's rows lazily: a `Conversation` per good row, a ``LOCATION: reason`` line per bad one.

    Reading is as lazy as the file type allows (JSONL, CSV and Parquet row by row; a JSON array is parsed whole)."""
    if dataset.ranking and kind != "pairs":
        needs = "conversations with a kto_tag label" if kind == "kto" else "conversations or text"
        raise UserError(
            f"{name}: a ranking (preference) dataset; this method (data kind {kind}) needs {needs}, and ranking "
            "data needs a preference method (data kind pairs)"
        )
    if dataset.hub_id:
        rows = read_hub(
            dataset.hub_id,
            subset=dataset.subset,
            split=dataset.split,
            folder=dataset.folder,
            revision=dataset.revision,
        )
    else:
        rows = read_rows(dataset.path or "")
    fmt = None if dataset.format == "auto" else _check_format(name, dataset, dataset.format, kind)

    for count, (location, row) in enumerate(rows):
        if dataset.max_samples is not None and count >= dataset.max_samples:
            break  # max_samples counts rows as read, bad ones included: "the first N rows"
        if isinstance(row, BadRow):
            yield f"{location}: {row.reason}"
            continue
        if not isinstance(row, dict):
            yield f"{location}: expected an object with named columns, got {json_type(row)}"
            continue
        if fmt is None:  # format: auto is decided by the first readable row
            try:
                fmt = _check_format(name, dataset, detect_format(row, dataset.columns), kind)
            except RowError as e:
                raise UserError(f"{location}: {e.reason}") from e
        try:
            conversation = convert(fmt, row, dataset.columns, dataset.tags, kind)
        except RowError as e:
            yield f"{location}: {e.reason}"
            continue
        conversation.source = location
        yield conversation


def _check_format(name: str, dataset: ResolvedDataset, fmt: str, kind: str) -> str:
    """Dataset-level checks, made once: the format suits the method, and its columns/tags names are known."""
    if kind != "text" and fmt == "text":
        raise UserError(
            f"{name}: format text is for method pt; this method trains on conversations (alpaca, sharegpt or openai)"
        )
    check_mapping(fmt, dataset.columns, dataset.tags, name, kind)
    return fmt


def split_validation(rows: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `val_size` rows (a fraction if < 1, a count if >= 1), chosen by a seeded shuffle.

    Both parts keep the original row order; the same rows, size and seed always give the same split.
    """
    if val_size <= 0:
        return list(rows), []
    n = len(rows)
    if n < 2:
        raise UserError(f"data.val_size={val_size} needs at least 2 rows to hold some out; the data has {n}")
    # round() first: 100 * 0.07 is 7.000000000000001 in floating point, which must not become 8.
    n_val = math.ceil(round(n * val_size, 6)) if val_size < 1 else int(val_size)
    if n_val >= n:
        raise UserError(
            f"data.val_size={val_size} would hold out {n_val} of {n} rows, leaving none to train on"
        )
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held_out = set(order[:n_val])
    train = [row for i, row in enumerate(rows) if i not in held_out]
    val = [row for i, row in enumerate(rows) if i in held_out]
    return train, val
