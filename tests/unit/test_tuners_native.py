"""tunelab's own PEFT methods (models/tuners): bottleneck adapters, BitFit, LoReFT.

For each method: only its parameters train, a tiny batch is memorised, save -> load reproduces the logits, a
malformed folder is refused; plus each method's own promise (bottleneck: no change at init; BitFit: merge and reload
as a plain transformers model; ReFT: exactly the chosen positions are edited, and generation with and without a
KV cache agree).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.tolerance import logits_tol, reorder_tol
from tunelab.config.schema import BitFitAdapter, BottleneckAdapter, ReftAdapter
from tunelab.errors import UserError
from tunelab.models import tuners
from tunelab.models.adapters import count_parameters
from tunelab.models.tuners import io, reft

CONFIGS = {
    "bottleneck": lambda: BottleneckAdapter(reduction=8),
    "bitfit": lambda: BitFitAdapter(add_bias=True),
    "reft": lambda: ReftAdapter(r=4, first=2, last=2),
}


def _base(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def _tuned(folder, cfg):
    torch.manual_seed(0)
    return tuners.apply_tuner(_base(folder), cfg)


def _batch() -> dict[str, torch.Tensor]:
    """Two right-padded rows: a 5-token prompt + 7 trained tokens, and a 3-token prompt + 5 trained + 4 pads."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (2, 12), generator=g)
    ids[1, 8:] = 0
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, :3] = -100
    labels[1, 8:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "token_mask": mask.bool()}


