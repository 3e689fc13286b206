"""Readers: every file type yields (location, row) with exact locations; broken files raise UserError."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunelab.data.readers import BadRow, read_hub, read_rows
from tunelab.errors import UserError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_locations_are_one_based_lines_and_bad_lines_are_marked():
    path = FIXTURES / "bad.jsonl"
    rows = list(read_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}:{n}" for n in (1, 2, 3, 5, 6, 7, 8)]  # line 4 is blank
    assert rows[0][1] == {"instruction": "Fine row.", "output": "OK."}
    assert rows[1][1] == BadRow("invalid JSON: Expecting ',' delimiter (column 45)")
    assert rows[4][1] == ["not", "an", "object"]  # not a dict: the loader reports it


def test_jsonl_line_that_is_not_utf8_is_a_bad_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\r\n{"text": "c"}\r\n')
    assert list(read_rows(path)) == [
        (f"{path}:1", {"text": "a"}),
        (f"{path}:2", BadRow("not valid UTF-8 text")),
        (f"{path}:3", {"text": "c"}),
    ]


def test_json_array_locations_are_zero_based_row_indices():
    path = FIXTURES / "alpaca.json"
    rows = list(read_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}:row 0", f"{path}:row 1", f"{path}:row 2"]
    assert rows[1][1] == {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}


def test_json_lines_saved_as_json_are_detected(tmp_path):
    path = write(tmp_path / "lines.json", '{"text": "a"}\n\n{"text": "b"}\n{"text": \n')
    assert list(read_rows(path)) == [
        (f"{path}:1", {"text": "a"}),
        (f"{path}:3", {"text": "b"}),
        (f"{path}:4", BadRow("invalid JSON: Expecting value (column 10)")),
    ]


def test_malformed_json_array_names_file_and_line(tmp_path):
    path = write(tmp_path / "broken.json", '[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(UserError) as e:
        list(read_rows(path))
    assert str(e.value).startswith(f"{path}:3: invalid JSON: ")


def test_single_json_object_is_refused(tmp_path):
    path = write(tmp_path / "obj.json", '{\n  "train": [{"text": "a"}]\n}\n')
    with pytest.raises(UserError, match="holds a single JSON object; expected an array of rows"):
        list(read_rows(path))


def test_empty_json_file_has_no_rows(tmp_path):
    assert list(read_rows(write(tmp_path / "empty.json", "\n"))) == []


def test_csv_locations_are_physical_lines_of_row_starts():
    path = FIXTURES / "alpaca.csv"
    assert list(read_rows(path)) == [
        (f"{path}:2", {"instruction": "Say hi.", "input": "", "output": "Hi!"}),
        (f"{path}:3", {"instruction": "Write two lines.", "input": "", "output": "Line one\nLine two"}),
        (f"{path}:5", {"instruction": "Add 1 and 2.", "input": "", "output": "3"}),
    ]


def test_csv_blank_lines_and_wrong_field_counts(tmp_path):
    path = write(tmp_path / "d.csv", "text,extra\n\nhello,1\nonly-one\n")
    assert list(read_rows(path)) == [
        (f"{path}:3", {"text": "hello", "extra": "1"}),
        (f"{path}:4", BadRow("1 fields, but the header has 2")),
    ]


def test_csv_fields_longer_than_csv_default_limit(tmp_path):
    long = "x" * 200_000
    path = write(tmp_path / "long.csv", f"text\n{long}\n")
    assert list(read_rows(path)) == [(f"{path}:2", {"text": long})]


def test_parquet_rows_keep_nested_values(tmp_path):
    path = tmp_path / "d.parquet"
    conversations = [[{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]]
    pq.write_table(pa.table({"conversations": conversations * 3, "id": [0, 1, 2]}), path, row_group_size=2)
    rows = list(read_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}:row 0", f"{path}:row 1", f"{path}:row 2"]
    assert rows[2][1] == {"conversations": conversations[0], "id": 2}


def test_corrupt_parquet_is_a_user_error(tmp_path):
    path = write(tmp_path / "d.parquet", "not parquet")
    with pytest.raises(UserError, match=r"d\.parquet: cannot read as Parquet"):
        list(read_rows(path))


def test_folder_reads_data_files_sorted_and_ignores_the_rest(tmp_path):
    write(tmp_path / "b.jsonl", '{"text": "b"}\n')
    write(tmp_path / "a.json", '[{"text": "a"}]')
    write(tmp_path / "c.csv", "text\nc\n")
    write(tmp_path / "README.md", "# notes")
    write(tmp_path / "dataset_info.json", "{}")
    write(tmp_path / ".hidden.jsonl", '{"text": "hidden"}\n')
    assert list(read_rows(tmp_path)) == [
        (f"{tmp_path / 'a.json'}:row 0", {"text": "a"}),
        (f"{tmp_path / 'b.jsonl'}:1", {"text": "b"}),
        (f"{tmp_path / 'c.csv'}:2", {"text": "c"}),
    ]


def test_folder_without_data_files(tmp_path):
    write(tmp_path / "notes.txt", "hi")
    with pytest.raises(UserError, match="no data files in this folder"):
        list(read_rows(tmp_path))


def test_missing_file_and_unsupported_type(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file or folder"):
        list(read_rows(tmp_path / "nope.jsonl"))
    with pytest.raises(
        UserError,
        match=r"d\.xml: unsupported file type '\.xml' \(expected \.json, \.jsonl, \.csv, \.parquet, \.txt\)",
    ):
        list(read_rows(write(tmp_path / "d.xml", "hello")))


def test_unreachable_hub_is_a_clear_user_error(monkeypatch):
    # A stand-in for `datasets` that fails the way it does offline: no network is touched.
    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/data' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError) as e:
        list(read_hub("org/data"))
    assert str(e.value).startswith(
        "org/data: could not load this dataset from the Hugging Face hub: the hub is unreachable"
    )
    assert "Couldn't reach 'org/data'" in str(e.value)


def test_hub_rows_are_located_by_index(monkeypatch):
    calls = []

    def load_dataset(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return [{"text": "a"}, {"text": "b"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(read_hub("org/data", subset="en", split="test")) == [
        ("org/data:row 0", {"text": "a"}),
        ("org/data:row 1", {"text": "b"}),
    ]
    assert calls == [("org/data", {"name": "en", "data_dir": None, "split": "test", "revision": None})]


def test_a_symlink_loop_is_named_as_such_not_as_a_missing_file(tmp_path):
    (tmp_path / "a.jsonl").symlink_to(tmp_path / "b.jsonl")
    (tmp_path / "b.jsonl").symlink_to(tmp_path / "a.jsonl")
    with pytest.raises(UserError, match=r"a\.jsonl: is a symlink loop"):
        list(read_rows(tmp_path / "a.jsonl"))
    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "nothing.jsonl")
    with pytest.raises(UserError, match=r"gone\.jsonl: is a broken symlink"):
        list(read_rows(tmp_path / "gone.jsonl"))
