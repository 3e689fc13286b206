"""The CLI on unsafe or broken model folders and on export folders that hold the user's files: `tunelab train`,
`chat` and `export` load no pickle and run no shipped code unless asked by name, answer broken folders in one line,
replace only the files an export wrote, never write over what they read, and print no library noise."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import alpaca_rows, base_config, run_cli, write_json
from tunelab.cli import main

NOISE = ("Loading weights", "Writing model shards", "Token indices sequence length is longer",
         "Failed to load CPU gemm_4bit_forward", "Traceback")


class _Creates:
    """Unpickling this creates a file: the marker of code run from a weights file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_rows(8))


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny model that a broken export could destroy without harming other tests."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "models" / "base"))


def _without_weights(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors")))


def _cfg(tmp_path: Path, model: Path, data_path: Path) -> Path:
    cfg = base_config(model, data_path, tmp_path / "out", train={"max_steps": 1, "batch_size": 4, "log_every": 1,
                                                                 "save_every": 0, "seed": 0})
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _error(capsys, argv: list[str]) -> str:
    """The one line of a refused command (exit 2, no traceback)."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (captured.out, captured.err)
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in captured.err, captured.err
    return errors[0]


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _quiet(proc) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    for noise in NOISE:
        assert noise not in text, (noise, text)


# ------------------------------------------------------------------------------------------------ export folder
def test_export_replaces_only_its_own_files(model_copy, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "exported"
    proc = run_cli("export", "--model", str(model_copy), "--out", str(out))
    _quiet(proc)
    manifest = json.loads((out / "tunelab_export.json").read_text())
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json"} <= set(
        manifest["files"])
    # the user adds a note; an earlier export of a bigger model had left two shards and their index
    (out / "notes.txt").write_text("my notes")
    stale = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    for name in stale:
        (out / name).write_text("stale")
    manifest["files"] += stale
    (out / "tunelab_export.json").write_text(json.dumps(manifest))

    assert main(["export", "--model", str(model_copy), "--out", str(out)]) == 0  # in this process: quicker
    assert (out / "notes.txt").read_text() == "my notes"
    for name in stale:
        assert not (out / name).exists(), name
    assert sorted(json.loads((out / "tunelab_export.json").read_text())["files"]) == sorted(
        p.name for p in out.iterdir() if p.name not in ("notes.txt", "tunelab_export.json"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".exported")]  # no staging folder left behind
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=ids).logits
        b = AutoModelForCausalLM.from_pretrained(model_copy).eval()(input_ids=ids).logits
    assert torch.equal(a, b)  # fp32 in, fp32 out, no adapter: the same weights


def test_export_refuses_out_that_overlaps_what_it_reads(model_copy, tmp_path, capsys):
    before = _digest(model_copy)
    adapter = tmp_path / "run" / "final"
    adapter.mkdir(parents=True)
    cases = [
        (["--model", str(model_copy), "--out", str(model_copy)], "is the --model folder"),
        (["--model", str(model_copy), "--out", str(model_copy / "exported")], "is inside the --model folder"),
        (["--model", str(model_copy), "--out", str(model_copy.parent)], "contains the --model folder"),
        (["--model", str(model_copy), "--adapter", str(adapter), "--out", str(adapter)], "is the --adapter folder"),
        (["--model", str(model_copy), "--adapter", str(adapter), "--out", str(adapter.parent)],
         "contains the --adapter folder"),
    ]
    for argv, words in cases:
        line = _error(capsys, ["export", *argv])
        assert line.startswith("error: --out: ") and words in line, line
    assert _digest(model_copy) == before and not (model_copy / "exported").exists()
    # a non-empty folder that no export wrote is left as it was
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    assert "holds no earlier export" in _error(capsys, ["export", "--model", str(model_copy), "--out", str(mine)])
    assert (mine / "config.json").read_text() == "{}"


# ------------------------------------------------------------------------------------------------ pickle weights
@pytest.fixture(scope="module")
def pickle_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with pytorch_model.bin (torch.save's pickle format) instead of safetensors."""
    from safetensors.torch import load_file

    dst = _without_weights(tiny_model_dir, tmp_path_factory.mktemp("pkl") / "model")
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), dst / "pytorch_model.bin")
    return dst


