"""Token ids and loss masks: which tokens are trained, prompt/training agreement, truncation, preview."""

from __future__ import annotations

from itertools import groupby
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunelab.data.conversation import Conversation
from tunelab.data.preview import render_preview
from tunelab.data.templates import BUILTIN_TEMPLATES, resolve_template
from tunelab.data.tokenize import IGNORE_INDEX, Encoded, encode_conversation, encode_prompt, encode_text

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, of course."},
    {"role": "user", "content": "And 3+3? Réponds vite 🙂"},
    {"role": "assistant", "content": "6 — naïvement."},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
TOOL_MESSAGES = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
    },
    {"role": "tool", "content": '{"temp": -3}'},
    {"role": "assistant", "content": "It is -3 degrees."},
]

# Control tokens of each family, added to the tiny tokenizer so that end-of-turn markers are single tokens as in
# the family's own tokenizer (see test_templates.py).
FAMILY_TOKENS: dict[str, tuple[str | None, str | None, list[str]]] = {
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "mistral": ("<s>", "</s>", ["[INST]", "[/INST]"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi": (None, None, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}
# The trained text of each answer: leading space where the template puts one after the prompt, then the end marker.
LEAD = {"default": " ", "mistral": " "}
END = {
    "default": "<|endoftext|>",
    "alpaca": "<|endoftext|>",
    "chatml": "<|im_end|>",
    "qwen": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "gemma": "<end_of_turn>",
    "phi": "<|end|>",
}


def family_tokenizer(model_dir: Path, name: str):
    bos, eos, extra = FAMILY_TOKENS.get(name, (None, None, []))
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    tok = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    if extra:
        tok.add_tokens(extra, special_tokens=True)
    return tok


def trained_runs(encoded: Encoded, tokenizer) -> list[str]:
    """The decoded text of each run of consecutive trained tokens."""
    return [
        tokenizer.decode([t for t, _ in run])
        for trained, run in groupby(zip(encoded.input_ids, encoded.labels), key=lambda p: p[1] != IGNORE_INDEX)
        if trained
    ]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def chatml(tokenizer):
    return resolve_template("chatml", tokenizer)


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_labels_cover_exactly_the_answers(tiny_model_dir: Path, name: str) -> None:
    tok = family_tokenizer(tiny_model_dir, name)
    enc = encode_conversation(Conversation(MESSAGES), tok, resolve_template(name, tok), max_length=4096)
    answers = [m["content"] for m in MESSAGES if m["role"] == "assistant"]
    assert trained_runs(enc, tok) == [LEAD.get(name, "") + a + END[name] for a in answers]
    # Labels are the ids themselves where trained (not shifted: the model shifts).
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(enc.input_ids, enc.labels))
    assert not enc.truncated


def test_mask_history_trains_only_the_last_answer(tokenizer, chatml) -> None:
    enc = encode_conversation(Conversation(MESSAGES), tokenizer, chatml, max_length=4096, mask_history=True)
    assert trained_runs(enc, tokenizer) == ["6 — naïvement.<|im_end|>"]
    full = encode_conversation(Conversation(MESSAGES), tokenizer, chatml, max_length=4096)
    assert enc.input_ids == full.input_ids


def test_train_on_prompt_trains_everything(tokenizer, chatml) -> None:
    enc = encode_conversation(Conversation(MESSAGES), tokenizer, chatml, max_length=4096, train_on_prompt=True)
    assert enc.labels == enc.input_ids
    assert tokenizer.decode(enc.input_ids) == chatml.render(MESSAGES)


def test_truncation_from_the_right(tokenizer, chatml) -> None:
    full = encode_conversation(Conversation(MESSAGES, source="f.jsonl:3"), tokenizer, chatml, max_length=4096)
    cut = encode_conversation(Conversation(MESSAGES, source="f.jsonl:3"), tokenizer, chatml, max_length=20)
    assert cut.truncated and cut.source == "f.jsonl:3"
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    # Cut before the first answer: nothing left to train on (the caller drops and reports such rows).
    assert cut.num_trained == 0
    exact = encode_conversation(Conversation(MESSAGES), tokenizer, chatml, max_length=len(full.input_ids))
    assert not exact.truncated


def test_system_default_only_when_missing(tokenizer, chatml) -> None:
    no_system = Conversation(MESSAGES[1:])
    enc = encode_conversation(no_system, tokenizer, chatml, max_length=4096, system="Be kind.")
    assert tokenizer.decode(enc.input_ids).startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n")
    enc = encode_conversation(Conversation(MESSAGES), tokenizer, chatml, max_length=4096, system="Be kind.")
    assert "Be kind." not in tokenizer.decode(enc.input_ids)
    prompt = encode_prompt(MESSAGES[1:2], tokenizer, chatml, system="Be kind.")
    assert tokenizer.decode(prompt).startswith("<|im_start|>system\nBe kind.")


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_prompt_is_prefix_of_training_ids(tokenizer, name: str) -> None:
    # With the plain tiny tokenizer, where most families' markers are ordinary text that BPE may merge.
    template = resolve_template(name, tokenizer)
    enc = encode_conversation(Conversation(MESSAGES), tokenizer, template, max_length=4096)
    prompt = encode_prompt(MESSAGES[:-1], tokenizer, template)
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[len(prompt) - 1] == IGNORE_INDEX and enc.labels[len(prompt)] != IGNORE_INDEX
    first_prompt = encode_prompt(MESSAGES[:2], tokenizer, template)
    assert enc.input_ids[: len(first_prompt)] == first_prompt


@pytest.mark.parametrize("name", ["default", "chatml", "qwen", "llama3"])
def test_tool_conversations(tokenizer, name: str) -> None:
    template = resolve_template(name, tokenizer)
    enc = encode_conversation(Conversation(TOOL_MESSAGES, tools=TOOLS), tokenizer, template, max_length=4096)
    runs = trained_runs(enc, tokenizer)
    assert len(runs) == 2 and '"get_weather"' in runs[0] and runs[1].endswith("It is -3 degrees." + END[name])
    prompt = encode_prompt(TOOL_MESSAGES[:-1], tokenizer, template, tools=TOOLS)
    assert enc.input_ids[: len(prompt)] == prompt


def test_answer_boundary_is_a_token_boundary(tokenizer, chatml) -> None:
    # An answer that starts with indentation: tokenizing the whole text at once merges the prompt's final newline
    # with the answer's spaces into one token, so the prompt alone would tokenize differently. The cut at the span
    # start keeps training and inference on the same ids.
    messages = [{"role": "user", "content": "Indent it."}, {"role": "assistant", "content": "    return x"}]
    enc = encode_conversation(Conversation(messages), tokenizer, chatml, max_length=4096)
    prompt = encode_prompt(messages[:1], tokenizer, chatml)
    joint = tokenizer(chatml.render(messages), add_special_tokens=False)["input_ids"]
    assert joint[: len(prompt)] != prompt  # the naive joint tokenization breaks the prefix property here
    assert enc.input_ids[: len(prompt)] == prompt
    assert trained_runs(enc, tokenizer) == ["    return x<|im_end|>"]


def test_ids_equal_plain_tokenization_when_markers_are_special(tokenizer, chatml) -> None:
    enc = encode_conversation(Conversation(MESSAGES), tokenizer, chatml, max_length=4096)
    assert enc.input_ids == tokenizer(chatml.render(MESSAGES), add_special_tokens=False)["input_ids"]


def test_tokenizer_that_prepends_a_space(tiny_model_dir: Path) -> None:
    # Like SentencePiece's dummy prefix: every encoded string gets a leading space, so cutting the text would insert
    # spaces. Such tokenizers are tokenized whole and tokens go to the side of the boundary they start on.
    from tokenizers import pre_tokenizers

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    template = resolve_template("chatml", tok)
    enc = encode_conversation(Conversation(MESSAGES), tok, template, max_length=4096)
    assert enc.input_ids == tok(template.render(MESSAGES), add_special_tokens=False)["input_ids"]
    assert trained_runs(enc, tok) == ["4, of course.<|im_end|>", "6 — naïvement.<|im_end|>"]
    prompt = encode_prompt(MESSAGES[:-1], tok, template)
    assert enc.input_ids[: len(prompt)] == prompt


def test_encode_text(tokenizer) -> None:
    text = "Plain text for pre-training: ünïcödé, 漢字, 🙂."
    enc = encode_text(Conversation(text=text, source="t.txt:1"), tokenizer, max_length=4096)
    assert enc.input_ids == tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert enc.labels == enc.input_ids and not enc.truncated and enc.source == "t.txt:1"
    assert tokenizer.decode(enc.input_ids) == text + "<|endoftext|>"
    short = encode_text(Conversation(text=text), tokenizer, max_length=5)
    assert short.truncated and short.input_ids == enc.input_ids[:5]


def test_preview_markers_and_colour(tokenizer, chatml) -> None:
    enc = encode_conversation(Conversation(MESSAGES[:3], source="data.jsonl:7"), tokenizer, chatml, max_length=4096)
    plain = render_preview(enc, tokenizer, color=False)
    assert plain.startswith("data.jsonl:7\n<|im_start|>system\nYou are terse.<|im_end|>")
    assert "<|im_start|>assistant\n[[4, of course.<|im_end|>]]\n" in plain
    assert plain.endswith(f"\ntokens: {len(enc.input_ids)}, trained: {enc.num_trained}, truncated: no")
    coloured = render_preview(enc, tokenizer, color=True)
    assert "\x1b[32m4, of course.<|im_end|>\x1b[0m" in coloured and "[[" not in coloured
