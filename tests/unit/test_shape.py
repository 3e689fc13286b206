"""One resolved run shape (engine/shape.py) for the loop, bench and plan: what a config means, decided once."""

from __future__ import annotations

import pytest

from tests.helpers import alpaca_rows, base_config, write_json
from tunelab.config import load_config
from tunelab.engine.shape import resolve_run
from tunelab.errors import UserError


@pytest.fixture
def cfg_for(tiny_model_dir, tmp_path):
    data = write_json(tmp_path / "rows.json", alpaca_rows(16))

    def make(method: dict, adapter: dict | None = None, **data_keys):
        cfg = base_config(tiny_model_dir, data, tmp_path / "out", method=method,
                          adapter=adapter or {"type": "lora", "r": 4, "alpha": 8})
        cfg["data"].update(data_keys)
        return load_config(cfg)

    return make


def test_the_shape_of_sft_and_of_preference_methods(cfg_for):
    sft = resolve_run(cfg_for({"type": "sft"}), device="cpu")
    assert (sft.data_kind.name, sft.kind.name, sft.sequences_per_row, sft.packing) == ("chat", "chat", 1, "padding_free")
    assert (sft.precision, sft.dtype, sft.mixed_precision, sft.extra_models) == ("fp32", "fp32", "no", {})
    dpo = resolve_run(cfg_for({"type": "dpo"}), device="cpu")
    assert dpo.sequences_per_micro_batch == 2 * dpo.batch_size and dpo.packing == "padding_free"
    # with LoRA the reference is the policy with its adapter off: no memory of its own
    assert dpo.extra_models["reference"].source == "adapter_off" and dpo.resident_models() == {}
    full = resolve_run(cfg_for({"type": "dpo"}, {"type": "full"}), device="cpu")
    assert full.extra_models["reference"].source == "copy" and set(full.resident_models()) == {"reference"}
    # scored once before training, the copy is gone by the first step
    pre = resolve_run(cfg_for({"type": "dpo", "precompute_reference": True}, {"type": "full"}), device="cpu")
    assert pre.extra_models["reference"].during_training is False and pre.resident_models() == {}
    kto = resolve_run(cfg_for({"type": "kto", "reference": "copy"}), device="cpu")
    assert kto.packing == "none" and set(kto.resident_models()) == {"reference"}


def test_packing_rules_are_decided_before_anything_loads(cfg_for):
    assert resolve_run(cfg_for({"type": "rm"}), device="cpu").packing == "none"  # a score head: one row each
    with pytest.raises(UserError, match="padding_free cannot be used with method rm"):
        resolve_run(cfg_for({"type": "rm"}, packing="padding_free"), device="cpu")
    prefix = {"type": "prefix", "virtual_tokens": 4}
    assert resolve_run(cfg_for({"type": "sft"}, prefix), device="cpu").packing == "none"
    with pytest.raises(UserError, match="padding_free cannot be used with adapter prefix"):
        resolve_run(cfg_for({"type": "sft"}, prefix, packing="padding_free"), device="cpu")
    assert resolve_run(cfg_for({"type": "sft"}, packing="group_by_length"), device="cpu").packing == "group_by_length"
    with pytest.raises(UserError, match="method.reference: adapter_off needs a peft adapter"):
        resolve_run(cfg_for({"type": "dpo", "reference": "adapter_off"}, {"type": "full"}), device="cpu")


def test_the_shape_for_another_device(cfg_for):
    """Planning for a CUDA machine from here: bf16 compute, a bf16 frozen base, fp32 weights when the base trains."""
    lora = resolve_run(cfg_for({"type": "sft"}), device="cuda", check_hardware=False)
    assert (lora.precision, lora.dtype, lora.compute_dtype) == ("bf16", "bf16", "bfloat16")
    full = resolve_run(cfg_for({"type": "sft"}, {"type": "full"}), device="cuda", check_hardware=False)
    assert (full.precision, full.dtype, full.storage) == ("bf16", "fp32", "fp32")


