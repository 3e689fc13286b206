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

Preference rows (`encode_pair`) and KTO rows (`encode_kto`) go through the same rendering and cutting, once per
answer: the prompt followed by the answer as the last assistant turn. Only that answer is trained (earlier assistant
turns are context, whatever ``train_on_prompt``/``mask_history`` say: the preference losses compare the answers'
log-probabilities, and prompt tokens would add the same amount to both). The prompt ids are stored once, so the
chosen and the rejected sequence start with exactly the same ids by construction. Their truncation keeps that
property, see `_truncate_answers`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
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
    # numbers a method computed for this row before training (e.g. DPO's precomputed reference log-probabilities):
    # name -> one value per sequence of the row; the data kind's batch carries them as tensors (data/kinds.py)
    values: dict[str, tuple[float, ...]] = field(default_factory=dict, compare=False, repr=False)

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


@dataclass
class EncodedPair:
    """One tokenized preference row: the shared prompt ids, and each answer's ids and labels (-100 = not trained).

    The full sequences are ``prompt_ids + chosen_ids`` and ``prompt_ids + rejected_ids`` (`chosen` and `rejected`
    build them as `Encoded` rows); the answer lists start where the prompt ends, with the template's generation
    prompt inside the prompt. ``truncated`` is True when either sequence was cut to max_length.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    truncated: bool
    source: str = ""
    values: dict[str, tuple[float, ...]] = field(default_factory=dict, compare=False, repr=False)  # as Encoded's

    @property
    def chosen(self) -> Encoded:
        return self._sequence(self.chosen_ids, self.chosen_labels)

    @property
    def rejected(self) -> Encoded:
        return self._sequence(self.rejected_ids, self.rejected_labels)

    def _sequence(self, ids: list[int], labels: list[int]) -> Encoded:
        prompt = len(self.prompt_ids)
        return Encoded([*self.prompt_ids, *ids], [IGNORE_INDEX] * prompt + list(labels), self.truncated, self.source)

    @property
    def num_trained(self) -> int:
        """Trained tokens of both answers together."""
        return sum(label != IGNORE_INDEX for label in (*self.chosen_labels, *self.rejected_labels))

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences (what a padded batch is sized by)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class EncodedKTO(Encoded):
    """A tokenized KTO row: an `Encoded` conversation whose last answer alone is trained, plus its label."""

    desirable: bool = True


def encode_pair(
    conv: Conversation,
    tokenizer: Any,
    template: ChatTemplate,
    *,
    max_length: int,
    system: str | None = None,
) -> EncodedPair:
    """Tokenize a preference row: the prompt once, each answer as the prompt's last assistant turn (see the module
    docstring), cut to ``max_length`` per sequence by `_truncate_answers`."""
    if not conv.is_pair:
        raise UserError(f"{_where(conv.source)}a preference row needs a prompt plus chosen and rejected answers")
    assert conv.chosen is not None and conv.rejected is not None
    messages = _with_system(conv.messages, system)
    prompt_c, chosen, chosen_labels = _prompt_and_answer([*messages, conv.chosen], conv, tokenizer, template)
    prompt_r, rejected, rejected_labels = _prompt_and_answer([*messages, conv.rejected], conv, tokenizer, template)
    # The prompt texts are identical (templates render incrementally), so with byte-level tokenizers the prompt ids
    # are too. A tokenizer that is run on the whole text (dummy-prefix SentencePiece) may give the prompt's last
    # token to one answer only; then the shared prompt is the common prefix and the rest opens each answer, untrained.
    common = 0
    while common < min(len(prompt_c), len(prompt_r)) and prompt_c[common] == prompt_r[common]:
        common += 1
    chosen, chosen_labels = prompt_c[common:] + chosen, [IGNORE_INDEX] * (len(prompt_c) - common) + chosen_labels
    rejected = prompt_r[common:] + rejected
    rejected_labels = [IGNORE_INDEX] * (len(prompt_r) - common) + rejected_labels
    prompt, ((chosen, chosen_labels), (rejected, rejected_labels)), truncated = _truncate_answers(
        prompt_c[:common], [(chosen, chosen_labels), (rejected, rejected_labels)], max_length
    )
    return EncodedPair(prompt, chosen, chosen_labels, rejected, rejected_labels, truncated, conv.source)


def encode_kto(
    conv: Conversation,
    tokenizer: Any,
    template: ChatTemplate,
    *,
    max_length: int,
    system: str | None = None,
) -> EncodedKTO:
    """Tokenize a KTO row like one side of a pair: the last assistant turn is the trained answer, the rest prompt."""
    if conv.label is None or not conv.messages or conv.messages[-1].get("role") != "assistant":
        raise UserError(f"{_where(conv.source)}a KTO row needs a conversation ending with an answer, and a label")
    messages = _with_system(conv.messages, system)
    prompt, answer, labels = _prompt_and_answer(messages, conv, tokenizer, template)
    prompt, ((answer, labels),), truncated = _truncate_answers(prompt, [(answer, labels)], max_length)
    return EncodedKTO(
        [*prompt, *answer], [IGNORE_INDEX] * len(prompt) + labels, truncated, conv.source, desirable=bool(conv.label)
    )


def _prompt_and_answer(
    messages: list[dict[str, Any]], conv: Conversation, tokenizer: Any, template: ChatTemplate
) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, answer ids, answer labels) of a conversation whose last message is the answer.

    The cut between the two is the start of the last assistant span, i.e. right after the generation prompt; only
    that span is trained (what follows the end-of-turn marker, such as the newline between turns, stays untrained
    as in `encode_conversation`).
    """
    try:
        text, spans = template.assistant_spans(messages, conv.tools)
    except UserError as e:
        raise UserError(f"{_where(conv.source)}{e.message}", e.details) from e
    start, end, _ = spans[-1]
    ids, pieces = _encode_pieces(tokenizer, text, [c for s, e, _ in spans for c in (s, e)])
    prompt: list[int] = []
    answer: list[int] = []
    labels: list[int] = []
    for (a, b), piece_ids in zip(pieces, ids):
        if b <= start:
            prompt.extend(piece_ids)
            continue
        answer.extend(piece_ids)
        labels.extend(piece_ids if start <= a and b <= end else [IGNORE_INDEX] * len(piece_ids))
    return prompt, answer, labels


