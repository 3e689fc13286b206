"""`tunelab data preview`: show a tokenized row with the trained tokens highlighted.

Seeing exactly which tokens the loss covers (and that each answer ends with its end-of-turn token) is the quickest
check that a template and the masking options do what the user expects. Preference rows show the shared prompt
once, then each answer with its trained tokens; KTO rows show their label; prompts show the rendered prompt a
rollout starts from and the columns passed on with it.
"""

from __future__ import annotations

import json
from itertools import groupby
from typing import Any

from tunelab.data.tokenize import IGNORE_INDEX, Encoded, EncodedKTO, EncodedPair, EncodedPrompt

TRAINED_START, TRAINED_END = "[[", "]]"
_GREEN, _DIM, _RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def render_preview(encoded: Encoded | EncodedPair, tokenizer: Any, *, color: bool, header: bool = True) -> str:
    """The decoded row, trained runs in green (``color``) or wrapped in ``[[ ]]``, then a line of counts.

    Masked text is dimmed in colour mode and left plain otherwise. Special tokens are shown as written.
    Runs are decoded separately, so a character split across a trained/masked boundary (only possible inside a
    byte-level multi-byte character) would show as a replacement character.

    A preference pair shows as ``prompt:``, ``chosen:`` and ``rejected:`` sections (the prompt once: it is
    identical in both sequences); a KTO row adds ``label: desirable`` or ``label: undesirable`` to the counts.
    ``header``: start with the row's source (FILE:LINE); off when the caller prints it already.
    """
    top = f"{encoded.source}\n" if encoded.source and header else ""
    truncated = f"truncated: {'yes' if encoded.truncated else 'no'}"
    if isinstance(encoded, EncodedPrompt):
        prompt = _runs(encoded.prompt_ids, [IGNORE_INDEX] * len(encoded.prompt_ids), tokenizer, color)
        columns = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)[:60]}" for k, v in encoded.extra.items())
        return (f"{top}prompt (generation starts after it):\n{prompt}\n"
                f"prompt tokens: {len(encoded.prompt_ids)}, {truncated}, columns: {columns or 'none'}")
    if isinstance(encoded, EncodedPair):
        prompt = _runs(encoded.prompt_ids, [IGNORE_INDEX] * len(encoded.prompt_ids), tokenizer, color)
        sections = [f"prompt:\n{prompt}"]
        for name in ("chosen", "rejected"):
            ids, labels = getattr(encoded, f"{name}_ids"), getattr(encoded, f"{name}_labels")
            trained = sum(label != IGNORE_INDEX for label in labels)
            sections.append(f"{name} ({trained} trained tokens):\n{_runs(ids, labels, tokenizer, color)}")
        counts = (
            f"prompt tokens: {len(encoded.prompt_ids)}, chosen tokens: {len(encoded.chosen_ids)}, rejected tokens: "
            f"{len(encoded.rejected_ids)}, {truncated}"
        )
        return f"{top}{chr(10).join(sections)}\n{counts}"
    counts = f"tokens: {len(encoded.input_ids)}, trained: {encoded.num_trained}, {truncated}"
    if isinstance(encoded, EncodedKTO):
        counts += f", label: {'desirable' if encoded.desirable else 'undesirable'}"
    return f"{top}{_runs(encoded.input_ids, encoded.labels, tokenizer, color)}\n{counts}"


def _runs(ids: list[int], labels: list[int], tokenizer: Any, color: bool) -> str:
    """Decoded text with trained runs highlighted (green, or inside ``[[ ]]``) and masked runs plain or dimmed."""
    parts: list[str] = []
    for trained, group in groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in group], skip_special_tokens=False)
        if color:
            parts.append(f"{_GREEN if trained else _DIM}{text}{_RESET}")
        else:
            parts.append(f"{TRAINED_START}{text}{TRAINED_END}" if trained else text)
    return "".join(parts)


def token_counts(encoded: Encoded | EncodedPair) -> tuple[int, int]:
    """(tokens, trained tokens) of a token row, for `data check` statistics; a pair counts its longer sequence
    (what max_length truncates and its padded batch rows are sized by) and the trained tokens of both answers, so
    its trained count can exceed its token count: `data check` labels both numbers for pairs."""
    if isinstance(encoded, EncodedPair):
        return encoded.length, encoded.num_trained
    return len(encoded.input_ids), encoded.num_trained
