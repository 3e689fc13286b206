"""The training loop in-process: normalisation across accumulation, adapters, eval, outputs."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import tunelab
from tests.helpers import alpaca_rows, base_config, write_json
from tests.tolerance import adam_tol, assert_same_metrics, assert_same_weights, chain_length
from tunelab.engine.metrics import read_metrics


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_rows(32))


def _final_adapter(out):
    return load_file(str(out / "final" / "adapter_model.safetensors"))


def test_loss_does_not_depend_on_how_the_batch_is_split(tiny_model_dir, data_path, tmp_path):
    """Global batch 8 as 8x1, 4x2 and 2x4 micro-batches: same per-step losses and same weights (float64 runs; the
    bounds are tests/tolerance.py's for sums over the 8 rows of at most 64 tokens)."""
    runs = {}
    for bs, accum in [(8, 1), (4, 2), (2, 4)]:
        out = tmp_path / f"bs{bs}"
        cfg = base_config(tiny_model_dir, data_path, out, train={"batch_size": bs, "grad_accum": accum, "max_steps": 4})
        cfg["model"]["dtype"] = "float64"
        tunelab.train(cfg, echo=False)
        runs[(bs, accum)] = (read_metrics(out), _final_adapter(out))
    ref_metrics, ref_w = runs[(8, 1)]
    assert len(ref_metrics) == 4
    n = chain_length(tiny_model_dir, 64, tokens=8 * 64)
    for metrics, w in runs.values():
        assert_same_metrics(metrics, ref_metrics, ("loss", "grad_norm"), n)
        assert_same_weights(w, ref_w, adam_tol(1e-2, 4, n))


def test_lora_run_outputs_and_metrics(tiny_model_dir, data_path, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out,
                      data={"val_size": 0.25},
                      train={"max_steps": 8, "log_every": 2, "eval_every": 4, "save_every": 4, "save_total_limit": 1})
    cfg["output"]["plot"] = True
    result = tunelab.train(cfg, echo=False)
    records = read_metrics(out)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [2, 4, 6, 8]
    for r in train_records:
        assert set(r) >= {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed"}
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    # tokens count real (non-pad) tokens and grow monotonically; elapsed too
    assert all(a["tokens"] < b["tokens"] for a, b in zip(train_records, train_records[1:]))
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert evals[-1]["eval_ppl"] == math.exp(evals[-1]["eval_loss"])  # the same double, through JSON exactly
    assert (out / "config.yaml").exists() and (out / "loss.png").stat().st_size > 1000
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-000008"]  # save_total_limit 1 kept only the last
    assert (out / "final" / "adapter_config.json").exists()
    assert (out / "final" / "tokenizer_config.json").exists()
    assert result.steps == 8 and result.data_stats["val_rows"] == 8


def _changed(before: dict, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


@pytest.mark.parametrize("adapter, expect", [
    ({"type": "full"}, "all"),
    ({"type": "freeze", "layers": 1, "modules": ["model.norm"]}, "last"),
])
def test_full_and_freeze_change_exactly_the_trained_parameters(tiny_model_dir, data_path, tmp_path, adapter, expect):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, adapter=adapter, train={"max_steps": 2, "lr": 1e-3})
    tunelab.train(cfg, echo=False)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = AutoModelForCausalLM.from_pretrained(out / "final")
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    changed = _changed(before, tuned)
    names = set(before)
    if expect == "all":
        assert changed == names
    else:
        n_layers = base.config.num_hidden_layers
        want = {n for n in names if f"layers.{n_layers - 1}." in n or n == "model.norm.weight"}
        assert changed == want


def test_pretraining_on_text_trains_every_token(tiny_model_dir, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(f'{{"text": "the quick brown fox number {i} jumps"}}' for i in range(16)))
    out = tmp_path / "pt"
    cfg = base_config(tiny_model_dir, data, out, method={"type": "pt"}, train={"max_steps": 3})
    cfg["data"]["train"] = [{"path": str(data), "format": "text"}]
    result = tunelab.train(cfg, echo=False)
    assert result.steps == 3 and (out / "final" / "adapter_model.safetensors").exists()
    # the rows the run trained on, from the same pipeline: every token is a target (labels equal the ids; the first
    # token of a row has nothing before it, so the loss skips only that one)
    from tunelab.config import load_config
    from tunelab.data.prepare import prepare_data
    from tunelab.models.load import load_tokenizer

    resolved = load_config(cfg)
    data = prepare_data(resolved.data, load_tokenizer(resolved.model), kind="text", seed=0)
    rows = data.train + data.val
    assert len(rows) == 16 and all(len(r.input_ids) > 5 and r.labels == r.input_ids for r in rows)
    assert result.data_stats["train_rows"] == len(data.train)


def test_gradient_checkpointing_gives_the_same_losses(tiny_model_dir, data_path, tmp_path):
    """Recomputing activations in the backward pass repeats the forward's arithmetic; the gradients may add their
    pieces in another order, so the runs are compared in float64 with the reorder bound."""
    runs = []
    for gc in (False, True):
        out = tmp_path / f"gc{gc}"
        cfg = base_config(tiny_model_dir, data_path, out, train={"max_steps": 3})
        cfg["model"].update(gradient_checkpointing=gc, dtype="float64")
        tunelab.train(cfg, echo=False)
        runs.append((read_metrics(out), _final_adapter(out)))
    n = chain_length(tiny_model_dir, 64, tokens=4 * 64)
    assert_same_metrics(runs[1][0], runs[0][0], ("loss", "grad_norm"), n)
    assert_same_weights(runs[1][1], runs[0][1], adam_tol(1e-2, 3, n))


@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_lora_plus_scales_the_b_learning_rate(tiny_model_dir, data_path, tmp_path, ratio):
    """One AdamW step moves each weight by lr * g / (|g| + eps) (bias-corrected m / sqrt(v) = g / |g|). LoRA's B
    starts at zero, so after step 1 its weights are +-lr x lr_ratio, short by the relative eps / (|g| + eps): rel=1e-3
    holds for the largest element while its gradient is above 1e-5 (eps = 1e-8), and fails for a wrong ratio."""
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, adapter={"type": "lora", "r": 4, "alpha": 8, "lr_ratio": ratio},
                      train={"max_steps": 1, "scheduler": "constant", "lr": 1e-3})
    tunelab.train(cfg, echo=False)
    weights = load_file(out / "final" / "adapter_model.safetensors")
    b = torch.cat([w.flatten() for k, w in weights.items() if "lora_B" in k])
    assert b.abs().max().item() == pytest.approx(1e-3 * ratio, rel=1e-3)
    assert (b != 0).float().mean() > 0.5


def test_method_metrics_are_averaged_per_unit_and_logged(tiny_model_dir, data_path, tmp_path, monkeypatch):
    """A method's metrics (summed over its units, like its loss) are divided by the window's total weight and
    written to metrics.jsonl next to the loss, for training and evaluation, and across a resume."""
    from tunelab import methods
    from tunelab.methods.base import LossOutput, Method
    from tunelab.methods.lm import causal_lm_loss, trained_tokens

    def loss(model, batch, ctx):
        out = causal_lm_loss(model, batch, ctx)
        n = trained_tokens(batch)
        # "unit" averages to exactly 1; "loss_copy" must equal the logged loss
        return LossOutput(out.loss_sum, {"unit": torch.tensor(float(n)), "loss_copy": out.loss_sum.detach()})

    probe = Method(name="sft", data_kind="chat", loss=loss, weight=trained_tokens)
    monkeypatch.setitem(methods.METHODS, "sft", probe)
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, data={"val_size": 0.25},
                      train={"max_steps": 4, "log_every": 2, "eval_every": 4})
    tunelab.train(cfg, echo=False)
    records = read_metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for r in train:
        # token counts are small integers, exact in float32 and in the loop's float64 sums: exactly 1
        assert r["unit"] == 1.0
        # the loss and its copy are the same float32 values summed in the same order and divided by one weight
        assert r["loss_copy"] == r["loss"]
    ev = [r for r in records if "eval_loss" in r][-1]
    assert ev["eval_unit"] == 1.0
    assert ev["eval_loss_copy"] == ev["eval_loss"]
