"""The tokenization cache: hits on identical inputs, misses on any change, identical rows, parallel workers."""

from __future__ import annotations

import json

import pytest

from tests.helpers import alpaca_rows
from tunelab.config.schema import DataConfig, DatasetSpec, ModelConfig
from tunelab.data.prepare import prepare_data
from tunelab.models.load import load_tokenizer


@pytest.fixture()
def setup(tmp_path, tiny_model_dir):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(alpaca_rows(40)))
    tok = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    cfg = DataConfig(train=[DatasetSpec(path=str(data))], val_size=0.1, max_length=64, cache_dir=str(tmp_path / "c"))
    return cfg, tok, data


def _rows(p):
    return [(r.input_ids, r.labels, r.truncated, r.source) for r in p.train + p.val]


def test_second_run_hits_the_cache_with_identical_rows(setup):
    cfg, tok, _ = setup
    first = prepare_data(cfg, tok, kind="chat", seed=1)
    second = prepare_data(cfg, tok, kind="chat", seed=1)
    assert not first.cached and second.cached
    assert _rows(first) == _rows(second) and first.stats == second.stats
    assert any("from the cache" in line for line in second.lines)
    assert any("tokenized in" in line for line in first.lines)


@pytest.mark.parametrize("change", ["file", "max_length", "mask", "seed", "template", "tokenizer"])
def test_any_input_change_misses(setup, change):
    cfg, tok, data = setup
    prepare_data(cfg, tok, kind="chat", seed=1)
    seed = 1
    if change == "file":
        rows = alpaca_rows(40)
        rows[3]["output"] = "changed"
        data.write_text(json.dumps(rows))
    elif change == "max_length":
        cfg.max_length = 48
    elif change == "mask":
        cfg.train_on_prompt = True
    elif change == "seed":
        seed = 2
    elif change == "template":
        cfg.template = "default"
    elif change == "tokenizer":
        tok.add_tokens(["<new-token>"])
    again = prepare_data(cfg, tok, kind="chat", seed=seed)
    assert not again.cached
    assert prepare_data(cfg, tok, kind="chat", seed=seed).cached


def test_batching_options_share_the_cache(setup):
    cfg, tok, _ = setup
    prepare_data(cfg, tok, kind="chat", seed=1)
    cfg.packing = "none"
    cfg.num_proc = 2
    assert prepare_data(cfg, tok, kind="chat", seed=1).cached


def test_parallel_workers_give_the_same_rows(tmp_path, tiny_model_dir):
    data = tmp_path / "big.json"
    data.write_text(json.dumps(alpaca_rows(1200)))
    tok = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    one = prepare_data(DataConfig(train=[DatasetSpec(path=str(data))], max_length=64, cache=False), tok,
                       kind="chat", seed=0)
    two = prepare_data(DataConfig(train=[DatasetSpec(path=str(data))], max_length=64, cache=False, num_proc=2), tok,
                       kind="chat", seed=0)
    assert _rows(one) == _rows(two) and len(one.train) == 1200
