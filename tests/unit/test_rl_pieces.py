"""Online RL pieces on a tiny model: seeded sampling, rewards (built-ins, the user's file, errors), and a policy loss
whose gradient does not depend on how a rollout batch is split into micro-batches."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from tests.tolerance import chain_length, reorder_tol
from tunelab.config import load_config
from tunelab.config.schema import RewardSpec
from tunelab.data.tokenize import IGNORE_INDEX, Encoded
from tunelab.errors import ConfigError, UserError
from tunelab.methods.base import FrozenModel, StepContext
from tunelab.methods.grpo import loss_units, policy_loss
from tunelab.methods.rewards import build_rewards, normalize_answer, score
from tunelab.methods.rl_losses import VARIANTS, units
from tunelab.methods.sampling import SamplingOptions, _filter, sample, sequence_seed

F64 = torch.float64


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64)


# ---------------------------------------------------------------------------------------------------- sampling
def test_a_completion_depends_on_its_seed_not_on_its_batch(model):
    """Each sequence samples from its own generator: the same (prompt, seed) gives the same completion alone or in
    a batch with other prompts of other lengths (left padding, positions of real tokens only); float64 logits keep
    batched and single rows equal far below any sampling boundary."""
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    seeds = [sequence_seed(0, 3, i, 0) for i in range(3)]
    opts = SamplingOptions(max_new_tokens=6, temperature=1.0)
    together, cut = sample(model, prompts, seeds, opts, stop_ids=[2], pad_id=0, device="cpu")
    alone = [sample(model, [p], [s], opts, stop_ids=[2], pad_id=0, device="cpu")[0][0]
             for p, s in zip(prompts, seeds)]
    assert together == alone and all(len(c) == 6 for c in together) and cut == [True] * 3
    other, _ = sample(model, prompts, [s + 1 for s in seeds], opts, stop_ids=[2], pad_id=0, device="cpu")
    assert other != together  # another seed, other draws
    assert len({sequence_seed(0, 3, i, j) for i in range(50) for j in range(8)}) == 400
    # greedy equals transformers' greedy generate
    greedy, _ = sample(model, [prompts[0]], [0], SamplingOptions(max_new_tokens=5, temperature=0), stop_ids=[2],
                       pad_id=0, device="cpu")
    ref = model.generate(torch.tensor([prompts[0]]), max_new_tokens=5, do_sample=False, eos_token_id=2,
                         pad_token_id=0)
    assert greedy[0] == ref[0, 5:].tolist()[:len(greedy[0])]


def test_a_completion_stops_at_a_stop_id_and_keeps_it(model):
    first, _ = sample(model, [[5, 6, 7]], [1], SamplingOptions(max_new_tokens=3, temperature=0), stop_ids=[2],
                      pad_id=0, device="cpu")
    stop = first[0][1]  # make the second greedy token a stop id: the completion ends there, with it
    out, cut = sample(model, [[5, 6, 7]], [1], SamplingOptions(max_new_tokens=3, temperature=0),
                      stop_ids=[stop], pad_id=0, device="cpu")
    assert out[0] == first[0][:2] and cut == [False]


def test_top_k_and_top_p_keep_what_they_should():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(_filter(logits, SamplingOptions(top_k=2)))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter(logits, SamplingOptions(top_p=0.8)))  # 0.5 + 0.3 reaches 0.8: two tokens
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(_filter(logits, SamplingOptions(top_p=0.81)))
    assert kept.tolist() == [[True, True, True, False]]


# ----------------------------------------------------------------------------------------------------- rewards
def _score(specs, completions, columns, **kw):
    fns = build_rewards([RewardSpec(**s) for s in specs], max_new_tokens=kw.pop("max_new_tokens", 8))
    texts = [[{"role": "assistant", "content": c}] for c in completions]
    ids = kw.pop("ids", [[1] * len(c.split()) for c in completions])
    return score(fns, [[{"role": "user", "content": "q"}]] * len(completions), texts, ids, columns, step=0,
                 max_steps=1, **kw)


def test_builtin_rewards():
    per, total = _score([{"function": "exact_match"}, {"function": "normalized_match", "weight": 2.0}],
                        ["42", "The answer is 42.", "41"], {"answer": ["42", "42", "42"]})
    assert per == [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]] and total == [3.0, 2.0, 0.0]
    assert normalize_answer("The Answer: 42!") == "the answer 42"
    per, _ = _score([{"function": "regex_format", "pattern": r"<a>\d+</a>"}], ["<a>12</a>", "<a>x</a>"], {})
    assert per == [[1.0, 0.0]]
    # DAPO's overlong shaping: 0 up to 8 - 4 tokens, then linear to -1 at 8, -1 beyond
    per, _ = _score([{"function": "overlong_penalty", "buffer": 4}], ["a"] * 4, {},
                    ids=[[1] * 4, [1] * 6, [1] * 8, [1] * 9])
    assert per == [[0.0, -0.5, -1.0, -1.0]]


def test_a_reward_file_gets_trls_arguments_and_none_means_no_opinion(tmp_path):
    f = tmp_path / "rewards.py"
    f.write_text(
        "seen = {}\n"
        "def correct(prompts, completions, completion_ids, answer, trainer_state, **kw):\n"
        "    seen.update(prompts=prompts, ids=completion_ids, step=trainer_state.global_step, extra=kw)\n"
        "    return [None if a is None else float(c[0]['content'] == a) for c, a in zip(completions, answer)]\n")
    per, total = _score([{"file": str(f), "function": "correct"}, {"function": "exact_match", "weight": 0.5}],
                        ["x", "y", "x"], {"answer": ["x", None, "y"], "level": [1, 1, 2]})
    assert math.isnan(per[0][1]) and per[0][0] == 1.0 and per[0][2] == 0.0
    # the second completion: only exact_match had an opinion (0 against the None answer)
    assert total == [1.5, 0.0, 0.0]


@pytest.mark.parametrize("body, message", [
    ("    raise KeyError('answer')", r"reward rewards.py:f: raised KeyError: 'answer' at step 1"),
    ("    return [1.0]", r"reward rewards.py:f: returned 1 rewards for 2 completions at step 1"),
    ("    return [1.0, float('nan')]", r"reward rewards.py:f: returned nan for prompt 0 at step 1"),
    ("    return [1.0, 'good']", r"reward rewards.py:f: returned 'good' for prompt 0 at step 1"),
])
def test_a_bad_reward_stops_the_run_in_one_line(tmp_path, body, message):
    f = tmp_path / "rewards.py"
    f.write_text(f"def f(prompts, completions, completion_ids, **kw):\n{body}\n")
    with pytest.raises(UserError, match=message):
        _score([{"file": str(f), "function": "f"}], ["a", "b"], {}, group=2)


def test_reward_config_is_checked(tiny_model_dir, tmp_path):
    base = {"model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": "x.json"}]}}
    with pytest.raises(ConfigError, match="method.rewards: at least one reward"):
        load_config({**base, "method": {"type": "grpo"}})
    with pytest.raises(ConfigError, match=r"method.rewards\[0\].function: 'exact' is not a built-in reward; "
                                          r"did you mean 'exact_match'\?"):
        load_config({**base, "method": {"type": "grpo", "rewards": [{"function": "exact"}]}})
    with pytest.raises(ConfigError, match=r"method.rewards\[0\].pattern: required for regex_format"):
        load_config({**base, "method": {"type": "rloo", "rewards": [{"function": "regex_format"}]}})
    with pytest.raises(ConfigError, match="num_generations: at least 2"):
        load_config({**base, "method": {"type": "grpo", "num_generations": 1,
                                        "rewards": [{"function": "exact_match"}]}})
    with pytest.raises(ConfigError, match=r"method.rewards\[0\]: give either `model` \(a reward model\) or"):
        load_config({**base, "method": {"type": "grpo", "rewards": [{"model": "rm", "function": "exact_match"}]}})
    with pytest.raises(ConfigError, match=r"method.rewards\[0\].adapter: needs `model`"):
        load_config({**base, "method": {"type": "grpo", "rewards": [{"adapter": "rm/final"}]}})
    with pytest.raises(UserError, match=r"method.rewards\[0\].file: .*nope.py does not exist"):
        build_rewards([RewardSpec(function="f", file=str(tmp_path / "nope.py"))], 8)


# ------------------------------------------------------------------------------------------- split invariance
def _rollout_rows(variant, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, 1000, (3 + i % 3,), generator=g).tolist()
        completion = torch.randint(3, 1000, (2 + (5 * i) % 7,), generator=g).tolist()
        adv = float(torch.randn(1, generator=g, dtype=F64))
        rows.append(Encoded(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion, False,
                            values={"advantage": (adv,), "unit": (units(variant, [len(completion)])[0],)}))
    return rows


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_gradient_does_not_depend_on_the_split(model, tiny_model_dir, variant):
    """One rollout batch of 8 completions of unequal lengths, as 1 micro-batch of 8, 2 x 4, 4 x 2 and 8 x 1, each
    micro-batch's summed loss divided by the units of the whole batch (what the loop does): the same gradient, in
    float64 to the reorder bound, for every normalisation, with the KL term on (a frozen copy as reference)."""
    from transformers import AutoModelForCausalLM

    from tunelab.data.kinds import CHAT

    cfg = load_config({"model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": "x.json"}]},
                       "method": {"type": "grpo", "loss": variant, "beta": 0.04, "max_new_tokens": 8,
                                  "rewards": [{"function": "exact_match"}]}}).method
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=F64)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ctx = StepContext(config=cfg, loss_chunk=0, state={"reference": FrozenModel(ref)})
    rows = _rollout_rows(variant)
    grads = {}
    for size in (8, 4, 2, 1):
        model.zero_grad(set_to_none=True)
        batches = [CHAT.batch(rows[i:i + size], "none", 0, 64) for i in range(0, 8, size)]
        total = sum(loss_units(b) for b in batches)
        for b in batches:
            (policy_loss(model, b, ctx).loss_sum / total).backward()
        grads[size] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    n = chain_length({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "intermediate_size": 176, "vocab_size": 1000}, 16, tokens=8 * 16)
    for size in (4, 2, 1):
        for name, g in grads[size].items():
            ref_g = grads[8][name]
            torch.testing.assert_close(g, ref_g, atol=reorder_tol(float(ref_g.abs().max()), n), rtol=0, msg=name)
    assert any(float(g.abs().max()) > 0 for g in grads[8].values())


def test_entropy_is_the_sampling_distributions_at_trained_positions(model, tiny_model_dir):
    """The entropy metric: -sum p log p of the policy's next-token distribution at every completion position,
    summed in the loss's unit (tokens for dapo) like the loss, from the same chunked pass."""
    from tunelab.data.collate import model_inputs
    from tunelab.data.kinds import CHAT

    cfg = load_config({"model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": "x.json"}]},
                       "method": {"type": "grpo", "rewards": [{"function": "exact_match"}]}}).method
    rows = _rollout_rows("dapo", n=4)
    batch = CHAT.batch(rows, "none", 0, 64)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits[:, :-1]
        keep = batch["labels"][:, 1:] != IGNORE_INDEX
        logp = torch.log_softmax(logits[keep], -1)
        expected = -(logp.exp() * logp).sum()
    for chunk in (0, 4096, 5):
        got = policy_loss(model, batch, StepContext(config=cfg, loss_chunk=chunk)).metrics["entropy"]
        assert abs(got.item() - expected.item()) <= reorder_tol(expected.item(), 1000 * 40)


