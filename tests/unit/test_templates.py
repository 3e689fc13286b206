"""Chat templates: exact renderings per family, assistant spans, tools, resolution by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from tunelab.config.schema import DataConfig
from tunelab.data.templates import BUILTIN_TEMPLATES, ChatTemplate, resolve_template
from tunelab.errors import UserError

DOCS = Path(__file__).resolve().parents[2] / "docs" / "data.md"

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6."},
]

# Each family's bos / eos / control tokens, added to the tiny tokenizer so that it renders and tokenizes like the
# family's own tokenizer (the tiny tokenizer itself has eos <|endoftext|>, <|im_start|>, <|im_end|> and no bos).
FAMILY_TOKENS: dict[str, tuple[str | None, str | None, list[str]]] = {
    "default": (None, None, []),
    "alpaca": (None, None, []),
    "chatml": (None, None, []),
    "qwen": (None, None, []),
    "llama3": (
        "<|begin_of_text|>",
        "<|end_of_text|>",
        ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"],
    ),
    "mistral": ("<s>", "</s>", ["[INST]", "[/INST]"]),
    "gemma": ("<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi": (None, None, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
}

# Written out by hand from each family's prompt format.
EXPECTED = {
    "default": "System: You are terse.\nUser: What is 2+2?\nAssistant: 4.<|endoftext|>\nUser: And 3+3?\n"
    "Assistant: 6.<|endoftext|>\n",
    "alpaca": "You are terse.\n\n### Instruction:\nWhat is 2+2?\n\n### Response:\n4.<|endoftext|>\n\n"
    "### Instruction:\nAnd 3+3?\n\n### Response:\n6.<|endoftext|>\n\n",
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n",
    "qwen": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n4.<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6.<|im_end|>\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n6.<|eot_id|>",
    "mistral": "<s>[INST] You are terse.\n\nWhat is 2+2? [/INST] 4.</s>[INST] And 3+3? [/INST] 6.</s>",
    "gemma": "<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n4.<end_of_turn>\n"
    "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n<start_of_turn>model\n6.<end_of_turn>\n",
    "phi": "<|system|>\nYou are terse.<|end|>\n<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n"
    "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n6.<|end|>\n",
}

# What the model is asked to continue from (the end of the prompt for the last answer).
GENERATION_PROMPT = {
    "default": "User: And 3+3?\nAssistant:",
    "alpaca": "### Instruction:\nAnd 3+3?\n\n### Response:\n",
    "chatml": "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n",
    "qwen": "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "And 3+3?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[INST] And 3+3? [/INST]",
    "gemma": "And 3+3?<end_of_turn>\n<start_of_turn>model\n",
    "phi": "<|user|>\nAnd 3+3?<|end|>\n<|assistant|>\n",
}

# The text of each assistant span: the answer and its end-of-turn marker.
SPAN_TEXT = {
    "default": [" 4.<|endoftext|>", " 6.<|endoftext|>"],
    "alpaca": ["4.<|endoftext|>", "6.<|endoftext|>"],
    "chatml": ["4.<|im_end|>", "6.<|im_end|>"],
    "qwen": ["4.<|im_end|>", "6.<|im_end|>"],
    "llama3": ["4.<|eot_id|>", "6.<|eot_id|>"],
    "mistral": [" 4.</s>", " 6.</s>"],
    "gemma": ["4.<end_of_turn>", "6.<end_of_turn>"],
    "phi": ["4.<|end|>", "6.<|end|>"],
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
    },
    {"role": "tool", "content": '{"temp": -3}'},
    {"role": "assistant", "content": "It is -3 degrees."},
]


def family_tokenizer(model_dir: Path, name: str):
    """The tiny tokenizer dressed up with a family's bos, eos and control tokens."""
    bos, eos, extra = FAMILY_TOKENS[name]
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v}
    tok = AutoTokenizer.from_pretrained(model_dir, **kwargs)
    if extra:
        tok.add_tokens(extra, special_tokens=True)
    return tok


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_builtin_renders_family_format(tiny_model_dir: Path, name: str) -> None:
    template = resolve_template(name, family_tokenizer(tiny_model_dir, name))
    assert template.render(CONVERSATION) == EXPECTED[name]


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_generation_prompt_and_spans(tiny_model_dir: Path, name: str) -> None:
    template = resolve_template(name, family_tokenizer(tiny_model_dir, name))
    prompt = template.render(CONVERSATION[:-1], add_generation_prompt=True)
    assert prompt.endswith(GENERATION_PROMPT[name])
    text, spans = template.assistant_spans(CONVERSATION)
    assert text == EXPECTED[name]
    assert [i for _, _, i in spans] == [2, 4]
    assert [text[s:e] for s, e, _ in spans] == SPAN_TEXT[name]
    assert spans[-1][0] == len(prompt)  # the last answer starts exactly where the generation prompt ends


