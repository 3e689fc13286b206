"""`tunelab average`: the uniform mean and the EMA of full model folders equal the hand-computed ones tensor by
tensor; the newest checkpoints of a LoRA run average into an adapter that chat and eval load; bad input gets one
line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tests.helpers import alpaca_rows, base_config, run_main, write_json
from tunelab.infer.average import ema_weights
from tunelab.models.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("avg")
    return [build_tiny_llama(root / f"m{seed}", hidden=32, layers=1, heads=4, vocab=500, seed=seed)
            for seed in range(3)]


def _state(folder):
    return load_file(str(folder / "model.safetensors"))


def test_uniform_mean_and_ema_of_model_folders_are_the_hand_computed_ones(three_models, tmp_path, capsys):
    a, b, c = (_state(m) for m in three_models)
    proc = run_main(capsys, "average", *(x for m in three_models for x in ("--model", str(m))), "--out",
                    str(tmp_path / "mean"), check=True)
    assert "averaged (uniform) 3 model folders, weights 0.3333, 0.3333, 0.3333" in proc.stdout
    mean = _state(tmp_path / "mean")
    assert set(mean) == set(a)
    for key in a:
        want = ((a[key].double() + b[key].double() + c[key].double()) / 3).to(a[key].dtype)
        assert torch.equal(mean[key], want), key
    # EMA, decay 0.5, oldest first: e = .5 (.5 a + .5 b) + .5 c, so weights .25, .25, .5
    assert ema_weights(3, 0.5) == [0.25, 0.25, 0.5]
    info = tunelab.average(models=[str(m) for m in three_models], ema=0.5, out=str(tmp_path / "ema"), echo=False)
    assert info["method"] == "ema" and info["weights"] == [0.25, 0.25, 0.5]
    ema = _state(tmp_path / "ema")
    for key in a:
        e = 0.5 * (0.5 * a[key].double() + 0.5 * b[key].double()) + 0.5 * c[key].double()
        assert torch.equal(ema[key], e.to(a[key].dtype)), key
    # a standard model folder: it loads, and eval reads it
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "mean")
    assert torch.equal(model.model.embed_tokens.weight.data, mean["model.embed_tokens.weight"])
    record = json.loads((tmp_path / "ema" / "tunelab_compression.json").read_text())
    assert record["tunelab_compression"] == "average" and record["decay"] == 0.5
    report = tunelab.evaluate_perplexity(model=str(tmp_path / "mean"),
                                         data=str(write_json(tmp_path / "ev.json", alpaca_rows(4))))
    assert report.tokens > 0 and report.ppl > 1


def test_the_last_checkpoints_of_a_lora_run_average_into_an_adapter(tiny_model_dir, tmp_path, capsys):
    data = write_json(tmp_path / "d.json", alpaca_rows(16))
    cfg = base_config(tiny_model_dir, data, tmp_path / "run", train={"save_every": 2, "save_total_limit": 0})
    tunelab.train(cfg, echo=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    assert [p.name for p in ckpts] == ["checkpoint-000002", "checkpoint-000004", "checkpoint-000006"]
    out = tmp_path / "avg"
    run_main(capsys, "average", "--run", str(tmp_path / "run"), "--last", "2", "--out", str(out), check=True)
    x, y = (load_file(str(p / "weights" / "adapter_model.safetensors")) for p in ckpts[1:])
    got = load_file(str(out / "adapter_model.safetensors"))
    assert set(got) == set(x) and any("lora_A" in k for k in got)
    for key in x:
        assert torch.equal(got[key], ((x[key].double() + y[key].double()) / 2).to(x[key].dtype)), key
    assert (out / "adapter_config.json").is_file()
    # an adapter folder like final/: eval and chat load it on the base
    report = tunelab.evaluate_perplexity(model=str(tiny_model_dir), adapter=str(out), data=str(data))
    assert report.tokens > 0
    proc = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--adapter", str(out), "--prompt", "hi",
                    "--max-new-tokens", "3", check=True)
    assert proc.returncode == 0


def test_bad_input_gets_one_line(three_models, tiny_model_dir, tmp_path, capsys):
    other = build_tiny_llama(tmp_path / "wide", hidden=64, layers=1, heads=4, vocab=500)
    empty = tmp_path / "empty"
    empty.mkdir()
    m0, m1 = (str(m) for m in three_models[:2])
    for args, message in (
            (["--model", m0], "needs two or more folders, got 1"),
            (["--model", m0, "--model", str(other)], "average: lm_head.weight is (500, 64) torch.float32 in"),
            (["--model", m0, "--model", m1, "--ema", "1.5"], "--ema: a decay in (0, 1), got 1.5"),
            (["--model", m0, "--model", str(empty)], "holds no safetensors weights"),
            (["--run", str(tmp_path)], "needs --last K"),
            (["--run", str(tmp_path), "--last", "2"], "has no checkpoints"),
            (["--model", m0, "--model", m1, "--last", "2"], "--last: only with --run")):
        proc = run_main(capsys, "average", *args, "--out", str(tmp_path / "bad"))
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert message in lines[0], lines[0]
    assert not (tmp_path / "bad").exists()
