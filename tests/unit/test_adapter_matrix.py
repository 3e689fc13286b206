"""Every fine-tuning type, the same proofs (tiny Llama, fp32, in-process):

- a few optimizer steps change exactly the parameters the method trains, and the trainable count it reports is the
  number of parameters that changed;
- the adapter saved the way the loop saves it, loaded back the way chat/export load it, gives identical logits;
- mergeable types: merged logits equal unmerged ones (1e-4); the others are refused with a clear error.
"""

from __future__ import annotations

import pytest
import torch

from tests.tolerance import logits_tol
from tunelab.config.load import build_section
from tunelab.config.schema import ADAPTER_CONFIGS, ModelConfig
from tunelab.errors import UserError

# name -> (adapter section, model.quantization)
CASES: dict[str, tuple[dict, str]] = {
    "full": ({"type": "full"}, "none"),
    "freeze": ({"type": "freeze", "layers": 1, "modules": ["lm_head"], "norms": True}, "none"),
    "freeze-embeddings": ({"type": "freeze", "layers": 0, "embeddings": True}, "none"),
    "lora": ({"type": "lora", "r": 4, "alpha": 8}, "none"),
    "lora-rslora-dora": ({"type": "lora", "r": 4, "rslora": True, "dora": True}, "none"),
    "lora-pissa": ({"type": "lora", "r": 4, "init": "pissa"}, "none"),
    "lora-pissa-fast": ({"type": "lora", "r": 4, "init": "pissa", "init_iters": 2}, "none"),
    "lora-olora": ({"type": "lora", "r": 4, "init": "olora"}, "none"),
    "lora-gaussian": ({"type": "lora", "r": 4, "init": "gaussian"}, "none"),
    "lora-eva": ({"type": "lora", "r": 4, "init": "eva"}, "none"),
    "adalora": ({"type": "adalora", "r": 6, "target_r": 3, "warmup": 1, "final": 1, "interval": 1}, "none"),
    "ia3": ({"type": "ia3"}, "none"),
    "ln": ({"type": "ln"}, "none"),
    "vera": ({"type": "vera", "r": 16}, "none"),
    "oft": ({"type": "oft", "block_size": 8}, "none"),
    "boft": ({"type": "boft", "block_size": 8, "butterfly": 2}, "none"),
    "prefix": ({"type": "prefix", "virtual_tokens": 4}, "none"),
    "prefix-projection": ({"type": "prefix", "virtual_tokens": 4, "projection": True, "projection_hidden": 16},
                          "none"),
    "prompt": ({"type": "prompt", "virtual_tokens": 4}, "none"),
    "prompt-text-init": ({"type": "prompt", "virtual_tokens": 4, "init_text": "answer the question"}, "none"),
    "ptuning-mlp": ({"type": "ptuning", "virtual_tokens": 4, "encoder_hidden": 16}, "none"),
    "ptuning-lstm": ({"type": "ptuning", "virtual_tokens": 4, "encoder": "lstm", "encoder_hidden": 16}, "none"),
    "bottleneck": ({"type": "bottleneck", "reduction": 8}, "none"),
    "bitfit": ({"type": "bitfit", "add_bias": True}, "none"),
    "reft": ({"type": "reft", "r": 2, "first": 2, "last": 2}, "none"),
    "qlora-nf4": ({"type": "lora", "r": 4, "alpha": 8}, "nf4"),
    "qlora-fp4": ({"type": "lora", "r": 4, "alpha": 8}, "fp4"),
    "lora-int8": ({"type": "lora", "r": 4, "alpha": 8}, "int8"),
    "qlora-loftq": ({"type": "lora", "r": 4, "init": "loftq"}, "nf4"),
}


def test_every_adapter_type_is_in_the_matrix():
    assert {c[0]["type"] for c in CASES.values()} == set(ADAPTER_CONFIGS)


