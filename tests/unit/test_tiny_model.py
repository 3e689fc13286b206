"""The tiny model builder: a standard HF folder that loads, runs and generates offline."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tunelab.data.templates import BUILTIN_TEMPLATES
from tunelab.errors import UserError
from tunelab.models.tiny import build_tiny_llama, tiny_corpus

TEXTS = ["Hello, world!", "naïve café — 漢字 🙂 ∑x²", 'def f(x):\n    return {"a": [1, 2.5, None]}\n', "\t \n\r\x00"]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_folder_contents_and_config(tiny_model_dir: Path) -> None:
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja"} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (64, 2, 1000)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (None, 0, 0)
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]  # for readers that predate rope_parameters
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, 0]
    tok_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["chat_template"] == BUILTIN_TEMPLATES["chatml"].source


@pytest.mark.parametrize("loader", [AutoTokenizer, PreTrainedTokenizerFast])
def test_tokenizer_loads_and_round_trips(tiny_model_dir: Path, loader) -> None:
    tok = loader.from_pretrained(tiny_model_dir)
    assert len(tok) == 1000
    assert tok.bos_token is None
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("<|endoftext|>", 0, 0)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tok.all_special_ids == [0, 1, 2]
    assert tok.decode([1, 300, 2, 0], skip_special_tokens=True) == tok.decode([300])
    assert tok.chat_template == BUILTIN_TEMPLATES["chatml"].source
    for text in TEXTS:
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("<|im_start|>user\nhi<|im_end|>")["input_ids"][:1] == [1]
    # The vocabulary learned real merges: common words and code are a few tokens, not one per byte.
    assert len(tok("The quick answer is 42.")["input_ids"]) < 12


def test_model_runs_and_generates(tiny_model_dir: Path, model) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["Hello there, how are you?"], return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (1, batch["input_ids"].shape[1], 1000)
    assert torch.isfinite(out.logits).all()
    assert abs(out.loss.item() - math.log(1000)) < 1.0  # random init: close to uniform over the vocabulary

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    generated = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]


def test_seeded_and_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = build_tiny_llama(tmp_path / "a", hidden=64, layers=2, heads=4, vocab=1000)
    assert torch.equal(torch.rand(3), expected)  # building does not disturb the caller's RNG
    assert (again / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    other = build_tiny_llama(tmp_path / "b", hidden=64, layers=2, heads=4, vocab=1000, seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()


def test_grouped_query_attention_and_sizes(tmp_path: Path) -> None:
    folder = build_tiny_llama(tmp_path / "gqa", hidden=32, layers=1, heads=4, kv_heads=2, intermediate=48, vocab=400)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_key_value_heads == 2 and model.config.intermediate_size == 48
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(folder)) == 400


@pytest.mark.parametrize(
    "kwargs", [{"hidden": 30, "heads": 4}, {"heads": 4, "kv_heads": 3}, {"vocab": 100}, {"layers": 0}]
)
def test_invalid_sizes(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(UserError, match="tiny model"):
        build_tiny_llama(tmp_path, **kwargs)


def test_corpus_is_deterministic_and_varied() -> None:
    docs = tiny_corpus(50_000)
    assert docs == tiny_corpus(50_000)
    text = "\n".join(docs)
    assert len(text) >= 50_000
    for marker in ("def ", "return", '{"', '": ', "SELECT", "0", "?", "\n\n"):
        assert marker in text
    # Some accented Latin and some CJK / emoji, so byte-level merges see multi-byte text.
    assert any(0x80 <= ord(c) < 0x250 for c in text) and any(ord(c) > 0x3000 for c in text)


def test_network_access_fails_the_test() -> None:
    # conftest's guard: tests (and the tiny model they build) never need the network.
    with pytest.raises(pytest.fail.Exception, match="offline"):
        socket.create_connection(("192.0.2.1", 80), timeout=0.1)
