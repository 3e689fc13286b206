"""Online RL through the real loop on a tiny model: GRPO, RLOO and PPO raise a verifiable reward on held-out prompts.

The task needs no pre-training: the reward is the share of a completion's tokens that lie in a fixed tenth of the
vocabulary (ids divisible by 10). A random policy samples about 10 % of them; a policy that learns from its own
samples moves probability mass onto that set, whatever the prompt. Measured on the held-out prompts (AMD EPYC, fp32,
full fine-tuning, 24 steps of 4 prompts x 4 completions): GRPO 0.084 -> 0.906, RLOO 0.084 -> 0.958, PPO with a value
head 0.084 -> 0.513, PPO with a critic model 0.084 -> 0.617.
"""

from __future__ import annotations

import pytest

import tunelab
from tests.helpers import base_config, write_json
from tunelab.engine.metrics import read_metrics

REWARD = '''
def tenth(prompts, completions, completion_ids, **kwargs):
    return [sum(i % 10 == 0 for i in ids) / max(len(ids), 1) for ids in completion_ids]
'''


def _cfg(tiny_model_dir, tmp_path, method: str, out: str, **train):
    """method: grpo, rloo, or ppo-head / ppo-model (PPO with that critic, one optimizer step per rollout)."""
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARD)
    prompts = [{"instruction": f"Write anything about thing {i}", "id": i} for i in range(64)]
    data = write_json(tmp_path / "prompts.json", prompts[:48])
    val = write_json(tmp_path / "val.json", prompts[48:56])  # held out
    kind, _, critic = method.partition("-")
    extra = {"critic": critic, "num_iterations": 1} if kind == "ppo" else {}
    cfg = base_config(tiny_model_dir, data, tmp_path / out, adapter={"type": "full"},
                      method={"type": kind, "num_generations": 4, "max_new_tokens": 8, "temperature": 1.0,
                              "rewards": [{"file": str(rewards), "function": "tenth"}], **extra},
                      train={"batch_size": 4, "lr": 1e-2, "log_every": 1, "scheduler": "constant", **train})
    cfg["data"]["val"] = [{"path": str(val), "format": "alpaca"}]
    return cfg


@pytest.mark.parametrize("method", ["grpo", "rloo", "ppo-head", "ppo-model"])
def test_online_rl_raises_the_reward_on_held_out_prompts(tiny_model_dir, tmp_path, method):
    # before: the policy as it starts (one evaluation after a step of learning rate 1e-12: no change)
    tunelab.train(_cfg(tiny_model_dir, tmp_path, method, "before", max_steps=1, lr=1e-12, eval_every=1), echo=False)
    before = read_metrics(tmp_path / "before")[-1]["eval_reward"]
    tunelab.train(_cfg(tiny_model_dir, tmp_path, method, "after", max_steps=24, eval_every=24), echo=False)
    records = read_metrics(tmp_path / "after")
    after = records[-1]["eval_reward"]
    # 8 held-out prompts x 4 completions x 8 tokens: a share of 256 tokens, about 10 % at the start
    print(f"{method}: eval reward {before:.3f} -> {after:.3f}")
    assert before < 0.25 and after > before + 0.25, (before, after)
    train = [r for r in records if "reward" in r]
    assert train[-1]["reward"] > train[0]["reward"]
    group_keys = ("reward_std", "zero_std_ratio") if not method.startswith("ppo") else \
        ("kl", "value_loss", "policy_loss", "value_clip_ratio", "approx_kl")
    for key in ("rewards/rewards.py:tenth", "completion_length", "clipped_ratio", "entropy", "generation_tokens_per_s",
                "clip_ratio", "rollout_s", "train_s", *group_keys):
        assert key in train[0], key


def test_a_resumed_run_samples_and_learns_what_the_uninterrupted_run_did(tiny_model_dir, tmp_path):
    """Completions are seeded per (seed, step, prompt, sample): a run stopped after step 2 and resumed to step 4
    logs the same rewards and losses for steps 3 and 4 as the run that went through, and ends on the same weights
    (fp32 CPU, the same operations in the same order: equal to the last bit)."""
    from safetensors.torch import load_file

    whole = _cfg(tiny_model_dir, tmp_path, "grpo", "whole", max_steps=4, save_every=2)
    whole["data"]["val"] = []
    tunelab.train(whole, echo=False)
    part = _cfg(tiny_model_dir, tmp_path, "grpo", "part", max_steps=2, save_every=2)
    part["data"]["val"] = []
    tunelab.train(part, echo=False)
    part["train"]["max_steps"] = 4
    tunelab.train(part, echo=False)
    keys = ("reward", "loss", "grad_norm", "completion_length", "tokens")
    a = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "whole") if "loss" in r]
    b = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "part") if "loss" in r]
    assert a == b and len(a) == 4
    wa = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "part" / "final" / "model.safetensors"))
    assert all(bool((wa[k] == wb[k]).all()) for k in wa)


