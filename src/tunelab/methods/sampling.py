"""Rollout sampling: batched generation on the policy with a KV cache, seeded per sequence.

Every sequence draws its tokens from its own `torch.Generator`, seeded from (train.seed, step, the prompt's index in
the global batch, the sample's index in its group). So a completion does not depend on which process generated it or
how the global batch was split: a 2-process run samples what a 1-process run samples, and a resumed run what the
uninterrupted run did (up to the last bits of logits computed in batches of another size, which can flip a draw that
falls within a rounding of a boundary).

Prompts are left-padded (generation continues at the last position for every row), positions count real tokens
only, and a sequence stops at the first of the template's stop ids (kept: the model learns to stop) or after
`max_new_tokens` (then it is marked truncated). Sampling is temperature / top-k / top-p over fp32 logits; temperature
0 is greedy.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache

import torch

from tunelab.methods.lm import _accepts_logits_to_keep, head_width
from tunelab.models.wrappers import core_model
from tunelab.utils.numerics import at_least_fp32


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    # > 1 discourages tokens already in the sequence (prompt or answer so far): a positive logit is divided by it, a
    # negative one multiplied (transformers' RepetitionPenaltyLogitsProcessor); 1: off
    repetition_penalty: float = 1.0
    # plain LoRA layers sample with their adapter merged into a temporary copy of the base weight (one GEMM per layer;
    # models/fused_lora.py: merged_for_sampling): the same policy up to rounding, the base untouched
    merge_adapter: bool = False


def merges_adapter(setting: str, device) -> bool:
    """method.merge_adapter: on, off, or auto (on when sampling on the CPU)."""
    if setting == "auto":
        return str(device).split(":")[0] == "cpu"
    return setting == "on"


def sequence_seed(seed: int, step: int, prompt: int, sample: int) -> int:
    """A 63-bit seed for sample `sample` of prompt `prompt` (its index in the global batch) at step `step`."""
    x = (seed * 1_000_003 + step) * 1_000_033 + prompt
    x = x * 1_000_037 + sample
    x ^= x >> 29
    x = (x * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    x ^= x >> 32
    return x & ((1 << 63) - 1)


def _filter(logits: torch.Tensor, opts: SamplingOptions) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) on [B, V] fp32 logits; removed entries become -inf."""
    logits = logits / opts.temperature
    if opts.top_k and opts.top_k < logits.shape[-1]:
        kth = torch.topk(logits, opts.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if opts.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= opts.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@torch.no_grad()
def sample(model, prompts: list[list[int]], seeds: list[int], opts: SamplingOptions, *, stop_ids: list[int],
           pad_id: int, device) -> tuple[list[list[int]], list[bool]]:
    """One completion per (prompt, seed): token ids (ending with a stop id unless truncated) and whether
    `max_new_tokens` cut it. The model runs in eval mode and is put back as it was."""
    from tunelab.models.fused_lora import merged_for_sampling

    was_training = model.training
    model.eval()
    try:
        with merged_for_sampling(model) if opts.merge_adapter else contextlib.nullcontext():
            return _sample(model, prompts, seeds, opts, stop_ids=stop_ids, pad_id=pad_id, device=device)
    finally:
        model.train(was_training)


def _draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row by inverse-CDF sampling: a uniform from the row's own generator, located in the row's
    cumulative distribution (float64). Each row depends on its own probabilities and generator only; ~10x faster
    than a multinomial call per row over a large vocabulary. u is drawn in (0, 1] and scaled by the row's total, so a
    token of probability 0 is never drawn."""
    u = torch.stack([1 - torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    cdf = torch.cumsum(probs.to(torch.float64), dim=-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(1)
    return idx.clamp(max=probs.shape[-1] - 1)


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Repetition penalty on [B, V] logits: where `seen`, a positive logit is divided by `penalty` and a negative
    one multiplied by it (Keskar et al., 2019, as transformers applies it)."""
    scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen[:, :logits.shape[-1]], scaled, logits)


def _cache_argument(model) -> str:
    """The forward's KV-cache argument: `cache` in transformers >= 5.24, `past_key_values` before."""
    return _cache_argument_of(type(core_model(model)))


@lru_cache(maxsize=32)
def _cache_argument_of(forward_cls: type) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(forward_cls.forward).parameters else "past_key_values"


def _sample(model, prompts, seeds, opts, *, stop_ids, pad_id, device):
    n = len(prompts)
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    mask = torch.zeros((n, longest), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p):] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(n)]
    cache = None
    cache_key = _cache_argument(model)
    keep_last = {"logits_to_keep": 1} if _accepts_logits_to_keep(type(core_model(model))) else {}
    step_ids, step_pos = input_ids, positions
    seen = None
    if opts.repetition_penalty != 1.0:  # the tokens of each sequence so far (padding excluded)
        seen = torch.zeros((n, head_width(model)), dtype=torch.bool)
        for i, p in enumerate(prompts):
            seen[i, torch.tensor(p, dtype=torch.long)] = True
    for _ in range(opts.max_new_tokens):
        result = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos,
                       use_cache=True, **{cache_key: cache}, **keep_last)
        cache = getattr(result, "cache", None) if cache_key == "cache" else result.past_key_values
        logits = at_least_fp32(result.logits[:, -1]).float().cpu()
        if seen is not None:
            logits = penalize_repeats(logits, seen, opts.repetition_penalty)
        if opts.temperature > 0:
            nxt = _draw(torch.softmax(_filter(logits, opts), dim=-1), generators)
        else:
            nxt = logits.argmax(-1)
        nxt = nxt.to(device)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        if seen is not None:
            live = (~done).cpu()
            seen[torch.nonzero(live).flatten(), nxt.cpu()[live]] = True
        for i in torch.nonzero(~done).flatten().tolist():
            out[i].append(int(nxt[i]))
        done = done | torch.isin(nxt, stop)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
    truncated = [not (ids and ids[-1] in set(stop_ids)) for ids in out]
    return out, truncated
