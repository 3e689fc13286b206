"""Data kinds: the shapes of training data a method can ask for, each declared once.

A method names the kind of rows it trains on (`Method.data_kind`). Everything that depends on that shape is declared
here and looked up, never decided by comparing kind names elsewhere:

- how a dataset row is read (`read`: format, row, columns, tags -> Conversation) and which extra columns it has;
- how a conversation is tokenized (`encode`) and which token rows are kept (`keep`: something left to train on);
- how rows become a micro-batch: padded (`pad`) or packed padding-free (`pack`; None: the kind never packs);
- how many sequences the model sees per row (`sequences_per_row`: a preference pair is two), and a row's length;
- what reports and `data check` say about the rows (`unit`, `row_name`, `summary`, `train_report`).

| kind | rows | packs |
|---|---|---|
| chat | conversations; assistant turns trained | yes |
| text | plain text (or conversations rendered whole); every token trained | yes |
| pairs | a prompt with a chosen and a rejected answer | yes (as 2 sequences) |
| kto | a conversation whose last answer is labelled desirable or not | no |
| prompts | a prompt to generate from, plus its other columns | no (nothing trained until a rollout answers it) |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.data.collate import (
    collate_kto,
    collate_pairs,
    collate_pairs_packed,
    collate_prompts,
    pack_collate,
    pad_collate,
)
from tunelab.data.conversation import Conversation
from tunelab.data.formats import (
    FORMATS,
    KTO_COLUMNS,
    PAIR_COLUMNS,
    alpaca_pretrain,
    convert_kto,
    convert_pair,
    convert_prompt,
)
from tunelab.data.templates import ChatTemplate
from tunelab.data.tokenize import (
    EncodedKTO,
    EncodedPair,
    EncodedPrompt,
    encode_conversation,
    encode_kto,
    encode_pair,
    encode_prompt_row,
    encode_text,
    has_trained,
)


@dataclass(frozen=True)
class DataKind:
    name: str
    describe: str  # one line for docs/methods.md
    read: Callable[[str, dict, dict, dict], Conversation]  # (format, row, columns, tags) -> Conversation
    encode: Callable[[Conversation, Any, ChatTemplate, Any], Any]  # (conversation, tokenizer, template, DataConfig)
    pad: Callable[[list, int, int], dict[str, torch.Tensor]]  # (rows, pad_id, max_length) -> padded batch
    # (rows, pad_id, row capacity, min rows) -> packed batch; None: rows of this kind are never packed
    pack: Callable[[list, int, int, int], dict[str, torch.Tensor]] | None = None
    sequences_per_row: int = 1  # sequences the model sees per row (a pair: chosen and rejected)
    keep: Callable[[Any], bool] = has_trained  # token rows worth training on (others are dropped and counted)
    columns: dict[str, str] = field(default_factory=dict)  # dataset columns of this kind beyond the format's
    text_format: bool = False  # reads datasets of format text
    ranking: bool = False  # reads registry datasets marked ranking (preference pairs)
    needs: str = "conversations"  # what its rows must be, for a message about a dataset of another shape
    unit: str = "rows"  # how reports count its rows
    row_name: str = "row"  # one of them, in `data check` statistics
    summary: Callable[[list[Conversation]], list[str]] | None = None  # `data check` lines about loaded rows
    train_report: Callable[[list], str] | None = None  # the training rows, counted for the data report line
    # its rows are single sequences whose trained tokens are next-token targets: perplexity measures them (eval ppl)
    scored_by_perplexity: bool = False

    def batch(self, rows: list, packing: str, pad_id: int, max_length: int, capacity: int | None = None,
              min_rows: int = 1) -> dict[str, torch.Tensor]:
        """Tensors for one micro-batch: packed into rows of at most `capacity` tokens when `packing` is
        padding_free and the kind packs, else padded. Values a method stored on the rows (`Encoded.values`) come
        along as float64 tensors: one entry per sequence in the batch's sequence order, or for a name ending in
        ``_per_token`` (a value per trained token of the row, in position order) all of them concatenated in row
        order, with ``NAME_lengths`` holding each row's count."""
        if packing == "padding_free" and self.pack is not None:
            batch = self.pack(rows, pad_id, capacity or max_length, min_rows)
        else:
            batch = self.pad(rows, pad_id, max_length)
        for name in (rows[0].values if rows else {}):
            if name.endswith("_per_token"):
                batch[name] = torch.tensor([v for r in rows for v in r.values[name]], dtype=torch.float64)
                batch[f"{name}_lengths"] = torch.tensor([len(r.values[name]) for r in rows], dtype=torch.long)
                continue
            per_sequence = [r.values[name][s] for s in range(self.sequences_per_row) for r in rows]
            batch[name] = torch.tensor(per_sequence, dtype=torch.float64)
        return batch

    def length(self, row) -> int:
        """Tokens of a row; a pair counts its longer sequence (what its padded batch rows are sized by)."""
        length = getattr(row, "length", None)
        return int(length) if isinstance(length, int) else len(row.input_ids)


# ------------------------------------------------------------------------------------------------------ readers
def _read_conversation(fmt: str, row: dict, columns: dict, tags: dict) -> Conversation:
    return FORMATS[fmt](row, columns, tags)


def _read_for_text(fmt: str, row: dict, columns: dict, tags: dict) -> Conversation:
    """Text rows as they are; alpaca rows without an answer are plain text under pre-training (`alpaca_pretrain`)."""
    return alpaca_pretrain(row, columns, tags) if fmt == "alpaca" else FORMATS[fmt](row, columns, tags)


