"""`tunelab eval ppl`: the perplexity a training run's evaluation reports, the parameters (and zeros) and size of a
model folder, its speed, and one clear line for a folder without weights."""

from __future__ import annotations

import json

import pytest
import torch

import tunelab
from tests.helpers import alpaca_rows, base_config, run_main, write_json
from tests.tolerance import chain_length, reorder_tol
from tunelab.engine.metrics import read_metrics


def test_eval_ppl_is_the_training_evaluations_perplexity(tiny_model_dir, tmp_path):
    """A run that does not move (lr 1e-12) evaluates its validation rows; eval ppl on the same rows with the saved
    model reports the same perplexity: the same tokens scored, summed in another order (packed there, padded here),
    so within the float32 reorder bound of the mean NLL."""
    data = write_json(tmp_path / "train.json", alpaca_rows(16))
    val = write_json(tmp_path / "val.json", alpaca_rows(28)[16:])
    cfg = base_config(tiny_model_dir, data, tmp_path / "run", adapter={"type": "full"},
                      train={"max_steps": 1, "lr": 1e-12, "eval_every": 1})
    cfg["data"]["val"] = [{"path": str(val), "format": "alpaca"}]
    tunelab.train(cfg, echo=False)
    want = read_metrics(tmp_path / "run")[-1]
    report = tunelab.evaluate_perplexity(model=str(tmp_path / "run" / "final"), data=str(val), batch_size=5)
    assert report.kind == "chat" and report.rows == 12
    tol = reorder_tol(want["eval_loss"], chain_length(tiny_model_dir, 64), torch.float32, cond=1.0)
    assert abs(report.nll - want["eval_loss"]) <= tol, (report.nll, want["eval_loss"], tol)
    assert report.ppl == pytest.approx(want["eval_ppl"], rel=2 * tol)
    assert report.forward_tokens_per_s > 0 and report.generate_tokens_per_s > 0
    text_report = tunelab.evaluate_perplexity(model=str(tmp_path / "run" / "final"), data=str(val), kind="text")
    assert text_report.tokens > report.tokens  # every token scored, prompts too


def test_eval_ppl_counts_zeros_and_the_weights_on_disk(tiny_model_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "sparse"
    shutil.copytree(tiny_model_dir, model)
    state = load_file(str(model / "model.safetensors"))
    name = next(n for n in state if n.endswith("q_proj.weight"))
    before = sum(int((t != 0).sum()) for t in state.values())
    zeroed = int((state[name][:, ::2] != 0).sum())
    state[name][:, ::2] = 0
    save_file(state, str(model / "model.safetensors"), metadata={"format": "pt"})
    data = write_json(tmp_path / "rows.json", alpaca_rows(4))
    proc = run_main(capsys, "eval", "ppl", "--model", str(model), "--data", str(data), "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    tied = sum(t.numel() for t in state.values())
    assert got["parameters"] == tied and got["nonzero"] == before - zeroed
    assert got["sparsity"] == pytest.approx(1 - (before - zeroed) / tied)
    assert got["disk_bytes"] == (model / "model.safetensors").stat().st_size
    assert got["ppl"] > 1 and got["tokens"] > 0


def test_eval_ppl_refuses_a_folder_without_weights_in_one_line(tiny_model_dir, tmp_path, capsys):
    import shutil

    empty = tmp_path / "no-weights"
    empty.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, empty / f.name)
    data = write_json(tmp_path / "rows.json", alpaca_rows(2))
    proc = run_main(capsys, "eval", "ppl", "--model", str(empty), "--data", str(data))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(empty) in lines[0], proc.stderr
