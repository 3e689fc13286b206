"""DeepSpeed ZeRO-1/2/3 and FSDP2 on the one loop, 2 processes over gloo: each gives the per-step losses of one
process training the same global batch (full fine-tuning, LoRA with the LM head in chunks, and DPO; online RL in
tests/e2e/test_rl.py), saves a standard final folder, writes
sharded checkpoints that resume exactly (after SIGKILL, on 2 processes and on 1, and under another sharded engine),
and resumes as 2 "machines" of one process each over loopback.

The many 2-process runs share one torchrun launch (tests/e2e/run_configs.py). Runs whose results are compared across
process counts are float64: the engines reorder sums (all-reduce, reduce-scatter, flattened partitions), and
tests/tolerance.py bounds what reordering can change."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.e2e.test_preference_methods import preference_rows
from tests.helpers import ROOT, alpaca_rows, base_config, free_port, kill_family, launch_configs, write_json
from tests.tolerance import (
    assert_same_metrics,
    assert_same_weights,
    chain_length,
    engine_adam_tol,
    reorder_tol,
)
from tunelab import api
from tunelab.engine.metrics import read_metrics

pytest.importorskip("deepspeed")

ENGINES = ["zero1", "zero2", "zero3", "fsdp2"]
KINDS = ["full", "lora", "dpo"]
STEPS = {"full": 12, "lora": 4, "dpo": 3, "reft": 4, "prompt": 4, "qlora": 4}  # full: long enough to be killed mid-run
# beside every engine x kind: (engine, kind, train.offload) — ZeRO-Offload and FSDP2's CPU offload, a tunelab
# adapter with per-micro-batch hooks (reft) and soft prompts (the head over virtual-token-shifted positions)
EXTRA = [("zero2", "full", "optimizer"), ("zero3", "full", "optimizer+params"), ("fsdp2", "lora", "optimizer+params"),
         ("zero3", "reft", "none"), ("fsdp2", "prompt", "none"), ("zero3", "qlora", "none"),
         ("fsdp2", "qlora", "none"),
         ("ddp", "dpo", "none")]  # DPO's per-pair normalisation across DDP processes too
ADAPTERS = {"full": {"type": "full"}, "reft": {"type": "reft", "r": 2}, "prompt": {"type": "prompt"}}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _config(model, data, out, kind: str, engine: str, *, processes: int, offload: str = "none") -> dict:
    adapter = ADAPTERS.get(kind, {"type": "lora", "r": 4, "alpha": 8})
    cfg = base_config(model, data[kind], out, adapter=adapter, method={"type": "dpo" if kind == "dpo" else "sft"},
                      train={"batch_size": 2, "grad_accum": 2 // processes, "max_steps": STEPS[kind],
                             "save_every": 2, "save_total_limit": 0, "lr": 1e-3 if kind == "dpo" else 1e-2,
                             "distributed": engine, "offload": offload})
    cfg["model"]["dtype"] = "float64"
    if kind == "qlora":  # bitsandbytes computes in float32: this run is float32
        cfg["model"].update(dtype="float32", quantization="nf4")
    if kind == "lora":  # more trained tokens than a chunk: one process runs the chunked head, ZeRO-3/FSDP2 their own
        cfg["train"]["loss_chunk"] = 16
    return cfg


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    data = {"full": write_json(root / "sft.json", alpaca_rows(48)),
            "pref": write_json(root / "pref.json", preference_rows(32, 0))}
    data["lora"] = data["reft"] = data["prompt"] = data["qlora"] = data["full"]
    data["dpo"] = data["pref"]
    configs = []
    for engine, kind, offload in [(e, k, "none") for e in ENGINES for k in KINDS] + EXTRA:
        name = _name(engine, kind, offload)
        cfg = _config(tiny_model_dir, data, root / name, kind, engine, processes=2, offload=offload)
        configs.append(_write(root / f"{name}.yaml", cfg))
    stdout = launch_configs(configs)
    for kind in KINDS + ["reft", "prompt", "qlora"]:  # the references: one process, the same global batch in two
        # micro-batches, plain training
        api.train(_config(tiny_model_dir, data, root / f"one-{kind}", kind, "ddp", processes=1), echo=False)
    return {"root": root, "data": data, "model": tiny_model_dir, "stdout": stdout}


def _name(engine: str, kind: str, offload: str = "none") -> str:
    return f"{engine}-{kind}" + ("" if offload == "none" else f"-offload-{offload}")


def _final_weights(out):
    final = out / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(str(final / name))


def _chain(model, kind):
    rows = 4 * (2 if kind == "dpo" else 1)  # sequences in a global batch: a pair is two
    return chain_length(model, 64, tokens=rows * 64)


MATRIX = [(e, k, "none") for e in ENGINES for k in KINDS] + EXTRA


@pytest.mark.parametrize("engine, kind, offload", MATRIX, ids=[_name(*m) for m in MATRIX])
def test_two_processes_match_one_process(runs, engine, kind, offload):
    root, model = runs["root"], runs["model"]
    got, ref = read_metrics(root / _name(engine, kind, offload)), read_metrics(root / f"one-{kind}")
    assert [r["step"] for r in got] == list(range(1, STEPS[kind] + 1))
    if kind == "qlora":
        # a float32 run (no float64 4-bit kernels): the 1e-5 relative bound on the losses (seen: ~1e-7),
        # and an adapter that is whole (the packed 4-bit base is split across the processes, the adapter is not)
        for a, b in zip(got, ref):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
        w = _final_weights(root / _name(engine, kind, offload))
        assert set(w) == set(_final_weights(root / "one-qlora")) and all(t.numel() for t in w.values())
        return
    n = _chain(model, kind)
    assert_same_metrics(got, ref, ("loss",), n)
    if engine.startswith("zero") and offload != "none":
        # ZeRO-Offload measures the norm of its float32 gradient copies on the host: a sum of squares (no
        # cancellation) of float32 values, over at most every trained element
        trained = sum(t.numel() for t in _final_weights(root / f"one-{kind}").values())
        for a, b in zip(got, ref):
            assert abs(a["grad_norm"] - b["grad_norm"]) <= reorder_tol(b["grad_norm"], trained, torch.float32, 1.0)
    elif engine.startswith("zero"):
        # step 1 runs at equal weights: the reorder bound. Later steps run at weights DeepSpeed's float32 master
        # has rounded and updated (engine_adam_tol apart, the float32 noise of cancelling elements amplified by
        # AdamW's normalisation): the 1e-5 relative bound (seen: ~1e-6)
        assert_same_metrics(got[:1], ref[:1], ("grad_norm",), n)
        for a, b in zip(got[1:], ref[1:]):
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * abs(b["grad_norm"]), (a["step"], a, b)
    else:
        assert_same_metrics(got, ref, ("grad_norm",), n)
    if kind == "dpo":
        assert_same_metrics(got, ref, ("rewards/margin", "rewards/accuracy"), n)
    # the final folder is the standard one (a whole HF model, or a PEFT adapter that is not empty) and holds what
    # one process trained
    w, w_ref = _final_weights(root / _name(engine, kind, offload)), _final_weights(root / f"one-{kind}")
    assert w and all(t.numel() for t in w.values())
    lr = 1e-3 if kind == "dpo" else 1e-2
    # peft keeps soft prompts in float32 whatever the model's dtype
    fp32 = kind == "prompt"
    assert_same_weights(w, w_ref, engine_adam_tol(engine, lr, STEPS[kind], n, w_ref, fp32_update=fp32),
                        dtype=torch.float32 if fp32 else torch.float64)


def test_each_process_holds_its_share_of_the_parameters(runs):
    """The start line names the engine and the parameter bytes per process: ZeRO-3 and FSDP2 hold about half of the
    model each (on 2 processes), ZeRO-1/2 the whole of it (they shard optimizer states and gradients only)."""
    stdout = runs["stdout"]
    lines = re.findall(r"train: engine (.+?); parameters held per process: (.+)", stdout)
    assert len(lines) == len(MATRIX)
    whole = None
    for (engine_text, held), engine in zip(lines[::3], ENGINES):  # the full fine-tuning run of each engine
        mib = [float(x) for x in re.findall(r"([\d.]+) MiB", held)]
        assert len(mib) == 2
        if engine == "zero1":
            assert "DeepSpeed ZeRO-1" in engine_text
            whole = mib[0]
            assert mib[0] == mib[1]
        elif engine in ("zero3", "fsdp2"):
            assert "ZeRO-3" in engine_text or "FSDP2" in engine_text
            # each process keeps its half of every split tensor (uneven splits: at most one row more)
            assert all(0.45 * whole <= m <= 0.55 * whole for m in mib), (engine, mib, whole)
            assert abs(sum(mib) - whole) <= 0.01 * whole


def _cut_to_checkpoint(src, dst, step: int):
    """A copy of a finished run as a run killed after checkpoint `step` leaves it: that checkpoint, no final/."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    for ckpt in (dst / "checkpoints").glob("checkpoint-*"):
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    kept = [line for line in (dst / "metrics.jsonl").read_text().splitlines() if line]
    (dst / "metrics.jsonl").write_text("\n".join(kept[:step]) + "\n")