# ----------------------------------------------------------------------------------------------------- encoders
def _encode_chat(conv: Conversation, tokenizer, template: ChatTemplate, cfg):
    return encode_conversation(conv, tokenizer, template, max_length=cfg.max_length,
                               train_on_prompt=cfg.train_on_prompt, mask_history=cfg.mask_history, system=cfg.system)


def _encode_text(conv: Conversation, tokenizer, template: ChatTemplate, cfg):
    """Plain text, or a conversation rendered with its template and trained on every token."""
    if conv.is_text:
        return encode_text(conv, tokenizer, max_length=cfg.max_length)
    return encode_conversation(conv, tokenizer, template, max_length=cfg.max_length, train_on_prompt=True,
                               mask_history=cfg.mask_history, system=cfg.system)


def _encode_pair(conv: Conversation, tokenizer, template: ChatTemplate, cfg) -> EncodedPair:
    return encode_pair(conv, tokenizer, template, max_length=cfg.max_length, system=cfg.system)


def _encode_kto(conv: Conversation, tokenizer, template: ChatTemplate, cfg) -> EncodedKTO:
    return encode_kto(conv, tokenizer, template, max_length=cfg.max_length, system=cfg.system)


def _encode_prompt(conv: Conversation, tokenizer, template: ChatTemplate, cfg) -> EncodedPrompt:
    return encode_prompt_row(conv, tokenizer, template, max_length=cfg.max_length, system=cfg.system)


# ----------------------------------------------------------------------------------------------------- batching
def _pad_rows(rows, pad_id: int, max_length: int):
    return pad_collate(rows, pad_id)


def _pad_pairs(rows, pad_id: int, max_length: int):
    return collate_pairs(rows, pad_id)


def _pad_prompts(rows, pad_id: int, max_length: int):
    return collate_prompts(rows, pad_id)


def _has_prompt(row: EncodedPrompt) -> bool:
    return bool(row.prompt_ids)


# ------------------------------------------------------------------------------------------------------ reports
def _prompt_turns(rows: list[Conversation]) -> list[int]:
    return [sum(1 for m in r.messages if m["role"] != "system") for r in rows]


def _assistant_turns(rows: list[Conversation]) -> list[str]:
    turns = [sum(1 for m in r.messages if m["role"] == "assistant") for r in rows if not r.is_text]
    return [f"assistant turns per row: min {min(turns)}, max {max(turns)}"] if turns else []


def _pairs_summary(rows: list[Conversation]) -> list[str]:
    turns = _prompt_turns(rows)
    return [f"preference pairs: {len(rows)}, prompt turns per pair: min {min(turns)}, max {max(turns)}"]


def _kto_summary(rows: list[Conversation]) -> list[str]:
    desirable = sum(bool(r.label) for r in rows)
    return [f"KTO rows: {len(rows)} ({desirable} desirable, {len(rows) - desirable} undesirable)",
            *_assistant_turns(rows)]


def _prompts_summary(rows: list[Conversation]) -> list[str]:
    turns = _prompt_turns(rows)
    columns = sorted({k for r in rows for k in (r.extra or {})})
    return [f"prompts: {len(rows)}, turns per prompt: min {min(turns)}, max {max(turns)}",
            "columns passed on with each prompt: " + (", ".join(columns) if columns else "none")]


def _kto_report(rows: list[EncodedKTO]) -> str:
    desirable = sum(r.desirable for r in rows)
    return f"KTO rows ({desirable} desirable, {len(rows) - desirable} undesirable in train)"


CHAT = DataKind(
    name="chat", describe="conversations (assistant turns trained)", read=_read_conversation, encode=_encode_chat,
    pad=_pad_rows, pack=pack_collate, scored_by_perplexity=True)
TEXT = DataKind(
    name="text", describe="plain text or conversations (every token trained)", read=_read_for_text,
    encode=_encode_text, pad=_pad_rows, pack=pack_collate, text_format=True, needs="conversations or text",
    scored_by_perplexity=True)
PAIRS = DataKind(
    name="pairs", describe="preference pairs (prompt, chosen, rejected)", read=convert_pair, encode=_encode_pair,
    pad=_pad_pairs, pack=collate_pairs_packed, sequences_per_row=2, columns=dict(PAIR_COLUMNS), ranking=True,
    needs="preference pairs", unit="preference pairs", row_name="pair", summary=_pairs_summary)
KTO = DataKind(
    name="kto", describe="answers labelled desirable / undesirable", read=convert_kto, encode=_encode_kto,
    pad=collate_kto, columns=dict(KTO_COLUMNS), needs="conversations with a kto_tag label", unit="KTO rows",
    summary=_kto_summary, train_report=_kto_report)
PROMPTS = DataKind(
    name="prompts", describe="prompts a method generates answers to (other columns passed on)",
    read=convert_prompt, encode=_encode_prompt, pad=_pad_prompts, keep=_has_prompt,
    needs="prompts (conversations ending with a user turn)", unit="prompts", row_name="prompt",
    summary=_prompts_summary)

KINDS: dict[str, DataKind] = {k.name: k for k in (CHAT, TEXT, PAIRS, KTO, PROMPTS)}


def get_kind(kind: str | DataKind) -> DataKind:
    """The kind of that name (a DataKind is returned as it is)."""
    if isinstance(kind, DataKind):
        return kind
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"data kind must be one of {', '.join(KINDS)}, got {kind!r}") from None


def kind_for_format(kind: str | DataKind, fmt: str) -> DataKind:
    """The kind a dataset is read as by `data check`/`data preview`: a file of format text is plain text whatever
    the method, else the method's kind."""
    return TEXT if fmt == "text" else get_kind(kind)
