"""Streaming: token rows read, validated and tokenized lazily, for data that does not fit in memory.

The stream is endless (epoch after epoch) and deterministic: rows pass through a seeded shuffle buffer of
`data.shuffle_buffer` rows (a new seed each epoch), so the k-th row it yields is always the same for the same data
and seed. That is what makes a streamed run resumable exactly: the loop skips the rows earlier steps consumed.
Only the buffer is held in memory; JSONL, CSV and Parquet files are read row by row.

Every data kind streams: the token rows are whatever `prepare_data` would make for the method's kind (`Encoded`,
`EncodedPair` for pairs, ...: data/kinds.py), ``data.replace`` placeholders filled as they are read. A stream is
never read whole before training, so the warning about placeholders left unreplaced looks at the first
`PEEK_ROWS` rows of each dataset (`placeholder_warnings`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import islice

from tunelab.config.schema import DataConfig
from tunelab.data.kinds import DataKind, get_kind
from tunelab.data.load import Placeholders, check_replace, dataset_name, iter_dataset
from tunelab.data.registry import resolve_dataset
from tunelab.data.templates import ChatTemplate
from tunelab.data.tokenize import Encoded
from tunelab.errors import UserError

PEEK_ROWS = 1000  # rows of each streamed dataset checked for placeholders before training starts


def placeholder_warnings(cfg: DataConfig, kind: str | DataKind) -> list[str]:
    """One warning line per streamed training dataset whose first `PEEK_ROWS` rows hold unreplaced placeholders."""
    check_replace(cfg.replace)
    lines = []
    for spec in cfg.train:
        name, left = dataset_name(spec), Placeholders()
        rows = iter_dataset(name, resolve_dataset(spec), kind, replace=cfg.replace, left=left)
        items = list(islice(rows, PEEK_ROWS))
        good = sum(1 for item in items if not isinstance(item, str))
        whole = len(items) < PEEK_ROWS  # the dataset ended within the peek: the count is exact
        warning = left.warning(name, good if whole else None, first_rows=None if whole else len(items))
        if warning:
            lines.append(warning)
    return lines


class TokenStream:
    """An endless, seeded, shuffled stream of token rows; iterate it to get (epoch, Encoded) pairs."""

    def __init__(self, cfg: DataConfig, tokenizer, template: ChatTemplate, *, kind: str | DataKind, seed: int):
        self.cfg, self.tokenizer, self.template, self.seed = cfg, tokenizer, template, seed
        self.kind = get_kind(kind)
        self.skipped_bad = 0  # invalid rows skipped (on_bad_row: skip), first epoch
        self.dropped = 0  # rows with no trained token left after truncation, first epoch

    def _encoded(self, first_epoch: bool) -> Iterator[Encoded]:
        for spec in self.cfg.train:
            name = dataset_name(spec)
            for item in iter_dataset(name, resolve_dataset(spec), self.kind, replace=self.cfg.replace):
                if isinstance(item, str):
                    if self.cfg.on_bad_row == "error":
                        raise UserError(f"{item} (with data.streaming rows are checked as they are read; fix the "
                                        "row or set data.on_bad_row=skip)")
                    self.skipped_bad += first_epoch
                    continue
                enc = self.kind.encode(item, self.tokenizer, self.template, self.cfg)
                if not self.kind.keep(enc):
                    self.dropped += first_epoch
                    continue
                yield enc

    def __iter__(self) -> Iterator[tuple[int, Encoded]]:
        epoch = 0
        size = self.cfg.shuffle_buffer if self.cfg.shuffle else 1
        while True:
            rng = random.Random(self.seed * 1_000_003 + epoch)
            buffer: list[Encoded] = []
            yielded = False
            for enc in self._encoded(first_epoch=epoch == 0):
                if len(buffer) < size:
                    buffer.append(enc)
                    continue
                i = rng.randrange(size)
                yield epoch, buffer[i]
                yielded = True
                buffer[i] = enc
            rng.shuffle(buffer)
            for enc in buffer:
                yield epoch, enc
                yielded = True
            if not yielded:
                names = ", ".join(dataset_name(s) for s in self.cfg.train)
                raise UserError(f"data: no usable rows in {names}")
            epoch += 1
