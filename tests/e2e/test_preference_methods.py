"""Preference methods through the real loop on a tiny model and a synthetic preference task.

The task: every prompt asks for a colour; the chosen answer names blue, the rejected one red, among varied filler
words. A model can learn that preference from a few dozen pairs, and held-out pairs (different prompts and filler)
measure whether it did.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import tunelab
from tests.helpers import base_config, write_json
from tests.tolerance import adam_tol, assert_same_metrics, assert_same_weights, chain_length, reorder_tol
from tunelab.engine.metrics import read_metrics

FILLER = ["sky", "sea", "stone", "river", "lamp", "door", "cloud", "tree", "road", "glass", "wall", "coat"]


def preference_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        thing = rng.choice(FILLER)
        extra = " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 3)))
        rows.append({
            "instruction": f"Name a colour for the {thing} {extra} number {i}".strip(),
            "chosen": f"The {thing} is blue {extra}".strip() + ".",
            "rejected": f"The {thing} is red {extra}".strip() + ".",
        })
    return rows


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    return write_json(d / "train.json", preference_rows(48, 0)), write_json(d / "val.json", preference_rows(24, 1))


def _cfg(tiny_model_dir, pref_data, out, method, steps=30, lr=5e-3, adapter=None, float64=False):
    train, val = pref_data
    cfg = base_config(tiny_model_dir, train, out, adapter=adapter or {"type": "lora", "r": 8, "alpha": 16},
                      train={"batch_size": 8, "max_steps": steps, "lr": lr, "log_every": 5, "eval_every": steps})
    cfg["data"]["val"] = [{"path": str(val), "format": "alpaca"}]
    cfg["method"] = method
    if float64:  # claims of exact equality between two runs (tests/tolerance.py says why float64)
        cfg["model"]["dtype"] = "float64"
    return cfg


def _pair_chain(model_dir, pairs_per_step: int) -> int:
    """The reduction chain of a preference step: rows of at most max_length 64, and a loss and gradients summed
    over every token of both answers of every pair."""
    return chain_length(model_dir, 64, tokens=2 * pairs_per_step * 64)


def test_dpo_learns_the_preference_and_generalises(tiny_model_dir, pref_data, tmp_path):
    out = tmp_path / "dpo"
    result = tunelab.train(_cfg(tiny_model_dir, pref_data, out, {"type": "dpo", "beta": 0.1}), echo=False)
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    # at step 0 the policy is the reference: every pair's loss is log 2, and the logged mean starts near it
    assert abs(train[0]["loss"] - math.log(2)) < 0.2
    assert train[-1]["rewards/margin"] > train[0]["rewards/margin"]
    final_eval = [r for r in records if "eval_loss" in r][-1]
    assert final_eval["eval_rewards/accuracy"] >= 0.9, final_eval
    assert result.packing == "padding_free"  # packing: auto packs pairs when the model isolates sequences


@pytest.mark.parametrize("method", [{"type": "orpo", "beta": 0.5}, {"type": "simpo", "beta": 2.0, "gamma": 0.5},
                                    {"type": "cpo", "beta": 0.5}], ids=lambda m: m["type"])
def test_reference_free_methods_grow_the_margin(tiny_model_dir, pref_data, tmp_path, method):
    out = tmp_path / method["type"]
    tunelab.train(_cfg(tiny_model_dir, pref_data, out, method, steps=20), echo=False)
    train = [r for r in read_metrics(out) if "loss" in r]
    assert train[-1]["rewards/margin"] > train[0]["rewards/margin"], [r["rewards/margin"] for r in train]
    assert train[-1]["loss"] < train[0]["loss"]
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracy", "logps/chosen", "logps/rejected"} <= set(train[0])


def test_reference_by_disabling_the_adapter_equals_a_frozen_copy(tiny_model_dir, pref_data):
    """With LoRA, the reference is the policy model with its adapter off; it scores pairs exactly as a separately
    loaded frozen base does (the same weights through the same operations: bitwise), and at initialisation DPO's
    loss is log 2 for every pair."""
    from accelerate import Accelerator

    from tunelab.config.load import load_config
    from tunelab.data.kinds import PAIRS
    from tunelab.data.prepare import prepare_data
    from tunelab.engine.frozen import build_frozen_models
    from tunelab.methods import METHODS
    from tunelab.methods.base import SetupContext, StepContext
    from tunelab.models.adapters import apply_adapter
    from tunelab.models.load import load_model, load_tokenizer

    cfg = load_config(_cfg(tiny_model_dir, pref_data, "/tmp/unused", {"type": "dpo"}, float64=True))
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg.data, tokenizer, kind="pairs", seed=0, use_cache=False)
    batch = PAIRS.batch(data.train[:6], "none", tokenizer.pad_token_id, 64)
    torch.manual_seed(0)
    dtype = torch.float64
    model = apply_adapter(load_model(cfg.model, dtype=dtype), cfg.adapter)
    with torch.no_grad():  # move the adapter away from zero so that policy and reference differ
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    accel = Accelerator(cpu=True)
    dpo = METHODS["dpo"]

    def context(mode: str) -> StepContext:
        """DPO's own setup with the frozen reference the loop builds for this method.reference."""
        cfg.method.reference = mode
        needs = dpo.extra_models(cfg)
        assert needs["reference"].source == mode
        models = build_frozen_models(needs, cfg, model, dtype=dtype, device=accel.device, autocast=accel.autocast)
        ctx = StepContext(config=cfg.method)
        dpo.setup(SetupContext(config=cfg.method, step=ctx, policy=model, models=models))
        return ctx

    scores = {mode: context(mode).reference(batch) for mode in ("adapter_off", "copy")}
    assert scores["copy"].dtype == dtype
    torch.testing.assert_close(scores["adapter_off"], scores["copy"], atol=0, rtol=0)
    contexts = {mode: context(mode) for mode in ("adapter_off", "copy")}
    loss_off, loss_copy = (METHODS["dpo"].loss(model, batch, contexts[m]).loss_sum.item() for m in contexts)
    assert loss_off == loss_copy
    # the policy with the adapter at zero equals the reference bitwise (W x + B A x with B = 0 is W x): every pair's
    # margin is exactly 0 and its loss log 2 = -log sigmoid(0) to one rounding; the sum of 6 adds 5 more
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    at_init = METHODS["dpo"].loss(model, batch, contexts["adapter_off"])
    assert abs(at_init.loss_sum.item() - 6 * math.log(2)) <= reorder_tol(6 * math.log(2), 6, dtype, cond=1)


