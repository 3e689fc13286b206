"""Format converters: exact conversations for valid rows, exact reasons for invalid ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.data.conversation import Conversation
from tunelab.data.formats import FORMATS, RowError, check_mapping, detect_format
from tunelab.errors import UserError


def convert(fmt: str, row: dict, columns: dict | None = None, tags: dict | None = None) -> Conversation:
    return FORMATS[fmt](row, columns or {}, tags or {})


def reason(fmt: str, row: dict, columns: dict | None = None, tags: dict | None = None) -> str:
    with pytest.raises(RowError) as e:
        convert(fmt, row, columns, tags)
    return e.value.reason


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
WEATHER_TOOL = {"name": "get_weather", "parameters": {"type": "object"}}


def test_formats_registry_lists_the_documented_names():
    assert list(FORMATS) == ["alpaca", "sharegpt", "openai", "text"]


# ---------------------------------------------------------------------------------------------------------- alpaca
def test_alpaca_instruction_only():
    conv = convert("alpaca", {"instruction": "Say hello.", "input": "", "output": "Hello!"})
    assert conv.messages == [user("Say hello."), assistant("Hello!")]
    assert conv.tools is None and conv.text is None


def test_alpaca_input_joins_instruction_with_a_newline():
    conv = convert("alpaca", {"instruction": "Translate.", "input": "Good morning", "output": "Bonjour"})
    assert conv.messages == [user("Translate.\nGood morning"), assistant("Bonjour")]


def test_alpaca_input_alone_is_the_user_turn():
    assert convert("alpaca", {"input": "2+2?", "output": "4"}).messages == [user("2+2?"), assistant("4")]


def test_alpaca_system_history_and_tools():
    row = {
        "instruction": "And now?",
        "output": "Still 4.",
        "system": "You are a calculator.",
        "history": [["What is 2+2?", "4"], ["Sure?", "Yes."]],
        "tools": json.dumps([WEATHER_TOOL]),
    }
    conv = convert("alpaca", row)
    assert conv.messages == [
        {"role": "system", "content": "You are a calculator."},
        user("What is 2+2?"),
        assistant("4"),
        user("Sure?"),
        assistant("Yes."),
        user("And now?"),
        assistant("Still 4."),
    ]
    assert conv.tools == [WEATHER_TOOL]


def test_alpaca_history_as_json_string_from_csv():
    row = {"instruction": "q2", "output": "a2", "history": '[["q1", "a1"]]'}
    assert convert("alpaca", row).messages == [user("q1"), assistant("a1"), user("q2"), assistant("a2")]


def test_alpaca_remapped_columns():
    columns = {
        "prompt": "question",
        "query": "context",
        "response": "answer",
        "system": "persona",
        "history": "past",
    }
    row = {"question": "Q", "context": "C", "answer": "A", "persona": "P", "past": [["q0", "a0"]]}
    assert convert("alpaca", row, columns).messages == [
        {"role": "system", "content": "P"},
        user("q0"),
        assistant("a0"),
        user("Q\nC"),
        assistant("A"),
    ]


@pytest.mark.parametrize(
    ("row", "columns", "expected"),
    [
        ({"instruction": "Q"}, {}, "output: missing or empty"),
        ({"instruction": "Q", "output": "   "}, {}, "output: missing or empty"),
        ({"instruction": "Q", "output": ["a", "b"]}, {}, "output: expected a string, got list"),
        ({"instruction": "", "input": "", "output": "A"}, {}, "instruction: missing or empty"),
        ({"instruction": 3, "output": "A"}, {}, "instruction: expected a string, got number"),
        ({"question": "Q"}, {"response": "answer", "prompt": "question"}, "answer: missing or empty"),
        (
            {"instruction": "Q", "output": "A", "system": {"x": 1}},
            {},
            "system: expected a string, got object",
        ),
        (
            {"instruction": "Q", "output": "A", "history": [["q", "a"], ["q"]]},
            {},
            "history[1]: expected a [question, answer] pair",
        ),
        (
            {"instruction": "Q", "output": "A", "history": ["qa"]},
            {},
            "history[0]: expected a [question, answer] pair",
        ),
        ({"instruction": "Q", "output": "A", "history": [["q", None]]}, {}, "history[0][1]: missing"),
        (
            {"instruction": "Q", "output": "A", "history": [[1, "a"]]},
            {},
            "history[0][0]: expected a string, got number",
        ),
        ({"instruction": "Q", "output": "A", "history": [["q", ""]]}, {}, "history[0][1]: empty answer"),
        (
            {"instruction": "Q", "output": "A", "history": {"q": "a"}},
            {},
            "history: expected a list, got object",
        ),
        (
            {"instruction": "Q", "output": "A", "history": "[[1,"},
            {},
            "history: invalid JSON (Expecting value at column 5)",
        ),
        (
            {"instruction": "Q", "output": "A", "tools": "[1]"},
            {},
            "tools[0]: expected a function schema object, got number",
        ),
    ],
)
def test_alpaca_bad_rows(row, columns, expected):
    assert reason("alpaca", row, columns) == expected


# -------------------------------------------------------------------------------------------------------- sharegpt
def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def test_sharegpt_multi_turn_with_leading_system_turn():
    row = {
        "conversations": [
            turn("system", "Be brief."),
            turn("human", "Hi"),
            turn("gpt", "Hello"),
            turn("human", "Bye"),
            turn("gpt", "Bye!"),
        ]
    }
    assert convert("sharegpt", row).messages == [
        {"role": "system", "content": "Be brief."},
        user("Hi"),
        assistant("Hello"),
        user("Bye"),
        assistant("Bye!"),
    ]


def test_sharegpt_system_column_when_no_system_turn():
    row = {"conversations": [turn("human", "Hi"), turn("gpt", "Hello")], "system": "Be kind."}
    assert convert("sharegpt", row).messages[0] == {"role": "system", "content": "Be kind."}


def test_sharegpt_function_call_and_observation():
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})
    row = {
        "conversations": [
            turn("human", "Weather?"),
            turn("function_call", call),
            turn("observation", '{"temp": 3}'),
            turn("gpt", "3 degrees."),
        ],
        "tools": json.dumps([WEATHER_TOOL]),
    }
    conv = convert("sharegpt", row)
    assert conv.messages == [
        user("Weather?"),
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": '{"temp": 3}'},
        assistant("3 degrees."),
    ]
    assert conv.tools == [WEATHER_TOOL]


def test_sharegpt_may_end_on_a_function_call_with_several_calls():
    calls = json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": '{"x": 1}'}])
    conv = convert("sharegpt", {"conversations": [turn("human", "Do both."), turn("function_call", calls)]})
    assert conv.messages[-1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"type": "function", "function": {"name": "a", "arguments": {}}},
            {"type": "function", "function": {"name": "b", "arguments": {"x": 1}}},
        ],
    }


def test_sharegpt_tools_as_a_list_or_a_single_object():
    row = {"conversations": [turn("human", "Hi"), turn("gpt", "Hello")], "tools": [WEATHER_TOOL]}
    assert convert("sharegpt", row).tools == [WEATHER_TOOL]
    row["tools"] = json.dumps(WEATHER_TOOL)
    assert convert("sharegpt", row).tools == [WEATHER_TOOL]


def test_sharegpt_remapped_tags_and_column():
    tags = {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}
    row = {"dialog": [{"speaker": "me", "text": "Hi"}, {"speaker": "bot", "text": "Hello"}]}
    assert convert("sharegpt", row, {"messages": "dialog"}, tags).messages == [user("Hi"), assistant("Hello")]


@pytest.mark.parametrize(
    ("turns", "expected"),
    [
        (
            [turn("human", "Hi"), turn("gpt", "Hello"), turn("bot", "?"), turn("gpt", "x")],
            "conversations[2].from: unknown role 'bot' (expected human, gpt, system, function_call, observation)",
        ),
        (
            [turn("human", "Hi"), turn("human", "Hello?"), turn("gpt", "x")],
            "conversations[1].from: expected gpt or function_call at this position, got 'human' (turns must alternate)",
        ),
        (
            [turn("gpt", "Hi")],
            "conversations[0].from: expected human or observation at this position, got 'gpt' (turns must alternate)",
        ),
        (
            [turn("human", "Hi"), turn("gpt", "Hello"), turn("human", "More?")],
            "conversations: ends with a 'human' turn; the last turn must be gpt or function_call",
        ),
        (
            [turn("human", "Hi"), turn("system", "late"), turn("gpt", "x")],
            "conversations[1].from: a system turn is only allowed first",
        ),
        ([turn("system", "Only a system prompt.")], "conversations: no turns besides the system prompt"),
        ([], "conversations: missing or empty"),
        ([turn("human", "Hi"), {"value": "x"}], "conversations[1].from: missing"),
        ([turn("human", "Hi"), "gpt: hello"], "conversations[1]: expected an object, got string"),
        (
            [turn("human", "Hi"), {"from": "gpt", "value": 7}],
            "conversations[1].value: expected a string, got number",
        ),
        ([turn("human", "Hi"), {"from": "gpt"}], "conversations[1].value: missing"),
        ([turn("human", "Hi"), turn("gpt", " ")], "conversations[1].value: empty gpt message"),
        (
            [turn("human", "Hi"), turn("function_call", "{name: x}")],
            "conversations[1].value: invalid function call JSON (Expecting property name enclosed in double quotes at column 2)",
        ),
        (
            [turn("human", "Hi"), turn("function_call", '{"arguments": {}}')],
            "conversations[1].value: function name missing",
        ),
        (
            [turn("human", "Hi"), turn("function_call", '{"name": "f", "arguments": [1]}')],
            "conversations[1].value.arguments: expected an object, got list",
        ),
        (
            [turn("human", "Hi"), turn("function_call", "[]")],
            "conversations[1].value: empty list of function calls",
        ),
    ],
)
def test_sharegpt_bad_rows(turns, expected):
    assert reason("sharegpt", {"conversations": turns}) == expected


def test_sharegpt_missing_column_and_bad_tools():
    assert reason("sharegpt", {"messages": []}) == "conversations: missing or empty"
    row = {"conversations": [turn("human", "Hi"), turn("gpt", "Hello")], "tools": "[{"}
    assert (
        reason("sharegpt", row)
        == "tools: invalid JSON (Expecting property name enclosed in double quotes at column 3)"
    )


# ---------------------------------------------------------------------------------------------------------- openai
def msg(role: str, content: str | None, **extra) -> dict:
    return {"role": role, "content": content, **extra}


def test_openai_basic_with_system():
    row = {"messages": [msg("system", "Terse."), msg("user", "2+3?"), msg("assistant", "5")]}
    assert convert("openai", row).messages == [
        {"role": "system", "content": "Terse."},
        user("2+3?"),
        assistant("5"),
    ]


def test_openai_tool_calls_and_parallel_tool_results():
    calls = [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        },
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
    ]
    row = {
        "messages": [
            msg("user", "Oslo and Rome?"),
            msg("assistant", None, tool_calls=calls),
            msg("tool", "3", tool_call_id="c1"),
            msg("tool", "18", tool_call_id="c2"),
            msg("assistant", "3 and 18 degrees."),
        ],
        "tools": [{"type": "function", "function": WEATHER_TOOL}],
    }
    conv = convert("openai", row)
    rome = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}
    assert conv.messages == [
        user("Oslo and Rome?"),
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL, rome]},
        {"role": "tool", "content": "3"},
        {"role": "tool", "content": "18"},
        assistant("3 and 18 degrees."),
    ]
    assert conv.tools == [{"type": "function", "function": WEATHER_TOOL}]


def test_openai_function_call_role_and_bad_rows():
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})
    row = {"messages": [msg("user", "Weather?"), msg("function_call", call)]}
    assert convert("openai", row).messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [WEATHER_CALL],
    }
    parts = [{"type": "text", "text": "Hi"}]
    assert reason("openai", {"messages": [msg("user", parts), msg("assistant", "x")]}) == (
        "messages[0].content: expected a string, got list"
    )
    assert reason("openai", {"messages": [msg("user", "Hi"), msg("bot", "x")]}) == (
        "messages[1].role: unknown role 'bot' (expected user, assistant, system, function_call, tool)"
    )
    bad_call = [{"type": "function", "function": {"name": "f", "arguments": "{oops"}}]
    assert reason(
        "openai", {"messages": [msg("user", "Hi"), msg("assistant", None, tool_calls=bad_call)]}
    ) == (
        "messages[1].tool_calls[0].arguments: invalid JSON (Expecting property name enclosed in double quotes at column 2)"
    )
    assert (
        reason("openai", {"messages": [msg("user", "Hi"), msg("assistant", None)]})
        == "messages[1].content: missing"
    )


# ------------------------------------------------------------------------------------------------------------ text
def test_text_rows():
    conv = convert("text", {"text": "Some document."})
    assert conv == Conversation(text="Some document.")
    assert conv.is_text
    assert convert("text", {"body": "Doc."}, {"text": "body"}).text == "Doc."
    assert reason("text", {"text": ""}) == "text: missing or empty"
    assert reason("text", {"other": "x"}) == "text: missing or empty"
    assert reason("text", {"text": ["a"]}) == "text: expected a string, got list"


# ------------------------------------------------------------------------------------------------- detect, mapping
@pytest.mark.parametrize(
    ("row", "columns", "expected"),
    [
        ({"instruction": "Q", "input": "", "output": "A"}, None, "alpaca"),
        ({"instruction": "Q"}, None, "alpaca"),
        ({"conversations": []}, None, "sharegpt"),
        ({"messages": []}, None, "openai"),
        ({"text": "doc"}, None, "text"),
        ({"question": "Q", "answer": "A"}, {"prompt": "question", "response": "answer"}, "alpaca"),
        ({"dialog": [{"role": "user", "content": "Hi"}]}, {"messages": "dialog"}, "openai"),
        ({"dialog": [{"from": "human", "value": "Hi"}]}, {"messages": "dialog"}, "sharegpt"),
        ({"body": "doc"}, {"text": "body"}, "text"),
    ],
)
def test_detect_format(row, columns, expected):
    assert detect_format(row, columns) == expected


def test_detect_format_names_the_columns_it_saw():
    with pytest.raises(RowError) as e:
        detect_format({"question": "Q", "answer": "A"})
    assert e.value.reason.startswith(
        "cannot detect the format from the columns ['answer', 'question']: expected instruction/output (alpaca), "
        "conversations (sharegpt), messages (openai) or text (text)"
    )


def test_check_mapping():
    check_mapping("alpaca", {"prompt": "q", "response": "a"}, {}, "d")
    check_mapping("openai", {"messages": "dialog"}, {"observation_tag": "function"}, "d")
    with pytest.raises(
        UserError, match=r"^d: columns\.promt: unknown for format alpaca; did you mean 'prompt'\?$"
    ):
        check_mapping("alpaca", {"promt": "q"}, {}, "d")
    with pytest.raises(
        UserError, match=r"^d: columns\.images: multimodal data is not supported \(text only\)$"
    ):
        check_mapping("sharegpt", {"images": "images"}, {}, "d")
    with pytest.raises(UserError, match=r"^d: tags\.role_tag: format alpaca takes no tags$"):
        check_mapping("alpaca", {}, {"role_tag": "role"}, "d")
    with pytest.raises(UserError, match=r"^d: tags\.user_tag: expected a non-empty string, got 3$"):
        check_mapping("sharegpt", {}, {"user_tag": 3}, "d")


def test_every_format_is_documented():
    docs = (Path(__file__).parents[2] / "docs" / "data.md").read_text()
    for name in FORMATS:
        assert f"### {name}\n" in docs
