"""benchmarks/compression.py's corpus helpers: the held-out split and the rows it cuts from each file."""

import importlib.util
import sys

import pytest

from tests.helpers import ROOT

_spec = importlib.util.spec_from_file_location("compression_benchmark", ROOT / "benchmarks" / "compression.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


class WordTokenizer:
    """One token per whitespace-separated word (and one for a line of spaces only), like a tokenizer's call."""

    def __call__(self, lines, add_special_tokens=False):
        return {"input_ids": [[0] * max(1, len(line.split())) for line in lines]}


def test_rows_are_consecutive_lines_within_the_limit():
    text = "".join(f"w{i} " * (1 + i % 4) + "\n" for i in range(40))
    rows = bench.rows_of(text, WordTokenizer(), limit=7)
    assert "".join(rows) == text  # every line once, in order
    for row in rows:
        assert sum(len(line.split()) for line in row.splitlines()) <= 7
    # greedy: a row ends only where the next line would not fit
    for row, nxt in zip(rows, rows[1:]):
        assert sum(len(line.split()) for line in row.splitlines()) + len(nxt.splitlines()[0].split()) > 7


def test_a_line_longer_than_the_limit_is_a_row_of_its_own():
    text = "a\n" + "b " * 20 + "\nc\n"
    assert bench.rows_of(text, WordTokenizer(), limit=5) == ["a\n", "b " * 20 + "\n", "c\n"]


def test_blank_rows_are_dropped():
    assert bench.rows_of("\n\n", WordTokenizer(), limit=1) == []


def test_the_held_out_split_is_fixed_by_the_path_and_about_one_in_twenty():
    paths = [f"pkg{i // 50}/mod{i}.py" for i in range(2000)]
    held = [p for p in paths if bench.held_out(p)]
    assert held == [p for p in paths if bench.held_out(p)]  # a hash, not a random draw
    assert 60 <= len(held) <= 140  # binomial(2000, 1/20): mean 100, sd ~10
    assert bench.held_out("json/decoder.py") == bench.held_out("json/decoder.py")


def test_every_variant_has_its_own_folder_and_a_known_command():
    names = [name for name, _, _ in bench.variants(bench.FULL)]
    assert len({bench.slug(n) for n in names}) == len(names)
    assert {cmd for _, cmd, _ in bench.variants(bench.FULL)} == {"prune", "quantize", "lowrank"}


def test_an_unknown_stage_is_refused(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main(["--only", "pretrian", "--cache", str(tmp_path / "unused")])
    assert e.value.code == 2 and "pretrian" in capsys.readouterr().err
    assert not (tmp_path / "unused").exists()