def test_pickle_weights_need_the_opt_in(pickle_model, tmp_path, data_path, capsys):
    import tunelab

    cfg = _cfg(tmp_path, pickle_model, data_path)
    line = _error(capsys, ["train", str(cfg)])
    assert str(pickle_model) in line and "model.allow_pickle=true" in line
    for argv in (["chat", "--model", str(pickle_model), "--prompt", "hi", "--max-new-tokens", "3"],
                 ["export", "--model", str(pickle_model), "--out", str(tmp_path / "exported")],
                 ["score", "--model", str(pickle_model), "--prompt", "hi", "--answer", "a"]):
        line = _error(capsys, argv)
        assert str(pickle_model) in line and "--allow-pickle" in line, line
    assert not (tmp_path / "exported").exists()

    proc = run_cli("train", str(cfg), "model.allow_pickle=true")
    _quiet(proc)
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").exists()
    assert main(["chat", "--model", str(pickle_model), "--allow-pickle", "--prompt", "hi", "--max-new-tokens", "3"]) == 0
    out = tunelab.export(model=str(pickle_model), out=tmp_path / "exported", allow_pickle=True)
    assert (out / "model.safetensors").exists() and not (out / "pytorch_model.bin").exists()


def test_a_pickle_only_adapter_to_start_from_needs_the_opt_in(tiny_model_dir, tmp_path, data_path, capsys):
    """peft falls back to adapter_model.bin when an adapter folder has no safetensors: held to the same rule."""
    adapter = tmp_path / "pickle_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    torch.save({}, adapter / "adapter_model.bin")
    line = _error(capsys, ["train", str(_cfg(tmp_path, tiny_model_dir, data_path)), f"adapter.path={adapter}"])
    assert "adapter.path" in line and str(adapter) in line and "model.allow_pickle=true" in line, line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_crafted_pickle_runs_no_code(tiny_model_dir, tmp_path, data_path, capsys):
    evil = _without_weights(tiny_model_dir, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Creates(marker)}, f)
    cfg = _cfg(tmp_path, evil, data_path)
    assert "model.allow_pickle=true" in _error(capsys, ["train", str(cfg)])
    assert "--allow-pickle" in _error(capsys, ["export", "--model", str(evil), "--out", str(tmp_path / "x")])
    assert "--allow-pickle" in _error(capsys, ["chat", "--model", str(evil), "--prompt", "hi"])
    # opted in, torch's weights-only unpickler still refuses the object: one line, and nothing ran
    proc = run_cli("chat", "--model", str(evil), "--allow-pickle", "--prompt", "hi", "--max-new-tokens", "3")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --model: the pickle weights of {evil}")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ tokenizer, remote code
def test_model_without_tokenizer_gives_one_line(tiny_model_dir, tmp_path, data_path, capsys):
    notok = tmp_path / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, notok / name)
    line = _error(capsys, ["train", str(_cfg(tmp_path, notok, data_path))])
    assert line.startswith("error: model.path: ") and "has no tokenizer" in line and "model.tokenizer" in line
    for argv in (["chat", "--model", str(notok), "--prompt", "hi"],
                 ["export", "--model", str(notok), "--out", str(tmp_path / "exported")]):
        line = _error(capsys, argv)
        assert line.startswith("error: --model: ") and str(notok) in line and "has no tokenizer" in line


def test_remote_code_refusal_names_the_key(tiny_model_dir, tmp_path, data_path, capsys):
    remote = Path(shutil.copytree(tiny_model_dir, tmp_path / "remote"))
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="shipped-llama", auto_map={"AutoConfig": "configuration_shipped.ShippedConfig",
                                                        "AutoModelForCausalLM": "modeling_shipped.ShippedModel"})
    (remote / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (remote / "configuration_shipped.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    line = _error(capsys, ["train", str(_cfg(tmp_path, remote, data_path))])
    assert str(remote) in line and "model.trust_remote_code=true" in line
    for argv in (["chat", "--model", str(remote), "--prompt", "hi"],
                 ["export", "--model", str(remote), "--out", str(tmp_path / "exported")]):
        assert "--trust-remote-code" in _error(capsys, argv)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ noise
def test_chat_and_env_print_no_library_noise(tmp_path):
    from tunelab.models.tiny import build_tiny_llama

    proc = run_cli("env")
    _quiet(proc)
    assert "bitsandbytes: " in proc.stdout
    # a model that knows only 32 positions, so a long prompt passes the tokenizer's maximum (a quiet export runs in
    # test_export_replaces_only_its_own_files, a quiet train in test_pickle_weights_need_the_opt_in)
    short = build_tiny_llama(tmp_path / "short", hidden=32, layers=1, heads=2, vocab=300, max_position=32)
    _quiet(run_cli("chat", "--model", str(short), "--prompt", "word " * 60, "--max-new-tokens", "3"))
