"""Row formats -> the canonical `Conversation`.

One converter per format name users write (``FORMATS``). Each takes a raw row, the user's column remapping and the
user's ShareGPT tag remapping (both only the keys that differ from the format's defaults) and returns a
`Conversation`, or raises `RowError` with a precise reason naming the offending field, e.g.
``conversations[2].from: unknown role 'bot' (...)``. The semantics follow LLaMA-Factory's alpaca and sharegpt
converters so that its datasets and ``dataset_info.json`` entries work unchanged.

Columns that hold lists (history, messages, tools) may also be JSON strings, which is how CSV files carry them.

`convert` adds the two row shapes of preference training on top of the same formats (see `convert_pair` and
`convert_kto`): a prompt plus ``chosen``/``rejected`` answers, and a conversation plus a ``kto_tag`` label, read as
LLaMA-Factory reads ``ranking: true`` entries and entries whose ``columns`` name a ``kto_tag``.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable
from typing import Any

from tunelab.data.conversation import Conversation
from tunelab.errors import UserError


class RowError(Exception):
    """A row that cannot become a valid conversation; `reason` says exactly which field is wrong and how."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# Default column names per format, under LLaMA-Factory's keys (the keys users remap in `columns`).
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {
        "prompt": "instruction",
        "query": "input",
        "response": "output",
        "history": "history",
        "system": "system",
        "tools": "tools",
    },
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools"},
    "text": {"text": "text"},
}

# Default tags of the message formats: which key holds the role and the content, and the value of each role.
DEFAULT_TAGS: dict[str, dict[str, str]] = {
    "alpaca": {},
    "sharegpt": {
        "role_tag": "from",
        "content_tag": "value",
        "user_tag": "human",
        "assistant_tag": "gpt",
        "observation_tag": "observation",
        "function_tag": "function_call",
        "system_tag": "system",
    },
    "openai": {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "function_tag": "function_call",
        "system_tag": "system",
    },
    "text": {},
}

# Extra columns of the preference data kinds (data/kinds.py), under LLaMA-Factory's keys. Unlike LF (where kto_tag
# has no default and must be named in `columns`), unnamed columns keep these default names, as the other columns do.
PAIR_COLUMNS: dict[str, str] = {"chosen": "chosen", "rejected": "rejected"}
KTO_COLUMNS: dict[str, str] = {"kto_tag": "kto_tag"}

# LLaMA-Factory column keys that describe data tunelab cannot train on with these formats.
_UNSUPPORTED_COLUMNS = {
    "images": "multimodal data is not supported (text only)",
    "videos": "multimodal data is not supported (text only)",
    "audios": "multimodal data is not supported (text only)",
    "chosen": "preference pairs need a preference method (data kind pairs: dpo, orpo, simpo, cpo, reward model)",
    "rejected": "preference pairs need a preference method (data kind pairs: dpo, orpo, simpo, cpo, reward model)",
    "kto_tag": "KTO labels need the kto method (data kind kto)",
}


def check_mapping(fmt: str, columns: dict[str, Any], tags: dict[str, Any], where: str,
                  extra: dict[str, str] | None = None) -> None:
    """Refuse unknown `columns` / `tags` keys for a format once per dataset, rather than once per row.

    `extra` holds the columns of the data kind the method reads (`DataKind.columns`): the preference columns are
    known only to the kind that uses them, so that a preference dataset given to sft fails at once instead of
    silently training on one answer.
    """
    extra = extra or {}
    for what, given, known in (
        ("columns", columns, {**DEFAULT_COLUMNS[fmt], **extra}),
        ("tags", tags, DEFAULT_TAGS[fmt]),
    ):
        for key, value in given.items():
            if key in _UNSUPPORTED_COLUMNS and what == "columns" and key not in extra:
                raise UserError(f"{where}: columns.{key}: {_UNSUPPORTED_COLUMNS[key]}")
            if key not in known:
                if not known:
                    raise UserError(f"{where}: {what}.{key}: format {fmt} takes no {what}")
                close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
                hint = f"; did you mean '{close[0]}'?" if close else f" (expected {', '.join(known)})"
                raise UserError(f"{where}: {what}.{key}: unknown for format {fmt}{hint}")
            if not isinstance(value, str) or not value:
                raise UserError(f"{where}: {what}.{key}: expected a non-empty string, got {value!r}")