def test_plan_counts_the_reference_copy_dpo_keeps(cfg_for):
    """The planner reads the same shape: DPO with full fine-tuning holds a frozen copy of the base (every parameter
    at its load dtype, fp32 here) beside the policy; with LoRA, or precomputed, it holds none."""
    from tunelab.engine.plan import ModelShape, plan_from_config

    sft = plan_from_config(cfg_for({"type": "sft"}, {"type": "full"}), device="cpu")
    dpo = plan_from_config(cfg_for({"type": "dpo"}, {"type": "full"}), device="cpu")
    base = ModelShape.from_pretrained(str(sft.model))
    assert dpo.plan.components["frozen_models"] == base.total * 4
    assert sft.plan.components["frozen_models"] == 0
    assert "reference: a copy of the base" in dpo.text() and "frozen_models" not in sft.text()
    for method in ({"type": "dpo"}, {"type": "dpo", "precompute_reference": True}):
        adapter = {"type": "lora", "r": 4, "alpha": 8} if len(method) == 1 else {"type": "full"}
        assert plan_from_config(cfg_for(method, adapter), device="cpu").plan.components["frozen_models"] == 0


def test_plan_counts_the_rollout_kv_cache(tiny_model_dir, tmp_path):
    """grpo samples batch_size x grad_accum x num_generations sequences of up to max_length + max_new_tokens
    tokens at once: their KV cache (2 x layers x kv_heads x head_dim values per token, fp32 here) is a moment of its
    own, before the step's forward; sft has none."""
    from tunelab.engine.plan import ModelShape, plan_from_config

    data = write_json(tmp_path / "rows.json", alpaca_rows(16))
    cfg = base_config(tiny_model_dir, data, tmp_path / "out", method={"type": "grpo", "num_generations": 4,
                                                                     "max_new_tokens": 32,
                                                                     "rewards": [{"function": "exact_match"}]},
                      train={"batch_size": 2, "grad_accum": 3})
    report = plan_from_config(load_config(cfg), device="cpu")
    shape = ModelShape.from_pretrained(str(tiny_model_dir))
    expected = 2 * shape.layers * shape.kv_heads * shape.head_dim * (2 * 3 * 4) * (64 + 32) * 4
    assert report.plan.moments["rollout"]["rollout_cache"] == expected
    assert "KV cache: 24 sequences x 96 tokens" in report.plan.notes["rollout_cache"]
    sft = plan_from_config(load_config(base_config(tiny_model_dir, data, tmp_path / "o2")), device="cpu")
    assert "rollout" not in sft.plan.moments and "rollout_cache" not in sft.text()


def test_plan_counts_a_critic_that_trains_beside_the_policy(tiny_model_dir, tmp_path):
    """ppo with critic: model trains a second model in full on the same micro-batches: at every moment the plan adds
    what a full fine-tune of that model (with a one-output score head instead of the LM head) holds at that moment:
    at the optimizer step its weights, gradients and AdamW's two fp32 moments, 16 bytes per parameter in fp32. A
    value head (critic: head) is a few parameters of the policy's: nothing to add."""
    from tunelab.engine.plan import ModelShape, plan_from_config

    data = write_json(tmp_path / "rows.json", alpaca_rows(16))

    def plan(critic):
        cfg = base_config(tiny_model_dir, data, tmp_path / "out", method={
            "type": "ppo", "critic": critic, "kl_coef": 0.0, "rewards": [{"function": "exact_match"}]})
        return plan_from_config(load_config(cfg), device="cpu")

    head, model = plan("head"), plan("model")
    shape = ModelShape.from_pretrained(str(tiny_model_dir))
    critic_params = shape.total - shape.vocab * shape.hidden * (not shape.tied) + shape.hidden
    assert all(m["trained_models"] == 0 for m in head.plan.moments.values())
    assert "trained_models" not in head.text()
    step = model.plan.moments["optimizer"]
    assert step["trained_models"] >= 16 * critic_params
    assert model.plan.moments["rollout"]["trained_models"] == 12 * critic_params  # weights + AdamW moments
    assert model.plan.moments["backward"]["trained_models"] > 12 * critic_params  # + its activations, gradients
    assert "critic (a copy of the base)" in model.text()
    for moment, parts in model.plan.moments.items():
        assert {k: v for k, v in parts.items() if k != "trained_models"} == \
            {k: v for k, v in head.plan.moments[moment].items() if k != "trained_models"}, moment


