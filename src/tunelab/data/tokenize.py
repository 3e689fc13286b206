"""Conversations -> token ids and labels (the loss mask).

How a row becomes tokens:

1. The chat template renders the whole conversation once, and prefix rendering locates every assistant turn as a
   character span (`ChatTemplate.assistant_spans`): from the end of the generation prompt to the end of the
   template's end-of-turn marker.
2. The text is tokenized in one batched tokenizer call, cut only at the span boundaries. Inside a piece,
   byte-level BPE merges freely (the answer and its end-of-turn token are tokenized together, as the model
   will see them). At a boundary, the cut guarantees that no token straddles prompt and answer: a token merged across
   the end of the generation prompt (ChatML's ``assistant\\n`` + an answer indented with spaces -> ``"\\n   "``), or
   a trailing ``\\n\\n`` that the pre-tokenizer splits differently at the end of a string, would train the model on a
   token sequence it never sees at inference, where the prompt is tokenized on its own and the first generated token
   starts exactly there.
   The same cuts make `encode_prompt` return exactly the ids that precede the last answer in training.
   Usually the cuts change nothing (the ids equal ``tokenizer(text)``); they matter only where a merge would cross
   a boundary, e.g. an answer that starts with whitespace. Tokenizers that prepend a space to every string (SentencePiece's
   dummy prefix) cannot be cut without inserting spaces; for them the text is tokenized whole, with offsets, and a
   token that straddles a boundary belongs to the side it starts on.
3. A token is trained iff it starts inside a trained span: every assistant turn, only the last one with
   ``mask_history``, or every token with ``train_on_prompt``. Labels hold the token id where trained and -100
   elsewhere; they are *not* shifted (the model shifts them, as Hugging Face models do).
4. Rows longer than ``max_length`` are cut from the right and flagged ``truncated``.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

from tunelab.data.conversation import Conversation
from tunelab.data.templates import ChatTemplate
from tunelab.errors import UserError

IGNORE_INDEX = -100  # label value the loss skips (PyTorch cross_entropy's default ignore_index)


@dataclass
class Encoded:
    """One tokenized row: ids, labels (-100 = not trained) and whether it was cut to max_length."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool
    source: str = ""

    @property
    def num_trained(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def encode_conversation(
    conv: Conversation,
    tokenizer: Any,
    template: ChatTemplate,
    *,
    max_length: int,
    train_on_prompt: bool = False,
    mask_history: bool = False,
    system: str | None = None,
) -> Encoded:
    """Tokenize a chat row and mark the tokens the loss is computed on (see the module docstring).

    A row whose assistant turns were all cut off by truncation (or that has none) comes back with no trained token;
    the caller drops and reports such rows.
    """
    if not conv.messages:
        raise UserError(f"{_where(conv.source)}a chat row needs messages (plain-text rows are for method pt)")
    messages = _with_system(conv.messages, system)
    try:
        text, spans = template.assistant_spans(messages, conv.tools)
    except UserError as e:
        raise UserError(f"{_where(conv.source)}{e.message}", e.details) from e
    trained_spans = spans[-1:] if mask_history else spans
    ids, pieces = _encode_pieces(tokenizer, text, [c for s, e, _ in spans for c in (s, e)])
    labels: list[int] = []
    for (start, end), piece_ids in zip(pieces, ids):
        # Pieces never cross a span boundary, so a piece is either inside a span or outside all of them.
        trained = train_on_prompt or any(s <= start and end <= e for s, e, _ in trained_spans)
        labels.extend(piece_ids if trained else [IGNORE_INDEX] * len(piece_ids))
    input_ids = [i for piece_ids in ids for i in piece_ids]
    return _truncate(input_ids, labels, max_length, conv.source)


def encode_text(conv: Conversation, tokenizer: Any, *, max_length: int) -> Encoded:
    """Tokenize a plain-text row for pre-training: text + eos, every token trained.

    The tokenizer's own special tokens are added (a Llama-style tokenizer prepends its bos, as in the model's
    pre-training; byte-level tokenizers like the tiny models' add nothing), then eos closes the document so the
    model learns where documents end.
    """
    if conv.text is None:
        raise UserError(f"{_where(conv.source)}a text row needs a 'text' field (chat rows are for method sft)")
    ids = list(tokenizer(conv.text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if isinstance(eos, int) and (not ids or ids[-1] != eos):
        ids.append(eos)
    return _truncate(ids, list(ids), max_length, conv.source)


def encode_prompt(
    messages: list[dict[str, Any]],
    tokenizer: Any,
    template: ChatTemplate,
    *,
    tools: list[dict[str, Any]] | None = None,
    system: str | None = None,
) -> list[int]:
    """Token ids of a generation prompt: the conversation so far plus the template's generation prompt.

    Cut at the same boundaries as `encode_conversation`, so for a conversation ending in an answer, the prompt of
    ``messages[:-1]`` is exactly the training ids before that answer.
    """
    messages = _with_system(messages, system)
    text, spans = template.assistant_spans(messages, tools, add_generation_prompt=True)
    ids, _ = _encode_pieces(tokenizer, text, [c for s, e, _ in spans for c in (s, e)])
    return [i for piece_ids in ids for i in piece_ids]


def _with_system(messages: list[dict[str, Any]], system: str | None) -> list[dict[str, Any]]:
    """The messages with ``system`` as a leading system message when they have none."""
    if system is None or any(m.get("role") == "system" for m in messages):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def _encode_pieces(
    tokenizer: Any, text: str, cuts: list[int]
) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """Tokenize ``text`` cut at ``cuts`` (character positions): the ids of each piece, and the pieces' bounds."""
    bounds = sorted({0, len(text), *(c for c in cuts if 0 < c < len(text))})
    pieces = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    if not pieces:
        return [], []
    # Chat templates write their special tokens (bos included) themselves: add_special_tokens=False, as
    # apply_chat_template(tokenize=True) does.
    if not _adds_prefix_space(tokenizer):
        encoded = tokenizer([text[a:b] for a, b in pieces], add_special_tokens=False)["input_ids"]
        return [list(piece_ids) for piece_ids in encoded], pieces
    # Tokenizers that prepend a space to every string they encode (SentencePiece's dummy prefix, as in Llama 2,
    # Mistral v0.x and Phi-3, or add_prefix_space=True) would insert a space at every cut. Tokenize the text once
    # instead and give each token to the piece its first character falls in; a token that straddles a cut then
    # belongs to the piece it starts in.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = [a for a, _ in pieces]
    ids: list[list[int]] = [[] for _ in pieces]
    for token_id, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        ids[max(bisect.bisect_right(starts, start) - 1, 0)].append(token_id)
    return ids, pieces


def _adds_prefix_space(tokenizer: Any) -> bool:
    """Whether encoding a string on its own changes its first token (a space/dummy prefix is added)."""
    alone = tokenizer("a", add_special_tokens=False)["input_ids"]
    after_newline = tokenizer("\na", add_special_tokens=False)["input_ids"]
    return after_newline[-len(alone):] != alone


def _truncate(input_ids: list[int], labels: list[int], max_length: int, source: str) -> Encoded:
    truncated = len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return Encoded(input_ids=input_ids, labels=labels, truncated=truncated, source=source)


def _where(source: str) -> str:
    return f"{source}: " if source else ""
