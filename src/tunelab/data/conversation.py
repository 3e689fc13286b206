"""The canonical row every input format is converted to.

Messages use the Hugging Face chat format so that jinja chat templates render them directly:
``{"role": "system" | "user" | "assistant" | "tool", "content": str}``; an assistant message that calls functions
carries ``"tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}]``.
Plain-text rows (pre-training) carry ``text`` and no messages.

Preference and KTO rows are the same dataclass with one or two more fields, so that every loader, reader and report
handles them unchanged:

- a preference row (data kind ``pairs``) holds the *prompt* in ``messages`` (system, earlier turns, and a last turn
  from the user or a tool) and the two competing answers in ``chosen`` and ``rejected``, each one assistant
  message (possibly with ``tool_calls``);
- a KTO row (data kind ``kto``) is an ordinary conversation ending with an assistant turn, plus ``label``: True when
  that last answer is desirable, False when it is not;
- a prompt row (data kind ``prompts``, for methods that generate their own answers) holds the prompt in ``messages``
  (ending with a user or tool turn) and every other column of the row in ``extra``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Conversation:
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # function schemas offered to the model (JSON-schema dicts)
    text: str | None = None  # plain-text rows (format: text); messages stay empty
    source: str = ""  # where the row came from, e.g. "data/train.jsonl:12"
    chosen: dict[str, Any] | None = None  # preference rows: the preferred assistant message after `messages`
    rejected: dict[str, Any] | None = None  # preference rows: the dispreferred assistant message
    label: bool | None = None  # KTO rows: whether the last assistant turn is desirable
    extra: dict[str, Any] | None = None  # prompt rows: the row's other columns, passed on to reward functions

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def is_pair(self) -> bool:
        return self.chosen is not None and self.rejected is not None

    def with_answer(self, which: str) -> list[dict[str, Any]]:
        """A preference row's prompt followed by its ``"chosen"`` or ``"rejected"`` answer: a whole conversation."""
        answer = self.chosen if which == "chosen" else self.rejected if which == "rejected" else None
        if answer is None:
            raise ValueError(f"which must be 'chosen' or 'rejected' on a preference row, got {which!r}")
        return [*self.messages, answer]