def test_plan_counts_the_merged_lora_copy_of_sampling(tiny_model_dir, tmp_path):
    """With method.merge_adapter (auto, on CPU) plain LoRA samples with a merged copy of every adapted linear
    weight: the sampling moment holds in x out x 4 bytes more per adapted linear (fp32), and nothing else changes;
    merge_adapter off, DoRA and full fine-tuning hold no copy."""
    from tunelab.engine.plan import ModelShape, plan_from_config

    data = write_json(tmp_path / "rows.json", alpaca_rows(16))

    def rollout(method=None, adapter=None):
        cfg = base_config(tiny_model_dir, data, tmp_path / "out",
                          method={"type": "grpo", "num_generations": 4, "rewards": [{"function": "exact_match"}],
                                  **(method or {})}, **({"adapter": adapter} if adapter else {}))
        return plan_from_config(load_config(cfg), device="cpu").plan.moments["rollout"]

    shape = ModelShape.from_pretrained(str(tiny_model_dir))
    adapted = sum(i * o for name, i, o in shape.linears if name != shape.head)
    merged, unmerged = rollout(), rollout({"merge_adapter": "off"})
    assert merged["weight_copies"] - unmerged["weight_copies"] == adapted * 4
    assert {k: v for k, v in merged.items() if k != "weight_copies"} == \
        {k: v for k, v in unmerged.items() if k != "weight_copies"}
    dora = {"type": "lora", "r": 4, "alpha": 8, "dora": True}
    assert rollout(adapter=dora)["weight_copies"] == rollout({"merge_adapter": "off"}, dora)["weight_copies"]
    assert rollout(adapter={"type": "full"})["weight_copies"] == \
        rollout({"merge_adapter": "off"}, {"type": "full"})["weight_copies"]


def test_kd_reads_the_kind_its_options_choose_and_plan_counts_the_teacher(tiny_model_dir, tmp_path):
    """kd reads chat rows or text (method.data); `plan` counts the live teacher's weights (another folder, here
    the same tiny model: its parameters x 4 bytes) and none with a teacher cache (the teacher is gone before the
    first step); only lmbda > 0 rolls out."""
    from tunelab.config import load_config
    from tunelab.engine.plan import ModelShape, plan_from_config

    data = write_json(tmp_path / "rows.json", alpaca_rows(16))

    def cfg(**method):
        return load_config(base_config(tiny_model_dir, data, tmp_path / "out", method={
            "type": "kd", "teacher": {"path": str(tiny_model_dir)}, **method}))

    chat, text = resolve_run(cfg(), device="cpu"), resolve_run(cfg(data="text"), device="cpu")
    assert (chat.data_kind.name, text.data_kind.name, text.kind.name) == ("chat", "text", "text")
    assert not chat.rolls_out and resolve_run(cfg(lmbda=0.5), device="cpu").rolls_out
    base = ModelShape.from_pretrained(str(tiny_model_dir))
    live = plan_from_config(cfg(), device="cpu")
    cached = plan_from_config(cfg(top_k=8, teacher_cache=str(tmp_path / "cache")), device="cpu")
    assert live.plan.components["frozen_models"] == base.total * 4
    assert cached.plan.components["frozen_models"] == 0
    assert f"teacher: {tiny_model_dir}" in live.text()