def _batch(tokenizer):
    from tunelab.data.collate import collate
    from tunelab.data.conversation import Conversation
    from tunelab.data.templates import resolve_template
    from tunelab.data.tokenize import encode_conversation

    template = resolve_template("auto", tokenizer)
    rows = []
    for i in range(4):
        conv = Conversation(messages=[{"role": "user", "content": f"say the number {i} " + "please " * i},
                                      {"role": "assistant", "content": f"the number is {i} " * (1 + i % 2)}])
        rows.append(encode_conversation(conv, tokenizer, template, max_length=64))
    return collate(rows, "none", tokenizer.pad_token_id, 64)


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _logits(model, batch, train_mode: bool = False) -> torch.Tensor:
    from tunelab.data.collate import model_inputs
    from tunelab.models.adapters import virtual_tokens

    model.train(train_mode)
    with torch.no_grad():
        out = model(**model_inputs(batch), use_cache=False).logits.float()
    return out[:, virtual_tokens(model):]


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_trains_saves_reloads_merges(case, tiny_model_dir, tmp_path):
    from tunelab.infer.loading import load_for_inference
    from tunelab.methods.lm import causal_lm_loss
    from tunelab.models import quant
    from tunelab.models.adapters import (
        ADAPTERS,
        AdapterRuntime,
        AdapterSetup,
        apply_adapter,
        count_parameters,
        save_adapter,
    )
    from tunelab.models.load import load_model, load_tokenizer

    section, quantization = CASES[case]
    cfg = build_section(ADAPTER_CONFIGS[section["type"]], section, "adapter")
    mcfg = ModelConfig(path=str(tiny_model_dir), quantization=quantization)
    tokenizer = load_tokenizer(mcfg)
    batch = _batch(tokenizer)
    torch.manual_seed(0)
    model = quant.prepare_for_training(load_model(mcfg, dtype=torch.float32), mcfg, False)
    steps = 6
    setup = AdapterSetup(total_steps=steps, model_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir),
                         calibration=lambda n: [batch] * n, output_dir=tmp_path)
    model = apply_adapter(model, cfg, setup)
    runtime = AdapterRuntime.for_model(model, cfg)
    before = _params(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, case
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    model.train()
    for step in range(steps):
        runtime.before_forward(model, batch)
        loss = causal_lm_loss(model, batch).loss_sum / batch["token_mask"].sum()
        extra = runtime.extra_loss(model)
        (loss + (extra if extra is not None else 0)).backward()
        opt.step()
        runtime.after_optimizer_step(model, step)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    after = _params(model)
    changed = {n for n in before if before[n].shape != after[n].shape or not torch.equal(before[n], after[n])}
    # AdaLoRA zeroes pruned singular values in place, which is training too; everything else must stay put
    assert changed <= trainable, f"{case}: frozen parameters changed: {sorted(changed - trainable)[:3]}"
    assert changed == trainable, f"{case}: trainable parameters that never changed: {sorted(trainable - changed)[:3]}"
    reported = count_parameters(model).trainable
    assert reported == sum(after[n].numel() for n in changed), case
    assert losses[-1] < losses[0], f"{case}: loss did not go down: {losses}"

    # save as the loop's final save does; load as chat/export do; identical logits
    if cfg.type == "reft":  # compare as inference sees it: the whole input is the prompt
        from tunelab.models.tuners import reft

        reft.set_prompt_lengths(model, None)
    expected = _logits(model, batch)
    folder = tmp_path / "final"
    base_info = {"quantization": quant.describe(mcfg)} if quant.describe(mcfg) else None
    save_adapter(model, folder, final=True, output_dir=tmp_path, base_info=base_info)
    if ADAPTERS[cfg.type].backend == "model":
        return  # full/freeze save the whole model: a plain HF folder, covered by the loop's tests
    loaded, _ = load_for_inference(str(tiny_model_dir), str(folder), dtype="float32")
    # The reloaded adapter may take another path through the same function (peft's forward instead of the fused
    # one, PiSSA's converted rank-2r factors on the original base): reordered sums. An adapter adds at most one
    # product of the hidden size per adapted linear (OFT/BOFT rotations; LoRA-family ranks <= 16): extra = 2 x 64.
    tol = logits_tol(expected, tiny_model_dir, extra=128)
    torch.testing.assert_close(_logits(loaded, batch), expected, atol=tol, rtol=0)

    if ADAPTERS[cfg.type].mergeable:
        merged, _ = load_for_inference(str(tiny_model_dir), str(folder), dtype="float32", merge=True)
        assert not hasattr(merged, "peft_config")
        # bitsandbytes' int8 inference kernel also quantizes activations (LLM.int8()); its training-mode forward,
        # the one the adapter was trained with, multiplies by the int8 weights exactly: compare that (no dropout)
        int8 = quantization == "int8"
        unmerged = _logits(loaded, batch, train_mode=int8) if int8 else expected
        torch.testing.assert_close(_logits(merged, batch, train_mode=int8), unmerged, atol=tol, rtol=0)
    else:
        with pytest.raises(UserError, match="cannot be merged"):
            load_for_inference(str(tiny_model_dir), str(folder), dtype="float32", merge=True)
