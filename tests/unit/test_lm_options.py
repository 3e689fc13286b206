"""sft's and pt's two options, which land in methods/ alone: label smoothing on trained positions (through the
same chunked path as the plain loss) and NEFTune's noisy embeddings (training only, scaled per sequence)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import alpaca_rows, base_config, write_json
from tests.tolerance import chain_length, reorder_tol
from tunelab.config import load_config
from tunelab.data.collate import model_inputs, pack_collate, pad_collate
from tunelab.data.tokenize import IGNORE_INDEX, Encoded
from tunelab.errors import ConfigError
from tunelab.methods.base import SetupContext, StepContext
from tunelab.methods.lm import NEFTune, causal_lm_loss, lm_loss, neftune_setup, sequence_lengths

F64 = torch.float64


def _rows(n=6, vocab=1000, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(5, 30)
        ids = [rng.randrange(3, vocab) for _ in range(k)]
        rows.append(Encoded(ids, [IGNORE_INDEX] * (k // 2) + ids[k // 2:], False))
    return rows


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa", dtype=F64)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("chunk", [0, 4096, 7], ids=["naive", "kept-positions", "chunked"])
def test_label_smoothing_is_pytorchs_on_trained_positions(model, chunk):
    """(1 - e) NLL + e x mean NLL over the vocabulary, summed over trained positions only: F.cross_entropy's
    label_smoothing on the full logits at those positions, loss and gradients, on every path of methods/lm.py."""
    eps = 0.1
    batch = pad_collate(_rows(), pad_id=0)
    model.zero_grad(set_to_none=True)
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
    keep = batch["labels"][:, 1:] != IGNORE_INDEX
    ref = F.cross_entropy(logits[keep], batch["labels"][:, 1:][keep], label_smoothing=eps, reduction="sum")
    ref_nll = F.cross_entropy(logits[keep], batch["labels"][:, 1:][keep], reduction="sum")
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    out = causal_lm_loss(model, batch, StepContext(loss_chunk=chunk), label_smoothing=eps)
    out.loss_sum.backward()
    n = chain_length({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 176,
                      "vocab_size": 1000}, 30, tokens=6 * 30)
    torch.testing.assert_close(out.loss_sum.detach(), ref.detach(), atol=reorder_tol(ref.item(), n), rtol=0)
    torch.testing.assert_close(out.metrics["nll"], ref_nll.detach(), atol=reorder_tol(ref_nll.item(), n), rtol=0)
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], atol=reorder_tol(float(ref_grads[name].abs().max()), n),
                                   rtol=0, msg=name)
    # without smoothing the loss is the plain NLL and no metric is added
    plain = causal_lm_loss(model, batch, StepContext(loss_chunk=chunk))
    assert plain.metrics == {}
    torch.testing.assert_close(plain.loss_sum.detach(), ref_nll.detach(), atol=reorder_tol(ref_nll.item(), n), rtol=0)


def test_sequence_lengths_are_each_tokens_own_sequence():
    rows = _rows(4)
    lengths = [len(r.input_ids) for r in rows]
    padded = sequence_lengths(pad_collate(rows, pad_id=0))
    for i, k in enumerate(lengths):
        assert padded[i, :k].tolist() == [k] * k and set(padded[i, k:].tolist()) <= {0}
    packed = pack_collate(rows, pad_id=0, max_length=200)
    got = sequence_lengths(packed)
    ids = packed["sequence_ids"]
    assert got[ids >= 0].tolist() == [lengths[i] for i in ids[ids >= 0].tolist()]
    assert set(got[ids < 0].tolist()) <= {0}


def test_neftune_noise_is_uniform_at_the_papers_scale_and_only_while_training():
    """Noise in [-1, 1] x alpha / sqrt(L d), L the token's sequence length: with 20,000 draws per scale the largest
    |noise| is within 0.1 % of the bound (the chance it is not is (1 - 0.001)^20000 < 3e-9) and its mean square is
    b^2 / 3 within 5 % (the standard error of the mean of u^2 for u uniform is 0.30 / sqrt(n) of its mean)."""
    torch.manual_seed(0)
    d, alpha = 50, 5.0
    embed = torch.nn.Embedding(10, d)
    hook = NEFTune(alpha)
    embed.register_forward_hook(hook)
    ids = torch.zeros((2, 400, ), dtype=torch.long)
    clean = embed(ids).detach()
    hook.lengths = torch.tensor([[400] * 400, [100] * 100 + [0] * 300])
    noise = (embed(ids) - clean).detach()
    for row, length in ((noise[0], 400), (noise[1, :100], 100)):
        bound = alpha / math.sqrt(length * d)
        assert row.abs().max() <= bound * (1 + 1e-6) and row.abs().max() >= 0.999 * bound
        assert abs(float((row ** 2).mean()) / (bound ** 2 / 3) - 1) < 0.05
    assert torch.equal(noise[1, 100:], torch.zeros_like(noise[1, 100:]))  # padding gets none
    embed.eval()
    assert torch.equal(embed(ids), clean)  # evaluation and generation: none


def test_neftune_noises_the_policys_training_forward_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64)
    cfg = load_config({"model": {"path": str(tiny_model_dir)}, "method": {"type": "sft", "neftune_alpha": 5.0},
                       "data": {"train": [{"path": "x.json"}]}})
    step = StepContext(config=cfg.method, loss_chunk=0)
    neftune_setup(SetupContext(config=cfg.method, step=step, policy=model, models={}))
    batch = pad_collate(_rows(), pad_id=0)
    model.eval()
    clean = lm_loss(model, batch, step).loss_sum.item()
    assert lm_loss(model, batch, step).loss_sum.item() == clean  # eval mode: no noise, deterministic
    model.train()
    noisy = [lm_loss(model, batch, step).loss_sum.item() for _ in range(2)]
    assert noisy[0] != clean and noisy[0] != noisy[1]  # fresh noise on every training forward
    assert step.state["neftune"].lengths is None  # nothing left over for a later forward (a reference, chat)


def test_lm_options_are_checked(tiny_model_dir):
    base = {"model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": "x.json"}]}}
    with pytest.raises(ConfigError, match="method.neftune_alpha: must be >= 0"):
        load_config({**base, "method": {"type": "sft", "neftune_alpha": -1}})
    with pytest.raises(ConfigError, match=r"method.label_smoothing: in \[0, 1\)"):
        load_config({**base, "method": {"type": "pt", "label_smoothing": 1.0}})


def test_sft_with_both_options_trains_and_reports_plain_nll(tiny_model_dir, tmp_path):
    import tunelab
    from tunelab.engine.metrics import read_metrics

    data = write_json(tmp_path / "train.json", alpaca_rows(32))
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data, out, method={"type": "sft", "neftune_alpha": 5.0,
                                                         "label_smoothing": 0.1},
                      train={"max_steps": 8, "eval_every": 8})
    cfg["data"]["val_size"] = 4
    tunelab.train(cfg, echo=False)
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    # the loss is the smoothed one, (1 - e) NLL + e x the mean NLL over the vocabulary; once the model prefers
    # the trained tokens to the average token (NLL below that mean) it lies above the plain NLL
    assert train[-1]["nll"] < train[0]["nll"] and train[-1]["loss"] > train[-1]["nll"]
    ev = records[-1]
    assert ev["eval_ppl"] == pytest.approx(math.exp(ev["eval_nll"]), rel=1e-12)