# ------------------------------------------------------------------------------------------------------- helpers
def json_type(value: Any) -> str:
    """JSON name of a value's type, for messages users can map back to their file."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _string(value: Any, where: str) -> str:
    """A required string field."""
    if value is None:
        raise RowError(f"{where}: missing")
    if not isinstance(value, str):
        raise RowError(f"{where}: expected a string, got {json_type(value)}")
    return value


def _optional_string(row: dict[str, Any], column: str) -> str:
    """An optional string column: absent or null reads as empty."""
    value = row.get(column)
    return "" if value is None else _string(value, column)


def _list_column(value: Any, where: str) -> list[Any] | None:
    """A list-valued column (or its JSON string); None when absent or empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise RowError(f"{where}: expected a list, got {json_type(value)}")
    return value or None


def _tools(row: dict[str, Any], column: str) -> list[dict[str, Any]] | None:
    """Function schemas offered to the model: a list of objects, or a JSON string of one (a lone object is a list of one)."""
    value = row.get(column)
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"{column}: invalid JSON ({e.msg} at column {e.colno})") from e
    tools = _list_column([value] if isinstance(value, dict) else value, column)
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise RowError(f"{column}[{i}]: expected a function schema object, got {json_type(tool)}")
    return tools


def _tool_call(value: Any, where: str) -> dict[str, Any]:
    """One call, ``{"name", "arguments"}`` or OpenAI's ``{"type": "function", "function": {...}}``, in canonical form."""
    if not isinstance(value, dict):
        raise RowError(f"{where}: expected an object with name and arguments, got {json_type(value)}")
    function = value["function"] if isinstance(value.get("function"), dict) else value
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise RowError(f"{where}: function name missing")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise RowError(f"{where}.arguments: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(arguments, dict):
        raise RowError(f"{where}.arguments: expected an object, got {json_type(arguments)}")
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """A function_call turn's value: one call or a list of calls, as JSON text (or already parsed)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(f"{where}: invalid function call JSON ({e.msg} at column {e.colno})") from e
    if isinstance(value, list):
        if not value:
            raise RowError(f"{where}: empty list of function calls")
        return [_tool_call(call, f"{where}[{i}]") for i, call in enumerate(value)]
    return [_tool_call(value, where)]


# ---------------------------------------------------------------------------------------------------- converters
def alpaca(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """instruction (+ input) -> output, after optional system prompt and [question, answer] history pairs."""
    c = {**DEFAULT_COLUMNS["alpaca"], **columns}
    messages = _alpaca_prompt(row, c)
    response = _optional_string(row, c["response"])
    if not response.strip():
        raise RowError(f"{c['response']}: missing or empty")
    messages.append({"role": "assistant", "content": response})
    return Conversation(messages=messages, tools=_tools(row, c["tools"]))


def alpaca_pretrain(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """An alpaca row read for pre-training (data kind text): plain text when it has no answer, as LLaMA-Factory's
    pre-training entries are (``c4_demo``, ``wiki_demo``: ``"columns": {"prompt": "text"}``), else a conversation.

    The text is the instruction, then the input on a new line when there is one (LLaMA-Factory's pt stage trains on
    exactly that). A row with an answer is a conversation like any other under pt, rendered with the chat template
    and trained on every token. A row with a system prompt or history but no answer is refused rather than half
    used: it is a conversation whose answer is missing, not a document.
    """
    c = {**DEFAULT_COLUMNS["alpaca"], **columns}
    if _optional_string(row, c["response"]).strip():
        return alpaca(row, columns, tags)
    parts = [part for part in (_optional_string(row, c["prompt"]), _optional_string(row, c["query"])) if part]
    if not "".join(parts).strip():
        names = f"{c['prompt']}, {c['query']} and {c['response']}"
        raise RowError(f"{names}: all missing or empty (a pre-training row needs its text in {c['prompt']})")
    system, history = _optional_string(row, c["system"]).strip(), _list_column(row.get(c["history"]), c["history"])
    for key, given in (("system", system), ("history", history)):
        if given:
            raise RowError(
                f"{c['response']}: missing or empty; a row with a {c[key]} column is a conversation and needs its "
                f"answer (a pre-training row holds only {c['prompt']}, and optionally {c['query']})"
            )
    return Conversation(text="\n".join(parts))


def _alpaca_prompt(row: dict[str, Any], c: dict[str, str]) -> list[dict[str, Any]]:
    """The messages before an alpaca row's answer: system, history pairs, then instruction (+ input) as user."""
    instruction = _optional_string(row, c["prompt"])
    query = _optional_string(row, c["query"])
    user = "\n".join(part for part in (instruction, query) if part)
    if not user:
        raise RowError(f"{c['prompt']}: missing or empty")
    system = _optional_string(row, c["system"])

    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    for i, pair in enumerate(_list_column(row.get(c["history"]), c["history"]) or []):
        where = f"{c['history']}[{i}]"
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError(f"{where}: expected a [question, answer] pair")
        question = _string(pair[0], f"{where}[0]")
        answer = _string(pair[1], f"{where}[1]")
        if not answer.strip():
            raise RowError(f"{where}[1]: empty answer")
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    messages.append({"role": "user", "content": user})
    return messages


def _messages(
    fmt: str, row: dict[str, Any], columns: dict[str, str], tags: dict[str, str], *, prompt: bool = False,
    prompt_of: str = "a preference prompt", answered_by: str = "chosen and rejected are the answers to it",
) -> Conversation:
    """ShareGPT-style turn lists (sharegpt and openai differ only in their default names).

    As in LLaMA-Factory, a leading system turn becomes the system message, and the remaining turns alternate:
    user or observation at the 1st, 3rd, ... position, assistant or function_call at the 2nd, 4th, ...; the list
    must end on an assistant or function_call turn (the answer to train on). Unlike LLaMA-Factory, consecutive
    observation turns are accepted as one position: OpenAI data answers parallel tool calls with one tool message
    per call. With ``prompt`` (the history of a preference row) the list must instead end on a user or observation
    turn, the one the chosen and rejected answers reply to.
    """
    c = {**DEFAULT_COLUMNS[fmt], **columns}
    t = {**DEFAULT_TAGS[fmt], **tags}
    role_tag, content_tag = t["role_tag"], t["content_tag"]
    role_of = {
        t["user_tag"]: "user",
        t["assistant_tag"]: "assistant",
        t["system_tag"]: "system",
        t["function_tag"]: "function",
        t["observation_tag"]: "tool",
    }
    column = c["messages"]
    turns = _list_column(row.get(column), column)
    if turns is None:
        raise RowError(f"{column}: missing or empty")

    system = ""
    messages: list[dict[str, Any]] = []
    position = 0  # among non-system turns; even positions ask, odd positions answer
    for i, turn in enumerate(turns):
        where = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(f"{where}: expected an object, got {json_type(turn)}")
        tag = turn.get(role_tag)
        if tag is None:
            raise RowError(f"{where}.{role_tag}: missing")
        role = role_of.get(tag) if isinstance(tag, str) else None
        if role is None:
            raise RowError(f"{where}.{role_tag}: unknown role {tag!r} (expected {', '.join(role_of)})")
        if role == "system":
            if i != 0:
                raise RowError(f"{where}.{role_tag}: a system turn is only allowed first")
            system = _string(turn.get(content_tag), f"{where}.{content_tag}")
            continue
        if role == "tool" and messages and messages[-1]["role"] == "tool":
            messages.append(
                {"role": "tool", "content": _string(turn.get(content_tag), f"{where}.{content_tag}")}
            )
            continue
        asks = position % 2 == 0
        if asks != (role in ("user", "tool")):
            expected = (
                f"{t['user_tag']} or {t['observation_tag']}"
                if asks
                else f"{t['assistant_tag']} or {t['function_tag']}"
            )
            raise RowError(
                f"{where}.{role_tag}: expected {expected} at this position, got {tag!r} (turns must alternate)"
            )
        messages.append(_message(role, turn, where, t))
        position += 1

    if not messages:
        raise RowError(f"{column}: no turns besides the system prompt")
    if prompt and position % 2 == 0:
        last = turns[-1][role_tag]
        raise RowError(
            f"{column}: ends with a {last!r} turn; {prompt_of} must end with {t['user_tag']} or "
            f"{t['observation_tag']} ({answered_by})"
        )
    if not prompt and position % 2 == 1:
        last = turns[-1][role_tag]
        raise RowError(
            f"{column}: ends with a {last!r} turn; the last turn must be {t['assistant_tag']} or {t['function_tag']}"
        )
    if not system:
        system = _optional_string(row, c["system"])
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return Conversation(messages=messages, tools=_tools(row, c["tools"]))


def _message(role: str, turn: dict[str, Any], where: str, tags: dict[str, str]) -> dict[str, Any]:
    """One non-system turn in HF chat form; function_call turns become assistant messages with tool_calls."""
    content_tag = tags["content_tag"]
    content = turn.get(content_tag)
    if role == "function":
        return {
            "role": "assistant",
            "content": "",
            "tool_calls": _tool_calls(content, f"{where}.{content_tag}"),
        }
    if role == "assistant" and turn.get("tool_calls"):  # an OpenAI-style assistant message calling functions
        text = "" if content is None else _string(content, f"{where}.{content_tag}")
        return {
            "role": "assistant",
            "content": text,
            "tool_calls": _tool_calls(turn["tool_calls"], f"{where}.tool_calls"),
        }
    text = _string(content, f"{where}.{content_tag}")
    if role == "assistant" and not text.strip():
        raise RowError(f"{where}.{content_tag}: empty {tags['assistant_tag']} message")
    return {"role": role, "content": text}


def sharegpt(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """ShareGPT rows: ``{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}``."""
    return _messages("sharegpt", row, columns, tags)


def openai(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """OpenAI chat rows: ``{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}``."""
    return _messages("openai", row, columns, tags)


def text(row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """Plain text for continued pre-training: ``{"text": ...}``."""
    column = {**DEFAULT_COLUMNS["text"], **columns}["text"]
    value = _optional_string(row, column)
    if not value.strip():
        raise RowError(f"{column}: missing or empty")
    return Conversation(text=value)


Converter = Callable[[dict[str, Any], dict[str, str], dict[str, str]], Conversation]

FORMATS: dict[str, Converter] = {
    "alpaca": alpaca,
    "sharegpt": sharegpt,
    "openai": openai,
    "text": text,
}


def detect_format(row: dict[str, Any], columns: dict[str, str] | None = None) -> str:
    """The format of a row, from its column names (after the user's remapping), for ``format: auto``."""
    columns = columns or {}
    messages = columns.get("messages")
    if messages is not None and messages in row:
        # A remapped turn list: the keys of its first turn tell the two message formats apart.
        try:
            turns = _list_column(row[messages], messages)
        except RowError:
            turns = None
        first = turns[0] if turns else None
        return "openai" if isinstance(first, dict) and "role" in first else "sharegpt"
    if "conversations" in row:
        return "sharegpt"
    if "messages" in row:
        return "openai"
    alpaca_columns = {**DEFAULT_COLUMNS["alpaca"], **columns}
    if alpaca_columns["prompt"] in row or alpaca_columns["response"] in row:
        return "alpaca"
    if columns.get("text", "text") in row:
        return "text"
    raise RowError(
        f"cannot detect the format from the columns {sorted(row)}: expected instruction/output (alpaca), "
        "conversations (sharegpt), messages (openai) or text (text); set the dataset's format, and columns if the "
        "names differ"
    )


# ------------------------------------------------------------------------------------------ preference data kinds
def _answer(fmt: str, row: dict[str, Any], key: str, columns: dict[str, str], tags: dict[str, str]) -> dict[str, Any]:
    """One answer of a preference row, as an assistant message.

    Alpaca answers are strings (as in LLaMA-Factory); sharegpt/openai answers are a turn object with an assistant or
    function_call role (LLaMA-Factory's form), or a plain string for convenience.
    """
    column = {**PAIR_COLUMNS, **columns}[key]
    value = row.get(column)
    if value is None:
        raise RowError(f"{column}: missing")
    if isinstance(value, str):
        if not value.strip():
            raise RowError(f"{column}: empty response")
        return {"role": "assistant", "content": value}
    if fmt == "alpaca" or not isinstance(value, dict):
        expected = "a string" if fmt == "alpaca" else "an assistant message object or a string"
        raise RowError(f"{column}: expected {expected}, got {json_type(value)}")
    t = {**DEFAULT_TAGS[fmt], **tags}
    tag = value.get(t["role_tag"])
    roles = {t["assistant_tag"]: "assistant", t["function_tag"]: "function"}
    if tag not in roles:
        raise RowError(
            f"{column}.{t['role_tag']}: expected {t['assistant_tag']} or {t['function_tag']}, got {tag!r}"
        )
    content = value.get(t["content_tag"])
    if roles[tag] == "assistant" and not value.get("tool_calls") and isinstance(content, str) and not content.strip():
        raise RowError(f"{column}.{t['content_tag']}: empty response")
    return _message(roles[tag], value, column, t)


def convert_pair(fmt: str, row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """A preference row: the prompt in ``messages`` (ending with a user or observation turn), plus chosen/rejected.

    LLaMA-Factory semantics: alpaca rows are instruction/input/history/system with string ``chosen`` and
    ``rejected`` columns (no ``output``); sharegpt/openai rows have a turn list that stops before the answer and
    ``chosen``/``rejected`` turn objects. Identical answers are refused: the pair would teach nothing, and the
    preference losses would be exactly flat on it, which usually means the columns were mapped wrongly.
    """
    if fmt == "alpaca":
        c = {**DEFAULT_COLUMNS["alpaca"], **columns}
        conv = Conversation(messages=_alpaca_prompt(row, c), tools=_tools(row, c["tools"]))
    elif fmt in ("sharegpt", "openai"):
        conv = _messages(fmt, row, columns, tags, prompt=True)
    else:
        raise RowError(f"format {fmt} has no preference pairs (use alpaca, sharegpt or openai)")
    conv.chosen = _answer(fmt, row, "chosen", columns, tags)
    conv.rejected = _answer(fmt, row, "rejected", columns, tags)
    if conv.chosen == conv.rejected:
        names = {**PAIR_COLUMNS, **columns}
        raise RowError(f"{names['chosen']} and {names['rejected']}: identical answers (nothing to prefer)")
    return conv


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def convert_kto(fmt: str, row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """A KTO row: an ordinary conversation (ending with the answer) plus its ``kto_tag`` label.

    The label is a boolean, as in LLaMA-Factory; strings true/false (and 1/0, yes/no) are accepted too, because CSV
    files cannot carry booleans. Anything else is an error rather than a guess: a wrong label flips the gradient.
    """
    if fmt not in ("alpaca", "sharegpt", "openai"):
        raise RowError(f"format {fmt} has no KTO rows (use alpaca, sharegpt or openai)")
    column = {**KTO_COLUMNS, **columns}["kto_tag"]
    value = row.get(column)
    if value is None:
        raise RowError(f"{column}: missing (the KTO label: true for a desirable answer, false for an undesirable one)")
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        label = value.strip().lower() in _TRUE
    elif isinstance(value, bool):
        label = value
    else:
        raise RowError(f"{column}: expected true or false, got {json_type(value)} {value!r}")
    conv = FORMATS[fmt](row, columns, tags)
    conv.label = label
    return conv


def convert_prompt(fmt: str, row: dict[str, Any], columns: dict[str, str], tags: dict[str, str]) -> Conversation:
    """A prompt row (data kind prompts): the messages a generated answer replies to, plus every other column.

    Alpaca rows are instruction/input/system/history; an ``output`` column, when present, is not part of the prompt
    and travels in ``extra`` with the other columns (a reference answer for a reward to compare against).
    Sharegpt/openai turn lists end with the user (or tool) turn the answer replies to, as a preference row's prompt
    does; a list that ends with an answer (an sft row, as LLaMA-Factory's ppo stage reads them) is a prompt up to
    that answer, which travels as the column ``response``. ``extra`` holds every column the format does not read,
    under its own name.
    """
    if fmt == "alpaca":
        c = {**DEFAULT_COLUMNS["alpaca"], **columns}
        conv = Conversation(messages=_alpaca_prompt(row, c), tools=_tools(row, c["tools"]))
        used = {c[key] for key in ("prompt", "query", "history", "system", "tools")}
    elif fmt in ("sharegpt", "openai"):
        response = None
        try:  # LLaMA-Factory's ppo stage reads sft rows: the last answer is dropped from the prompt
            conv = _messages(fmt, row, columns, tags)
            last = conv.messages.pop()
            response = last.get("content") if not last.get("tool_calls") else last
        except RowError:
            conv = _messages(fmt, row, columns, tags, prompt=True, prompt_of="a prompt",
                             answered_by="the generated answer replies to it")
        c = {**DEFAULT_COLUMNS[fmt], **columns}
        used = {c["messages"], c["system"], c["tools"]}
    else:
        raise RowError(f"format {fmt} has no prompts (use alpaca, sharegpt or openai)")
    conv.extra = {k: v for k, v in row.items() if k not in used}
    if fmt in ("sharegpt", "openai") and response is not None:
        conv.extra.setdefault("response", response)
    return conv