@pytest.mark.parametrize("packing", ["none", "padding_free"])
def test_stored_old_logps_line_up_with_the_batchs_tokens(model, tiny_model_dir, packing):
    """The sampling policy's per-token log-probabilities, stored on rolled-out rows, reach the loss in the order of
    its tokens, packed batches (sequences interleaved by bin) included: with the policy unchanged every ratio is
    1, so the loss and clip ratio equal those with the ratio taken against the policy itself."""
    from tunelab.data.kinds import CHAT
    from tunelab.methods.grpo import _old_logps

    cfg = load_config({"model": {"path": str(tiny_model_dir)}, "data": {"train": [{"path": "x.json"}]},
                       "method": {"type": "grpo", "loss": "dapo", "epsilon": 1e-6,
                                  "rewards": [{"function": "exact_match"}]}}).method
    ctx = StepContext(config=cfg, loss_chunk=0, device="cpu", tokenizer=SimpleNamespace(pad_token_id=0))
    rows = _rollout_rows("dapo", n=6)
    _old_logps(model, rows, ctx)
    model.eval()
    with_old = CHAT.batch(rows, packing, 0, 64, capacity=64 * 6)
    without = {k: v for k, v in with_old.items() if not k.startswith("old_logps")}
    a, b = policy_loss(model, with_old, ctx), policy_loss(model, without, ctx)
    # epsilon 1e-6: a ratio off by more than float64's roundings (~1e-15 here) would be clipped, and counted
    assert a.metrics["clip_ratio"].item() == 0
    assert abs(a.loss_sum.item() - b.loss_sum.item()) <= 1e-9 * max(1.0, abs(b.loss_sum.item()))


def test_inverse_cdf_draws_follow_the_distribution():
    """20,000 draws from [0.5, 0.3, 0.2, 0]: each frequency within 5 standard errors (sqrt(p(1-p)/n) <= 0.0036) of
    its probability, and the token of probability 0 never."""
    from tunelab.methods.sampling import _draw

    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[_draw(probs, [g])[0]] += 1
    freq = counts / 20000
    for f, p in zip(freq.tolist(), probs[0].tolist()):
        assert abs(f - p) <= 5 * math.sqrt(p * (1 - p) / 20000) + 1e-12
    assert counts[3] == 0


def test_repetition_penalty_by_hand():
    """A token already in the sequence: a positive logit divided by the penalty, a negative one multiplied."""
    import torch

    from tunelab.methods.sampling import penalize_repeats

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -2.0, 0.5, 3.0]]
    assert penalize_repeats(logits, seen, 1.0).tolist() == logits.tolist()
