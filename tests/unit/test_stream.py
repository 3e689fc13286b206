"""Streaming: lazy reading, seeded shuffling that covers every row once per epoch, exact resume of streamed runs."""

from __future__ import annotations

import itertools
import json

import pytest

import tunelab
from tests.helpers import alpaca_rows, base_config
from tunelab.config.schema import DataConfig, DatasetSpec, ModelConfig
from tunelab.data.stream import TokenStream
from tunelab.data.templates import resolve_template
from tunelab.engine.metrics import read_metrics
from tunelab.errors import ConfigError, UserError
from tunelab.models.load import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(ModelConfig(path=str(tiny_model_dir)))


def _stream(path, tok, **kw):
    cfg = DataConfig(train=[DatasetSpec(path=str(path))], max_length=64, streaming=True, **kw)
    return TokenStream(cfg, tok, resolve_template("auto", tok), kind="chat", seed=3)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_row_once_per_epoch_in_a_seeded_order(tmp_path, tok):
    path = _write_jsonl(tmp_path / "d.jsonl", alpaca_rows(30))
    taken = list(itertools.islice(_stream(path, tok, shuffle_buffer=8), 60))
    first = [enc.source for epoch, enc in taken[:30]]
    second = [enc.source for epoch, enc in taken[30:]]
    assert [e for e, _ in taken] == [0] * 30 + [1] * 30
    assert sorted(first) == sorted(second) == sorted(f"{path}:{i}" for i in range(1, 31))
    assert first != second and first != sorted(first, key=lambda s: int(s.rsplit(":", 1)[1]))
    again = [enc.source for _, enc in itertools.islice(_stream(path, tok, shuffle_buffer=8), 30)]
    assert again == first  # deterministic: what makes resume exact


def test_reading_is_lazy(tmp_path, tok):
    rows = alpaca_rows(5000)
    rows[4000] = {"instruction": "no answer"}  # invalid, far beyond what the first steps read
    path = _write_jsonl(tmp_path / "big.jsonl", rows)
    stream = iter(_stream(path, tok, shuffle_buffer=16))
    assert len([next(stream) for _ in range(32)]) == 32
    with pytest.raises(UserError, match=r"big.jsonl:4001: output: missing or empty"):
        for _ in range(5000):
            next(stream)


def test_streaming_rules():
    with pytest.raises(ConfigError, match="val_size: not available with data.streaming"):
        tunelab.load_config({"model": {"path": "m"}, "data": {"train": [{"path": "x"}], "streaming": True,
                                                                "val_size": 0.1}})
    with pytest.raises(ConfigError, match="group_by_length needs the whole dataset"):
        tunelab.load_config({"model": {"path": "m"}, "data": {"train": [{"path": "x"}], "streaming": True,
                                                                "packing": "group_by_length"}})


def test_streamed_run_resumes_exactly(tiny_model_dir, tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", alpaca_rows(20))
    common = {"train": {"max_steps": 6, "scheduler": "constant", "save_every": 3}}

    def cfg(out, steps):
        c = base_config(tiny_model_dir, path, out, **common)
        c["data"].update(streaming=True, shuffle_buffer=5)
        c["train"]["max_steps"] = steps
        return c

    tunelab.train(cfg(tmp_path / "ref", 6), echo=False)
    tunelab.train(cfg(tmp_path / "split", 3), echo=False)  # stops (and checkpoints) at step 3
    tunelab.train(cfg(tmp_path / "split", 6), echo=False)  # resumes the stream at row 3 x 4
    ref, split = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 7))
    # the resumed run repeats the uninterrupted one's arithmetic in the same order: bitwise equal
    assert [r["loss"] for r in split] == [r["loss"] for r in ref]
    assert ref[-1]["epoch"] == 1  # 6 steps x 4 rows = 24 rows > 20: the stream went into its second epoch
    with pytest.raises(UserError, match="train.max_steps: required with data.streaming"):
        c = cfg(tmp_path / "x", 6)
        c["train"]["max_steps"] = -1
        tunelab.train(c, echo=False)