def test_builtins_listed_in_config_help_and_docs() -> None:
    help_text = next(f for f in dataclasses.fields(DataConfig) if f.name == "template").metadata["help"]
    docs = DOCS.read_text(encoding="utf-8")
    for name in BUILTIN_TEMPLATES:
        assert name in help_text
        assert f"`{name}`" in docs


def test_render_matches_hugging_face(tokenizer) -> None:
    template = resolve_template("auto", tokenizer)
    for gen in (False, True):
        expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=gen)
        assert template.render(CONVERSATION, add_generation_prompt=gen) == expected


def test_default_system_prompts(tokenizer) -> None:
    no_system = CONVERSATION[1:3]
    assert resolve_template("qwen", tokenizer).render(no_system).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
    )
    assert resolve_template("chatml", tokenizer).render(no_system).startswith("<|im_start|>user\n")
    assert resolve_template("alpaca", tokenizer).render(no_system).startswith(
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n"
    )
    assert resolve_template("default", tokenizer).render(no_system).startswith("User: What is 2+2?\n")


def test_qwen_tool_calls(tokenizer) -> None:
    text = resolve_template("qwen", tokenizer).render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert text == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp": -3}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\nIt is -3 degrees.<|im_end|>\n"
    )


def test_chatml_tool_calls(tokenizer) -> None:
    calls = TOOL_CONVERSATION[1]["tool_calls"] * 2
    messages = [TOOL_CONVERSATION[0], {"role": "assistant", "content": "Checking.", "tool_calls": calls}]
    text = resolve_template("chatml", tokenizer).render(messages, tools=[WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\n# Tools\n\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    assert text.endswith(f"<|im_start|>assistant\nChecking.\n{call}\n{call}<|im_end|>\n")


def test_llama3_and_default_tool_calls(tokenizer) -> None:
    llama = resolve_template("llama3", tokenizer).render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert '"name": "get_weather",' in llama  # signatures pretty-printed in the system turn
    assert '<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eot_id|>' in llama
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp": -3}<|eot_id|>' in llama
    default = resolve_template("default", tokenizer).render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert default.startswith("Tools (to call one, answer with <tool_call>")
    assert (
        'Assistant: <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call><|endoftext|>\n'
        'Tool: {"temp": -3}\n'
    ) in default


def test_arguments_given_as_json_text_are_kept(tokenizer) -> None:
    messages = [
        TOOL_CONVERSATION[0],
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
    ]
    text = resolve_template("chatml", tokenizer).render(messages)
    assert '{"name": "f", "arguments": {"a":1}}' in text


@pytest.mark.parametrize("name", ["alpaca", "mistral", "gemma", "phi"])
def test_templates_without_tool_format_refuse_tools(tokenizer, name: str) -> None:
    template = resolve_template(name, tokenizer)
    with pytest.raises(UserError, match="no tool-call format"):
        template.render(TOOL_CONVERSATION)
    with pytest.raises(UserError, match="no tool-call format"):
        template.render(CONVERSATION, tools=[WEATHER_TOOL])


def test_template_that_rewrites_history_is_rejected(tokenizer) -> None:
    # Marks the final answer differently from earlier ones, as templates that drop old reasoning do.
    source = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} (final){% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    template = ChatTemplate("custom", source, (), tokenizer)
    with pytest.raises(UserError, match="data.template"):
        template.assistant_spans(CONVERSATION)


def test_conversation_starting_with_answer_is_rejected(tokenizer) -> None:
    with pytest.raises(UserError, match="starts with an assistant message"):
        resolve_template("chatml", tokenizer).assistant_spans([{"role": "assistant", "content": "Hi"}])


def test_resolve_auto_builtin_and_file(tokenizer, tmp_path: Path) -> None:
    own = resolve_template("auto", tokenizer)
    assert own.source == tokenizer.chat_template
    assert own.stop_strings == ("<|im_end|>",)

    no_template = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_template.chat_template = None
    assert resolve_template("auto", no_template).name == "default"

    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}", encoding="utf-8")
    from_file = resolve_template(str(path), tokenizer)
    assert from_file.render(CONVERSATION[1:2]) == "<|im_start|>What is 2+2?<|im_end|>"
    assert from_file.stop_strings == ("<|im_end|>",)


def test_resolve_errors(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="did you mean 'chatml'"):
        resolve_template("chatm", tokenizer)
    with pytest.raises(UserError, match="did you mean 'llama3'"):
        resolve_template("llama-3", tokenizer)
    with pytest.raises(UserError, match="not found"):
        resolve_template(str(tmp_path / "missing.jinja"), tokenizer)


def test_stop_token_ids(tiny_model_dir: Path, tokenizer) -> None:
    assert resolve_template("chatml", tokenizer).stop_token_ids(tokenizer) == [0, 2]
    assert resolve_template("default", tokenizer).stop_token_ids(tokenizer) == [0]
    llama = family_tokenizer(tiny_model_dir, "llama3")
    ids = resolve_template("llama3", llama).stop_token_ids(llama)
    assert ids == [llama.eos_token_id, *llama.convert_tokens_to_ids(["<|eot_id|>", "<|eom_id|>"])]