def test_sharded_checkpoints_resume_on_two_processes_one_process_and_another_engine(runs, tmp_path):
    root, data, model = runs["root"], runs["data"], runs["model"]
    checkpoint = sorted((root / "zero2-full" / "checkpoints").glob("checkpoint-*"))[-1]
    assert sorted(p.name for p in (checkpoint / "shards").iterdir()) == ["rank-00000-of-00002.safetensors",
                                                                      "rank-00001-of-00002.safetensors"]
    assert not (checkpoint / "optimizer.pt").exists()  # no pickled optimizer: safetensors shards only
    cases = {  # name: (the engine that wrote the checkpoint, the engine resuming it, processes)
        "zero2": ("zero2", "zero2", 2), "zero3": ("zero3", "zero3", 2), "fsdp2": ("fsdp2", "fsdp2", 2),
        "zero2-to-fsdp2": ("zero2", "fsdp2", 2), "zero3-on-one": ("zero3", "zero3", 1),
        "fsdp2-on-one": ("fsdp2", "fsdp2", 1),
    }
    two, one = [], []
    for name, (wrote, resumes, procs) in cases.items():
        out = tmp_path / name
        _cut_to_checkpoint(root / f"{wrote}-full", out, 6)
        cfg = _config(model, data, out, "full", resumes, processes=procs)
        (two if procs == 2 else one).append(_write(tmp_path / f"{name}.yaml", cfg))
    stdout = launch_configs(two)
    assert stdout.count("resume: continuing from") == len(two)
    for path in one:
        assert api.train(str(path), echo=False).steps == 12
    n = _chain(model, "full")
    for name, (wrote, resumes, procs) in cases.items():
        got, ref = read_metrics(tmp_path / name), read_metrics(root / f"{wrote}-full")
        assert [r["step"] for r in got] == list(range(1, 13)), name
        if wrote == resumes and procs == 2:
            # the same engine, processes and order of arithmetic as the uninterrupted run: bitwise the same
            assert [r["loss"] for r in got] == [r["loss"] for r in ref], name
            assert_same_weights(_final_weights(tmp_path / name), _final_weights(root / f"{wrote}-full"), 0.0)
        else:  # another split of the same global batch: the reorder bound
            assert_same_metrics(got, ref, ("loss", "grad_norm"), n)
            ref_w = _final_weights(root / f"{wrote}-full")
            assert_same_weights(_final_weights(tmp_path / name), ref_w, engine_adam_tol(wrote, 1e-2, 12, n, ref_w))


