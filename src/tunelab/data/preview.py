"""`tunelab data preview`: show a tokenized row with the trained tokens highlighted.

Seeing exactly which tokens the loss covers (and that each answer ends with its end-of-turn token) is the quickest
check that a template and the masking options do what the user expects.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from tunelab.data.tokenize import IGNORE_INDEX, Encoded

TRAINED_START, TRAINED_END = "[[", "]]"
_GREEN, _DIM, _RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def render_preview(encoded: Encoded, tokenizer: Any, *, color: bool) -> str:
    """The decoded row, trained runs in green (``color``) or wrapped in ``[[ ]]``, then a line of counts.

    Masked text is dimmed in colour mode and left plain otherwise. Special tokens are shown as written.
    Runs are decoded separately, so a character split across a trained/masked boundary (only possible inside a
    byte-level multi-byte character) would show as a replacement character.
    """
    parts: list[str] = []
    for trained, group in groupby(zip(encoded.input_ids, encoded.labels), key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in group], skip_special_tokens=False)
        if color:
            parts.append(f"{_GREEN if trained else _DIM}{text}{_RESET}")
        else:
            parts.append(f"{TRAINED_START}{text}{TRAINED_END}" if trained else text)
    counts = (
        f"tokens: {len(encoded.input_ids)}, trained: {encoded.num_trained}, "
        f"truncated: {'yes' if encoded.truncated else 'no'}"
    )
    header = f"{encoded.source}\n" if encoded.source else ""
    return f"{header}{''.join(parts)}\n{counts}"
