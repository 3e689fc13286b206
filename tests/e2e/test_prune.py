"""`tunelab prune` on a tiny model: the zeros Wanda chooses are the ones its scores give on the activations of the
already pruned layers before (sequential calibration), N:M and sparsity are exact, layer dropping and width
shrinking write smaller standard folders that compute what the pruned original does, LoRA recovery keeps the
zeros, and bad input gets one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import tunelab
from tests.helpers import CALIB, base_config, calib_windows, run_main
from tests.tolerance import logits_tol
from tunelab.errors import UserError
from tunelab.infer.calibration import input_square_sums
from tunelab.infer.prune import row_mask, top_indices, wanda_score


def _linears(state):
    return {k: v for k, v in state.items() if ".layers." in k and k.endswith("proj.weight")}


def test_wanda_zeros_follow_the_scores_of_the_sequentially_pruned_model(tiny_model_dir, calib, tmp_path):
    out = tmp_path / "wanda"
    info = tunelab.prune(model=str(tiny_model_dir), out=str(out), method="wanda", sparsity=0.5,
                         calibration=str(calib), echo=False, **CALIB)
    pruned = load_file(str(out / "model.safetensors"))
    dense = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, w in _linears(pruned).items():  # every row of every linear: exactly half zero (none were before)
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
    assert info["sparsity_of_prunable"] == 0.5
    assert json.loads((out / "tunelab_compression.json").read_text())["method"] == "wanda"
    # the masks: layer 0 from the dense model's activations; layer 1 from those of the model whose layer 0 is pruned
    windows = calib_windows(tiny_model_dir, calib)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for index in (0, 1):
        sq = input_square_sums(model, windows, index)
        for short, norms in sq.items():
            key = f"model.layers.{index}.{short}.weight"
            want = row_mask(wanda_score(dense[key], norms), 0.5)
            assert torch.equal(pruned[key] != 0, want), key
        with torch.no_grad():  # prune layer `index` as the command did before moving on
            for name, p in model.named_parameters():
                if name.startswith(f"model.layers.{index}.") and name in pruned:
                    p.copy_(pruned[name])


def test_two_of_four_and_magnitude_and_bad_input(tiny_model_dir, calib, tmp_path, capsys):
    out = tmp_path / "nm"
    tunelab.prune(model=str(tiny_model_dir), out=str(out), method="magnitude", pattern="2:4", echo=False)
    for name, w in _linears(load_file(str(out / "model.safetensors"))).items():
        groups = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (groups == 2).all(), name
    for args, message in (
            (["--method", "magnitude", "--sparsity", "1.5"], "error: --sparsity: the share of weights to prune, in "
                                                             "(0, 1), got 1.5"),
            (["--method", "magnitude", "--pattern", "2:7"], "self_attn.q_proj: 64 inputs are not a multiple of 7"),
            (["--method", "wanda", "--sparsity", "0.5"], "needs --calibration")):
        proc = run_main(capsys, "prune", "--model", str(tiny_model_dir), "--out", str(tmp_path / "bad"), *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert message in lines[0] or lines[0].startswith(message), lines[0]
    assert not (tmp_path / "bad").exists()


def test_dropped_layer_model_is_the_original_without_that_layer(tiny_model_dir, calib, tmp_path):
    out = tmp_path / "layers"
    info = tunelab.prune(model=str(tiny_model_dir), out=str(out), method="layers", drop=1, calibration=str(calib),
                         echo=False, **CALIB)
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    assert small.config.num_hidden_layers == 1 and len(small.model.layers) == 1
    dropped = info["dropped_layers"]
    assert len(dropped) == 1 and dropped[0] == min(range(2), key=lambda i: (info["block_influence"][i], -i))
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ref.model.layers = torch.nn.ModuleList([m for i, m in enumerate(ref.model.layers) if i not in dropped])
    ref.config.num_hidden_layers = 1
    ids = calib_windows(tiny_model_dir, calib)[:2]
    with torch.no_grad():
        assert torch.equal(small(input_ids=ids, use_cache=False).logits, ref(input_ids=ids, use_cache=False).logits)


def test_narrower_model_computes_the_original_with_those_neurons_and_heads_removed(tiny_model_dir, calib, tmp_path):
    """--mlp 0.25 --heads 0.5: the saved smaller model equals the original whose removed MLP neurons and heads
    contribute nothing (their down_proj / o_proj columns zeroed); layer 0 keeps the neurons that rank highest on
    the dense model's activations."""
    out = tmp_path / "width"
    info = tunelab.prune(model=str(tiny_model_dir), out=str(out), method="width", mlp=0.25, heads=0.5,
                         calibration=str(calib), echo=False, **CALIB)
    small = AutoModelForCausalLM.from_pretrained(out).eval()
    cfg = small.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (132, 2, 2, 16)
    assert info["intermediate_size"] == [176, 132]
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    windows = calib_windows(tiny_model_dir, calib)
    sq = input_square_sums(dense, windows, 0, names=["mlp.down_proj"])["mlp.down_proj"]
    down = dense.model.layers[0].mlp.down_proj.weight.data
    want = top_indices(sq.sqrt() * down.double().norm(dim=0), 132)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        for i, (big, little) in enumerate(zip(ref.model.layers, small.model.layers)):
            # the kept neurons and heads, found by their rows of gate_proj / q_proj
            g_big, g_small = big.mlp.gate_proj.weight, little.mlp.gate_proj.weight
            kept = [int((g_big == row).all(1).nonzero()[0]) for row in g_small]
            if i == 0:
                assert kept == want.tolist()
            gone = [j for j in range(176) if j not in kept]
            big.mlp.down_proj.weight[:, gone] = 0
            q_big, q_small = big.self_attn.q_proj.weight, little.self_attn.q_proj.weight
            kept_rows = {int((q_big == row).all(1).nonzero()[0]) for row in q_small}
            big.self_attn.o_proj.weight[:, [j for j in range(64) if j not in kept_rows]] = 0
        ids = windows[:2]
        got, want_logits = small(input_ids=ids).logits, ref(input_ids=ids).logits
    assert float((got - want_logits).abs().max()) <= logits_tol(want_logits, tiny_model_dir)


def test_lora_recovery_keeps_the_zeros_and_merging_needs_keep_sparsity(tiny_model_dir, calib, tmp_path):
    pruned = tmp_path / "pruned"
    tunelab.prune(model=str(tiny_model_dir), out=str(pruned), method="magnitude", sparsity=0.5, echo=False)
    zeros = {k: v == 0 for k, v in _linears(load_file(str(pruned / "model.safetensors"))).items()}
    run = tmp_path / "recover"
    tunelab.train(base_config(pruned, calib, run, train={"max_steps": 2}), echo=False)
    with pytest.raises(UserError, match="--keep-sparsity"):
        tunelab.export(run=str(run), out=str(tmp_path / "merged"))
    tunelab.export(run=str(run), out=str(tmp_path / "merged"), keep_sparsity=True)
    merged = _linears(load_file(str(tmp_path / "merged" / "model.safetensors")))
    adapted = 0
    for key, zero in zeros.items():
        assert (merged[key][zero] == 0).all(), key
        adapted += int((merged[key][~zero] != load_file(str(pruned / "model.safetensors"))[key][~zero]).sum())
    assert adapted > 0  # the adapter's update is in the kept weights
    report = tunelab.evaluate_perplexity(model=str(pruned), adapter=str(run / "final"), data=str(calib))
    assert report.sparsity > 0.2  # the adapter stayed unmerged: the base's zeros are counted