# (method, engine, adapter) run on 2 processes; each is compared with its method and adapter on one process
TWO_PROCESS_RUNS = [("grpo", "ddp", "full"), ("ppo-model", "ddp", "full"), ("grpo", "zero3", "full"),
                    ("ppo-model", "zero3", "full"), ("grpo", "fsdp2", "lora"), ("ppo-model", "fsdp2", "full"),
                    ("ppo-head", "fsdp2", "full"), ("ppo-head", "zero2", "full")]


def _two_process_config(tiny_model_dir, tmp_path, method, engine, adapter, procs):
    name = f"{method}-{engine}-{adapter}" if procs == 2 else f"{method}-one-{adapter}"
    cfg = _cfg(tiny_model_dir, tmp_path, method, name, max_steps=3, grad_accum=2 // procs, batch_size=2,
               distributed=engine)
    cfg["data"]["val"] = []
    cfg["model"]["dtype"] = "float64"
    if adapter == "lora":
        cfg["adapter"] = {"type": "lora", "r": 4, "alpha": 8}
    if method == "grpo":
        cfg["method"]["loss"] = "grpo"  # per-sequence means: the normalisation most sensitive to the split
    return name, cfg


@pytest.fixture(scope="module")
def two_process_rl(tiny_model_dir, tmp_path_factory):
    """Every TWO_PROCESS_RUNS entry in one torchrun launch (tests/e2e/run_configs.py), and the one-process runs."""
    import yaml

    from tests.helpers import launch_configs

    tmp_path = tmp_path_factory.mktemp("rl2")
    paths = []
    for method, engine, adapter in TWO_PROCESS_RUNS:
        name, cfg = _two_process_config(tiny_model_dir, tmp_path, method, engine, adapter, 2)
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(cfg))
    for method, adapter in sorted({(m, a) for m, _, a in TWO_PROCESS_RUNS}):
        tunelab.train(_two_process_config(tiny_model_dir, tmp_path, method, "ddp", adapter, 1)[1], echo=False)
    launch_configs(paths)
    return tmp_path


@pytest.mark.parametrize("method, engine, adapter", TWO_PROCESS_RUNS, ids=["-".join(r) for r in TWO_PROCESS_RUNS])
def test_online_rl_on_two_processes_matches_one(tiny_model_dir, two_process_rl, method, engine, adapter):
    """2 processes x 2 prompts equal 1 process x 2 prompts x 2 accumulation: each process samples its own prompts'
    completions from their per-sequence seeds (the same completions as the one process samples), both train on the
    gathered batch (the rollout contract's gather, methods/base.py), and the loss is normalised by the units of the
    whole global batch. PPO: its critic trains under the engine like the policy (one DeepSpeed engine with it, or
    sharded itself under FSDP2), and the advantages are whitened over the whole batch. Under zero3/fsdp2 sampling
    gathers the split parameters (and LoRA samples unmerged). float64 weights: rewards equal exactly, losses within
    the reorder bound, weights (the critic's too) within Adam's bound after 3 steps (plus DeepSpeed's float32
    master update: tests/e2e/test_distributed_engines.py)."""
    from safetensors.torch import load_file

    from tests.tolerance import assert_same_metrics, assert_same_weights, chain_length, engine_adam_tol

    one_dir = two_process_rl / f"{method}-one-{adapter}"
    two_dir = two_process_rl / f"{method}-{engine}-{adapter}"
    one, two = read_metrics(one_dir), read_metrics(two_dir)
    assert [r["reward"] for r in two] == [r["reward"] for r in one]
    assert [r["completion_length"] for r in two] == [r["completion_length"] for r in one]
    n = chain_length(tiny_model_dir, 64, tokens=4 * 4 * 64)
    assert_same_metrics(two, one, ("loss", "grad_norm"), n)
    policy = "adapter_model.safetensors" if adapter == "lora" else "model.safetensors"
    critic = {"ppo-model": ["critic/model.safetensors"], "ppo-head": ["value_head.safetensors"]}.get(method, [])
    for weights in [policy, *critic]:
        w1 = load_file(str(one_dir / "final" / weights))
        w2 = load_file(str(two_dir / "final" / weights))
        assert_same_weights(w2, w1, engine_adam_tol(engine, 1e-2, 3, n, w1))


