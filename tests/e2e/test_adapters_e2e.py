"""Fine-tuning types through the real training loop, chat and export (tiny Llama, in-process, fp32).

The per-method proofs of which parameters change, save/reload and merge equality are in
tests/unit/test_adapter_matrix.py; here each kind of method runs end to end: `tunelab.train` memorises a tiny set
(loss goes down), `ChatSession` answers with the saved adapter, and `export` writes a merged model whose logits
equal the unmerged adapter's, or refuses a method that cannot merge.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import tunelab
from tests.helpers import alpaca_rows, base_config, run_cli, write_json
from tests.tolerance import assert_same_weights, logits_tol
from tunelab.engine.metrics import read_metrics
from tunelab.errors import UserError


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_rows(8))


E2E = {
    "adalora": ({"type": "adalora", "r": 6, "target_r": 2, "warmup": 2, "final": 3, "interval": 1}, {}),
    "lora-pissa": ({"type": "lora", "r": 4, "alpha": 4, "init": "pissa"}, {}),
    "ia3": ({"type": "ia3"}, {}),
    "prompt": ({"type": "prompt", "virtual_tokens": 4}, {}),
    "prefix": ({"type": "prefix", "virtual_tokens": 4}, {}),
    "ptuning": ({"type": "ptuning", "virtual_tokens": 4, "encoder_hidden": 16}, {}),
    "bottleneck": ({"type": "bottleneck", "reduction": 8}, {}),
    "bitfit": ({"type": "bitfit", "add_bias": True}, {}),
    "reft": ({"type": "reft", "r": 2}, {}),
    "qlora-nf4": ({"type": "lora", "r": 4, "alpha": 8}, {"quantization": "nf4"}),
}


def _ids(tokenizer):
    return torch.tensor([tokenizer("Repeat the word number 3 please")["input_ids"]])


@pytest.mark.parametrize("case", list(E2E))
def test_method_trains_chats_and_exports(case, tiny_model_dir, data_path, tmp_path):
    from tunelab.infer.chat import ChatSession, GenerationOptions
    from tunelab.infer.loading import load_for_inference, mergeable_folder

    adapter, model = E2E[case]
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, adapter=adapter,
                      train={"batch_size": 8, "max_steps": 12, "lr": 2e-2})
    cfg["model"].update(model)
    result = tunelab.train(cfg, echo=False)
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses[-1] < losses[0] - 0.02, (case, losses)  # a random tiny model learns slowly at first
    final = out / "final"

    session = ChatSession.load(str(tiny_model_dir), adapter=str(final))
    answer = session.reply([{"role": "user", "content": "Repeat the word number 3"}],
                           GenerationOptions(max_new_tokens=4))
    assert isinstance(answer, str)

    if not mergeable_folder(str(final)):
        with pytest.raises(UserError, match="cannot be merged"):
            tunelab.export(run=out, out=tmp_path / "merged")
        return
    exported = tunelab.export(run=out, out=tmp_path / "merged")
    unmerged, tok = load_for_inference(str(tiny_model_dir), str(final), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = unmerged(_ids(tok)).logits
        # merged W + s B A against W x + s B (A x): reordered sums, r more terms per adapted linear
        torch.testing.assert_close(merged(_ids(tok)).logits, ref, atol=logits_tol(ref, tiny_model_dir, 16), rtol=0)
    assert result.trainable_params > 0


def test_adalora_budget_schedule_and_exact_resume(tiny_model_dir, data_path, tmp_path):
    """AdaLoRA's ranks shrink to the budget during the run, and a run resumed from a checkpoint (the rank
    allocator's scores included) ends with the same adapter as an uninterrupted one."""
    from safetensors.torch import load_file

    adapter = {"type": "adalora", "r": 6, "target_r": 2, "warmup": 2, "final": 3, "interval": 1}
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, adapter=adapter,
                      train={"batch_size": 8, "max_steps": 12, "save_every": 4, "save_total_limit": 0})
    tunelab.train(cfg, echo=False)
    saved = json.loads((out / "final" / "adapter_config.json").read_text())
    ranks = saved["rank_pattern"]
    assert ranks, "AdaLoRA saved no rank pattern"
    kept = [sum(bool(x) for x in mask) for mask in ranks.values()]
    assert sum(kept) <= 2 * len(kept) and max(kept) <= 6  # average rank at most target_r
    ref = load_file(str(out / "final" / "adapter_model.safetensors"))
    ref_losses = [r["loss"] for r in read_metrics(out) if "loss" in r]

    # forget everything after step 4 and resume from its checkpoint
    shutil.rmtree(out / "final")
    for step in (8, 12):
        shutil.rmtree(out / "checkpoints" / f"checkpoint-{step:06d}")
    tunelab.train(cfg, echo=False)
    got = load_file(str(out / "final" / "adapter_model.safetensors"))
    # the resumed steps repeat the uninterrupted run's arithmetic in the same order: bitwise equal
    assert [r["loss"] for r in read_metrics(out) if "loss" in r] == ref_losses
    assert_same_weights(got, ref, 0.0, dtype=torch.float32)


