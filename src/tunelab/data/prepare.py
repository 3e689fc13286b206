"""From a data config to token rows ready for training: load, validate, split, render, tokenize, mask, report.

What a token row is depends on the data kind the method declares (data/kinds.py): `Encoded` for chat and text,
`EncodedPair` for pairs (preference methods), `EncodedKTO` for kto, `EncodedPrompt` for prompts. Every kind goes
through the same loading, splitting, caching, truncation report and dropping of rows the kind does not keep.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.config.schema import DataConfig
from tunelab.data.kinds import DataKind, get_kind
from tunelab.data.load import load_conversations, split_validation
from tunelab.data.templates import ChatTemplate, resolve_template
from tunelab.data.tokenize import Encoded, EncodedKTO, EncodedPair, EncodedPrompt
from tunelab.errors import UserError


@dataclass
class Prepared:
    train: list[Encoded] | list[EncodedPair] | list[EncodedKTO] | list[EncodedPrompt]
    val: list[Encoded] | list[EncodedPair] | list[EncodedKTO] | list[EncodedPrompt]
    template: ChatTemplate
    lines: list[str] = field(default_factory=list)  # human-readable report
    stats: dict[str, int] = field(default_factory=dict)
    cached: bool = False  # loaded from the tokenization cache
    seconds: float = 0.0  # preprocessing time


_WORKER: dict = {}


def _init_worker(tokenizer, template, cfg, kind: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER.update(tokenizer=tokenizer, template=template, cfg=cfg, kind=get_kind(kind))


def _encode_chunk(rows) -> list:
    w = _WORKER
    return [w["kind"].encode(c, w["tokenizer"], w["template"], w["cfg"]) for c in rows]


def encode_rows(
    rows, tokenizer, template: ChatTemplate, cfg: DataConfig, kind: str | DataKind
) -> tuple[list, dict[str, int]]:
    """Tokenize conversations as the data kind does (in cfg.num_proc processes for large inputs); drop and count
    the rows the kind does not keep (nothing left to train on after truncation)."""
    kind = get_kind(kind)
    procs = min(cfg.num_proc, max(1, len(rows) // 500))
    if procs > 1:
        import multiprocessing as mp

        chunk = (len(rows) + procs * 4 - 1) // (procs * 4)
        parts = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
        with mp.get_context("fork").Pool(procs, _init_worker, (tokenizer, template, cfg, kind.name)) as pool:
            encoded = [e for part in pool.map(_encode_chunk, parts) for e in part]
    else:
        encoded = [kind.encode(c, tokenizer, template, cfg) for c in rows]
    out: list = []
    stats = {"truncated": 0, "dropped_no_labels": 0}
    for enc in encoded:
        stats["truncated"] += int(enc.truncated)
        if not kind.keep(enc):
            stats["dropped_no_labels"] += 1
            continue
        out.append(enc)
    return out, stats


def prepare_data(cfg: DataConfig, tokenizer, *, kind: str | DataKind, seed: int,
                 use_cache: bool | None = None) -> Prepared:
    """Token rows for training and validation, from the tokenization cache when the inputs are unchanged."""
    from tunelab.data import cache

    kind = get_kind(kind)
    template = resolve_template(cfg.template, tokenizer)
    use_cache = cfg.cache if use_cache is None else use_cache
    t0 = time.perf_counter()
    if use_cache:
        root = Path(cfg.cache_dir) if cfg.cache_dir else cache.default_cache_dir()
        key = cache.cache_key(cfg, tokenizer, template.source, kind=kind.name, seed=seed)
        hit = cache.load(root, key)
        if hit is not None:
            splits, meta = hit
            lines = [*meta["lines"], f"data: loaded {len(splits['train'])} + {len(splits['val'])} tokenized rows "
                     f"from the cache in {time.perf_counter() - t0:.2f}s ({root / key})"]
            return Prepared(splits["train"], splits["val"], template, lines, meta["stats"], cached=True,
                            seconds=time.perf_counter() - t0)
    prepared = _prepare(cfg, tokenizer, template, kind=kind, seed=seed)
    prepared.seconds = time.perf_counter() - t0
    prepared.lines.append(f"data: tokenized in {prepared.seconds:.2f}s"
                          + (f" with {cfg.num_proc} processes" if cfg.num_proc > 1 else ""))
    if use_cache:
        try:
            cache.save(root, key, {"train": prepared.train, "val": prepared.val},
                       {"lines": prepared.lines[:-1], "stats": prepared.stats})
        except OSError as e:  # a read-only cache folder costs speed, not correctness
            prepared.lines.append(f"data: could not write the tokenization cache in {root}: {e.strerror or e}")
    return prepared


def prepare_stream(cfg: DataConfig, tokenizer, *, kind: str | DataKind, seed: int):
    """(Prepared with the validation rows only, TokenStream of the training rows) for data.streaming."""
    from tunelab.data.stream import TokenStream, placeholder_warnings

    kind = get_kind(kind)
    template = resolve_template(cfg.template, tokenizer)
    val: list = []
    warnings: list[str] = []
    if cfg.val:
        rows, vreport = load_conversations(cfg.val, on_bad_row=cfg.on_bad_row, kind=kind, replace=cfg.replace)
        val, _ = encode_rows(rows, tokenizer, template, cfg, kind)
        warnings = vreport.warnings
    lines = [f"data: streaming the training rows (shuffle buffer {cfg.shuffle_buffer}), {len(val)} validation rows, "
             f"template '{template.name}'", *placeholder_warnings(cfg, kind), *warnings]
    stats = {"train_rows": -1, "val_rows": len(val)}
    return Prepared([], val, template, lines, stats), TokenStream(cfg, tokenizer, template, kind=kind, seed=seed)


def _prepare(cfg: DataConfig, tokenizer, template: ChatTemplate, *, kind: DataKind, seed: int) -> Prepared:
    rows, report = load_conversations(cfg.train, on_bad_row=cfg.on_bad_row, kind=kind, replace=cfg.replace)
    lines = [f"data: {report.rows} training rows loaded" + (f", {report.skipped} invalid rows skipped" if report.skipped else "")]
    lines += report.warnings
    if cfg.val:
        train_rows = rows
        val_rows, vreport = load_conversations(cfg.val, on_bad_row=cfg.on_bad_row, kind=kind, replace=cfg.replace)
        lines += vreport.warnings
    else:
        train_rows, val_rows = split_validation(rows, cfg.val_size, seed)
    train, tstats = encode_rows(train_rows, tokenizer, template, cfg, kind)
    val, vstats = encode_rows(val_rows, tokenizer, template, cfg, kind)
    if not train:
        raise UserError(
            f"data: every training row is empty after truncation to data.max_length={cfg.max_length} "
            f"({tstats['dropped_no_labels']} {kind.unit} have nothing left to train on); raise data.max_length"
        )
    unit = kind.train_report(train) if kind.train_report else kind.unit
    lines.append(
        f"data: {len(train)} train / {len(val)} validation {unit}, template '{template.name}', "
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