@pytest.mark.parametrize("engine, kind", [("zero3", "full"), ("fsdp2", "lora"), ("zero1", "dpo")])
def test_an_intermediate_sharded_checkpoint_exports_as_the_standard_folder(runs, tmp_path, engine, kind):
    """`tunelab export --checkpoint` gathers a checkpoint into what RUN/final would hold had the run ended there
    (one process, no process group). The last checkpoint of a sharded run gives the final folder's weights bit for
    bit; an intermediate one gives the one-process run's weights at that step (its ddp-layout checkpoint, gathered
    the same way) within the engines' bound; the export of it is a standard HF folder that transformers loads."""
    from transformers import AutoModelForCausalLM

    from tunelab.engine.consolidate import write_checkpoint_folder

    root, model = runs["root"], runs["model"]
    sharded = root / _name(engine, kind)
    last = sorted((sharded / "checkpoints").glob("checkpoint-*"))[-1]
    write_checkpoint_folder(last, tmp_path / "last")
    final = _final_weights(sharded)
    assert_same_weights(load_file(str(next((tmp_path / "last").glob("*model.safetensors")))), final, 0.0)
    assert (tmp_path / "last" / "tokenizer_config.json").exists()

    step = 2
    write_checkpoint_folder(sharded / "checkpoints" / f"checkpoint-{step:06d}", tmp_path / "mid")
    write_checkpoint_folder(root / f"one-{kind}" / "checkpoints" / f"checkpoint-{step:06d}", tmp_path / "ref")
    got, ref = (load_file(str(next((tmp_path / d).glob("*model.safetensors")))) for d in ("mid", "ref"))
    lr = 1e-3 if kind == "dpo" else 1e-2
    assert_same_weights(got, ref, engine_adam_tol(engine, lr, step, _chain(model, kind), ref))
    assert any(not torch.equal(got[k], final[k]) for k in final)  # step 2's weights, not the final ones

    # the CLI: the run's checkpoint by name, exported as a standard folder (an adapter merged into its base)
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "tunelab", "export", "--run", str(sharded), "--checkpoint",
                           f"checkpoint-{step:06d}", "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    state = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).state_dict()
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float64).state_dict()
    if kind == "full":
        assert all(torch.equal(state[k], v) for k, v in got.items() if k in state)
    else:  # the adapter is merged into the attention projections it trained
        q = "model.layers.0.self_attn.q_proj.weight"
        assert state.keys() == base.keys() and not torch.equal(state[q], base[q])