def test_pissa_final_adapter_is_a_plain_lora_on_the_original_base(tiny_model_dir, data_path, tmp_path):
    """PiSSA trains on a residual base; the saved adapter is converted (rank 2r, plain init) so that peft applies
    it to the unmodified base model and reproduces the trained model, and a resumed run rebuilds the residual."""
    from peft import PeftModel

    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, adapter={"type": "lora", "r": 4, "alpha": 4, "init": "pissa"},
                      train={"batch_size": 8, "max_steps": 6, "save_every": 3, "save_total_limit": 0})
    tunelab.train(cfg, echo=False)
    conf = json.loads((out / "final" / "adapter_config.json").read_text())
    assert conf["r"] == 8 and conf["init_lora_weights"] is True
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain = PeftModel.from_pretrained(base, out / "final").eval()  # plain peft, nothing tunelab-specific
    ckpt = out / "checkpoints" / "checkpoint-000006" / "weights"
    assert json.loads((ckpt / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    # the checkpoint (unconverted, with peft re-deriving the residual base on load) gives the same model
    base2 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trained = PeftModel.from_pretrained(base2, ckpt).eval()
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        ref = trained(ids).logits
        # residual base + PiSSA factors against the original base + converted rank-2r factors: reordered sums
        torch.testing.assert_close(plain(ids).logits, ref, atol=logits_tol(ref, tiny_model_dir, 16), rtol=0)


def test_several_adapters_switch_stack_merge_unmerge(tiny_model_dir, data_path, tmp_path):
    from tunelab.infer.chat import ChatSession

    finals = []
    for i, adapter in enumerate([{"type": "lora", "r": 4, "alpha": 8}, {"type": "lora", "r": 2, "alpha": 8,
                                                                         "target": ["q_proj", "v_proj"]}]):
        out = tmp_path / f"run{i}"
        cfg = base_config(tiny_model_dir, data_path, out, adapter=adapter, train={"max_steps": 3, "seed": i})
        tunelab.train(cfg, echo=False)
        finals.append(str(out / "final"))
    session = ChatSession.load(str(tiny_model_dir), adapter=finals)
    assert session.adapters() == ["run0", "run1"]
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])

    def logits():
        with torch.no_grad():
            return session.model(ids).logits

    stacked = logits()
    session.use(["run0"])
    only0 = logits()
    session.use(["run1"])
    only1 = logits()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    # each adapter alone differs from the other and from both together
    assert not torch.allclose(only0, only1)
    assert not torch.allclose(stacked, only0) and not torch.allclose(stacked, only1)
    session.use(["run0", "run1"])
    torch.testing.assert_close(logits(), stacked, atol=0, rtol=0)  # the same adapters again: the same arithmetic
    tol = logits_tol(stacked, tiny_model_dir, 2 * 4)  # two adapters of rank <= 4 folded into the weights
    session.merge()
    torch.testing.assert_close(logits(), stacked, atol=tol, rtol=0)
    session.unmerge()  # subtracting the product again leaves the weights one rounding off
    torch.testing.assert_close(logits(), stacked, atol=tol, rtol=0)
    assert not torch.allclose(stacked, base_logits, atol=tol, rtol=0)

    # export both merged: the same logits as the stacked adapters
    merged_dir = tmp_path / "merged"
    tunelab.export(model=str(tiny_model_dir), adapter=finals, out=merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, stacked, atol=tol, rtol=0)


