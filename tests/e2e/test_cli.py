"""The CLI: fast help, clear one-line errors with exit code 2, data tools, export and chat."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest
import torch
import yaml

from tests.helpers import ROOT, alpaca_rows, base_config, run_cli, write_json
from tests.tolerance import logits_tol
from tunelab.cli import main


def test_help_is_fast_and_imports_no_torch():
    code = ("import sys, time; t = time.time(); from tunelab.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nprint(time.time() - t)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and float(proc.stdout.strip().splitlines()[-1]) < 1.0
    t = time.time()
    proc = run_cli("--help")
    assert proc.returncode == 0 and time.time() - t < 5


def test_train_help_lists_config_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for key in ("train.lr", "adapter.r", "data.template", "output.dir", "model.attn_implementation"):
        assert key in text


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_rows(16))


def _cfg(tmp_path, tiny_model_dir, data_path, **kw):
    cfg = base_config(tiny_model_dir, data_path, tmp_path / "out", **kw)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _error(capsys, argv) -> str:
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (captured.out, captured.err)
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert lines and lines[0].startswith("error: ") and "Traceback" not in captured.err
    return lines[0]


def test_bad_inputs_give_one_line_and_exit_2(tmp_path, tiny_model_dir, data_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {path: x\n")
    line = _error(capsys, ["train", str(bad_yaml)])
    assert "bad.yaml:" in line and "malformed YAML" in line
    cfg = _cfg(tmp_path, tiny_model_dir, data_path)
    assert "train.lrr: unknown key; did you mean 'train.lr'?" in _error(capsys, ["train", str(cfg), "train.lrr=1"])
    assert "train.batch_size: expected an integer" in _error(capsys, ["train", str(cfg), "train.batch_size=x"])
    assert "config file not found" in _error(capsys, ["train", str(tmp_path / "nope.yaml")])
    assert "model folder not found" in _error(capsys, ["train", str(cfg), f"model.path={tmp_path / 'nomodel'}"])
    missing = tmp_path / "missing.json"
    assert "missing.json" in _error(capsys, ["train", str(cfg), f"data.train.0.path={missing}"])
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert "empty.json" in _error(capsys, ["train", str(cfg), f"data.train.0.path={empty}"])
    line = _error(capsys, ["train", str(cfg), "data.max_length=8"])
    assert "data.max_length" in line
    assert "--nproc 64" in _error(capsys, ["train", str(cfg), "--nproc", "64"])


def test_unwritable_output_dir(tmp_path, tiny_model_dir, data_path, capsys):
    if os.geteuid() == 0:
        # root ignores permission bits: use a path below a regular file instead
        blocker = tmp_path / "file"
        blocker.write_text("")
        out = blocker / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        out = ro / "out"
    cfg = _cfg(tmp_path, tiny_model_dir, data_path)
    assert "output.dir: cannot write" in _error(capsys, ["train", str(cfg), f"output.dir={out}"])


def test_real_process_exit_code_and_debug_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\ndata: {train: [{path: d.json}]}\ntrain: {lrr: 1}\n")
    proc = run_cli("train", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[0] == f"error: {cfg}: train.lrr: unknown key; did you mean 'train.lr'?"
    proc = run_cli("train", str(cfg), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_data_check_and_preview(tmp_path, tiny_model_dir, data_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "hello"}\n{"instruction": "x"}\n')
    assert main(["data", "check", str(bad)]) == 2
    out = capsys.readouterr().out
    assert "1 valid, 1 invalid" in out and "bad.jsonl:2:" in out
    assert main(["data", "check", str(data_path), "--model", str(tiny_model_dir), "--max-length", "16"]) == 0
    out = capsys.readouterr().out
    assert "tokens per row: min" in out and "rows longer than max_length 16:" in out
    assert main(["data", "preview", str(data_path), "--model", str(tiny_model_dir), "-n", "2", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert out.count("[[") >= 2 and "\x1b[" not in out


def test_init_model_cli(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    proc = run_cli("init-model", "tiny-llama", str(tmp_path / "m"), "--hidden", "32", "--layers", "1",
                   "--heads", "2", "--vocab", "600", check=True)
    assert "model written to" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert tok.chat_template


def test_env_reports_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "transformers:" in out and "native bf16:" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rule; a CUDA GPU takes bf16 either way")
@pytest.mark.parametrize("native", [False, True], ids=["emulated-bf16", "native-bf16"])
def test_bf16_on_cpu_follows_native_support(tmp_path, tiny_model_dir, data_path, capsys, monkeypatch, native):
    """bf16 is refused on a CPU that emulates it and accepted on one with AVX512-BF16 or AMX. Both answers are
    checked on every machine: the CPU's own flags are replaced by each case (`tunelab env` reports the real ones)."""
    from tunelab.engine import shape

    monkeypatch.setattr(shape, "cpu_has_native_bf16", lambda: native)
    if native:
        assert shape.resolve_precision("bf16", "cpu") == "bf16"
        return
    cfg = _cfg(tmp_path, tiny_model_dir, data_path)
    assert "train.precision: bf16" in _error(capsys, ["train", str(cfg), "train.precision=bf16"])


def test_native_bf16_detection_reads_the_cpu_flags(monkeypatch):
    from tunelab.utils import hardware

    for flags, native in [({"avx2", "fma"}, False), ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True)]:
        monkeypatch.setattr(hardware, "cpu_flags", lambda flags=flags: flags)
        assert hardware.cpu_has_native_bf16() is native, flags


def test_export_merges_lora_and_chat_answers(tmp_path, tiny_model_dir, data_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, tiny_model_dir, data_path, train={"max_steps": 3, "lr": 5e-2})
    run_cli("train", str(cfg), check=True)
    run_dir = tmp_path / "out"
    exported = tmp_path / "exported"
    proc = run_cli("export", "--run", str(run_dir), "--out", str(exported), check=True)
    assert "exported:" in proc.stdout
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "generation_config.json"):
        assert (exported / name).exists(), name
    assert (exported / "chat_template.jinja").exists() or "chat_template" in json.loads(
        (exported / "tokenizer_config.json").read_text())

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, run_dir / "final").eval()
    merged = AutoModelForCausalLM.from_pretrained(exported).eval()
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(input_ids=ids).logits
    tol = logits_tol(a, tiny_model_dir, 4)  # merged W + s B A against W x + s B (A x), rank 4
    torch.testing.assert_close(b, a, atol=tol, rtol=0)
    assert not torch.allclose(plain, a, atol=100 * tol, rtol=0)  # the adapter changed far more than rounding

    proc = run_cli("chat", "--model", str(exported), "--prompt", "Repeat the word number 3", "--greedy",
                   "--max-new-tokens", "8", check=True)
    assert proc.stdout.strip() != ""
    proc = run_cli("chat", "--model", str(tiny_model_dir), "--adapter", str(run_dir / "final"), "--prompt", "hi",
                   "--num-beams", "2", "--max-new-tokens", "4", check=True)
    assert proc.returncode == 0