@pytest.mark.parametrize("adapter", [{"type": "full"}, {"type": "lora", "r": 4, "alpha": 8}], ids=["full", "lora"])
def test_a_reward_model_scores_completions_as_tunelab_score_does(tiny_model_dir, tmp_path, adapter):
    """An rm run's final/ folder (or the base plus its adapter) as a reward: each prompt with its completion is
    scored exactly as `tunelab score` scores that answer to that prompt."""
    from tests.e2e.test_preference_methods import preference_rows
    from tunelab.config.schema import RewardSpec
    from tunelab.infer.score import run_score
    from tunelab.methods.rewards import build_rewards, score

    data = write_json(tmp_path / "pairs.json", preference_rows(16, 0))
    cfg = base_config(tiny_model_dir, data, tmp_path / "rm", adapter=adapter, method={"type": "rm"},
                      train={"max_steps": 2, "batch_size": 4})
    final = tunelab.train(cfg, echo=False).final_dir
    spec = RewardSpec(model=str(final)) if adapter["type"] == "full" else \
        RewardSpec(model=str(tiny_model_dir), adapter=str(final))
    (rm,) = build_rewards([spec], max_new_tokens=8)
    answers = ["The sky is blue.", "The sky is red.", "No."]
    prompts = [[{"role": "user", "content": "Name a colour for the sky"}]] * 3
    completions = [[{"role": "assistant", "content": a}] for a in answers]
    per_function, totals = score([rm], prompts, completions, [[1]] * 3, {}, step=0, max_steps=1)
    by_cli = run_score(model=spec.model, adapter=spec.adapter or None, prompt="Name a colour for the sky",
                       answers=answers)
    assert per_function[0] == pytest.approx(by_cli, abs=1e-6) and totals == per_function[0]
    assert len(set(by_cli)) == 3  # a trained head tells the answers apart


def test_sigkill_then_resume_reproduces_the_uninterrupted_rl_run(tiny_model_dir, tmp_path):
    """A GRPO run killed with SIGKILL after its step-2 checkpoint and resumed logs the uninterrupted run's per-step
    rewards, losses and completion lengths and ends on its weights, bit for bit (CPU fp32, same thread count)."""
    import signal

    import yaml

    from tests.e2e.test_resume_ddp import _start, _wait_for_step
    from tests.helpers import run_cli

    cfgs = {}
    for name in ("ref", "killed"):
        cfg = _cfg(tiny_model_dir, tmp_path, "grpo", name, max_steps=6, save_every=2)
        cfg["data"]["val"] = []
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(cfg))
    run_cli("train", str(cfgs["ref"]), check=True)
    proc = _start(cfgs["killed"])
    _wait_for_step(tmp_path / "killed", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "final").exists()
    assert "resume: continuing from" in run_cli("train", str(cfgs["killed"]), check=True).stdout
    keys = ("step", "reward", "loss", "grad_norm", "completion_length", "entropy")
    ref = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "ref")]
    got = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "killed")]
    assert got == ref and [r["step"] for r in got] == list(range(1, 7))


def test_a_reward_hack_shows_in_the_metrics(tiny_model_dir, tmp_path):
    """A reward that counts tokens, not quality (here: the share of completion tokens from a fixed tenth of the
    vocabulary, whatever they say) is learned as a collapse: the reward climbs while the policy's entropy at the
    completion tokens falls, and the metrics show both step by step."""
    cfg = _cfg(tiny_model_dir, tmp_path, "grpo", "hack", max_steps=24)
    cfg["data"]["val"] = []
    tunelab.train(cfg, echo=False)
    records = read_metrics(tmp_path / "hack")
    first, last = records[0], records[-1]
    assert last["reward"] > first["reward"] + 0.2, (first["reward"], last["reward"])
    assert last["entropy"] < 0.8 * first["entropy"], (first["entropy"], last["entropy"])


