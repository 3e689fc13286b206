"""Batching token rows into tensors: dynamic padding, or padding-free packing.

Every batch carries `input_ids`, `labels` (-100 = not trained) and `token_mask` (True on real tokens, for counting
throughput). Padded batches add `attention_mask`; packed batches add `position_ids` that restart at 0 for every packed
sequence and carry *no* attention mask: transformers then builds a block-diagonal causal mask (SDPA/eager) or uses
varlen kernels (flash attention), so a sequence never attends to its neighbours in the row.

Preference pairs are padded (`collate_pairs`) or packed (`collate_pairs_packed`); KTO rows (`collate_kto`) are always
padded; prompts (`collate_prompts`) are left-padded for generation. Which collator a data kind uses is declared in
data/kinds.py.
"""

from __future__ import annotations

import torch

from tunelab.data.tokenize import IGNORE_INDEX


def sequences(rows) -> list:
    """The token sequences a model sees for prepared rows: a preference pair is two (chosen, rejected)."""
    out = []
    for r in rows:
        out.extend((r.chosen, r.rejected) if hasattr(r, "chosen") and hasattr(r, "rejected") else (r,))
    return out


def pad_collate(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad input_ids with pad_id, labels with -100; attention_mask marks real tokens."""
    longest = max(len(r.input_ids) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r.input_ids)
        input_ids[i, :k] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[i, :k] = torch.tensor(r.labels, dtype=torch.long)
        attention[i, :k] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention, "token_mask": attention.bool()}


def pack_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices grouped into bins whose total length is at most `capacity`."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


def split_bins(bins: list[list[int]], lengths: list[int], min_rows: int) -> list[list[int]]:
    """Split bins until there are `min_rows` (or one per sequence): each time the fullest bin with more than one
    member gives its shortest sequence to a new bin. The row width never grows."""
    bins = [list(b) for b in bins]
    while len(bins) < min_rows:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            break
        b = max(splittable, key=lambda m: sum(lengths[i] for i in m))
        shortest = min(b, key=lambda i: lengths[i])
        b.remove(shortest)
        bins.append([shortest])
    return bins


def pack_collate(rows, pad_id: int, max_length: int, min_rows: int = 1) -> dict[str, torch.Tensor]:
    """Pack rows into as few rows of at most max_length tokens as first-fit decreasing finds (at least `min_rows`
    when there are that many sequences: torch.compile specialises a batch of one row, so compiled runs ask for 2).

    The first token of every packed sequence is never a target: in an unpacked row nothing precedes it, and here the
    previous sequence's last token must not learn to predict it. The tail padding of a short packed row is its own
    sequence (positions restart at 0) with no labels, so it cannot affect real tokens either.

    ``sequence_ids`` gives every position the index of the row (of `rows`) it came from, -1 on tail padding, so
    per-sequence sums (preference methods) can be taken over a packed batch.
    """
    lengths = [len(r.input_ids) for r in rows]
    capacity = max(max_length, max(lengths))
    bins = split_bins(pack_bins(lengths, capacity), lengths, min_rows)
    width = max(sum(lengths[i] for i in b) for b in bins)
    n = len(bins)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    token_mask = torch.zeros((n, width), dtype=torch.bool)
    sequence_ids = torch.full((n, width), -1, dtype=torch.long)
    for row, members in enumerate(bins):
        at = 0
        for i in members:
            r, k = rows[i], lengths[i]
            input_ids[row, at:at + k] = torch.tensor(r.input_ids, dtype=torch.long)
            labels[row, at:at + k] = torch.tensor(r.labels, dtype=torch.long)
            labels[row, at] = IGNORE_INDEX
            position_ids[row, at:at + k] = torch.arange(k)
            token_mask[row, at:at + k] = True
            sequence_ids[row, at:at + k] = i
            at += k
        position_ids[row, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_mask": token_mask,
            "sequence_ids": sequence_ids}


def collate(rows, mode: str, pad_id: int, max_length: int, min_rows: int = 1) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch in the configured mode (group_by_length pads; its grouping is in the sampler)."""
    if mode == "padding_free":
        return pack_collate(rows, pad_id, max_length, min_rows)
    return pad_collate(rows, pad_id)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a causal LM's forward takes."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}


def collate_pairs_packed(rows, pad_id: int, max_length: int, min_rows: int = 1) -> dict[str, torch.Tensor]:
    """The 2n sequences of n pairs packed padding-free (`pack_collate`): sequence i < n is pair i's chosen answer,
    n + i its rejected one, found through ``sequence_ids``; ``num_sequences`` (2n) sizes the per-sequence sums."""
    batch = pack_collate([r.chosen for r in rows] + [r.rejected for r in rows], pad_id, max_length, min_rows)
    batch["num_sequences"] = torch.tensor(2 * len(rows))
    return batch


def collate_pairs(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """One padded batch of 2n sequences for n preference pairs: rows 0..n-1 are the chosen sequences, rows n..2n-1
    the rejected ones, in the same pair order (row i and row n + i are one pair).

    Concatenating lets a method score both answers in ONE forward pass (half the kernel launches, and the policy and
    reference see identical padding), then split any per-sequence result with ``x[:n], x[n:]``. Keys as in a padded
    SFT batch: input_ids, attention_mask, labels (-100 outside the answers), token_mask; plus ``prompt_lengths``
    (n,), the tokens shared by both sequences of each pair. Padding-free packing is not offered for pairs: a method
    needs one log-probability per sequence, which a packed row would have to be split back into.
    """
    if not rows:
        raise ValueError("collate_pairs needs at least one pair")
    batch = pad_collate([r.chosen for r in rows] + [r.rejected for r in rows], pad_id)
    batch["prompt_lengths"] = torch.tensor([len(r.prompt_ids) for r in rows], dtype=torch.long)
    return batch


def collate_kto(rows, pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """A padded batch of KTO rows (as `pad_collate`) plus ``desirable`` (bool, one per row): the KTO label, and the
    mismatched batch KTO estimates its KL reference point from (``kl_input_ids``, ``kl_attention_mask``,
    ``kl_labels``): row i's prompt with the answer of row i+1 (cyclically), as TRL pairs them. A batch of one row
    pairs it with itself, which makes the estimate 0's unbiased stand-in (policy and reference agree at start)."""
    from tunelab.data.tokenize import Encoded

    batch = pad_collate(rows, pad_id)
    batch["desirable"] = torch.tensor([bool(r.desirable) for r in rows], dtype=torch.bool)
    mismatched = []
    for i, row in enumerate(rows):
        other = rows[(i + 1) % len(rows)]
        p_self, p_other = _answer_start(row.labels), _answer_start(other.labels)
        ids = list(row.input_ids[:p_self]) + list(other.input_ids[p_other:])
        labels = [IGNORE_INDEX] * p_self + list(other.labels[p_other:])
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        mismatched.append(Encoded(ids, labels, False))
    kl = pad_collate(mismatched, pad_id)
    batch.update(kl_input_ids=kl["input_ids"], kl_attention_mask=kl["attention_mask"], kl_labels=kl["labels"])
    return batch


def _answer_start(labels) -> int:
    """Where a KTO row's trained answer starts (its first trained label); the rest before it is the prompt."""
    for i, x in enumerate(labels):
        if x != IGNORE_INDEX:
            return i
    return len(labels)


def collate_prompts(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """A batch of prompts for generation, *left*-padded so every prompt ends at the last position, where generation
    continues: ``input_ids``, ``attention_mask`` (1 on real tokens), ``token_mask``. No labels: a prompt is not
    trained; a method's rollout turns prompts into trainable rows (methods/base.py)."""
    if not rows:
        raise ValueError("collate_prompts needs at least one prompt")
    longest = max(len(r.prompt_ids) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r.prompt_ids)
        if k:
            input_ids[i, longest - k:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            attention[i, longest - k:] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "token_mask": attention.bool()}
