"""Data kinds (data/kinds.py): what each kind declares, and the prompts kind that rollout methods read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tunelab.config.schema import DataConfig, DatasetSpec
from tunelab.data.formats import RowError
from tunelab.data.kinds import KINDS, PAIRS, PROMPTS, TEXT, get_kind, kind_for_format
from tunelab.data.load import load_conversations
from tunelab.data.prepare import prepare_data
from tunelab.data.preview import render_preview
from tunelab.data.templates import resolve_template
from tunelab.data.tokenize import EncodedPair, EncodedPrompt, encode_pair, encode_prompt
from tunelab.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chatml(tok):
    return resolve_template("chatml", tok)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_every_kind_declares_its_shape():
    assert set(KINDS) == {"chat", "text", "pairs", "kto", "prompts"}
    assert {k.name for k in KINDS.values() if k.pack is not None} == {"chat", "text", "pairs"}
    assert {k.name: k.sequences_per_row for k in KINDS.values()} == {
        "chat": 1, "text": 1, "pairs": 2, "kto": 1, "prompts": 1}
    assert [k.name for k in KINDS.values() if k.text_format] == ["text"]
    assert [k.name for k in KINDS.values() if k.ranking] == ["pairs"]
    assert get_kind("pairs") is PAIRS and get_kind(PAIRS) is PAIRS
    assert kind_for_format("pairs", "text") is TEXT and kind_for_format("pairs", "auto") is PAIRS
    with pytest.raises(ValueError, match="data kind must be one of chat, text, pairs, kto, prompts"):
        get_kind("pair")


def test_prompt_rows_in_every_format_carry_their_other_columns():
    row = {"instruction": "Q", "input": "x", "system": "S", "history": [["h1", "a1"]], "output": "ref",
           "answer": 42, "tests": ["assert f(1) == 2"]}
    conv = PROMPTS.read("alpaca", row, {}, {})
    assert conv.messages == [{"role": "system", "content": "S"}, user("h1"), {"role": "assistant", "content": "a1"},
                             user("Q\nx")]
    # an alpaca output is not part of the prompt: it travels as a column (a reference answer for a reward)
    assert conv.extra == {"output": "ref", "answer": 42, "tests": ["assert f(1) == 2"]}
    conv = PROMPTS.read("openai", {"messages": [user("hi")], "solution": "s"}, {}, {})
    assert conv.messages == [user("hi")] and conv.extra == {"solution": "s"}
    sharegpt = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    conv = PROMPTS.read("sharegpt", sharegpt, {}, {})  # an sft row: the prompt up to its answer, as LF's ppo reads it
    assert conv.messages == [user("a")] and conv.extra == {"response": "b"}
    with pytest.raises(RowError, match=r"conversations\[0\].from: expected human or observation at this position"):
        PROMPTS.read("sharegpt", {"conversations": [{"from": "gpt", "value": "b"}]}, {}, {})
    with pytest.raises(RowError, match="format text has no prompts"):
        PROMPTS.read("text", {"text": "t"}, {}, {})


def test_prompts_encode_as_the_generation_prompt_cut_from_the_left(tok, chatml):
    cfg = DataConfig(max_length=4096)
    conv = PROMPTS.read("alpaca", {"instruction": "Name a colour", "answer": "blue"}, {}, {})
    enc = PROMPTS.encode(conv, tok, chatml, cfg)
    assert isinstance(enc, EncodedPrompt) and not enc.truncated
    assert enc.prompt_ids == encode_prompt(conv.messages, tok, chatml)  # what chat generates from
    assert enc.extra == {"answer": "blue"} and enc.num_trained == 0 and PROMPTS.keep(enc)
    short = PROMPTS.encode(conv, tok, chatml, DataConfig(max_length=5))
    assert short.truncated and short.prompt_ids == enc.prompt_ids[-5:]  # the generation prompt stays


def test_prompt_batches_are_left_padded(tok, chatml):
    rows = [EncodedPrompt([5, 6, 7], False), EncodedPrompt([8], False)]
    batch = PROMPTS.batch(rows, "padding_free", pad_id=0, max_length=64)  # prompts never pack
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]] and "labels" not in batch


def test_values_on_rows_come_with_the_batch_in_sequence_order(tok, chatml):
    """Values a method stored on rows (DPO's precomputed reference) reach the batch one per sequence: for pairs the
    chosen sequences first, then the rejected ones, as the batch's rows are laid out, packed or padded."""
    conv = PAIRS.read("alpaca", {"instruction": "Q", "chosen": "good", "rejected": "bad"}, {}, {})
    pairs = [encode_pair(conv, tok, chatml, max_length=64) for _ in range(3)]
    for i, pair in enumerate(pairs):
        pair.values["ref"] = (float(i), 10.0 + i)
    for packing in ("none", "padding_free"):
        batch = PAIRS.batch(pairs, packing, pad_id=0, max_length=64)
        assert batch["ref"].dtype == torch.float64 and batch["ref"].tolist() == [0, 1, 2, 10, 11, 12]
    assert isinstance(pairs[0], EncodedPair) and pairs[0] == encode_pair(conv, tok, chatml, max_length=64)


def test_prompts_load_cache_and_preview(tok, chatml, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": f"Question {i}", "answer": str(i), "meta": {"id": i}} for i in range(6)]))
    spec = DatasetSpec(path=str(path))
    rows, report = load_conversations([spec], kind="prompts")
    assert report.rows == 6 and rows[3].extra == {"answer": "3", "meta": {"id": 3}}
    cfg = DataConfig(train=[spec], template="chatml", cache_dir=str(tmp_path / "cache"), val_size=0)
    first = prepare_data(cfg, tok, kind="prompts", seed=0)
    again = prepare_data(cfg, tok, kind="prompts", seed=0)
    assert not first.cached and again.cached
    assert [(r.prompt_ids, r.extra, r.source) for r in again.train] == \
        [(r.prompt_ids, r.extra, r.source) for r in first.train]
    assert "6 train / 0 validation prompts" in "\n".join(first.lines)
    shown = render_preview(first.train[0], tok, color=False)
    assert "prompt (generation starts after it):" in shown and "Question 0" in shown
    assert 'answer="0"' in shown and "prompt tokens:" in shown


def test_a_dataset_of_another_shape_names_what_the_kind_needs(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"text": "plain"}) + "\n")
    with pytest.raises(UserError, match="format text is for method pt; this method trains on prompts"):
        load_conversations([DatasetSpec(path=str(path), format="text")], kind="prompts")


def test_llamafactory_sft_entries_serve_as_prompts_as_its_ppo_stage_reads_them():
    """LLaMA-Factory's ppo stage reads ordinary sft datasets and drops each row's answer: a turn list that ends with
    an assistant turn is a prompt up to that turn, and the dropped answer travels as the column `response`
    (alpaca's `output` travels under its own name)."""
    fixtures = Path(__file__).parents[1] / "fixtures" / "data" / "dataset_info.json"
    rows, report = load_conversations([DatasetSpec(name="sharegpt_demo", registry=str(fixtures))], kind="prompts")
    assert report.rows > 0 and all(r.messages[-1]["role"] in ("user", "tool") for r in rows)
    assert rows[0].messages == [user("Hi")] and rows[0].extra["response"] == "Hello! How can I help?"
    rows, _ = load_conversations([DatasetSpec(name="alpaca_demo", registry=str(fixtures))], kind="prompts")
    assert rows[0].messages == [user("Say hello.")] and rows[0].extra == {"output": "Hello!"}
