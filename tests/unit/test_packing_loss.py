"""Padding-free packing and trained-position-only logits give the naive path's loss and gradients exactly.

Exactly means: equal in exact arithmetic, computed in float64, compared within the reorder bound of
tests/tolerance.py (rows of at most 40 tokens, a loss summed over at most 9 x 40 of them)."""

from __future__ import annotations

import random

import pytest
import torch

from tests.tolerance import chain_length, reorder_tol
from tunelab.data.collate import pack_bins, pack_collate, pad_collate
from tunelab.data.tokenize import Encoded
from tunelab.engine.order import length_grouped
from tunelab.engine.packing import packing_works
from tunelab.methods.base import StepContext
from tunelab.methods.lm import causal_lm_loss, trained_tokens

F64 = torch.float64


def _rows(n=7, vocab=1000, seed=0, prompt_share=0.5):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(4, 40)
        ids = [rng.randrange(3, vocab) for _ in range(k)]
        cut = int(k * prompt_share)
        rows.append(Encoded(ids, [-100] * cut + ids[cut:], False))
    return rows


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=F64)


def _loss_and_grads(model, batch, chunk):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model, batch, StepContext(loss_chunk=chunk)).loss_sum
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """a == b within the reorder bound at b's scale (float64 values only: the bound is float64's)."""
    assert a.dtype == b.dtype == F64, (a.dtype, b.dtype)
    n = chain_length({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176,
                      "vocab_size": 1000}, 40, tokens=9 * 40)
    torch.testing.assert_close(a, b, atol=reorder_tol(float(b.abs().max()), n), rtol=0, msg=what)


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    _close(la, lb, "loss")
    assert ga.keys() == gb.keys()
    for name in ga:
        _close(ga[name], gb[name], name)


def test_first_fit_decreasing_bins():
    bins = pack_bins([5, 3, 8, 2, 7], capacity=10)
    assert bins == [[2, 3], [4, 1], [0]]
    assert all(sum([5, 3, 8, 2, 7][i] for i in b) <= 10 for b in bins)


def test_pack_collate_layout():
    rows = [Encoded([1, 2, 3], [1, 2, 3], False), Encoded([4, 5], [-100, 5], False), Encoded([6], [6], False)]
    b = pack_collate(rows, pad_id=0, max_length=4)
    assert b["input_ids"].tolist() == [[1, 2, 3, 6], [4, 5, 0, 0]]
    # the first token of every packed sequence is never a target; padding is its own sequence
    assert b["labels"].tolist() == [[-100, 2, 3, -100], [-100, 5, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert b["token_mask"].sum() == 6 and "attention_mask" not in b
    assert trained_tokens(b) == trained_tokens(pad_collate(rows, 0)) == 3


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_unpacked(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=attn, dtype=F64)
    assert packing_works(m, 1000)
    rows = _rows()
    naive = _loss_and_grads(m, pad_collate(rows, 0), chunk=0)
    _assert_same(_loss_and_grads(m, pack_collate(rows, 0, max_length=64), chunk=0), naive)
    _assert_same(_loss_and_grads(m, pack_collate(rows, 0, max_length=64), chunk=4096), naive)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention_packed_equals_unpacked(tmp_path, kv_heads):
    """The per-sequence attention (models/varlen.py) on packed rows gives the padded batch's loss and gradients;
    kv_heads 2 of 4 exercises grouped-query attention."""
    from transformers import AutoModelForCausalLM

    from tunelab.models.tiny import build_tiny_llama
    from tunelab.models.varlen import NAME, sequence_bounds, use_varlen

    path = build_tiny_llama(tmp_path / "m", hidden=64, layers=2, heads=4, kv_heads=kv_heads, vocab=1000)
    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=F64)
    rows = _rows(n=9)
    naive = _loss_and_grads(m, pad_collate(rows, 0), chunk=0)
    assert use_varlen(m) and m.config._attn_implementation == NAME
    assert packing_works(m, 1000)
    packed = pack_collate(rows, 0, max_length=64)
    assert len(packed["input_ids"]) < len(rows)  # several sequences share rows
    _assert_same(_loss_and_grads(m, packed, chunk=0), naive)
    _assert_same(_loss_and_grads(m, packed, chunk=4096), naive)
    # a padded batch (with its attention mask) still takes transformers' masked path through the same model
    _assert_same(_loss_and_grads(m, pad_collate(rows, 0), chunk=0), naive)
    assert sequence_bounds(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])) == [
        [(0, 3), (3, 5), (5, 6)], [(0, 6)]]


def test_packing_keeps_min_rows():
    from tunelab.data.collate import split_bins

    lengths = [5, 3, 2]
    assert pack_bins(lengths, 16) == [[0, 1, 2]]
    assert split_bins([[0, 1, 2]], lengths, 2) == [[0, 1], [2]]
    assert split_bins([[0, 1, 2]], lengths, 5) == [[0], [2], [1]]  # never more rows than sequences
    rows = [Encoded([7] * n, [7] * n, False) for n in lengths]
    b = pack_collate(rows, 0, max_length=16, min_rows=2)
    assert b["input_ids"].shape == (2, 8) and b["token_mask"].sum() == 10


@pytest.mark.parametrize("chunk", [4096, 7, 1])
def test_trained_positions_only_equals_full_logits(model, chunk):
    rows = _rows(prompt_share=0.6)
    batch = pad_collate(rows, 0)
    assert trained_tokens(batch) > 7  # so chunk=7 and chunk=1 take the chunked, recomputed path
    _assert_same(_loss_and_grads(model, batch, chunk), _loss_and_grads(model, batch, 0))


def test_trained_positions_only_through_peft(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64),
                       LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    batch = pack_collate(_rows(), 0, max_length=64)
    naive = _loss_and_grads(m, batch, 0)
    _assert_same(_loss_and_grads(m, batch, 4096), naive)
    _assert_same(_loss_and_grads(m, batch, 5), naive)


def test_length_grouping_sorts_within_groups_only():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    perm = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    out = length_grouped(perm, lengths, group=4).tolist()
    assert out == [2, 0, 3, 1, 6, 4, 7, 5]
    assert sorted(out) == list(range(8))


@pytest.mark.parametrize("chunk", [4096, 7, 0])
def test_sequence_logprobs_per_row_equal_the_naive_sums(model, chunk):
    """Per-row summed log-probabilities of the trained tokens (what preference losses score) from every path equal
    the ones read off full logits, gradients included."""
    from tunelab.methods.lm import sequence_logprobs

    batch = pad_collate(_rows(5, seed=3), 0)
    model.zero_grad(set_to_none=True)
    sums, counts = sequence_logprobs(model, batch, StepContext(loss_chunk=chunk))
    (sums * torch.arange(1.0, 6.0, dtype=F64)).sum().backward()  # a different weight per row checks the row assignment
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                             [:, :-1], -1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    tok = logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    ref = tok.sum(1)
    (ref * torch.arange(1.0, 6.0, dtype=F64)).sum().backward()
    _close(sums, ref.detach(), "per-row sums")
    assert counts.tolist() == mask.sum(1).tolist()
    for n, g in got.items():
        _close(g, model.get_parameter(n).grad, n)
