"""Data files -> raw rows, each tagged with the place it came from.

Every row is yielded as ``(location, row)``. The location is what error reports show, so that a user can open the
file at the right place: ``FILE:LINE`` (1-based) for JSON lines, CSV and plain text, ``FILE:row N`` (0-based) for JSON arrays,
Parquet and hub datasets. A JSON-lines line that does not parse is one bad row among others, not a reason to stop:
it is yielded as a `BadRow` for the loader to report with the rest. Problems with a whole file (missing, unreadable,
unsupported type, a JSON array with a syntax error) raise `UserError`.

A ``.txt`` file is plain text for pre-training, read as the Hugging Face ``datasets`` "text" builder reads it: one row
per line, ``{"text": LINE}`` (the line ending removed, the rest kept as written); blank lines are skipped.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

FOLDER_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")  # the files a folder's rows are read from
SUFFIXES = (*FOLDER_SUFFIXES, ".txt")  # a .txt file is data only when named itself, see `read_rows`


@dataclass(frozen=True)
class BadRow:
    """A row that could not even be parsed; `reason` says why."""

    reason: str


def read_rows(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` for every row of a data file, or of every data file in a folder (sorted by name).

    A folder's ``.txt`` files are not read: next to data they are usually notes (README.txt), which would otherwise be
    trained on line by line. A plain-text file is data when a dataset names it.
    """
    path = Path(path)
    if path.is_dir():
        # dataset_info.json is LLaMA-Factory's registry, often kept next to the data: it is not data.
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and p.suffix.lower() in FOLDER_SUFFIXES
            and not p.name.startswith(".")
            and p.name != "dataset_info.json"
        )
        if not files:
            texts = any(p.suffix.lower() == ".txt" for p in path.iterdir())
            hint = "; a .txt file is read only when a dataset names that file itself" if texts else ""
            raise UserError(f"{path}: no data files in this folder (expected {', '.join(FOLDER_SUFFIXES)}){hint}")
        for file in files:
            yield from _read_file(file)
    elif path.is_file():
        yield from _read_file(path)
    else:
        from tunelab.config.load import path_problem

        problem = path_problem(path)
        if problem in (None, "not found"):
            raise UserError(f"{path}: no such file or folder")
        raise UserError(f"{path}: {'is ' if problem.startswith('a ') else ''}{problem}")


def _read_file(path: Path) -> Iterator[tuple[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".json":
        yield from _read_json(path)
    elif suffix == ".csv":
        yield from _read_csv(path)
    elif suffix == ".parquet":
        yield from _read_parquet(path)
    elif suffix == ".txt":
        yield from _read_txt(path)
    else:
        raise UserError(
            f"{path}: unsupported file type '{suffix or path.name}' (expected {', '.join(SUFFIXES)})"
        )


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e


def _parse_lines(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[str, Any]]:
    """JSON lines: one value per line, blank lines ignored; a line that fails to parse becomes a `BadRow`."""
    for lineno, raw in enumerate(lines, start=1):
        location = f"{path}:{lineno}"
        try:
            # utf-8-sig: tolerate a byte-order mark on the first line.
            line = raw.decode("utf-8-sig").rstrip("\r\n")
        except UnicodeDecodeError:
            yield location, BadRow("not valid UTF-8 text")
            continue
        if not line.strip():
            continue
        try:
            yield location, json.loads(line)
        except json.JSONDecodeError as e:
            yield location, BadRow(f"invalid JSON: {e.msg} (column {e.colno})")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with path.open("rb") as f:
            yield from _parse_lines(path, f)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e


def _read_txt(path: Path) -> Iterator[tuple[str, Any]]:
    """Plain text: one ``{"text": line}`` row per non-blank line (what LLaMA-Factory's ``wiki_demo.txt`` holds)."""
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                location = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    yield location, BadRow("not valid UTF-8 text")
                    continue
                if line.strip():
                    yield location, {"text": line}
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e


def _read_json(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON array of rows; JSON lines saved under a .json name (common in the wild) are detected and read as such."""
    data = _read_bytes(path)
    stripped = data.lstrip()
    if not stripped:
        return
    if not stripped.startswith(b"[") and _parses(stripped.split(b"\n", 1)[0]):
        # The first line is a complete JSON value on its own: JSON lines.
        yield from _parse_lines(path, data.split(b"\n"))
        return
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(rows, list):
        raise UserError(
            f"{path}: holds a single JSON {'object' if isinstance(rows, dict) else 'value'}; "
            "expected an array of rows, or one JSON object per line"
        )
    for index, row in enumerate(rows):
        yield f"{path}:row {index}", row


def _parses(line: bytes) -> bool:
    try:
        json.loads(line.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return True


def _read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    """CSV with a header line; every value is a string. Locations are the physical line where a row starts."""
    # Text fields of long documents exceed csv's default 128 KiB field limit; lift it while reading.
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header: list[str] | None = None
            while True:
                start = reader.line_num + 1  # line_num counts physical lines read so far
                try:
                    fields = next(reader)
                except StopIteration:
                    break
                except csv.Error as e:
                    raise UserError(f"{path}:{reader.line_num}: malformed CSV ({e})") from e
                if not fields:  # blank line
                    continue
                if header is None:
                    header = fields
                    continue
                location = f"{path}:{start}"
                if len(fields) != len(header):
                    yield location, BadRow(f"{len(fields)} fields, but the header has {len(header)}")
                else:
                    yield location, dict(zip(header, fields))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from e
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa  # imported here: a core dependency, but slow to import for commands that never read data
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        index = 0
        for batch in batches:
            for row in batch.to_pylist():
                yield f"{path}:row {index}", row
                index += 1
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"{path}: cannot read as Parquet ({e})") from e


def read_hub(
    repo_id: str,
    *,
    subset: str | None = None,
    split: str = "train",
    folder: str | None = None,
    revision: str | None = None,
    from_path: bool = False,
) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, row)`` for a Hugging Face hub dataset, loaded through `datasets` (imported only here).

    `from_path`: the id was written as a dataset's ``path`` (not a registry's ``hf_hub_url``), so errors also say it
    is not a local file. When the hub cannot be reached this fails at once, with one line, instead of letting
    `datasets` retry for half a minute; with ``HF_HUB_OFFLINE`` set, `datasets` reads its cache (which fails fast).
    """
    head = f"{repo_id}: " + ("not a local file or folder, and " if from_path else "")
    head += "could not load this dataset from the Hugging Face hub"
    local = "Download it and point data.train[].path (or the registry's file_name) at the local file"
    from tunelab.utils import hub

    offline = hub.offline()
    host = None if offline else hub.unreachable_host()
    if host is not None:
        raise UserError(f"{head}: {host} cannot be reached from here. {local}, or set HF_HUB_OFFLINE=1 to use "
                        "a copy already in the Hugging Face cache.")
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"{repo_id}: hub datasets need the `datasets` package (pip install datasets)") from e
    try:
        rows = datasets.load_dataset(repo_id, name=subset, data_dir=folder, split=split, revision=revision)
    except Exception as e:  # network, auth, missing repo, bad subset: all surface as one user-facing message
        detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        note = "HF_HUB_OFFLINE is set, so only the local cache is read; " if offline else ""
        raise UserError(
            f"{head}: the hub is unreachable from here or the dataset does not exist ({note}{detail}). {local}."
        ) from e
    for index, row in enumerate(rows):
        yield f"{repo_id}:row {index}", row
