"""From a data config to token rows ready for training: load, validate, split, render, tokenize, mask, report."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.config.schema import DataConfig
from tunelab.data.load import load_conversations, split_validation
from tunelab.data.templates import ChatTemplate, resolve_template
from tunelab.data.tokenize import Encoded, encode_conversation, encode_text
from tunelab.errors import UserError


@dataclass
class Prepared:
    train: list[Encoded]
    val: list[Encoded]
    template: ChatTemplate
    lines: list[str] = field(default_factory=list)  # human-readable report
    stats: dict[str, int] = field(default_factory=dict)


def encode_rows(rows, tokenizer, template: ChatTemplate, cfg: DataConfig, kind: str) -> tuple[list[Encoded], dict[str, int]]:
    """Tokenize conversations; drop (and count) rows left with no trained token after truncation."""
    out: list[Encoded] = []
    stats = {"truncated": 0, "dropped_no_labels": 0}
    for conv in rows:
        if conv.is_text:
            enc = encode_text(conv, tokenizer, max_length=cfg.max_length)
        else:
            enc = encode_conversation(
                conv,
                tokenizer,
                template,
                max_length=cfg.max_length,
                train_on_prompt=cfg.train_on_prompt or kind == "text",
                mask_history=cfg.mask_history,
                system=cfg.system,
            )
        stats["truncated"] += int(enc.truncated)
        # labels[0] is never a prediction target (the loss shifts by one), so count from position 1.
        if not any(label != -100 for label in enc.labels[1:]):
            stats["dropped_no_labels"] += 1
            continue
        out.append(enc)
    return out, stats


def prepare_data(cfg: DataConfig, tokenizer, *, kind: str, seed: int) -> Prepared:
    template = resolve_template(cfg.template, tokenizer)
    rows, report = load_conversations(cfg.train, on_bad_row=cfg.on_bad_row, kind=kind)
    lines = [f"data: {report.rows} training rows loaded" + (f", {report.skipped} invalid rows skipped" if report.skipped else "")]
    if cfg.val:
        train_rows = rows
        val_rows, vreport = load_conversations(cfg.val, on_bad_row=cfg.on_bad_row, kind=kind)
    else:
        train_rows, val_rows = split_validation(rows, cfg.val_size, seed)
    train, tstats = encode_rows(train_rows, tokenizer, template, cfg, kind)
    val, vstats = encode_rows(val_rows, tokenizer, template, cfg, kind)
    if not train:
        raise UserError(
            f"data: every training row is empty after truncation to data.max_length={cfg.max_length} "
            f"({tstats['dropped_no_labels']} rows have no trained token left); raise data.max_length"
        )
    lines.append(
        f"data: {len(train)} train / {len(val)} validation rows, template '{template.name}', "
        f"{tstats['truncated'] + vstats['truncated']} truncated to {cfg.max_length} tokens"
        + (
            f", {tstats['dropped_no_labels'] + vstats['dropped_no_labels']} dropped (no trained token left)"
            if tstats["dropped_no_labels"] + vstats["dropped_no_labels"]
            else ""
        )
    )
    stats = {
        "train_rows": len(train),
        "val_rows": len(val),
        "skipped_bad": report.skipped,
        "truncated": tstats["truncated"] + vstats["truncated"],
        "dropped_no_labels": tstats["dropped_no_labels"] + vstats["dropped_no_labels"],
    }
    return Prepared(train=train, val=val, template=template, lines=lines, stats=stats)
