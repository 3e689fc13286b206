"""`tunelab lowrank` on a tiny model: the folder computes the original with each decoder linear replaced by its
factor product, loads in eval and chat, exports to a standard folder that transformers loads alone; whitening
lowers the calibration outputs' error; LoRA recovery trains on it; bad input gets one line."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tests.helpers import CALIB, alpaca_rows, base_config, calib_windows, run_main, write_json
from tests.tolerance import logits_tol
from tunelab.infer.loading import load_for_inference
from tunelab.models.lowrank import LOWRANK_FILE, LowRankLinear, factor


def test_low_rank_folder_is_the_factored_original_and_exports_to_a_standard_one(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lr"
    proc = run_main(capsys, "lowrank", "--model", str(tiny_model_dir), "--out", str(out), "--ratio", "0.5",
                    check=True)
    assert "14 linear layers factored" in proc.stdout
    ranks = json.loads((out / LOWRANK_FILE).read_text())["ranks"]
    # half the parameters: q/k/v/o (64 x 64): floor(0.5 * 4096 / 128) = 16; MLP (64 x 176 / 176 x 64): 23
    assert ranks["model.layers.0.self_attn.q_proj"] == 16 and ranks["model.layers.1.mlp.down_proj"] == 23
    stored = load_file(str(out / "model.safetensors"))
    assert stored["model.layers.0.self_attn.q_proj.a.weight"].shape == (16, 64)
    assert "model.layers.0.self_attn.q_proj.weight" not in stored
    record = json.loads((out / "tunelab_compression.json").read_text())
    before, after = record["parameters"]
    linear = 2 * (4 * 64 * 64 + 3 * 64 * 176)
    assert before - after == linear - 2 * (4 * 16 * 128 + 3 * 23 * 240)
    # the original with every decoder linear replaced by B A from its SVD, computed here
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".layers." in name and name.endswith("proj.weight"):
                b, a, _ = factor(p.data, rank=ranks[name.removesuffix(".weight")])
                p.copy_(b @ a)
    net, _ = load_for_inference(str(out), None, dtype="float32")
    assert isinstance(net.model.layers[0].self_attn.q_proj, LowRankLinear)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = net(input_ids=ids).logits
    # x -> A x -> B (A x) against (B A) x: the same products summed in another order (rank terms more)
    tol = logits_tol(want, tiny_model_dir, extra=23)
    assert float((got - want).abs().max()) <= tol
    data = str(write_json(tmp_path / "ev.json", alpaca_rows(8)))
    report = tunelab.evaluate_perplexity(model=str(out), data=data)
    assert report.parameters == after and report.tokens > 0
    run_main(capsys, "chat", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "3", check=True)
    # export multiplies the factors back: a standard folder transformers loads alone, computing the same
    dense = tmp_path / "dense"
    run_main(capsys, "export", "--model", str(out), "--out", str(dense), check=True)
    assert not (dense / LOWRANK_FILE).exists()
    plain = AutoModelForCausalLM.from_pretrained(dense).eval()
    with torch.no_grad():
        assert float((plain(input_ids=ids).logits - got).abs().max()) <= tol


def test_whitening_lowers_the_error_on_the_calibration_outputs_and_lora_recovers(tiny_model_dir, calib, tmp_path):
    plain = tunelab.lowrank(model=str(tiny_model_dir), out=str(tmp_path / "plain"), rank=8, echo=False)
    white = tunelab.lowrank(model=str(tiny_model_dir), out=str(tmp_path / "white"), rank=8, whiten=True,
                            calibration=str(calib), echo=False, **CALIB)
    assert white["whitened"] and white["calibration"]["windows"] == 6
    # the record's errors: plain SVD's of the weights, whitened SVD's of the outputs on the calibration tokens
    assert all(v["rank"] == 8 and 0 < v["relative_error"] < 1 for row in white["layers"] for v in row.values())
    # layer 0 (whose inputs both see alike: the embeddings): each linear's outputs on the calibration tokens move
    # less with the whitened factors than with plain SVD's, at the same rank and size
    from tunelab.infer.calibration import input_hessians

    windows = calib_windows(tiny_model_dir, calib)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    hessians = input_hessians(dense, windows, 0)
    dense_w = load_file(str(tiny_model_dir / "model.safetensors"))
    folders = {k: load_file(str(tmp_path / k / "model.safetensors")) for k in ("plain", "white")}
    for short, h in hessians.items():
        key = f"model.layers.0.{short}"
        w = dense_w[f"{key}.weight"].double()
        errs = {}
        for kind, state in folders.items():
            d = w - state[f"{key}.b.weight"].double() @ state[f"{key}.a.weight"].double()
            errs[kind] = float(torch.einsum("ij,jk,ik->", d, h, d))
        assert errs["white"] < errs["plain"], short
    assert plain["parameters"] == white["parameters"]
    data = str(write_json(tmp_path / "held.json", alpaca_rows(16)[8:]))
    # LoRA recovery trains on the low-rank folder (LoRA on each factor) and its adapter loads on it
    cfg = base_config(tmp_path / "white", write_json(tmp_path / "d.json", alpaca_rows(16)), tmp_path / "recover")
    result = tunelab.train(cfg, echo=False)
    adapter = load_file(str(result.final_dir / "adapter_model.safetensors"))
    assert any(".q_proj.a.lora_A" in k for k in adapter) and any(".q_proj.b.lora_B" in k for k in adapter)
    report = tunelab.evaluate_perplexity(model=str(tmp_path / "white"), adapter=str(result.final_dir), data=data)
    assert report.tokens > 0


def test_bad_input_gets_one_line(tiny_model_dir, calib, tmp_path, capsys):
    tunelab.lowrank(model=str(tiny_model_dir), out=str(tmp_path / "lr"), rank=4, echo=False)
    for args, message in (
            ([], "lowrank: give one of --rank"),
            (["--rank", "4", "--energy", "0.9"], "got --rank and --energy"),
            (["--energy", "1.5"], "--energy: a share of the energy in (0, 1], got 1.5"),
            (["--ratio", "1"], "--ratio: a share of each layer's parameters in (0, 1), got 1"),
            (["--rank", "4", "--whiten"], "--whiten: needs --calibration"),
            (["--rank", "64"], "--rank 64: no layer gets smaller at this rank")):
        proc = run_main(capsys, "lowrank", "--model", str(tiny_model_dir), "--out", str(tmp_path / "bad"), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert message in lines[0], lines[0]
    assert not (tmp_path / "bad").exists()
    proc = run_main(capsys, "lowrank", "--model", str(tmp_path / "lr"), "--out", str(tmp_path / "bad"), "--rank", "2")
    assert proc.returncode == 2 and "already a low-rank folder" in proc.stderr
    # a low-rank folder with a layer's factor missing is refused in one line, not loaded half random
    stored = load_file(str(tmp_path / "lr" / "model.safetensors"))
    del stored["model.layers.1.mlp.up_proj.b.weight"]
    from safetensors.torch import save_file

    save_file(stored, str(tmp_path / "lr" / "model.safetensors"))
    proc = run_main(capsys, "eval", "ppl", "--model", str(tmp_path / "lr"), "--data", str(calib))
    assert proc.returncode == 2 and "lacks model.layers.1.mlp.up_proj.b.weight" in proc.stderr


def test_the_compression_example_runs(tmp_path, capsys):
    """examples/compression.sh, every command of docs/compression.md, on a tiny model of 4 layers (one dropped): its
    tunelab lines run here in this process as the script writes them (an interpreter start per command would
    cost more than the commands), after bash checks the script's syntax."""
    import re
    import shlex
    import subprocess
    from pathlib import Path

    from tunelab.models.tiny import build_tiny_llama

    root = Path(__file__).resolve().parents[2]
    script = (root / "examples" / "compression.sh").read_text()
    assert subprocess.run(["bash", "-n", str(root / "examples" / "compression.sh")]).returncode == 0
    model = build_tiny_llama(tmp_path / "model", hidden=64, layers=4, heads=4, vocab=1000)
    out = tmp_path / "c"
    text = re.search(r"^TEXT=(\S+)$", script, re.M).group(1)
    cal = shlex.split(re.search(r"^CAL=\((.*)\)$", script, re.M).group(1).replace('"$TEXT"', text))
    commands = [line.removeprefix("$TUNELAB ") for line in script.splitlines() if line.startswith("$TUNELAB ")]
    assert len(commands) == 8
    for command in commands:
        args = []
        for word in shlex.split(command.replace('"${CAL[@]}"', "@CAL")):
            args += cal if word == "@CAL" else [word.replace("$MODEL", str(model)).replace("$OUT", str(out))]
        run_main(capsys, *(str(root / a) if a == text else a for a in args), check=True)
    for name in re.search(r"for m in ([^;]+);", script).group(1).split():
        assert (out / name / "tunelab_compression.json").is_file(), name