def _truncate_answers(
    prompt: list[int], answers: list[tuple[list[int], list[int]]], max_length: int
) -> tuple[list[int], list[tuple[list[int], list[int]]], bool]:
    """Cut (prompt, answers) so that prompt + each answer fits in max_length, keeping one prompt for all answers.

    Answers are cut first, from the right, to what the prompt leaves, but never below half of max_length (a long
    prompt must not squeeze the answers out: they are what the loss compares). Then, if the prompt still does not
    fit next to the longest answer, it is cut from the *left*: the earliest history goes (and with it the system
    prompt and any bos token), while the last user turn and the generation prompt, which the answers reply to,
    stay. Every answer keeps at least one token, so a truncated row is never left without trained tokens unless its
    answer had none.
    """
    longest = max(len(ids) for ids, _ in answers)
    if len(prompt) + longest <= max_length:
        return prompt, answers, False
    budget = max(max_length - len(prompt), max_length // 2)
    answers = [(ids[:budget], labels[:budget]) for ids, labels in answers]
    room = max_length - max(len(ids) for ids, _ in answers)
    if len(prompt) > room:
        prompt = prompt[len(prompt) - room:] if room > 0 else []
    return prompt, answers, True


def _where(source: str) -> str:
    return f"{source}: " if source else ""


@dataclass
class EncodedPrompt:
    """A tokenized prompt (data kind prompts): the conversation so far plus the template's generation prompt, the
    ids a rollout generates from, and every other column of the row (``extra``: a reference answer, tests, ...),
    which travels with it to whatever judges the generated answers. Nothing of it is trained."""

    prompt_ids: list[int]
    truncated: bool
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)  # the conversation (system prompt included)
    values: dict[str, tuple[float, ...]] = field(default_factory=dict, compare=False, repr=False)  # as Encoded's

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids

    @property
    def num_trained(self) -> int:
        return 0


def encode_prompt_row(conv: Conversation, tokenizer: Any, template: ChatTemplate, *, max_length: int,
                      system: str | None = None) -> EncodedPrompt:
    """A prompt row for generation. A prompt longer than ``max_length`` is cut from the *left*, as preference prompts
    are (`_truncate_answers`): the earliest history goes, the last user turn and the generation prompt stay."""
    try:
        ids = encode_prompt(conv.messages, tokenizer, template, tools=conv.tools, system=system)
    except UserError as e:
        raise UserError(f"{_where(conv.source)}{e.message}", e.details) from e
    truncated = len(ids) > max_length
    if truncated:
        ids = ids[len(ids) - max_length:]
    return EncodedPrompt(ids, truncated, conv.source, dict(conv.extra or {}), _with_system(conv.messages, system))


def has_trained(enc: Encoded | EncodedPair) -> bool:
    """Whether a token row still has something to learn from: a trained token after position 0 (labels[0] is never
    a prediction target, the loss shifts by one), or for a pair a trained token in *both* answers (a pair with one
    side cut away cannot be compared)."""
    if isinstance(enc, EncodedPair):
        prompted = bool(enc.prompt_ids)
        return all(
            any(label != IGNORE_INDEX for label in labels[0 if prompted else 1:])
            for labels in (enc.chosen_labels, enc.rejected_labels)
        )
    return any(label != IGNORE_INDEX for label in enc.labels[1:])
