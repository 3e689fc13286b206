"""Dataset specs -> validated `Conversation`s, with every bad row reported by location.

This is the data layer's entry point: resolve each spec (registry entries included), read its rows, detect or apply
its format, convert and validate every row, and collect each bad row as ``LOCATION: reason``. Bad rows either stop
the run, all of them counted and the first ones listed (``on_bad_row="error"``), or are dropped and counted
(``"skip"``). Nothing is tokenized here; templates do that later.

``data.replace`` is applied here too, to every row as it is converted (so streamed data gets it as well): each
``{{key}}`` placeholder in a text field becomes its value. Placeholders left over (LLaMA-Factory's ``identity``
data is full of ``{{name}}`` and ``{{author}}``) are counted per dataset and reported as one warning line.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.schema import DatasetSpec
from tunelab.data.conversation import Conversation
from tunelab.data.formats import RowError, check_mapping, detect_format, json_type
from tunelab.data.kinds import DataKind, get_kind
from tunelab.data.readers import BadRow, read_hub, read_rows
from tunelab.data.registry import ResolvedDataset, resolve_dataset
from tunelab.errors import UserError

MAX_LISTED = 10  # bad rows shown in an error; the rest are counted


@dataclass
class LoadReport:
    """What loading found: rows kept, every bad row as ``LOCATION: reason``, rows skipped, rows kept per dataset."""

    rows: int = 0
    bad: list[str] = field(default_factory=list)
    skipped: int = 0
    per_dataset: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # one line each, e.g. placeholders left unreplaced


# A placeholder is {{name}} (spaces inside the braces allowed): what LLaMA-Factory's identity data holds.
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@dataclass
class Placeholders:
    """The `{{...}}` placeholders left in one dataset after ``data.replace``: rows holding any, and their names."""

    rows: int = 0
    names: set[str] = field(default_factory=set)
    first: str = ""  # location of the first such row

    def warning(self, name: str, total: int | None = None, *, first_rows: int | None = None) -> str | None:
        """The one-line warning for dataset `name`, or None when every placeholder was filled."""
        if not self.rows:
            return None
        shown = sorted(self.names)
        listed = ", ".join("{{" + n + "}}" for n in shown[:8])
        listed += f" and {len(shown) - 8} more" if len(shown) > 8 else ""
        of = f" of {total}" if total is not None else f" of the first {first_rows}" if first_rows else ""
        example = ", ".join(f"data.replace.{n}=..." for n in shown[:2])
        return (f"data: warning: {name}: {self.rows}{of} rows hold unreplaced placeholders {listed} (first at "
                f"{self.first}); they would be trained literally: set data.replace ({example}) to fill them")


def check_replace(replace: Mapping[str, str]) -> None:
    """Refuse `data.replace` keys that no placeholder can match, instead of silently filling nothing."""
    for key, value in replace.items():
        if not isinstance(key, str) or not re.fullmatch(r"\w+", key):
            raise UserError(f"data.replace.{key}: a placeholder name is letters, digits and _ "
                            f"(it fills {{{{{key}}}}})")
        if not isinstance(value, str):
            raise UserError(f"data.replace.{key}: expected a string, got {json_type(value)}")


def fill_placeholders(conv: Conversation, replace: Mapping[str, str]) -> set[str]:
    """Replace each ``{{key}}`` of `replace` in every text field of a row, in place: the text, every message's
    content, the chosen and rejected answers (the system prompt is a message). Returns the names left unfilled."""
    left: set[str] = set()

    def fill(text: str) -> str:
        def one(match: re.Match) -> str:
            if match.group(1) in replace:
                return replace[match.group(1)]
            left.add(match.group(1))
            return match.group(0)

        return PLACEHOLDER.sub(one, text) if "{{" in text else text

    if conv.text is not None:
        conv.text = fill(conv.text)
    for message in [*conv.messages, conv.chosen, conv.rejected]:
        if message is not None and isinstance(message.get("content"), str):
            message["content"] = fill(message["content"])
    return left


def dataset_name(spec: DatasetSpec) -> str:
    """How reports name a dataset: its registry name, else its path."""
    return spec.name or spec.path or "<unnamed dataset>"


def load_conversations(
    specs: list[DatasetSpec],
    *,
    on_bad_row: str = "error",
    kind: str | DataKind = "chat",
    replace: Mapping[str, str] | None = None,
) -> tuple[list[Conversation], LoadReport]:
    """Load and validate every row of the datasets, concatenated in order, with ``{{key}}`` placeholders filled from
    `replace` (``data.replace``); a dataset with placeholders left adds one line to `LoadReport.warnings`.

    `kind` (data/kinds.py) decides how rows are read: conversations for chat (format text refused), text rows and
    conversations alike for text, preference rows (`Conversation.chosen`/`rejected` set) for pairs, conversations
    with a `Conversation.label` for kto, prompts with their other columns (`Conversation.extra`) for prompts.
    """
    kind = get_kind(kind)
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")

    replace = dict(replace or {})
    check_replace(replace)

    conversations: list[Conversation] = []
    report = LoadReport()
    empty: list[str] = []  # datasets that contributed no row, with why
    for spec in specs:
        name = dataset_name(spec)
        left = Placeholders()
        rows, bad = _load_dataset(name, resolve_dataset(spec), kind, replace, left)
        warning = left.warning(name, len(rows))
        if warning:
            report.warnings.append(warning)
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


def _load_dataset(
    name: str, dataset: ResolvedDataset, kind: DataKind, replace: Mapping[str, str], left: Placeholders
) -> tuple[list[Conversation], list[str]]:
    """Convert one dataset's rows: the good ones as conversations, the bad ones as ``LOCATION: reason`` lines."""
    conversations: list[Conversation] = []
    bad: list[str] = []
    for item in iter_dataset(name, dataset, kind, replace=replace, left=left):
        if isinstance(item, str):
            bad.append(item)
        else:
            conversations.append(item)
    return conversations, bad


