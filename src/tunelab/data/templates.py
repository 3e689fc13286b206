"""Chat templates: conversations -> prompt text, and where each assistant turn lies in it.

Every template is a jinja chat-template source rendered by the tokenizer's own ``apply_chat_template``, so the text
we train on is exactly what Hugging Face (and any server that uses the same template) produces at inference, with the
tokenizer's ``bos_token``/``eos_token`` filled in. The built-ins below and a tokenizer's own template go through the
same code path; nothing is formatted by hand in Python.

Loss masks need the character span of each assistant turn. They come from *prefix rendering*: the conversation up to
assistant turn i rendered with the generation prompt is the text before that turn, and the conversation up to and
including turn i is the text that ends after it. Both must be prefixes of the whole rendering; a template that
rewrites earlier turns once later ones exist (some "thinking" templates drop old reasoning) breaks this, and we say so
instead of guessing.

Built-in templates are written for tunelab from each family's published prompt format. Families without a native tool
format (alpaca, mistral, gemma, phi) refuse tools rather than invent one.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, NamedTuple

from tunelab.errors import UserError

# -------------------------------------------------------------------------------------------------- jinja sources
# Shared jinja macros, prepended to the templates that need them (plain string concatenation keeps each template a
# single self-contained source, which is what gets saved next to a model).
#   text(v): message content as a string (None/missing -> "", non-strings -> JSON).
#   call_json(call, key): one function call as {"name": ..., key: arguments}; arguments given as a JSON string are
#   inserted verbatim, dicts are serialised.
_MACROS = r"""{%- macro text(value) -%}
{%- if value is string -%}{{ value }}
{%- elif value is none or value is undefined -%}
{%- else -%}{{ value | tojson }}
{%- endif -%}
{%- endmacro -%}
{%- macro call_json(call, key) -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- set args = fn.arguments if fn.arguments is defined and fn.arguments is not none else {} -%}
{{- '{"name": ' + fn.name | tojson + ', "' + key + '": ' + (args if args is string else args | tojson) + '}' -}}
{%- endmacro -%}
"""

# The templates that have no tool format call this on tools, tool calls and tool results.
_NO_TOOLS = (
    "{{- raise_exception('the %s template has no tool-call format; "
    "choose data.template: qwen, chatml, llama3 or default for rows with tools') -}}"
)

_DEFAULT = (
    _MACROS
    + r"""
{%- set eos = eos_token if eos_token is defined else '' -%}
{%- if messages[0].role == 'system' -%}
{%- set system = text(messages[0].content) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if system -%}
{{- 'System: ' + system + '\n' -}}
{%- endif -%}
{%- if tools -%}
{{- 'Tools (to call one, answer with <tool_call>{"name": ..., "arguments": {...}}</tool_call>):\n' -}}
{%- for tool in tools -%}
{{- tool | tojson + '\n' -}}
{%- endfor -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == 'assistant' -%}
{%- set ns = namespace(parts=[text(message.content)] if message.content else []) -%}
{%- for call in message.tool_calls or [] -%}
{%- set ns.parts = ns.parts + ['<tool_call>' + call_json(call, 'arguments') + '</tool_call>'] -%}
{%- endfor -%}
{{- 'Assistant: ' + ns.parts | join('\n') + eos + '\n' -}}
{%- else -%}
{{- message.role | capitalize + ': ' + text(message.content) + '\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- 'Assistant:' -}}
{%- endif -%}
"""
)

_ALPACA = (
    _MACROS
    + r"""
{%- set eos = eos_token if eos_token is defined else '' -%}
{%- if tools -%}"""
    + _NO_TOOLS % "alpaca"
    + r"""{%- endif -%}
{%- if messages[0].role == 'system' -%}
{%- set system = text(messages[0].content) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = 'Below is an instruction that describes a task. Write a response that appropriately completes the request.' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if system -%}
{{- system + '\n\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == 'user' -%}
{{- '### Instruction:\n' + text(message.content) + '\n\n' -}}
{%- elif message.role == 'assistant' and not message.tool_calls -%}
{{- '### Response:\n' + text(message.content) + eos + '\n\n' -}}
{%- else -%}"""
    + _NO_TOOLS % "alpaca"
    + r"""{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '### Response:\n' -}}
{%- endif -%}
"""
)

# ChatML: system turn only when there is a system prompt or tools; tool results come back in a `tool` turn.
_CHATML = (
    _MACROS
    + r"""
{%- if messages[0].role == 'system' -%}
{%- set system = text(messages[0].content) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if system or tools -%}
{{- '<|im_start|>system\n' + system -}}
{%- if tools -%}
{{- ('\n\n' if system else '') + '# Tools\n\nTo call a tool, reply with <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Available tools:\n<tools>' -}}
{%- for tool in tools -%}
{{- '\n' + tool | tojson -}}
{%- endfor -%}
{{- '\n</tools>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' + text(message.content) -}}
{%- for call in message.tool_calls or [] -%}
{{- ('\n' if message.content or not loop.first else '') + '<tool_call>\n' + call_json(call, 'arguments') + '\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' + text(message.content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
)

# Qwen2.5: ChatML with a default system prompt, tool signatures in the system turn, <tool_call> JSON in assistant
# turns and consecutive tool results grouped into one user turn of <tool_response> blocks.
_QWEN = (
    _MACROS
    + r"""
{%- if messages[0].role == 'system' -%}
{%- set system = text(messages[0].content) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|im_start|>system\n' + system -}}
{%- if tools -%}
{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}
{{- '\n' + tool | tojson -}}
{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in loop_messages -%}
{%- if message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' + text(message.content) -}}
{%- for call in message.tool_calls or [] -%}
{{- ('\n' if message.content or not loop.first else '') + '<tool_call>\n' + call_json(call, 'arguments') + '\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or loop_messages[loop.index0 - 1].role != 'tool' -%}
{{- '<|im_start|>user' -}}
{%- endif -%}
{{- '\n<tool_response>\n' + text(message.content) + '\n</tool_response>' -}}
{%- if loop.last or loop_messages[loop.index0 + 1].role != 'tool' -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- else -%}
{{- '<|im_start|>' + message.role + '\n' + text(message.content) + '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""
)

# Llama 3 / 3.1: header tokens around each role, contents trimmed, <|eot_id|> ends every turn. Tools (3.1 style):
# JSON signatures in the system turn, a call is one JSON object {"name", "parameters"}, results come back in an
# `ipython` turn.
_LLAMA3 = (
    _MACROS
    + r"""
{{- bos_token if bos_token is defined else '' -}}
{%- if messages[0].role == 'system' -%}
{%- set system = text(messages[0].content) | trim -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- if system or tools -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' + system -}}
{%- if tools -%}
{{- ('\n\n' if system else '') + 'You can call the following functions. To call one, reply with only a JSON object of the form {"name": function name, "parameters": dictionary of argument names and values}.' -}}
{%- for tool in tools -%}
{{- '\n\n' + tool | tojson(indent=4) -}}
{%- endfor -%}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == 'assistant' -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' + text(message.content) | trim -}}
{%- if message.tool_calls -%}
{%- if message.tool_calls | length > 1 -%}
{{- raise_exception('the llama3 template supports one tool call per assistant message') -}}
{%- endif -%}
{{- ('\n' if message.content else '') + call_json(message.tool_calls[0], 'parameters') -}}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- else -%}
{{- '<|start_header_id|>' + ('ipython' if message.role == 'tool' else message.role) + '<|end_header_id|>\n\n' + text(message.content) | trim + '<|eot_id|>' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
"""
)

# Mistral instruct ([INST] format): the system prompt opens the first user turn, each answer ends with eos. The
# generation prompt is empty: the prompt ends with " [/INST]" and the answer starts with a space.
_MISTRAL = (
    _MACROS
    + r"""
{%- set eos = eos_token if eos_token is defined else '' -%}
{%- if tools -%}"""
    + _NO_TOOLS % "mistral"
    + r"""{%- endif -%}
{{- bos_token if bos_token is defined else '' -}}
{%- if messages[0].role == 'system' -%}
{%- set ns = namespace(system=text(messages[0].content)) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set ns = namespace(system='') -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == 'user' -%}
{{- '[INST] ' + (ns.system + '\n\n' if ns.system else '') + text(message.content) + ' [/INST]' -}}
{%- set ns.system = '' -%}
{%- elif message.role == 'assistant' and not message.tool_calls -%}
{{- ' ' + text(message.content) + eos -}}
{%- else -%}"""
    + _NO_TOOLS % "mistral"
    + r"""{%- endif -%}
{%- endfor -%}
"""
)

# Gemma: user/model turns; no system role, so the system prompt opens the first user turn; contents trimmed.
_GEMMA = (
    _MACROS
    + r"""
{%- if tools -%}"""
    + _NO_TOOLS % "gemma"
    + r"""{%- endif -%}
{{- bos_token if bos_token is defined else '' -}}
{%- if messages[0].role == 'system' -%}
{%- set ns = namespace(system=text(messages[0].content) | trim) -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set ns = namespace(system='') -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if message.role == 'user' -%}
{{- '<start_of_turn>user\n' + (ns.system + '\n\n' if ns.system else '') + text(message.content) | trim + '<end_of_turn>\n' -}}
{%- set ns.system = '' -%}
{%- elif message.role == 'assistant' and not message.tool_calls -%}
{{- '<start_of_turn>model\n' + text(message.content) | trim + '<end_of_turn>\n' -}}
{%- else -%}"""
    + _NO_TOOLS % "gemma"
    + r"""{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<start_of_turn>model\n' -}}
{%- endif -%}
"""
)

# Phi-3: <|role|> headers and <|end|> after every turn.
_PHI = (
    _MACROS
    + r"""
{%- if tools -%}"""
    + _NO_TOOLS % "phi"
    + r"""{%- endif -%}
{%- for message in messages -%}
{%- if message.role in ['system', 'user'] or (message.role == 'assistant' and not message.tool_calls) -%}
{{- '<|' + message.role + '|>\n' + text(message.content) + '<|end|>\n' -}}
{%- else -%}"""
    + _NO_TOOLS % "phi"
    + r"""{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>\n' -}}
{%- endif -%}
"""
)


class BuiltinTemplate(NamedTuple):
    """A built-in template: its jinja source and the strings that end an assistant turn at generation time."""

    source: str
    stop_strings: tuple[str, ...]


# The names users write in `data.template`. Stop strings are used by generation; the single-token ones become stop
# token ids (see ChatTemplate.stop_token_ids).
BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    "default": BuiltinTemplate(_DEFAULT, ("\nUser:",)),
    "alpaca": BuiltinTemplate(_ALPACA, ("### Instruction:",)),
    "chatml": BuiltinTemplate(_CHATML, ("<|im_end|>",)),
    "qwen": BuiltinTemplate(_QWEN, ("<|im_end|>", "<|endoftext|>")),
    "llama3": BuiltinTemplate(_LLAMA3, ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")),
    "mistral": BuiltinTemplate(_MISTRAL, ("</s>",)),
    "gemma": BuiltinTemplate(_GEMMA, ("<end_of_turn>", "<eos>")),
    "phi": BuiltinTemplate(_PHI, ("<|end|>", "<|endoftext|>")),
}

# End-of-turn markers recognised in templates we did not write (a tokenizer's own, a .jinja file).
_KNOWN_STOP_STRINGS: tuple[str, ...] = tuple(
    dict.fromkeys(s for t in BUILTIN_TEMPLATES.values() for s in t.stop_strings if s.startswith("<"))
)

Span = tuple[int, int, int]  # (start_char, end_char, message index)


class ChatTemplate:
    """A jinja chat template bound to the tokenizer whose ``apply_chat_template`` renders it."""

    def __init__(self, name: str, source: str, stop_strings: tuple[str, ...] | list[str], tokenizer: Any):
        self.name = name
        self.source = source
        self.stop_strings = tuple(stop_strings)
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, stop_strings={self.stop_strings!r})"

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = False,
    ) -> str:
        """The conversation as text, exactly as ``tokenizer.apply_chat_template(..., tokenize=False)`` renders it."""
        import jinja2  # transformers depends on jinja2; imported here to keep this module cheap to import

        try:
            return self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.source,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise UserError(f"chat template {self.name!r} failed: {e}") from e

    def assistant_spans(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = False,
    ) -> tuple[str, list[Span]]:
        """The rendered text and, per assistant message, ``(start_char, end_char, message_index)``.

        A span starts where the generation prompt ends (so it holds what the model must produce) and ends after the
        template's end-of-turn marker; whitespace the template writes after that marker (the newline between turns)
        is left out, since generation stops at the marker. ``add_generation_prompt`` renders the whole text with the
        generation prompt appended, for prompts that end in a user turn.
        """
        full = self.render(messages, tools, add_generation_prompt=add_generation_prompt)
        spans: list[Span] = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            if i == 0:
                raise UserError(
                    "the conversation starts with an assistant message: a chat template needs a prompt before it "
                    "(add a user turn, or a system prompt with data.system)"
                )
            before = self.render(messages[:i], tools, add_generation_prompt=True)
            through = self.render(messages[: i + 1], tools) if i + 1 < len(messages) or add_generation_prompt else full
            if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
                raise UserError(
                    f"chat template {self.name!r} does not render conversations incrementally (the rendering of "
                    f"messages[:{i + 1}] is not a prefix of the whole conversation: the template rewrites earlier "
                    f"turns), so assistant turns cannot be located for the loss mask; choose a built-in template "
                    f"with data.template ({', '.join(BUILTIN_TEMPLATES)})"
                )
            start = len(before)
            end = start + len(through[start:].rstrip())
            spans.append((start, end, i))
        return full, spans

    def stop_token_ids(self, tokenizer: Any = None) -> list[int]:
        """Token ids that end generation: the tokenizer's eos plus the stop strings that are single tokens in it."""
        tok = tokenizer if tokenizer is not None else self.tokenizer
        ids: list[int] = []
        eos = tok.eos_token_id
        if isinstance(eos, int):
            ids.append(eos)
        for s in self.stop_strings:
            encoded = tok.encode(s, add_special_tokens=False)
            if len(encoded) == 1 and encoded[0] not in ids:
                ids.append(encoded[0])
        return ids


def _detect_stop_strings(source: str) -> tuple[str, ...]:
    """End-of-turn markers that a template written elsewhere mentions."""
    return tuple(s for s in _KNOWN_STOP_STRINGS if s in source)


def resolve_template(name: str, tokenizer: Any) -> ChatTemplate:
    """The template for ``data.template``: ``auto``, a built-in name, or a path to a ``.jinja`` file.

    ``auto`` uses the tokenizer's own chat template when it has one (that is what the model was tuned with and what
    inference servers will apply), else the plain ``default`` template.
    """
    if name == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one is the chat template
            own = own.get("default")
        if own:
            return ChatTemplate("auto (tokenizer's own)", own, _detect_stop_strings(own), tokenizer)
        name = "default"
    if name in BUILTIN_TEMPLATES:
        builtin = BUILTIN_TEMPLATES[name]
        return ChatTemplate(name, builtin.source, builtin.stop_strings, tokenizer)
    path = Path(name).expanduser()
    if name.endswith(".jinja") or path.is_file():
        if not path.is_file():
            raise UserError(f"data.template: chat template file not found: {name}")
        source = path.read_text(encoding="utf-8")
        return ChatTemplate(str(path), source, _detect_stop_strings(source), tokenizer)
    choices = ["auto", *BUILTIN_TEMPLATES]
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise UserError(
        f"data.template: unknown template {name!r}; {hint}use auto, one of {', '.join(BUILTIN_TEMPLATES)}, "
        "or a path to a .jinja file"
    )
