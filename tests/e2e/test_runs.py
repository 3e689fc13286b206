"""Run-level behaviour: bad rows, re-running a run, TensorBoard, chat rendering equals training rendering."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import tunelab
from tests.helpers import ROOT, alpaca_rows, base_config, run_cli, write_json
from tunelab.cli import main


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_rows(16))


def test_bad_rows_stop_the_run_or_are_skipped(tiny_model_dir, tmp_path, capsys):
    rows = alpaca_rows(12)
    lines = [json.dumps(r) for r in rows[:5]] + ['{"instruction": "no answer"}'] + [json.dumps(r) for r in rows[5:]]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = base_config(tiny_model_dir, data, tmp_path / "out", train={"max_steps": 1})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "1 invalid row" in err and "mixed.jsonl:6: output: missing or empty" in err
    assert main(["train", str(path), "data.on_bad_row=skip"]) == 0
    assert "1 invalid rows skipped" in capsys.readouterr().out


def test_rerun_is_complete_and_resume_never_refuses(tiny_model_dir, data_path, tmp_path, capsys):
    cfg = base_config(tiny_model_dir, data_path, tmp_path / "out", train={"max_steps": 2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    capsys.readouterr()
    assert main(["train", str(path)]) == 0
    assert "already complete" in capsys.readouterr().out
    assert main(["train", str(path), "train.resume=never"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", str(path), "train.resume=never", "output.overwrite=true"]) == 0


def test_tensorboard_logging(tiny_model_dir, data_path, tmp_path):
    cfg = base_config(tiny_model_dir, data_path, tmp_path / "out", train={"max_steps": 2})
    cfg["output"]["report_to"] = ["tensorboard"]
    tunelab.train(cfg, echo=False)
    assert list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))


def test_chat_prompt_tokens_equal_training_rendering(tiny_model_dir):
    """The prompt chat sends to the model is, token for token, the training rendering up to the answer."""
    from tunelab.config.schema import DataConfig
    from tunelab.data.conversation import Conversation
    from tunelab.data.prepare import encode_rows
    from tunelab.infer.chat import ChatSession

    session = ChatSession.load(str(tiny_model_dir), system="Be brief.")
    history = [
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And 4 + 4?"},
    ]
    conv = Conversation(messages=[*history, {"role": "assistant", "content": "8"}])
    (train_row,), _ = encode_rows([conv], session.tokenizer, session.template,
                                  DataConfig(system="Be brief.", max_length=512), "chat")
    prompt = session.prompt_ids(history)
    assert train_row.input_ids[: len(prompt)] == prompt
    # the generation prompt is not trained; the answer's first token, right after it, is
    assert train_row.labels[len(prompt) - 1] == -100 and train_row.labels[len(prompt)] != -100


def test_interactive_chat_multi_turn(tiny_model_dir):
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "chat", "--model", str(tiny_model_dir), "--max-new-tokens", "4",
         "--temperature", "0.8", "--top-k", "20", "--repetition-penalty", "1.1"],
        input="hello there\nsecond question\n/reset\nthird\n/exit\n", capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("assistant> ") == 3
    assert "(history cleared)" in proc.stderr


def test_python_api_generate_and_export(tiny_model_dir, data_path, tmp_path):
    result = tunelab.train(base_config(tiny_model_dir, data_path, tmp_path / "out", train={"max_steps": 2}),
                           echo=False)
    exported = tunelab.export(run=result.output_dir, out=tmp_path / "exp")
    text = tunelab.generate(str(exported), "hi", max_new_tokens=3, do_sample=False)
    # the exported folder is a plain HF model: transformers alone, on the prompt its saved chat template renders,
    # gives the same greedy answer (the same weights and arithmetic, so the same tokens)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(exported)
    model = AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert run_cli("chat", "--model", str(exported), "--prompt", "hi", "--greedy", "--max-new-tokens", "3",
                   "--no-stream").returncode == 0


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")))
def test_every_example_runs_two_steps(tiny_model_dir, tmp_path, name, monkeypatch):
    monkeypatch.chdir(ROOT)  # example paths are relative to the repository root
    overrides = [f"model.path={tiny_model_dir}", "train.max_steps=2", f"output.dir={tmp_path / 'out'}",
                 "output.plot=false"]
    method = yaml.safe_load((ROOT / "examples" / name).read_text())["method"]
    if method["type"] == "kd":  # the teacher a user trains first (examples/sft_full.yaml): the tiny model here
        overrides.append(f"method.teacher.path={tiny_model_dir}")
        if method.get("teacher_cache"):
            overrides.append(f"method.teacher_cache={tmp_path / 'cache'}")
    result = tunelab.train(ROOT / "examples" / name, overrides, echo=False)
    assert result.steps == 2
    assert any((result.final_dir / f).exists() for f in ("config.json", "adapter_config.json", "tunelab_adapter.json"))


def test_quickstart_runs_every_step_through_export(tmp_path, monkeypatch, capsys):
    """`make quickstart`'s whole path (build, answer, train, answer, export into the run folder, answer from the
    export) on 40 steps instead of 280: enough for the loss to fall by a fifth, not for the answers to be right."""
    from tunelab import quickstart

    monkeypatch.setattr(quickstart, "MODEL_DIR", tmp_path / "model")
    out = tmp_path / "run"
    assert quickstart.main(["train.max_steps=40", f"model.path={tmp_path / 'model'}", f"output.dir={out}"],
                           required_drop=0.2) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "[5/5] exported merged model to" in text
    assert (out / "exported" / "model.safetensors").exists() and (out / "final" / "adapter_model.safetensors").exists()