def test_num_iterations_trains_several_steps_on_each_rollout_and_resumes_between_them(tiny_model_dir, tmp_path):
    """num_iterations 2: steps 1-2 train on one rollout and steps 3-4 on the next (rollout metrics logged on the
    steps that sample, losses that move as the policy leaves the sampling policy); a run stopped after step 3,
    between the two steps of a rollout, resumes on the rolled-out batch its checkpoint kept and matches the run that
    went through."""
    def cfg(out, steps):
        c = _cfg(tiny_model_dir, tmp_path, "grpo", out, max_steps=steps, save_every=1)
        c["data"]["val"] = []
        c["method"]["num_iterations"] = 2
        return c

    tunelab.train(cfg("whole", 4), echo=False)
    whole = read_metrics(tmp_path / "whole")
    assert ["reward" in r for r in whole] == [True, False, True, False]  # sampled on steps 1 and 3 only
    assert whole[0]["loss"] != whole[1]["loss"] and whole[1]["tokens"] - whole[0]["tokens"] == whole[0]["tokens"]
    assert whole[1]["rollout_s"] < whole[0]["rollout_s"] / 10  # the second step trains on the kept batch
    part = cfg("part", 3)
    tunelab.train(part, echo=False)
    part["train"]["max_steps"] = 4
    tunelab.train(part, echo=False)
    keys = ("reward", "loss", "grad_norm", "clip_ratio", "tokens")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "part")] == \
        [{k: r.get(k) for k in keys} for r in whole]


def test_an_epoch_of_prompts_takes_num_iterations_times_the_steps(tiny_model_dir, tmp_path):
    c = _cfg(tiny_model_dir, tmp_path, "grpo", "epoch", max_steps=-1, epochs=0.25)
    c["data"]["val"] = []
    c["method"]["num_iterations"] = 2
    result = tunelab.train(c, echo=False)
    assert result.steps == 6  # 48 prompts / 4 per step = 12 rollouts per epoch, x 2 steps each, x 0.25
    assert read_metrics(tmp_path / "epoch")[-1]["epoch"] == 0.25


def test_ppo_resumes_between_the_epochs_of_a_rollout_and_saves_its_critic_as_a_reward_model(tiny_model_dir, tmp_path):
    """PPO with a critic model and num_iterations 2: a run stopped after step 3 (between the two steps on the second
    rollout) resumes with the critic, its optimizer state and the kept rollout from the checkpoint and matches the
    run that went through, to the last bit; the trained critic is saved as RUN/final/critic, a standard folder that
    loads as a sequence-classification model with one output and serves as a reward model."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    def cfg(out, steps):
        c = _cfg(tiny_model_dir, tmp_path, "ppo-model", out, max_steps=steps, save_every=1)
        c["data"]["val"] = []
        c["method"]["num_iterations"] = 2
        return c

    tunelab.train(cfg("whole", 4), echo=False)
    part = cfg("part", 3)
    tunelab.train(part, echo=False)
    part["train"]["max_steps"] = 4
    tunelab.train(part, echo=False)
    keys = ("reward", "loss", "grad_norm", "value_loss", "clip_ratio", "tokens")
    whole = read_metrics(tmp_path / "whole")
    assert ["reward" in r for r in whole] == [True, False, True, False]
    assert [{k: r.get(k) for k in keys} for r in read_metrics(tmp_path / "part")] == \
        [{k: r.get(k) for k in keys} for r in whole]
    for weights in ("model.safetensors", "critic/model.safetensors"):
        wa = load_file(str(tmp_path / "whole" / "final" / weights))
        wb = load_file(str(tmp_path / "part" / "final" / weights))
        assert all(bool((wa[k] == wb[k]).all()) for k in wa), weights
    critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "whole" / "final" / "critic")
    assert critic.config.num_labels == 1 and (tmp_path / "whole" / "final" / "critic" / "tokenizer.json").exists()


def test_dynamic_sampling_refills_the_batch_with_groups_that_carry_a_signal(tiny_model_dir, tmp_path):
    """A sparse reward (1 when the first token lies in the tenth of the vocabulary): most groups of 4 score all 0 and
    carry no signal; dynamic sampling drops them and refills the batch from further prompts, so every group it
    trains on has a reward spread (signal_ratio 1) while the share of sampled groups without one stays high."""
    sparse = tmp_path / "sparse.py"
    sparse.write_text("def first(prompts, completions, completion_ids, **kw):\n"
                      "    return [float(bool(ids) and ids[0] % 10 == 0) for ids in completion_ids]\n")
    cfg = _cfg(tiny_model_dir, tmp_path, "grpo", "dapo", max_steps=3)
    cfg["data"]["val"] = []
    cfg["method"].update(dynamic_sampling=True, max_refills=8, temperature=1.5,
                         rewards=[{"file": str(sparse), "function": "first"}])
    tunelab.train(cfg, echo=False)
    records = read_metrics(tmp_path / "dapo")
    assert len(records) == 3
    assert all(r["refills"] >= 1 for r in records)
    assert all(r["signal_ratio"] == 1.0 for r in records)
    assert sum(r["zero_std_ratio"] for r in records) / 3 > 0.3
