"""The canonical row every input format is converted to.

Messages use the Hugging Face chat format so that jinja chat templates render them directly:
``{"role": "system" | "user" | "assistant" | "tool", "content": str}``; an assistant message that calls functions
carries ``"tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}}]``.
Plain-text rows (pre-training) carry ``text`` and no messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Conversation:
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # function schemas offered to the model (JSON-schema dicts)
    text: str | None = None  # plain-text rows (format: text); messages stay empty
    source: str = ""  # where the row came from, e.g. "data/train.jsonl:12"

    @property
    def is_text(self) -> bool:
        return self.text is not None