def test_padding_free_is_refused_for_score_and_kto_methods(tiny_model_dir, pref_data, tmp_path):
    from tunelab.errors import UserError

    cfg = _cfg(tiny_model_dir, pref_data, tmp_path / "x", {"type": "rm"}, steps=1)
    cfg["data"]["packing"] = "padding_free"
    with pytest.raises(UserError, match="padding_free"):
        tunelab.train(cfg, echo=False)


def kto_rows(n: int, seed: int) -> list[dict]:
    """Unpaired answers: blue ones desirable, red ones undesirable (each prompt appears with one of them)."""
    rows = []
    for i, r in enumerate(preference_rows(n, seed)):
        good = i % 2 == 0
        rows.append({"instruction": r["instruction"], "output": r["chosen"] if good else r["rejected"],
                     "kto_tag": good})
    return rows


def test_kto_learns_from_labelled_answers(tiny_model_dir, tmp_path):
    d = tmp_path / "data"
    train = write_json(d / "train.json", kto_rows(48, 0))
    val = write_json(d / "val.json", kto_rows(24, 1))
    out = tmp_path / "kto"
    cfg = base_config(tiny_model_dir, train, out, adapter={"type": "lora", "r": 8, "alpha": 16},
                      train={"batch_size": 8, "max_steps": 30, "lr": 5e-3, "log_every": 5, "eval_every": 30})
    cfg["data"]["val"] = [{"path": str(val), "format": "alpaca"}]
    cfg["method"] = {"type": "kto", "beta": 0.1}
    tunelab.train(cfg, echo=False)
    records = read_metrics(out)
    train_recs = [r for r in records if "loss" in r]
    assert abs(train_recs[0]["loss"] - 0.5) < 0.1  # at the reference every row's loss is 1 - sigmoid(0) = 0.5
    assert train_recs[-1]["rewards/signed"] > train_recs[0]["rewards/signed"]
    assert {"kl", "rewards/accuracy", "logps"} <= set(train_recs[0])
    final_eval = [r for r in records if "eval_loss" in r][-1]
    assert final_eval["eval_rewards/accuracy"] >= 0.9, final_eval