def test_chat_cli_with_two_adapters_and_commands(tiny_model_dir, data_path, tmp_path):
    finals = []
    for i in range(2):
        out = tmp_path / f"a{i}"
        tunelab.train(base_config(tiny_model_dir, data_path, out, train={"max_steps": 2, "seed": i}), echo=False)
        finals.append(str(out / "final"))
    import subprocess
    import sys

    from tests.helpers import ROOT

    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", "chat", "--model", str(tiny_model_dir), "--adapter", finals[0],
         "--adapter", finals[1], "--max-new-tokens", "2", "--greedy", "--no-stream"],
        input="/adapters\n/adapter a1\nhello\n/merge\n/unmerge\n/adapter nope\n/exit\n", capture_output=True,
        text=True, cwd=ROOT, timeout=120, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "adapters: a0, a1" in proc.stderr
    assert "(using a1)" in proc.stderr and "assistant> " in proc.stdout
    assert "(adapters merged into the weights)" in proc.stderr and "(adapters unmerged)" in proc.stderr
    assert "error: adapter 'nope' is not loaded" in proc.stderr


def test_export_refuses_prompt_tuning_with_one_line_error(tiny_model_dir, data_path, tmp_path):
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, adapter={"type": "prompt", "virtual_tokens": 4},
                      train={"max_steps": 2})
    tunelab.train(cfg, echo=False)
    proc = run_cli("export", "--run", str(out), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --adapter:") and "cannot be merged" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("adapter", [{"type": "ia3"}, {"type": "bottleneck", "reduction": 8},
                                     {"type": "prompt", "virtual_tokens": 4}], ids=lambda a: a["type"])
def test_continue_training_a_saved_adapter(adapter, tiny_model_dir, data_path, tmp_path):
    """adapter.path loads a saved adapter of any type as the starting point: its first loss is the first run's last
    state, and training goes on from there."""
    from tunelab.infer.loading import load_for_inference

    first = tmp_path / "first"
    tunelab.train(base_config(tiny_model_dir, data_path, first, adapter=adapter,
                              train={"batch_size": 8, "max_steps": 6, "lr": 2e-2}), echo=False)
    second = tmp_path / "second"
    cont = {"type": adapter["type"], "path": str(first / "final")}
    result = tunelab.train(base_config(tiny_model_dir, data_path, second, adapter=cont,
                                       train={"batch_size": 8, "max_steps": 3, "lr": 2e-2}), echo=False)
    first_losses = [r["loss"] for r in read_metrics(first) if "loss" in r]
    second_losses = [r["loss"] for r in read_metrics(second) if "loss" in r]
    # the second run starts where the first ended (the same 8 rows each step), not from scratch
    assert second_losses[0] < first_losses[0] - 0.01
    assert result.trainable_params > 0
    a, _ = load_for_inference(str(tiny_model_dir), str(first / "final"), dtype="float32")
    b, _ = load_for_inference(str(tiny_model_dir), str(second / "final"), dtype="float32")
    ids = torch.tensor([[5, 17, 99, 3, 250, 7]])
    with torch.no_grad():
        assert not torch.allclose(a(ids).logits, b(ids).logits)


def test_ptuning_resumes_its_encoder_exactly(tiny_model_dir, data_path, tmp_path):
    """peft saves only the prompts a P-tuning encoder produced; checkpoints also keep the encoder, so a run resumed
    from step 3 ends like an uninterrupted one; continuing from the final adapter is refused with a reason."""
    out = tmp_path / "run"
    cfg = base_config(tiny_model_dir, data_path, out, adapter={"type": "ptuning", "virtual_tokens": 4,
                                                               "encoder_hidden": 16},
                      train={"batch_size": 8, "max_steps": 6, "save_every": 3, "save_total_limit": 0})
    tunelab.train(cfg, echo=False)
    ref = [r["loss"] for r in read_metrics(out) if "loss" in r]
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "checkpoint-000006")
    tunelab.train(cfg, echo=False)
    assert [r["loss"] for r in read_metrics(out) if "loss" in r] == ref  # same arithmetic, same order: bitwise
    cont = base_config(tiny_model_dir, data_path, tmp_path / "cont",
                       adapter={"type": "ptuning", "path": str(out / "final")})
    with pytest.raises(UserError, match="not the encoder"):
        tunelab.train(cont, echo=False)


def test_eva_with_streaming_is_refused_with_a_reason(tiny_model_dir, data_path, tmp_path):
    cfg = base_config(tiny_model_dir, data_path, tmp_path / "run", adapter={"type": "lora", "r": 4, "init": "eva"},
                      data={"streaming": True}, train={"max_steps": 2})
    with pytest.raises(UserError, match="streamed dataset"):
        tunelab.train(cfg, echo=False)
