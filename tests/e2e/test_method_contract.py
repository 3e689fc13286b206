"""The method contract carries what new methods need: the two worked examples of docs/architecture.md
(examples/methods/) plug in as modules outside tunelab and train through the one loop unchanged.

- distill.py asks for a frozen teacher (`Method.models`) and keeps it in the step context (`Method.setup`);
- best_of_n.py reads prompts (data kind prompts) and turns each global batch into trainable rows (`Method.rollout`)
  before it is split, so the loss weight is counted on what the rollout produced.
"""

from __future__ import annotations

import dataclasses

import pytest
from examples.methods import best_of_n, distill

import tunelab
from tests.helpers import alpaca_rows, base_config, write_json
from tunelab.config.schema import METHOD_CONFIGS
from tunelab.data.tokenize import IGNORE_INDEX, EncodedPrompt
from tunelab.engine.metrics import read_metrics
from tunelab.errors import UserError
from tunelab.methods import METHODS
from tunelab.models.tiny import build_tiny_llama


@pytest.fixture
def registered(monkeypatch):
    """Register an example method for one test; the registries are restored afterwards."""

    def register(module):
        monkeypatch.setitem(METHODS, module.NAME, None)  # recorded as absent: removed again at teardown
        monkeypatch.setitem(METHOD_CONFIGS, module.NAME, None)
        module.register()
        return module

    return register


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(out) if "loss" in r]


def test_a_method_with_a_teacher_plugs_in(tiny_model_dir, tmp_path, registered):
    registered(distill)
    data = write_json(tmp_path / "train.json", alpaca_rows(32))
    # the teacher is the student's own base: with LoRA's B at zero the student computes the same logits, so the
    # KL starts at 0 (up to the roundings of the fused LoRA path: squared, far below 1e-6 per token)
    same = base_config(tiny_model_dir, data, tmp_path / "same", train={"max_steps": 1},
                       method={"type": distill.NAME, "teacher": str(tiny_model_dir)})
    tunelab.train(same, echo=False)
    assert 0 <= losses(tmp_path / "same")[0] < 1e-6
    # another model as teacher: the KL is positive and falls as the student learns its distribution
    teacher = build_tiny_llama(tmp_path / "teacher", hidden=64, layers=2, heads=4, vocab=1000, seed=1)
    other = base_config(tiny_model_dir, data, tmp_path / "other", train={"max_steps": 16, "lr": 2e-2},
                        method={"type": distill.NAME, "teacher": str(teacher), "temperature": 2.0})
    result = tunelab.train(other, echo=False)
    curve = losses(tmp_path / "other")
    assert curve[0] > 1e-3 and curve[-1] < 0.8 * curve[0], curve
    assert (result.final_dir / "adapter_model.safetensors").exists()


def test_a_teacher_option_is_checked_with_the_config(tiny_model_dir, tmp_path, registered):
    registered(distill)
    data = write_json(tmp_path / "train.json", alpaca_rows(8))
    cfg = base_config(tiny_model_dir, data, tmp_path / "x", method={"type": distill.NAME})
    with pytest.raises(UserError, match="method.teacher: required"):
        tunelab.train(cfg, echo=False)


def test_a_method_with_a_rollout_plugs_in(tiny_model_dir, tmp_path, registered, monkeypatch):
    registered(best_of_n)
    calls = []

    def recording(model, rows, ctx):
        produced = best_of_n.rollout(model, rows, ctx)
        calls.append((rows, produced))
        return produced

    monkeypatch.setitem(METHODS, best_of_n.NAME, dataclasses.replace(best_of_n.METHOD, rollout=recording))
    prompts = [{"instruction": f"Say the colour of thing {i}", "answer": "blue"} for i in range(16)]
    train = write_json(tmp_path / "prompts.json", prompts)
    val = write_json(tmp_path / "val.json", prompts[:4])
    out = tmp_path / "bon"
    cfg = base_config(tiny_model_dir, train, out, method={"type": best_of_n.NAME, "samples": 2, "max_new_tokens": 6},
                      train={"batch_size": 2, "grad_accum": 2, "max_steps": 3, "eval_every": 3})
    cfg["data"]["val"] = [{"path": str(val), "format": "alpaca"}]
    result = tunelab.train(cfg, echo=False)
    assert result.steps == 3
    # each step rolls out its whole global batch (2 x 2 prompts) before it is split; evaluation rolls out its
    # micro-batches of validation prompts
    assert [len(rows) for rows, _ in calls] == [4, 4, 4, 2, 2]
    assert all(isinstance(r, EncodedPrompt) and r.extra == {"answer": "blue"} for rows, _ in calls for r in rows)
    for rows, produced in calls:  # a prompt's sampled answer trains, the prompt does not
        for prompt, row in zip(rows, produced):
            n = len(prompt.prompt_ids)
            assert row.input_ids[:n] == prompt.prompt_ids and set(row.labels[:n]) == {IGNORE_INDEX}
            assert row.labels[n:] == row.input_ids[n:] and len(row.labels) > n
    # the loop counted what the rollout produced: the tokens of the generated rows, step by step
    records = read_metrics(out)
    produced_tokens, total = [], 0
    for _, produced in calls[:3]:
        total += sum(len(r.input_ids) for r in produced)
        produced_tokens.append(total)
    assert [r["tokens"] for r in records if "tokens" in r] == produced_tokens
    assert "eval_loss" in records[-1] and "eval_ppl" not in records[-1]


def test_data_check_and_preview_show_prompts(tiny_model_dir, tmp_path, registered):
    registered(best_of_n)
    rows = [{"instruction": "Name a colour", "answer": "blue", "tests": [1, 2]},
            {"conversations": []}]
    path = write_json(tmp_path / "prompts.json", rows)
    report = tunelab.data_check(path, model=str(tiny_model_dir), method=best_of_n.NAME, format="alpaca")
    text = "\n".join(report.lines)
    assert "prompts: 1, turns per prompt: min 1, max 1" in text
    assert "columns passed on with each prompt: answer, tests" in text
    assert "tokens per prompt:" in text and "trained tokens" not in text
    preview = tunelab.data_preview(path, model=str(tiny_model_dir), method=best_of_n.NAME, format="alpaca")
    assert "prompt (generation starts after it):" in preview and "Name a colour" in preview
    assert 'answer="blue"' in preview and "tests=[1, 2]" in preview


def test_plan_counts_a_teachers_weights(tiny_model_dir, tmp_path, registered):
    """`tunelab plan` reads the frozen models a method asks for from the same declaration the loop builds them
    from: the teacher's parameters at the run's weight dtype."""
    from tunelab.config import load_config
    from tunelab.engine.plan import ModelShape, plan_from_config

    registered(distill)
    teacher = build_tiny_llama(tmp_path / "teacher", hidden=96, layers=3, heads=4, vocab=1000, seed=1)
    data = write_json(tmp_path / "train.json", alpaca_rows(8))
    cfg = load_config(base_config(tiny_model_dir, data, tmp_path / "x",
                                  method={"type": distill.NAME, "teacher": str(teacher)}))
    report = plan_from_config(cfg, device="cpu")
    assert report.plan.components["frozen_models"] == ModelShape.from_pretrained(str(teacher)).total * 4
    assert f"teacher: {teacher}" in report.text()
