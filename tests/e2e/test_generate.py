"""`tunelab generate`: every prompt answered --n times into rows `tunelab train` reads, and an interrupted run
continued without a duplicated or missing row."""

from __future__ import annotations

import json

import pytest

import tunelab
from tests.helpers import alpaca_rows, base_config, run_main, write_json
from tunelab.errors import UserError

SHAREGPT = [{"system": "Be brief.", "conversations": [
    {"from": "human", "value": "Name a colour"}, {"from": "gpt", "value": "Red"},
    {"from": "human", "value": f"And another one, number {i}"}, {"from": "gpt", "value": "Blue"}]}
    for i in range(3)]


def _gen(model, data, out, **kw):
    opts = {"n": 2, "batch_size": 1, "max_new_tokens": 6, "temperature": 1.0, "echo": False, **kw}
    return tunelab.generate_data(model=str(model), data=str(data), out=str(out), **opts)


def test_generate_answers_every_prompt_and_continues_after_an_interruption(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "prompts.json", alpaca_rows(5))
    whole = tmp_path / "whole.jsonl"
    report = _gen(tiny_model_dir, data, whole)
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert (report.rows, report.written, report.prompts, len(rows)) == (10, 10, 5, 10)
    instructions = [r["instruction"] for r in rows]
    assert instructions == [row["instruction"] for row in alpaca_rows(5) for _ in range(2)]
    assert all(set(r) == {"instruction", "input", "output"} and isinstance(r["output"], str) for r in rows)
    assert rows[0]["output"] != rows[1]["output"]  # two draws of one prompt
    # an interruption: 7 complete rows and half of the 8th; the run continues with exactly the missing rows (one
    # answer per batch here, so each is computed alone in both runs: the same arithmetic, the same tokens)
    part = tmp_path / "part.jsonl"
    _gen(tiny_model_dir, data, part)
    lines = part.read_bytes().splitlines(keepends=True)
    part.write_bytes(b"".join(lines[:7]) + lines[7][: len(lines[7]) // 2])
    again = _gen(tiny_model_dir, data, part)
    assert (again.written, again.rows) == (3, 10) and part.read_bytes() == whole.read_bytes()
    assert _gen(tiny_model_dir, data, part).written == 0  # complete: nothing to do
    with pytest.raises(UserError, match=r"other settings \(n differ"):
        _gen(tiny_model_dir, data, part, n=3)
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"not": "generated"}\n')
    with pytest.raises(UserError, match="was not written by tunelab generate"):
        _gen(tiny_model_dir, data, foreign)
    assert foreign.read_text() == '{"not": "generated"}\n'
    # the rows train
    result = tunelab.train(base_config(tiny_model_dir, whole, tmp_path / "run", train={"max_steps": 1}), echo=False)
    assert result.steps == 1


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt"])
def test_generated_multi_turn_rows_read_back_as_the_prompt_plus_the_answer(tiny_model_dir, tmp_path, fmt):
    from tunelab.config.schema import DatasetSpec
    from tunelab.data.load import load_conversations

    data = write_json(tmp_path / "chats.json", SHAREGPT)
    out = tmp_path / f"{fmt}.jsonl"
    _gen(tiny_model_dir, data, out, n=1, format=fmt)
    convs, _ = load_conversations([DatasetSpec(path=str(out), format=fmt)])
    generated = [json.loads(line) for line in out.read_text().splitlines()]
    answers = [g["output"] if fmt == "alpaca" else g["conversations"][-1]["value"] for g in generated]
    for conv, src, answer in zip(convs, SHAREGPT, answers):
        turns = src["conversations"]
        want = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": turns[0]["value"]},
                {"role": "assistant", "content": "Red"}, {"role": "user", "content": turns[2]["value"]},
                {"role": "assistant", "content": answer}]
        assert [{k: m[k] for k in ("role", "content")} for m in conv.messages] == want


def test_generate_cli_reports_and_refuses_bad_options(tiny_model_dir, tmp_path, capsys):
    data = write_json(tmp_path / "prompts.json", alpaca_rows(3))
    out = tmp_path / "g.jsonl"
    proc = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                    "--max-new-tokens", "4", "--greedy")
    assert proc.returncode == 0, proc.stderr
    assert "3 rows for 3 prompts" in proc.stdout and "generate: 3/3 rows" in proc.stderr
    bad = run_main(capsys, "generate", "--model", str(tiny_model_dir), "--data", str(data), "--out",
                   str(tmp_path / "h.jsonl"), "--top-p", "0")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: generate: --top-p must be in (0, 1], got 0.0"
