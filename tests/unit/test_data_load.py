"""Loader: datasets -> conversations, bad rows reported by location, skip/error, kinds, validation split."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config.schema import DatasetSpec
from tunelab.data.load import LoadReport, dataset_name, load_conversations, split_validation
from tunelab.errors import UserError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
BAD = str(FIXTURES / "bad.jsonl")
BAD_LINES = [
    f"{BAD}:2: invalid JSON: Expecting ',' delimiter (column 45)",
    f"{BAD}:3: output: missing or empty",
    f"{BAD}:5: history[0]: expected a [question, answer] pair",
    f"{BAD}:6: expected an object with named columns, got list",
    f"{BAD}:7: output: expected a string, got number",
]


def spec(name: str, **kw) -> DatasetSpec:
    return DatasetSpec(path=str(FIXTURES / name), **kw)


def test_alpaca_file_loads_with_sources_and_report():
    rows, report = load_conversations([spec("alpaca.json")])
    path = FIXTURES / "alpaca.json"
    assert [r.source for r in rows] == [f"{path}:row 0", f"{path}:row 1", f"{path}:row 2"]
    assert rows[0].messages == [
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert report == LoadReport(rows=3, bad=[], skipped=0, per_dataset={str(path): 3})


def test_csv_rows_carry_line_locations():
    rows, _ = load_conversations([spec("alpaca.csv")])
    path = FIXTURES / "alpaca.csv"
    assert [r.source for r in rows] == [f"{path}:2", f"{path}:3", f"{path}:5"]
    assert rows[1].messages[-1] == {"role": "assistant", "content": "Line one\nLine two"}


def test_several_datasets_are_concatenated_in_order():
    rows, report = load_conversations(
        [spec("sharegpt.jsonl"), spec("alpaca.json", max_samples=2), spec("openai.jsonl")]
    )
    assert report.rows == len(rows) == 3 + 2 + 2
    assert list(report.per_dataset.values()) == [3, 2, 2]
    files = ["sharegpt.jsonl"] * 3 + ["alpaca.json"] * 2 + ["openai.jsonl"] * 2
    assert [Path(r.source.rsplit(":", 1)[0]).name for r in rows] == files
    assert rows[2].tools == [
        {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]


def test_bad_rows_stop_the_run_with_every_location_counted():
    with pytest.raises(UserError) as e:
        load_conversations([spec("bad.jsonl", format="alpaca")])
    assert e.value.message == "5 invalid row(s) in the training data; fix them or set data.on_bad_row=skip"
    assert e.value.details == BAD_LINES


def test_error_details_list_the_first_ten(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join('{"instruction": "q"}\n' for _ in range(12)))
    with pytest.raises(UserError) as e:
        load_conversations([DatasetSpec(path=str(path))])
    assert e.value.message.startswith("12 invalid row(s)")
    assert e.value.details == [f"{path}:{n}: output: missing or empty" for n in range(1, 11)]


def test_skip_drops_bad_rows_and_reports_them():
    rows, report = load_conversations([spec("bad.jsonl")], on_bad_row="skip")  # format auto: alpaca
    assert [r.source for r in rows] == [f"{BAD}:1", f"{BAD}:8"]
    assert rows[1].messages == [
        {"role": "user", "content": "Another fine row."},
        {"role": "assistant", "content": "Fine."},
    ]
    assert report == LoadReport(rows=2, bad=BAD_LINES, skipped=5, per_dataset={BAD: 2})


def test_max_samples_counts_the_first_rows_read_bad_ones_included():
    rows, report = load_conversations([spec("bad.jsonl", max_samples=3)], on_bad_row="skip")
    assert [r.source for r in rows] == [f"{BAD}:1"]
    assert report.bad == BAD_LINES[:2]


def test_chat_kind_refuses_text_format():
    with pytest.raises(UserError, match=r"text\.jsonl: format text is for method pt"):
        load_conversations([spec("text.jsonl")])  # detected as text
    with pytest.raises(UserError, match=r"text\.jsonl: format text is for method pt"):
        load_conversations([spec("text.jsonl", format="text")])


def test_text_kind_takes_text_rows_and_conversations():
    rows, report = load_conversations(
        [spec("text.jsonl"), spec("sharegpt.jsonl", max_samples=1)], kind="text"
    )
    assert rows[0].text == "The quick brown fox jumps over the lazy dog." and rows[0].messages == []
    assert rows[2].text is None and rows[2].messages[-1] == {
        "role": "assistant",
        "content": "Hello! How can I help?",
    }
    assert report.rows == 3


def test_empty_and_all_skipped_datasets_are_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match=rf"^no usable rows in dataset\(s\): {empty} \(no rows\)$"):
        load_conversations([spec("alpaca.json"), DatasetSpec(path=str(empty))])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "q"}\n')
    with pytest.raises(UserError) as e:
        load_conversations([DatasetSpec(path=str(broken)), DatasetSpec(path=str(empty))], on_bad_row="skip")
    assert (
        e.value.message == f"no usable rows in dataset(s): {broken} (all 1 rows invalid), {empty} (no rows)"
    )
    assert e.value.details == [f"{broken}:1: output: missing or empty"]


def test_undetectable_format_names_the_first_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('not json\n{"question": "q", "answer": "a"}\n')
    with pytest.raises(
        UserError, match=rf"^{path}:2: cannot detect the format from the columns \['answer', 'question'\]"
    ):
        load_conversations([DatasetSpec(path=str(path))])


def test_columns_remapping_reaches_the_converter(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "Why?", "a": "Because."}\n')
    rows, _ = load_conversations([DatasetSpec(path=str(path), columns={"prompt": "q", "response": "a"})])
    assert rows[0].messages == [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
    ]


def test_dataset_name():
    assert dataset_name(DatasetSpec(path="data/train.jsonl")) == "data/train.jsonl"
    assert dataset_name(DatasetSpec(name="alpaca_en", registry="data/dataset_info.json")) == "alpaca_en"


# ---------------------------------------------------------------------------------------------------------- split
def test_split_fraction_and_count_are_deterministic_and_complete():
    rows = list(range(20))
    train, val = split_validation(rows, 0.25, seed=1)
    assert len(val) == 5 and len(train) == 15
    assert sorted(train + val) == rows
    assert train == sorted(train) and val == sorted(val)  # original order kept within each part
    assert split_validation(rows, 0.25, seed=1) == (train, val)
    assert split_validation(rows, 0.25, seed=2) != (train, val)
    train, val = split_validation(rows, 3, seed=1)
    assert (len(train), len(val)) == (17, 3)


def test_split_sizes_round_up_but_ignore_float_noise():
    # A fraction > 0 holds out at least one row.
    assert len(split_validation(list(range(10)), 0.01, seed=0)[1]) == 1
    assert len(split_validation(list(range(100)), 0.07, seed=0)[1]) == 7  # 100 * 0.07 == 7.000000000000001


def test_split_zero_keeps_everything():
    assert split_validation([1, 2, 3], 0.0, seed=0) == ([1, 2, 3], [])
    assert split_validation([1], 0, seed=0) == ([1], [])


def test_split_needs_enough_rows():
    with pytest.raises(
        UserError, match=r"^data\.val_size=0\.1 needs at least 2 rows to hold some out; the data has 1$"
    ):
        split_validation([1], 0.1, seed=0)
    with pytest.raises(
        UserError, match=r"^data\.val_size=3 would hold out 3 of 3 rows, leaving none to train on$"
    ):
        split_validation([1, 2, 3], 3, seed=0)
