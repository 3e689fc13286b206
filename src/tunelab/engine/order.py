"""Which rows each global batch trains: data order as a pure function of (seed, epoch, step).

Step s of epoch e trains rows perm_e[s*G:(s+1)*G] where G = batch_size x grad_accum x world_size and perm_e is a
seeded permutation (sorted within chunks of similar length for group_by_length). So the data position of a
checkpoint is just its step, and a 2-process run sees the same global batches as a 1-process run with twice the
accumulation. The last incomplete global batch of an epoch is dropped (the next epoch reshuffles, so no row is lost
for good). A stream (data.streaming) yields its rows in a fixed order: on resume the rows earlier steps consumed are
read again and dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def length_grouped(perm: torch.Tensor, lengths: list[int], group: int) -> torch.Tensor:
    """Reorder a permutation so that consecutive rows have similar lengths: sort within chunks of `group` rows
    (longest first). The chunks keep their random order, so epochs still differ."""
    out = []
    for start in range(0, len(perm), group):
        chunk = perm[start:start + group].tolist()
        chunk.sort(key=lambda i: -lengths[i])
        out.extend(chunk)
    return torch.tensor(out, dtype=torch.long)


class RowOrder:
    """The rows of global batch `step`, from rows in memory or from a stream of (epoch, row) pairs."""

    def __init__(self, rows: list, global_batch: int, *, seed: int, shuffle: bool,
                 lengths: list[int] | None = None, stream: Iterable | None = None):
        self.rows, self.global_batch, self.seed, self.shuffle = rows, global_batch, seed, shuffle
        self.lengths = lengths  # group_by_length: the rows' lengths
        self.steps_per_epoch = len(rows) // global_batch if stream is None else 0
        self._stream = iter(stream) if stream is not None else None
        self._consumed = 0  # stream rows read so far
        self._stream_epoch = 0  # the epoch of the last stream row read
        self._perm: dict[int, torch.Tensor] = {}

    def global_rows(self, step: int) -> list:
        if self._stream is not None:
            return self._from_stream(step)
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = self._permutation(epoch)
        return [self.rows[i] for i in perm[k * self.global_batch:(k + 1) * self.global_batch].tolist()]

    def refill_rows(self, step: int, attempt: int) -> list:
        """A global batch of further rows for refill `attempt` (1, 2, ...) of step `step` (DAPO's dynamic sampling):
        drawn at random from the rows in memory, without replacement, seeded by (seed, step, attempt) alone, so a
        resumed or distributed run draws the same."""
        if self._stream is not None:
            raise ValueError("refills draw rows at random: they need rows in memory, not a stream")
        seed = (self.seed * 1_000_003 + step) * 1_000_033 + attempt
        perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed & ((1 << 63) - 1)))
        return [self.rows[i] for i in perm[:self.global_batch].tolist()]

    def epoch_at(self, step: int) -> float:
        if self._stream is not None:
            return self._stream_epoch
        return round(step / self.steps_per_epoch, 4)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            self._perm.clear()
            n = len(self.rows)
            if self.shuffle:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
            else:
                perm = torch.arange(n)
            if self.lengths is not None:
                perm = length_grouped(perm, self.lengths, self.global_batch * 32)
            self._perm[epoch] = perm
        return self._perm[epoch]

    def _from_stream(self, step: int) -> list:
        """Steps are taken in order; on resume, replay (and drop) what earlier steps consumed."""
        target = step * self.global_batch
        while self._consumed < target:
            next(self._stream)
            self._consumed += 1
        taken = [next(self._stream) for _ in range(self.global_batch)]
        self._consumed += self.global_batch
        self._stream_epoch = taken[-1][0]
        return [row for _, row in taken]


def split_global_batch(rows: list, grad_accum: int, world: int, rank: int) -> list[list]:
    """This process's micro-batches of a global batch: part m * world + rank of grad_accum x world equal parts (each
    batch_size rows when nothing changed the batch; a rollout may return more rows than it was given)."""
    parts = grad_accum * world
    bounds = [i * len(rows) // parts for i in range(parts + 1)]
    return [rows[bounds[m * world + rank]:bounds[m * world + rank + 1]] for m in range(grad_accum)]
