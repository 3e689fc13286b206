"""Preference (pairs) and KTO data: formats, registry declarations, bad rows, tokenization, truncation, cache,
collation, streaming and preview."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.unit.test_tokenize import trained_runs
from tunelab.config.schema import DataConfig, DatasetSpec
from tunelab.data.collate import collate_kto, collate_pairs
from tunelab.data.conversation import Conversation
from tunelab.data.formats import check_mapping
from tunelab.data.kinds import KINDS
from tunelab.data.load import load_conversations
from tunelab.data.prepare import prepare_data, prepare_stream
from tunelab.data.preview import render_preview, token_counts
from tunelab.data.templates import resolve_template
from tunelab.data.tokenize import IGNORE_INDEX, Encoded, EncodedKTO, EncodedPair, encode_kto, encode_pair
from tunelab.errors import UserError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data" / "preference"
REGISTRY = str(FIXTURES / "dataset_info.json")


def convert(fmt, row, columns, tags, kind):
    """A row read as data kind `kind` reads it."""
    return KINDS[kind].read(fmt, row, columns, tags)


def named(name: str) -> DatasetSpec:
    return DatasetSpec(name=name, registry=REGISTRY)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def trained_text(ids: list[int], labels: list[int], tok) -> list[str]:
    return trained_runs(Encoded(ids, labels, False), tok)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chatml(tok):
    return resolve_template("chatml", tok)


# ---------------------------------------------------------------------------------------------------------- formats
def test_alpaca_pair_keeps_system_and_history():
    row = {"instruction": "Q", "input": "x", "system": "S", "history": [["h1", "a1"]], "chosen": "good", "rejected": "bad"}
    conv = convert("alpaca", row, {}, {}, "pairs")
    assert conv.messages == [
        {"role": "system", "content": "S"}, user("h1"), assistant("a1"), user("Q\nx"),
    ]
    assert conv.chosen == assistant("good") and conv.rejected == assistant("bad")
    assert conv.is_pair and conv.with_answer("rejected")[-1] == assistant("bad")


def test_alpaca_pair_remapped_columns():
    row = {"q": "Q", "better": "good", "worse": "bad"}
    conv = convert("alpaca", row, {"prompt": "q", "chosen": "better", "rejected": "worse"}, {}, "pairs")
    assert conv.messages == [user("Q")] and conv.chosen == assistant("good")


def test_sharegpt_pair_with_objects_strings_and_function_calls():
    row = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "w", "arguments": {}}'},
            {"from": "observation", "value": "sunny"},
        ],
        "chosen": {"from": "gpt", "value": "Sunny."},
        "rejected": "Rainy.",
    }
    conv = convert("sharegpt", row, {}, {}, "pairs")
    assert [m["role"] for m in conv.messages] == ["user", "assistant", "tool"]
    assert conv.chosen == assistant("Sunny.") and conv.rejected == assistant("Rainy.")
    calls = convert("sharegpt", {**row, "rejected": {"from": "function_call", "value": '{"name": "w"}'}}, {}, {}, "pairs")
    assert calls.rejected["tool_calls"][0]["function"]["name"] == "w"


def test_openai_pair_with_tool_calls_answer():
    row = {
        "messages": [{"role": "system", "content": "S"}, user("a"), assistant("b"), user("c")],
        "chosen": {"role": "assistant", "content": "d"},
        "rejected": {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    }
    conv = convert("openai", row, {}, {}, "pairs")
    assert conv.messages == [{"role": "system", "content": "S"}, user("a"), assistant("b"), user("c")]
    assert conv.rejected["tool_calls"] == [{"type": "function", "function": {"name": "f", "arguments": {}}}]


def test_kto_rows_every_format():
    conv = convert("alpaca", {"instruction": "Q", "output": "A", "kto_tag": False}, {}, {}, "kto")
    assert conv.messages == [user("Q"), assistant("A")] and conv.label is False
    conv = convert("openai", {"messages": [user("Q"), assistant("A")], "ok": "TRUE"}, {"kto_tag": "ok"}, {}, "kto")
    assert conv.label is True
    conv = convert("sharegpt", {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                                "kto_tag": True}, {}, {}, "kto")
    assert conv.label is True and conv.messages[-1] == assistant("A")


def test_check_mapping_knows_the_preference_columns_only_for_their_kind():
    check_mapping("sharegpt", {"chosen": "c", "rejected": "r"}, {}, "d", KINDS["pairs"].columns)
    check_mapping("alpaca", {"kto_tag": "label"}, {}, "d", KINDS["kto"].columns)
    with pytest.raises(UserError, match=r"^d: columns\.chosen: preference pairs need a preference method"):
        check_mapping("sharegpt", {"chosen": "c"}, {}, "d", KINDS["chat"].columns)
    with pytest.raises(UserError, match=r"^d: columns\.kto_tag: KTO labels need the kto method"):
        check_mapping("sharegpt", {"kto_tag": "label"}, {}, "d", KINDS["pairs"].columns)


# --------------------------------------------------------------------------------------------- registry and loading
def test_registry_ranking_sharegpt_keeps_multi_turn_history():
    rows, report = load_conversations([named("dpo_sharegpt")], kind="pairs")
    assert report.rows == 2 and report.per_dataset == {"dpo_sharegpt": 2}
    first = rows[0]
    assert first.messages == [
        {"role": "system", "content": "You are terse."}, user("What is 2+2?"), assistant("4."), user("And 3+3?"),
    ]
    assert first.chosen == assistant("6.") and first.rejected == assistant("Seven, I think.")
    assert first.source.endswith("dpo_sharegpt.json:row 0")


def test_registry_ranking_alpaca_with_remapped_answer_columns():
    rows, _ = load_conversations([named("dpo_alpaca")], kind="pairs")
    assert rows[0].messages == [
        {"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Translate to French\ncat"),
    ]
    assert (rows[0].chosen["content"], rows[0].rejected["content"]) == ("chat", "chien")
    assert rows[1].source.endswith("dpo_alpaca.jsonl:2")


def test_registry_kto_tag():
    rows, _ = load_conversations([named("kto_openai")], kind="kto")
    assert [r.label for r in rows] == [True, False]
    assert rows[1].messages == [user("Is fire cold?"), assistant("Yes, very.")]


def test_ranking_entries_refused_by_other_kinds_and_kto_columns_refused_by_sft():
    with pytest.raises(UserError, match=r"^dpo_sharegpt: a ranking \(preference\) dataset"):
        load_conversations([named("dpo_sharegpt")], kind="chat")
    with pytest.raises(UserError, match=r"^dpo_sharegpt: a ranking \(preference\) dataset; this method \(data kind kto\)"):
        load_conversations([named("dpo_sharegpt")], kind="kto")
    with pytest.raises(UserError, match=r"^kto_openai: columns\.kto_tag: KTO labels need the kto method"):
        load_conversations([named("kto_openai")], kind="chat")


def test_text_format_refused_for_pairs(tmp_path):
    data = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(UserError, match="format text is for method pt"):
        load_conversations([DatasetSpec(path=data)], kind="pairs")


def test_bad_pair_rows_give_file_line_reason(tmp_path):
    good = {"conversations": [{"from": "human", "value": "Q"}], "chosen": "A", "rejected": "B"}
    rows = [
        good,
        {**good, "chosen": None},
        {"conversations": good["conversations"], "chosen": "A"},
        {**good, "rejected": "A"},
        {**good, "chosen": "  "},
        {**good, "chosen": {"from": "gpt", "value": ""}},
        {**good, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {**good, "chosen": {"from": "human", "value": "A"}},
        {**good, "rejected": 3},
    ]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    loaded, report = load_conversations([DatasetSpec(path=path, format="sharegpt")], kind="pairs", on_bad_row="skip")
    assert len(loaded) == 1
    assert report.bad == [
        f"{path}:2: chosen: missing",
        f"{path}:3: rejected: missing",
        f"{path}:4: chosen and rejected: identical answers (nothing to prefer)",
        f"{path}:5: chosen: empty response",
        f"{path}:6: chosen.value: empty response",
        f"{path}:7: conversations: ends with a 'gpt' turn; a preference prompt must end with human or observation "
        "(chosen and rejected are the answers to it)",
        f"{path}:8: chosen.from: expected gpt or function_call, got 'human'",
        f"{path}:9: rejected: expected an assistant message object or a string, got number",
    ]


def test_bad_alpaca_pair_rows(tmp_path):
    rows = [
        {"instruction": "Q", "chosen": "A", "rejected": "B"},
        {"instruction": "Q", "chosen": {"content": "A"}, "rejected": "B"},
        {"instruction": "", "chosen": "A", "rejected": "B"},
        {"instruction": "Q", "chosen": "A"},
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    _, report = load_conversations([DatasetSpec(path=path)], kind="pairs", on_bad_row="skip")
    assert report.bad == [
        f"{path}:2: chosen: expected a string, got object",
        f"{path}:3: instruction: missing or empty",
        f"{path}:4: rejected: missing",
    ]


def test_bad_kto_rows(tmp_path):
    turns = [user("Q"), assistant("A")]
    rows = [
        {"messages": turns, "kto_tag": True},
        {"messages": turns},
        {"messages": turns, "kto_tag": "maybe"},
        {"messages": turns, "kto_tag": 1},
        {"messages": [user("Q")], "kto_tag": True},
        {"messages": [user("Q"), assistant(" ")], "kto_tag": False},
    ]
    path = write_jsonl(tmp_path / "k.jsonl", rows)
    _, report = load_conversations([DatasetSpec(path=path)], kind="kto", on_bad_row="skip")
    assert report.bad == [
        f"{path}:2: kto_tag: missing (the KTO label: true for a desirable answer, false for an undesirable one)",
        f"{path}:3: kto_tag: expected true or false, got string 'maybe'",
        f"{path}:4: kto_tag: expected true or false, got number 1",
        f"{path}:5: messages: ends with a 'user' turn; the last turn must be assistant or function_call",
        f"{path}:6: messages[1].content: empty assistant message",
    ]


# ------------------------------------------------------------------------------------------------------ tokenization
PROMPT = [{"role": "system", "content": "S"}, user("What is 2+2?"), assistant("4."), user("And 3+3?")]


def test_pair_shares_prompt_ids_and_trains_only_the_answers(tok, chatml):
    conv = Conversation(PROMPT, chosen=assistant("Six."), rejected=assistant("Seven, surely."), source="f:1")
    enc = encode_pair(conv, tok, chatml, max_length=4096)
    chosen, rejected = enc.chosen, enc.rejected
    n = len(enc.prompt_ids)
    assert chosen.input_ids[:n] == rejected.input_ids[:n] == enc.prompt_ids
    # The prompt is exactly the generation prompt of the history: what the model is asked at inference.
    assert tok.decode(enc.prompt_ids) == chatml.render(PROMPT, add_generation_prompt=True)
    assert trained_text(chosen.input_ids, chosen.labels, tok) == ["Six.<|im_end|>"]
    assert trained_text(rejected.input_ids, rejected.labels, tok) == ["Seven, surely.<|im_end|>"]
    assert all(label == IGNORE_INDEX for label in chosen.labels[:n])  # the history answer "4." is not trained
    full = chatml.render([*PROMPT, assistant("Six.")])
    assert tok.decode(chosen.input_ids) == full  # same rendering as SFT, nothing added
    assert not enc.truncated and enc.source == "f:1"
    assert enc.num_trained == chosen.num_trained + rejected.num_trained
    assert pickle.loads(pickle.dumps(enc)) == enc


def test_kto_encodes_like_sft_with_only_the_last_answer_and_the_label(tok, chatml):
    conv = Conversation([*PROMPT, assistant("Six.")], label=False)
    enc = encode_kto(conv, tok, chatml, max_length=4096)
    assert isinstance(enc, EncodedKTO) and enc.desirable is False
    assert tok.decode(enc.input_ids) == chatml.render(conv.messages)
    assert trained_text(enc.input_ids, enc.labels, tok) == ["Six.<|im_end|>"]


def test_truncation_cuts_answers_first_then_the_prompt_from_the_left(tok, chatml):
    long_answer = " ".join(["word"] * 200)
    conv = Conversation(PROMPT, chosen=assistant(long_answer), rejected=assistant("Short."))
    whole = encode_pair(conv, tok, chatml, max_length=4096)
    p = len(whole.prompt_ids)

    # The prompt is at most half of max_length: only the long answer is cut, to what the prompt leaves.
    enc = encode_pair(conv, tok, chatml, max_length=2 * p + 10)
    assert enc.truncated and enc.prompt_ids == whole.prompt_ids
    assert len(enc.chosen.input_ids) == 2 * p + 10 and enc.rejected_ids == whole.rejected_ids
    assert enc.chosen_ids == whole.chosen_ids[: p + 10]

    # The prompt is long: answers keep half of max_length, the prompt loses its beginning, both stay identical.
    enc = encode_pair(conv, tok, chatml, max_length=16)
    assert enc.truncated and len(enc.chosen_ids) == 8
    assert enc.prompt_ids == whole.prompt_ids[-8:]  # the end of the prompt (generation prompt) is kept
    assert len(enc.chosen.input_ids) == 16 and len(enc.rejected.input_ids) <= 16
    assert enc.chosen.input_ids[:8] == enc.rejected.input_ids[:8]
    assert any(label != IGNORE_INDEX for label in enc.rejected_labels)


# -------------------------------------------------------------------------------------------- prepare, cache, stream
def pair_rows(n: int) -> list[dict]:
    return [
        {"instruction": f"Question {i}?", "history": [[f"hi {i}", "hello"]], "chosen": f"Answer {i}.",
         "rejected": f"Wrong {i}, " + "really " * (i % 5)}
        for i in range(n)
    ]


def test_prepare_pairs_and_cache_hit(tmp_path, tok):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(20))
    cfg = DataConfig(train=[DatasetSpec(path=data)], val_size=0.1, max_length=40, template="chatml",
                     cache_dir=str(tmp_path / "cache"))
    first = prepare_data(cfg, tok, kind="pairs", seed=3)
    assert not first.cached and len(first.train) == 18 and len(first.val) == 2
    assert all(isinstance(r, EncodedPair) for r in first.train + first.val)
    assert "preference pairs" in first.lines[-2]
    assert first.stats["truncated"] > 0  # the long rejected answers and two-turn prompts exceed 40 tokens
    second = prepare_data(cfg, tok, kind="pairs", seed=3)
    assert second.cached and second.train == first.train and second.val == first.val
    assert second.stats == first.stats
    # The kind is part of the key: the same file prepared for another kind is not this entry.
    cfg2 = DataConfig(train=[DatasetSpec(path=data)], max_length=40, template="chatml", cache_dir=str(tmp_path / "cache"))
    assert not prepare_data(cfg2, tok, kind="pairs", seed=4).cached


def test_prepare_kto_and_cache_hit(tmp_path, tok):
    cfg = DataConfig(train=[named("kto_openai")], max_length=64, template="chatml", cache_dir=str(tmp_path / "c"))
    first = prepare_data(cfg, tok, kind="kto", seed=1)
    assert [r.desirable for r in first.train] == [True, False]
    assert "1 desirable, 1 undesirable" in first.lines[-2]
    second = prepare_data(cfg, tok, kind="kto", seed=1)
    assert second.cached and second.train == first.train
    assert all(isinstance(r, EncodedKTO) for r in second.train)


def test_streaming_pairs(tmp_path, tok):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(5))
    cfg = DataConfig(train=[DatasetSpec(path=data)], max_length=64, template="chatml", streaming=True,
                     shuffle_buffer=2)
    _, stream = prepare_stream(cfg, tok, kind="pairs", seed=0)
    rows = []
    for _epoch, row in stream:
        rows.append(row)
        if len(rows) == 5:
            break
    assert sorted(r.source for r in rows) == sorted(f"{data}:{i}" for i in range(1, 6))
    assert all(isinstance(r, EncodedPair) for r in rows)


# ------------------------------------------------------------------------------------------------ collate and preview
def test_collate_pairs_layout(tok, chatml):
    convs = [
        Conversation([user("a")], chosen=assistant("yes"), rejected=assistant("no, not at all")),
        Conversation(PROMPT, chosen=assistant("6"), rejected=assistant("7")),
    ]
    pairs = [encode_pair(c, tok, chatml, max_length=4096) for c in convs]
    batch = collate_pairs(pairs, pad_id=0)
    n = len(pairs)
    width = max(p.length for p in pairs)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2 * n, width)
    assert batch["token_mask"].dtype == torch.bool
    assert batch["prompt_lengths"].tolist() == [len(p.prompt_ids) for p in pairs]
    for i, p in enumerate(pairs):
        for row, seq in ((i, p.chosen), (n + i, p.rejected)):  # chosen first half, rejected second half
            k = len(seq.input_ids)
            assert batch["input_ids"][row, :k].tolist() == seq.input_ids
            assert batch["labels"][row, :k].tolist() == seq.labels
            assert batch["attention_mask"][row].sum().item() == k
            assert (batch["labels"][row, k:] == IGNORE_INDEX).all() and (batch["input_ids"][row, k:] == 0).all()


def test_collate_kto(tok, chatml):
    rows = [encode_kto(Conversation([user("q"), assistant(a)], label=lab), tok, chatml, max_length=64)
            for a, lab in (("yes", True), ("no way", False))]
    batch = collate_kto(rows, pad_id=0)
    assert batch["desirable"].tolist() == [True, False] and batch["input_ids"].shape[0] == 2


def test_preview_shows_both_answers_and_kto_label(tok, chatml):
    conv = Conversation(PROMPT, chosen=assistant("Six."), rejected=assistant("Seven."), source="f:4")
    text = render_preview(encode_pair(conv, tok, chatml, max_length=4096), tok, color=False)
    assert text.startswith("f:4\nprompt:\n")
    assert "chosen (" in text and "[[Six.<|im_end|>]]" in text
    assert "rejected (" in text and "[[Seven.<|im_end|>]]" in text
    assert text.count("And 3+3?") == 1  # the shared prompt is shown once
    kto = encode_kto(Conversation([user("q"), assistant("a")], label=False), tok, chatml, max_length=64)
    assert render_preview(kto, tok, color=False).endswith("label: undesirable")
    assert token_counts(encode_pair(conv, tok, chatml, max_length=4096))[1] > 0


def test_row_summary_counts_pairs_and_labels():
    rows, _ = load_conversations([named("dpo_sharegpt")], kind="pairs")
    assert KINDS["pairs"].summary(rows) == ["preference pairs: 2, prompt turns per pair: min 1, max 3"]
    rows, _ = load_conversations([named("kto_openai")], kind="kto")
    assert KINDS["kto"].summary(rows)[0] == "KTO rows: 2 (1 desirable, 1 undesirable)"