def iter_dataset(
    name: str,
    dataset: ResolvedDataset,
    kind: str | DataKind,
    *,
    replace: Mapping[str, str] | None = None,
    left: Placeholders | None = None,
) -> Iterator[Conversation | str]:
    """Convert one dataset's rows lazily: a `Conversation` per good row, a ``LOCATION: reason`` line per bad one.

    Each good row has its placeholders filled from `replace`; rows with placeholders left are counted in `left`.
    Reading is as lazy as the file type allows (JSONL, CSV and Parquet row by row; a JSON array is parsed whole)."""
    kind = get_kind(kind)
    if dataset.ranking and not kind.ranking:
        raise UserError(
            f"{name}: a ranking (preference) dataset; this method (data kind {kind.name}) needs {kind.needs}, and "
            "ranking data needs a preference method (data kind pairs)"
        )
    if dataset.hub_id:
        rows = read_hub(
            dataset.hub_id,
            subset=dataset.subset,
            split=dataset.split,
            folder=dataset.folder,
            revision=dataset.revision,
            from_path=dataset.from_path,
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
            conversation = kind.read(fmt, row, dataset.columns, dataset.tags)
        except RowError as e:
            yield f"{location}: {e.reason}"
            continue
        conversation.source = location
        unfilled = fill_placeholders(conversation, replace or {})
        if unfilled and left is not None:
            left.rows += 1
            left.names |= unfilled
            left.first = left.first or location
        yield conversation


def _check_format(name: str, dataset: ResolvedDataset, fmt: str, kind: DataKind) -> str:
    """Dataset-level checks, made once: the format suits the method, and its columns/tags names are known."""
    if not kind.text_format and fmt == "text":
        raise UserError(
            f"{name}: format text is for method pt; this method trains on {kind.needs} (alpaca, sharegpt or openai)"
        )
    check_mapping(fmt, dataset.columns, dataset.tags, name, kind.columns)
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