def test_collate_kto_builds_mismatched_pairs(tiny_model_dir):
    from tunelab.data.collate import collate_kto
    from tunelab.data.tokenize import EncodedKTO

    rows = [EncodedKTO([1, 2, 3, 4], [-100, -100, 3, 4], False, desirable=True),
            EncodedKTO([5, 6, 7], [-100, 6, 7], False, desirable=False)]
    batch = collate_kto(rows, pad_id=0)
    assert batch["desirable"].tolist() == [True, False]
    # row 0's prompt [1, 2] with row 1's answer [6, 7]; row 1's prompt [5] with row 0's answer [3, 4]
    assert batch["kl_input_ids"].tolist() == [[1, 2, 6, 7], [5, 3, 4, 0]]
    assert batch["kl_labels"].tolist() == [[-100, -100, 6, 7], [-100, 3, 4, -100]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("adapter", [{"type": "lora", "r": 8, "alpha": 16}, {"type": "full"}],
                         ids=lambda a: a["type"])
def test_reward_model_ranks_held_out_pairs_and_scores(tiny_model_dir, pref_data, tmp_path, adapter):
    """rm learns the preference (held-out accuracy >= 0.9); its output is a standard score-head model (full) or a
    peft SEQ_CLS adapter carrying the head (lora); `tunelab score` ranks a new chosen answer above its rejected one."""
    from tests.helpers import run_cli

    out = tmp_path / "rm"
    lr = 5e-3 if adapter["type"] == "lora" else 1e-3
    cfg = _cfg(tiny_model_dir, pref_data, out, {"type": "rm"}, steps=30, lr=lr, adapter=adapter)
    tunelab.train(cfg, echo=False)
    records = read_metrics(out)
    final_eval = [r for r in records if "eval_loss" in r][-1]
    assert final_eval["eval_rewards/accuracy"] >= 0.9, final_eval
    train = [r for r in records if "loss" in r]
    assert train[-1]["rewards/margin"] > train[0]["rewards/margin"]
    final = out / "final"
    if adapter["type"] == "lora":
        import json

        assert json.loads((final / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
        args = ["--model", str(tiny_model_dir), "--adapter", str(final)]
    else:
        from transformers import AutoModelForSequenceClassification

        assert AutoModelForSequenceClassification.from_pretrained(final).config.num_labels == 1
        args = ["--model", str(final)]
    proc = run_cli("score", *args, "--prompt", "Name a colour for the lamp", "--answer", "The lamp is blue.",
                   "--answer", "The lamp is red.", check=True)
    (blue, _), (red, _) = [line.split("\t") for line in proc.stdout.strip().splitlines()]
    assert float(blue) > float(red), proc.stdout


def test_score_refuses_a_model_without_a_score_head(tiny_model_dir):
    from tests.helpers import run_cli

    proc = run_cli("score", "--model", str(tiny_model_dir), "--prompt", "hi", "--answer", "hello")
    assert proc.returncode == 2 and "not a reward model" in proc.stderr and "Traceback" not in proc.stderr


def test_precomputed_reference_gives_the_same_run(tiny_model_dir, pref_data, tmp_path):
    """Scoring every pair with the reference once before training gives the same losses, metrics and adapter as
    scoring it live at every step (the reference is a fixed function of each pair)."""
    from safetensors.torch import load_file

    runs = {}
    for pre in (False, True):
        out = tmp_path / f"pre{int(pre)}"
        cfg = _cfg(tiny_model_dir, pref_data, out, {"type": "dpo", "beta": 0.1, "reference": "copy",
                                                    "precompute_reference": pre}, steps=6, float64=True)
        cfg["train"]["log_every"] = 1
        cfg["data"]["packing"] = "padding_free"  # the table is scored on padded pairs, the steps on packed ones
        tunelab.train(cfg, echo=False)
        runs[pre] = (read_metrics(out), load_file(str(out / "final" / "adapter_model.safetensors")))
    (live, w_live), (pre, w_pre) = runs[False], runs[True]
    n = _pair_chain(tiny_model_dir, 8)
    assert_same_metrics(pre, live, ("loss", "rewards/margin", "rewards/chosen", "eval_loss"), n)
    assert_same_weights(w_pre, w_live, adam_tol(5e-3, 6, n))


@pytest.mark.parametrize("method", [{"type": "dpo", "beta": 0.1, "reference": "copy"}, {"type": "dpo", "beta": 0.1},
                                    {"type": "simpo"}], ids=["dpo-copy", "dpo-adapter_off", "simpo"])
def test_padding_free_pairs_give_the_unpacked_run(tiny_model_dir, pref_data, tmp_path, method):
    """Pairs packed padding-free (sequences kept apart by per-sequence attention and sequence ids) train exactly
    like padded pairs: same per-step losses, reward metrics and adapter."""
    from safetensors.torch import load_file

    runs = {}
    for packing in ("none", "padding_free"):
        out = tmp_path / packing
        cfg = _cfg(tiny_model_dir, pref_data, out, method, steps=4, float64=True)
        cfg["data"]["packing"] = packing
        cfg["train"]["log_every"] = 1
        result = tunelab.train(cfg, echo=False)
        assert result.packing == packing
        runs[packing] = (read_metrics(out), load_file(str(out / "final" / "adapter_model.safetensors")))
    (plain, w_plain), (packed, w_packed) = runs["none"], runs["padding_free"]
    n = _pair_chain(tiny_model_dir, 8)
    assert_same_metrics(packed, plain, ("loss", "rewards/margin", "rewards/accuracy", "eval_loss"), n)
    assert packed[-1]["positions"] < plain[-1]["positions"]  # no padding computed
    assert_same_weights(w_packed, w_plain, adam_tol(5e-3, 4, n))


def test_plan_and_bench_see_a_pair_as_two_sequences(tiny_model_dir, pref_data, tmp_path):
    from tunelab.config.load import load_config
    from tunelab.engine.bench import train_lengths
    from tunelab.engine.plan import plan_from_config

    cfg = load_config(_cfg(tiny_model_dir, pref_data, tmp_path / "p", {"type": "dpo"}))
    report = plan_from_config(cfg, measure_data=True, device="cpu", memory_gb=4)
    assert report.data["rows"] == 2 * 48  # every chosen and rejected sequence of the 48 training pairs
    assert report.settings["batch_size"] == 8 and report.max_batch >= 1
    lengths, fraction = train_lengths(cfg)
    assert len(lengths) == 96 and 0 < fraction < 1
