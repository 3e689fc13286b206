"""The `tunelab` CLI on bad input: one `error:` line on stderr and exit code 2 (a traceback too, still
exit 2, with --debug); and the friction fixes: `tunelab config QUERY`, options around overrides in `data
preview`, `data check --method`, labelled pair statistics, chat's /help and unknown slash commands."""

from __future__ import annotations

import json

import yaml

from tests.helpers import ROOT, alpaca_rows, run_main, write_json


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_duplicate_key_non_utf8_and_debug_exit_code(tmp_path, capsys):
    dup = tmp_path / "config.yaml"
    dup.write_text("model: {path: m}\ndata: {train: [{path: d.json}]}\ntrain:\n  lr: 1.0e-4\n  lr: 5.0\n")
    line = _one_error_line(run_main(capsys, "train", str(dup)))
    assert line == f"error: {dup}:5: train.lr given twice (first at line 4)"
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: {path: caf\u00e9}\n".encode("latin-1"))
    assert f"{latin}:1: not UTF-8 text" in _one_error_line(run_main(capsys, "plan", str(latin)))
    proc = run_main(capsys, "train", str(dup), "--debug")  # the traceback, but still "your input", not a crash
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {dup}:5: train.lr given twice (first at line 4)"


def test_override_blamed_on_the_command_line_and_config_query(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\ndata: {train: [{path: d.json}]}\n")
    line = _one_error_line(run_main(capsys, "train", str(cfg), "train.lrr=1"))
    assert line == "error: command-line override 'train.lrr=1': train.lrr: unknown key; did you mean 'train.lr'?"
    line = _one_error_line(run_main(capsys, "config", "foo"))
    assert line.startswith("error: config: no section or key matches 'foo'")
    proc = run_main(capsys, "config", "train.lr", check=True)
    assert "train.lr (number" in proc.stdout and "train.batch_size" not in proc.stdout


def test_chat_refuses_max_new_tokens_zero_before_loading(capsys):
    for value in ("0", "-1"):
        line = _one_error_line(run_main(capsys, "chat", "--model", "nowhere", "--max-new-tokens", value, "--prompt", "hi"))
        assert "--max-new-tokens" in line and f"got {value}" in line


def test_help_epilog_builds_the_model_the_examples_use(capsys):
    proc = run_main(capsys, "--help", check=True)
    example = yaml.safe_load((ROOT / "examples" / "sft_lora.yaml").read_text())
    assert f"init-model tiny-llama {example['model']['path']} " in proc.stdout
    assert "kto" in proc.stdout and "reft" in proc.stdout


def test_data_preview_options_around_overrides_and_one_header(tmp_path, tiny_model_dir, capsys):
    data = write_json(tmp_path / "train.json", alpaca_rows(4))
    for args in (["--model", str(tiny_model_dir), "--rows", "2", "data.max_length=64"],
                 ["data.max_length=64", "--model", str(tiny_model_dir), "-n", "2"]):
        proc = run_main(capsys, "data", "preview", str(data), *args, "--no-color", check=True)
        assert proc.stdout.count("train.json:row 0") == 1 and proc.stdout.count("train.json:row 1") == 1, proc.stdout
        assert "train.json:row 2" not in proc.stdout


def test_data_check_method_and_labelled_pair_counts(tmp_path, tiny_model_dir, capsys):
    pairs = [{"instruction": f"Question {i}?", "chosen": "Yes, a long and careful answer " * 3,
              "rejected": "No."} for i in range(4)]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs))
    proc = run_main(capsys, "data", "check", str(data), "--method", "dpo", "--model", str(tiny_model_dir), check=True)
    out = proc.stdout
    assert "preference pairs: 4" in out
    assert "tokens per pair (longer sequence: prompt + longer answer): min" in out
    assert "trained tokens per pair (chosen + rejected answers): min" in out
    line = _one_error_line(run_main(capsys, "data", "check", str(data), "--method", "ddpo"))
    assert line == "error: --method: unknown method 'ddpo'; did you mean 'dpo'?"


def test_chat_help_and_unknown_commands(tiny_model_dir, capsys):
    proc = run_main(capsys, "chat", "--model", str(tiny_model_dir), "--greedy", "--max-new-tokens", "2",
                    stdin="/help\n/xyz\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert "assistant>" not in proc.stdout  # nothing went to the model
    assert "list these commands" in proc.stderr
    assert "error: unknown command /xyz; /help lists the commands" in proc.stderr