def test_export_refuses_a_checkpoint_that_is_not_there_or_an_out_inside_it(runs, tmp_path):
    from tunelab.errors import UserError

    run = runs["root"] / "zero3-full"
    with pytest.raises(UserError, match="no such checkpoint folder"):
        api.export(run=run, checkpoint="checkpoint-999999", out=tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.yaml"):
        api.export(checkpoint=tmp_path / "empty", out=tmp_path / "x")
    ckpt = sorted((run / "checkpoints").glob("checkpoint-*"))[0]
    with pytest.raises(UserError, match="which the export reads"):
        api.export(checkpoint=ckpt, out=ckpt / "exported")
    assert not (ckpt / "exported").exists()


def test_a_ddp_checkpoint_is_not_resumed_by_a_sharded_engine(runs, tmp_path):
    root, data, model = runs["root"], runs["data"], runs["model"]
    out = tmp_path / "run"
    _cut_to_checkpoint(root / "one-lora", out, 2)
    with pytest.raises(Exception, match=r"train.distributed: .* was written under ddp"):
        api.train(_config(model, data, out, "lora", "zero2", processes=1), echo=False)


def test_sigkill_of_a_zero3_run_then_resume_on_two_machines_matches_the_uninterrupted_run(runs, tmp_path):
    """A 2-process ZeRO-3 run started by the deepspeed launcher (which hands each process --local_rank), every
    process killed at once; the run resumed as two "machines" of one process each over loopback (--nnodes 2
    --node-rank R --master-addr --master-port, as two machines would start it): the same two ranks and collectives
    as the uninterrupted torchrun launch, so bit for bit its losses and weights."""
    root, data, model = runs["root"], runs["data"], runs["model"]
    out = tmp_path / "killed"
    cfg_path = _write(tmp_path / "run.yaml", _config(model, data, out, "full", "zero3", processes=2))
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                "--master_port", str(free_port()), "--module", "tunelab"]
    proc = subprocess.Popen([*launcher, "train", str(cfg_path)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "checkpoints" / "checkpoint-000004" / "state.json").exists():
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    kill_family(proc)
    assert not (out / "final").exists()
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(cfg_path), "--nproc", "1",
                               "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                               "--master-port", str(port)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    results = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "resume: continuing from" in results[0][0]
    got, ref = read_metrics(out), read_metrics(root / "zero3-full")
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert_same_weights(_final_weights(out), _final_weights(root / "zero3-full"), 0.0)