def _loss(model, batch) -> torch.Tensor:
    tuners.before_forward(model, batch)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def _train(model, batch, steps: int, lr: float = 1e-2) -> list[float]:
    # Every parameter goes to the optimizer: a frozen one must stay put because it gets no gradient.
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _logits(model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _base_names(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(io.CONTAINER + ".")}


# ------------------------------------------------------------------------------------------------------- common
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_only_the_method_trains(tiny_model_dir, kind):
    model = _tuned(tiny_model_dir, CONFIGS[kind]())
    assert tuners.tuner_of(model) == kind
    trained = tuners.tuner_state(model)
    assert trained and all(p.requires_grad for p in trained.values())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in trained.values()}
    assert count_parameters(model).trainable == sum(p.numel() for p in trained.values())

    base_before = _base_names(model)
    tuned_before = {k: v.detach().clone() for k, v in trained.items()}
    _train(model, _batch(), steps=3)
    base_after = _base_names(model)
    changed_base = {k for k in base_before if not torch.equal(base_before[k], base_after[k])}
    changed_tuned = {k for k, v in tuners.tuner_state(model).items() if not torch.equal(v, tuned_before[k])}
    assert changed_tuned == set(trained)  # every trained tensor moved
    if kind == "bitfit":  # the trained tensors are the model's own biases, and nothing else moved
        assert changed_base == set(trained)
    else:
        assert changed_base == set()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_memorises_a_tiny_batch(tiny_model_dir, kind):
    # The tiny random model's logits are bounded (embeddings of std 0.02 read a normalised hidden state), so even
    # a perfect fit only gets about 0.5 nats below the starting ~7: ask for most of that.
    model = _tuned(tiny_model_dir, CONFIGS[kind]()).train()
    losses = _train(model, _batch(), steps=20, lr=2e-2)
    assert losses[-1] < losses[0] - 0.3, losses
    if kind == "reft":  # R keeps orthonormal rows under AdamW's weight decay
        for intervention in model.tunelab_tuner.layers.values():
            rot = intervention.rotate.weight
            # R is rebuilt from its parameters at every call: r Householder reflections of length `hidden`, then
            # R R^T's dot products of unit rows (sum |terms| <= 1): (r + 1) x hidden roundings in float32
            r, hidden = rot.shape
            tol = reorder_tol(1.0, (r + 1) * hidden, torch.float32, cond=1.0)
            torch.testing.assert_close(rot @ rot.T, torch.eye(r), atol=tol, rtol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_save_load_gives_identical_logits(tiny_model_dir, tmp_path, kind):
    model = _tuned(tiny_model_dir, CONFIGS[kind]())
    _train(model, _batch(), steps=3)
    if kind == "reft":
        reft.set_prompt_lengths(model, None)  # compare at inference positions
    batch = _batch()
    expected = _logits(model, batch["input_ids"], batch["attention_mask"])

    tuners.save_tuner(model, tmp_path / "adapter")
    assert tuners.is_tuner_folder(tmp_path / "adapter") and not tuners.is_tuner_folder(tmp_path)
    meta = json.loads((tmp_path / "adapter" / io.ADAPTER_JSON).read_text())
    assert meta["tunelab_adapter"] == kind and meta["format"] == 1
    assert "path" not in meta["config"] and meta["config"]["type"] == kind
    saved = load_file(tmp_path / "adapter" / io.WEIGHTS_FILE)
    assert saved.keys() == tuners.tuner_state(model).keys()

    loaded = tuners.load_tuner(_base(tiny_model_dir), tmp_path / "adapter")
    assert tuners.tuner_of(loaded) == kind
    assert not any(p.requires_grad for p in loaded.parameters())
    # the same weights through the same hooks and code: bit for bit
    torch.testing.assert_close(_logits(loaded, batch["input_ids"], batch["attention_mask"]), expected,
                               atol=0, rtol=0)

    # adapter.path: continue training from the folder
    cfg = CONFIGS[kind]()
    cfg.path = str(tmp_path / "adapter")
    resumed = tuners.apply_tuner(_base(tiny_model_dir), cfg)
    assert {id(p) for p in resumed.parameters() if p.requires_grad} == {
        id(p) for p in tuners.tuner_state(resumed).values()}
    torch.testing.assert_close(_logits(resumed, batch["input_ids"], batch["attention_mask"]), expected,
                               atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tuner_state_restores_exactly(tiny_model_dir, kind):
    model = _tuned(tiny_model_dir, CONFIGS[kind]())
    snapshot = {k: v.detach().clone() for k, v in tuners.tuner_state(model).items()}
    _train(model, _batch(), steps=2)
    tuners.load_tuner_state(model, snapshot)
    for k, v in tuners.tuner_state(model).items():
        assert torch.equal(v, snapshot[k]), k


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_generate_and_gradient_checkpointing(tiny_model_dir, kind):
    model = _tuned(tiny_model_dir, CONFIGS[kind]())
    _train(model, _batch(), steps=3)  # leaves ReFT's training prompts set: generate must not use them
    ids = _batch()["input_ids"][:1, :6]
    cached = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    uncached = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.shape[1] > ids.shape[1] and torch.equal(cached, uncached)

    # The same loss and gradients with activation checkpointing (the hooks run once per layer call, and the
    # recomputation sees the same edits): the recomputed forward and the backward repeat the same operations in
    # the same order, so bit for bit.
    model.train()
    model.zero_grad(set_to_none=True)
    plain = _loss(model, _batch())
    plain.backward()
    grads = {k: v.grad.clone() for k, v in tuners.tuner_state(model).items()}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ckpt = _loss(model, _batch())
    ckpt.backward()
    torch.testing.assert_close(ckpt, plain, atol=0, rtol=0)
    for k, v in tuners.tuner_state(model).items():
        torch.testing.assert_close(v.grad, grads[k], atol=0, rtol=0, msg=k)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_bf16_base_and_wrapped_model(tiny_model_dir, kind):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = tuners.apply_tuner(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16),
                               CONFIGS[kind]())
    for name, p in tuners.tuner_state(model).items():  # own modules train in fp32; BitFit biases match their layer
        assert p.dtype == (torch.bfloat16 if kind == "bitfit" else torch.float32), name

    class Wrapper(torch.nn.Module):  # what DDP looks like to the loop: the model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **kwargs):
            return self.module(**kwargs)

    wrapped = Wrapper(model)
    assert tuners.tuner_of(wrapped) == kind and tuners.tuner_state(wrapped).keys() == tuners.tuner_state(model).keys()
    batch = _batch()
    tuners.before_forward(wrapped, batch)
    out = wrapped(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tuners.tuner_state(model).values())
    generated = model.generate(batch["input_ids"][:1, :5], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert generated.shape[1] > 5


def test_malformed_folders_are_refused(tiny_model_dir, tmp_path):
    model = _tuned(tiny_model_dir, BottleneckAdapter(reduction=8))
    folder = tmp_path / "adapter"
    tuners.save_tuner(model, folder)
    weights = folder / io.WEIGHTS_FILE
    good = load_file(weights)

    bad = dict(good)
    bad["layers.0.attn.down.weight"] = torch.zeros(3, 64)
    save_file(bad, weights)
    with pytest.raises(UserError, match=r"layers\.0\.attn\.down\.weight.*shape") as e:
        tuners.load_tuner(_base(tiny_model_dir), folder)
    assert str(folder) in str(e.value)

    missing = {k: v for k, v in good.items() if k != "layers.1.mlp.up.bias"}
    save_file(missing, weights)
    with pytest.raises(UserError, match=r"layers\.1\.mlp\.up\.bias is missing"):
        tuners.load_tuner(_base(tiny_model_dir), folder)

    save_file({**good, "layers.7.attn.up.bias": torch.zeros(64)}, weights)
    with pytest.raises(UserError, match=r"unexpected tensor layers\.7\.attn\.up\.bias"):
        tuners.load_tuner(_base(tiny_model_dir), folder)

    # the tensors fit reduction 8; a config that says 16 makes every bottleneck the wrong size
    save_file(good, weights)
    meta = json.loads((folder / io.ADAPTER_JSON).read_text())
    meta["config"]["reduction"] = 16
    (folder / io.ADAPTER_JSON).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="shape"):
        tuners.load_tuner(_base(tiny_model_dir), folder)

    weights.write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read adapter weights"):
        tuners.load_tuner(_base(tiny_model_dir), folder)

    with pytest.raises(UserError, match="holds a bottleneck adapter"):
        tuners.apply_tuner(_base(tiny_model_dir), ReftAdapter(path=str(folder)))
    with pytest.raises(UserError, match="not a tunelab adapter folder"):
        tuners.load_tuner(_base(tiny_model_dir), tmp_path)


def test_registry_and_constants():
    assert tuners.TUNERS == {"bottleneck": tuners.bottleneck, "bitfit": tuners.bitfit, "reft": tuners.reft}
    for name, module in tuners.TUNERS.items():
        assert isinstance(module.TRAINS, str) and module.TRAINS.endswith(".")
        assert tuners.mergeable(name) is module.MERGEABLE is (name == "bitfit")


@pytest.mark.parametrize("kind", ["bottleneck", "reft"])
def test_unmergeable_types_say_so(tiny_model_dir, kind):
    model = _tuned(tiny_model_dir, CONFIGS[kind]())
    with pytest.raises(UserError, match=f"adapter type {kind} cannot be merged.*chat --adapter"):
        tuners.merge_tuner(model)


# --------------------------------------------------------------------------------------------------- bottleneck
def test_bottleneck_is_the_identity_at_init_and_respects_layers(tiny_model_dir):
    batch = _batch()
    expected = _logits(_base(tiny_model_dir), batch["input_ids"], batch["attention_mask"])
    model = _tuned(tiny_model_dir, BottleneckAdapter(reduction=4, activation="gelu", dropout=0.1))
    assert not model.tunelab_tuner.training  # from_pretrained gives an eval model: no dropout in the adapters
    assert torch.equal(_logits(model, batch["input_ids"], batch["attention_mask"]), expected)

    last = _tuned(tiny_model_dir, BottleneckAdapter(where=["mlp"], layers=[-1]))
    assert set(tuners.tuner_state(last)) == {f"layers.1.mlp.{m}.{p}" for m in ("down", "up")
                                             for p in ("weight", "bias")}
    assert tuners.tuner_state(last)["layers.1.mlp.down.weight"].shape == (64 // 16, 64)
    with pytest.raises(UserError, match="out of range"):
        _tuned(tiny_model_dir, BottleneckAdapter(layers=[2]))


# ------------------------------------------------------------------------------------------------------- bitfit
def test_bitfit_needs_biases_or_add_bias(tiny_model_dir):
    with pytest.raises(UserError, match=r"add_bias=true"):
        _tuned(tiny_model_dir, BitFitAdapter())
    model = _tuned(tiny_model_dir, BitFitAdapter(add_bias=True))
    names = set(tuners.tuner_state(model))
    assert "model.layers.0.self_attn.q_proj.bias" in names and "model.layers.1.mlp.down_proj.bias" in names
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers; not lm_head or embeddings
    assert model.lm_head.bias is None
    batch = _batch()
    expected = _logits(_base(tiny_model_dir), batch["input_ids"], batch["attention_mask"])
    assert torch.equal(_logits(model, batch["input_ids"], batch["attention_mask"]), expected)  # zero biases


def test_bitfit_merges_into_a_plain_model_that_reloads(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tuned(tiny_model_dir, BitFitAdapter(add_bias=True))
    _train(model, _batch(), steps=3)
    batch = _batch()
    expected = _logits(model, batch["input_ids"], batch["attention_mask"])

    merged = tuners.merge_tuner(model)
    assert tuners.tuner_of(merged) is None
    assert merged.config.attention_bias is True and merged.config.mlp_bias is True
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert type(reloaded) is type(_base(tiny_model_dir))
    # b + delta folded into one bias (one rounding each) against adding them in the forward: reordered sums
    torch.testing.assert_close(_logits(reloaded, batch["input_ids"], batch["attention_mask"]), expected,
                               atol=logits_tol(expected, tiny_model_dir), rtol=0)


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    return Qwen2ForCausalLM(config).eval()


def test_bitfit_on_a_model_with_biases_and_an_inexpressible_merge():
    # Qwen2 has q/k/v biases: BitFit trains them as they are, and merging needs no config change.
    model = tuners.apply_tuner(_tiny_qwen2(), BitFitAdapter())
    assert set(tuners.tuner_state(model)) == {f"model.layers.0.self_attn.{m}_proj.bias" for m in "qkv"}
    assert tuners.tuner_of(tuners.merge_tuner(model)) is None
    # add_bias gives o_proj and the MLP biases, which no Qwen2 config can ask for.
    model = tuners.apply_tuner(_tiny_qwen2(), BitFitAdapter(add_bias=True))
    with pytest.raises(UserError, match="cannot express"):
        tuners.merge_tuner(model)
    assert tuners.tuner_of(model) == "bitfit"  # still usable as an adapter


# --------------------------------------------------------------------------------------------------------- reft
def _differing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(batch, seq) positions whose logits are not bit-identical."""
    return (a != b).any(dim=-1)


def test_reft_edits_exactly_the_chosen_positions(tiny_model_dir):
    # Only the last layer is edited: its output reaches the logits position by position (final norm + lm_head),
    # so the positions whose logits differ from the base model's are exactly the edited ones.
    model = _tuned(tiny_model_dir, ReftAdapter(layers=[-1], r=4, first=2, last=1))
    base = _base(tiny_model_dir)
    batch = _batch()  # prompts of 5 and 3 tokens
    ids, mask = batch["input_ids"], batch["attention_mask"]

    tuners.before_forward(model, batch)
    training = torch.zeros(2, 12, dtype=torch.bool)
    training[0, [0, 1, 4]] = True
    training[1, [0, 1, 2]] = True
    assert torch.equal(_differing(_logits(model, ids, mask), _logits(base, ids, mask)), training)

    # inference: the whole non-pad input is the prompt, whichever side the padding is on
    reft.set_prompt_lengths(model, None)
    left = torch.ones(2, 8, dtype=torch.long)
    left[0, :2] = 0
    ids8 = ids[:, :8]
    inference = torch.zeros(2, 8, dtype=torch.bool)
    inference[0, [2, 3, 7]] = True
    inference[1, [0, 1, 7]] = True
    assert torch.equal(_differing(_logits(model, ids8, left), _logits(base, ids8, left)), inference)

    # a packed row (no attention mask, positions restart per sequence): each sequence's prompt is edited
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    labels = ids[:1].clone()
    labels[0, [0, 1, 2, 5, 6, 7, 8]] = -100  # prompts of 3 and 4 tokens
    tuners.before_forward(model, {"input_ids": ids[:1], "labels": labels, "position_ids": position_ids})
    packed = torch.zeros(1, 12, dtype=torch.bool)
    packed[0, [0, 1, 2, 5, 6, 8]] = True
    with torch.no_grad():
        tuned_packed = model(input_ids=ids[:1], position_ids=position_ids).logits
        base_packed = base(input_ids=ids[:1], position_ids=position_ids).logits
    assert torch.equal(_differing(tuned_packed, base_packed), packed)

    # set_prompt_lengths: per-row prompt lengths, clipped to the prompt (a 1-token prompt: one position)
    reft.set_prompt_lengths(model, [1, 4])
    chosen = torch.zeros(2, 12, dtype=torch.bool)
    chosen[0, 0] = True
    chosen[1, [0, 1, 3]] = True
    assert torch.equal(_differing(_logits(model, ids, mask), _logits(base, ids, mask)), chosen)


def test_reft_training_prompts_of_packed_and_plain_rows():
    # One packed row: a sequence with a 3-token prompt, one with a 2-token prompt, tail padding (own positions).
    labels = torch.tensor([[-100, -100, -100, 5, 6, -100, -100, 7, 8, 9, -100, -100]])
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]])
    token_mask = torch.tensor([[True] * 10 + [False] * 2])
    prompt, segments = reft.training_prompt({"labels": labels, "position_ids": position_ids,
                                             "token_mask": token_mask})
    assert prompt.long().tolist() == [[1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]]
    assert segments.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]]
    chosen = reft.choose_positions(prompt, first=1, last=1, segments=segments)
    assert chosen.long().tolist() == [[1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0]]
    # Plain-text rows train from the first token: the prompt is that token, marked or not (it is never a target).
    for first_label in (-100, 11):
        labels = torch.tensor([[first_label, 12, 13, 14]])
        prompt, _ = reft.training_prompt({"labels": labels})
        assert prompt.long().tolist() == [[1, 0, 0, 0]]
    # A row with no trained token is all prompt.
    prompt, _ = reft.training_prompt({"labels": torch.full((1, 4), -100)})
    assert prompt.all()


def test_reft_generation_of_a_left_padded_batch(tiny_model_dir):
    model = _tuned(tiny_model_dir, ReftAdapter(r=4, first=2, last=2))
    _train(model, _batch(), steps=5)
    ids = _batch()["input_ids"][:, :6]
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as for batched generation
    kwargs = {"attention_mask": mask, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(ids, **kwargs)
    uncached = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape[1] > ids.shape[1]
    assert torch.equal(cached, uncached)
    # the edits are there: the prompt's logits are not the base model's
    reft.set_prompt_lengths(model, None)
    base = _base(tiny_model_dir)
    assert _differing(_logits(model, ids, mask), _logits(base, ids, mask)).any()


def test_reft_leaves_cached_decoding_steps_alone(tiny_model_dir):
    # Last layer only: an edit reaches no other position (the KV cache holds layer inputs), so a decoding step that
    # is not edited gives exactly the base model's logits, while a fresh forward over the same tokens edits its end.
    model = _tuned(tiny_model_dir, ReftAdapter(layers=[-1], r=4, first=1, last=1))
    base = _base(tiny_model_dir)
    ids = _batch()["input_ids"][:1, :7]
    with torch.no_grad():
        steps = []
        for m in (model, base):
            out = m(input_ids=ids[:, :6], use_cache=True)
            steps.append(m(input_ids=ids[:, 6:], cache=out.cache, use_cache=True).logits[:, -1])
    assert torch.equal(steps[0], steps[1])
    assert not torch.equal(_logits(model, ids)[:, -1], _logits(base, ids)[:, -1])


def test_reft_deepcopy_uses_its_own_interventions(tiny_model_dir):
    import copy

    model = _tuned(tiny_model_dir, ReftAdapter(r=2, first=1, last=1))
    ids = _batch()["input_ids"]
    before = _logits(model, ids)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuners.tuner_state(twin).values():
            p.mul_(0.5)
    assert torch.equal(_logits(model, ids), before)
    assert not torch.equal(_logits(twin, ids), before)
