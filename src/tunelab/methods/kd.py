"""Knowledge distillation on the one loop (method kd; docs/distillation.md).

The student learns, at every trained position (an sft row's assistant tokens, or every token of text with
method.data: text), the teacher's next-token distribution: the per-position divergence of methods/kd_losses.py
(forward KL, reverse KL or GKD's generalized JSD) between the two distributions at method.temperature, times T^2,
mixed with the data's cross-entropy by method.alpha. The loss is summed over trained tokens (the loop divides by the
global batch's), like sft's.

Only trained positions are computed, through the same exact paths as the SFT loss (methods/lm.py:
trained_head_values): the teacher runs one forward pass without gradients and hands over its final hidden states at
those positions; then, chunk by chunk, both heads produce their logits and the divergence, under activation
checkpointing, so neither model's vocabulary-wide logits exist for more than one chunk of positions at a time.
When the engine splits parameters across processes (ZeRO-3, FSDP2) both heads run inside their models' forwards
instead (all trained positions at once), as the SFT loss does there.

Teacher and student must share a vocabulary (`check_vocabulary`): the same token strings for the same ids. Their
logits may be of different widths (a model whose embedding is padded to a multiple of 64): the divergence is taken
over the first `width` ids, the smaller width, which must cover the tokenizer.

method.top_k keeps the teacher's k most likely tokens and one bucket for the rest of its mass; the student's
distribution is coarse-grained to the same k + 1 buckets. method.teacher_cache computes those top-k distributions
once, before the first step, into a folder (methods/kd_cache.py) and frees the teacher: the cached run computes the
same loss as the live one with that top_k, from float32 values read back.

method.lmbda > 0 is GKD's on-policy distillation: on that share of optimizer steps (drawn from the seed and the step,
so every process and a resumed run agree) the rollout replaces each row's last answer with one the student samples
from the row's prompt (methods/sampling.py, seeded per sequence), and the divergence is taken on the student's own
tokens (no cross-entropy term there: the sampled tokens are no target).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from tunelab.data.tokenize import IGNORE_INDEX, Encoded
from tunelab.errors import UserError
from tunelab.methods.base import ExtraModel, LossOutput, Method, Rollout, SetupContext, StepContext
from tunelab.methods.kd_cache import SHARD_ROWS, TeacherCache, fingerprint, row_key, trained_count
from tunelab.methods.kd_losses import distill_terms, log_distribution, topk_buckets, topk_indices
from tunelab.methods.lm import (
    decoder_states,
    head_logits,
    head_width,
    perplexity,
    trained_head_values,
    trained_positions,
    trained_tokens,
)
from tunelab.methods.sampling import SamplingOptions, merges_adapter, sample, sequence_seed
from tunelab.utils.numerics import at_least_fp32

ON_POLICY_STREAM = 1 << 41  # the seed stream that decides which steps are on-policy


def _models(cfg) -> dict[str, ExtraModel]:
    m = cfg.method
    return {"teacher": ExtraModel(source="path", path=m.teacher.path, adapter=m.teacher.adapter,
                                  what="method.teacher.adapter", during_training=not m.teacher_cache)}


def _reads(cfg) -> str:
    return cfg.method.data


def _rollout_shape(cfg) -> tuple[int, int]:
    """With lmbda > 0: one sampled answer per row, each row at most max_length + max_new_tokens tokens."""
    if not cfg.method.lmbda:
        return 0, 0
    return 1, cfg.data.max_length + cfg.method.max_new_tokens


def _rollout_merges(cfg, device: str) -> bool:
    return bool(cfg.method.lmbda) and cfg.adapter.type == "lora" and not getattr(cfg.adapter, "dora", False) \
        and merges_adapter(cfg.method.merge_adapter, device) and cfg.train.distributed not in ("zero3", "fsdp2")


# ---------------------------------------------------------------------------------------------------- vocabulary
def _teacher_vocab(path: str, adapter: str) -> dict[str, int] | None:
    """The teacher's tokenizer vocabulary (from its adapter folder when the run saved one there), or None when its
    folders hold no tokenizer."""
    for folder in (adapter, path):
        if folder and any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            from transformers import AutoTokenizer

            from tunelab.utils.env import quiet_transformers

            with quiet_transformers():
                return AutoTokenizer.from_pretrained(folder).get_vocab()
    return None


def check_vocabulary(student, teacher, tokenizer, teacher_vocab: dict[str, int] | None, *, student_name: str,
                     teacher_name: str) -> int:
    """The logit width both models' distributions are compared over; a mismatched vocabulary is refused with one
    line naming both models."""
    ws, wt = head_width(student), head_width(teacher)
    if teacher_vocab is not None and teacher_vocab != tokenizer.get_vocab():
        raise UserError(f"method.teacher.path: the teacher {teacher_name} has another vocabulary "
                        f"({len(teacher_vocab)} tokens) than the student {student_name} ({len(tokenizer)} tokens); "
                        "distillation compares distributions over the same tokens, so both need one tokenizer")
    width = min(ws, wt)
    if width < len(tokenizer) or (teacher_vocab is None and ws != wt):
        raise UserError(f"method.teacher.path: the teacher {teacher_name} predicts {wt} tokens and the student "
                        f"{student_name} {ws} (tokenizer: {len(tokenizer)}); they do not share a vocabulary")
    return width


# --------------------------------------------------------------------------------------------------------- setup
def _setup(ctx: SetupContext) -> None:
    cfg, step = ctx.config, ctx.step
    frozen = ctx.models["teacher"]
    teacher = cfg.teacher
    width = check_vocabulary(ctx.policy, frozen.module, step.tokenizer, _teacher_vocab(teacher.path, teacher.adapter),
                             student_name="model.path", teacher_name=teacher.path)
    step.state["kd"] = {"width": width, "teacher": frozen}
    if cfg.teacher_cache:
        if ctx.streaming:
            raise UserError("method.teacher_cache: computes the teacher's distributions of all rows before "
                            "training; not available with data.streaming")
        cache = TeacherCache(cfg.teacher_cache, {"teacher": fingerprint(teacher.path, teacher.adapter),
                                                 "top_k": cfg.top_k, "temperature": cfg.temperature, "width": width})
        cache.open(main=ctx.rank == 0, barrier=ctx.barrier)
        step.state["kd"]["cache"] = cache
    ctx.say(f"kd: teacher {teacher.path}{' + ' + teacher.adapter if teacher.adapter else ''}, {cfg.loss}"
            f"{f' (beta {cfg.beta})' if cfg.loss == 'jsd' else ''}, temperature {cfg.temperature}, alpha {cfg.alpha}"
            f", {'top ' + str(cfg.top_k) if cfg.top_k else 'whole vocabulary'} over {width} tokens"
            + (f", on-policy share {cfg.lmbda}" if cfg.lmbda else ""))


# ------------------------------------------------------------------------------------------------ teacher values
def _teacher_logits(teacher_model, batch, keep, ctx: StepContext) -> torch.Tensor | None:
    """With parameters split across processes: the teacher's logits at every trained position, from inside its own
    forward. Otherwise None (the hidden states are enough; the head runs per chunk)."""
    if not ctx.sharded_params:
        return None
    from tunelab.data.collate import model_inputs

    n = int(keep.sum())
    return teacher_model(**model_inputs(batch), use_cache=False, logits_to_keep=keep).logits.reshape(n, -1)


def _teacher_distribution(t_logits: torch.Tensor, cfg, width: int):
    """(the teacher's log-probabilities at the temperature: [n, width] or top-k buckets [n, k + 1], the top-k
    indices or None)."""
    t_logits = at_least_fp32(t_logits[:, :width])
    logp = log_distribution(t_logits, cfg.temperature)
    if not cfg.top_k or cfg.top_k >= width:
        return logp, None
    indices = topk_indices(t_logits, cfg.top_k)
    return topk_buckets(logp, indices), indices


def _terms(cfg, width: int, alpha: float):
    """The per-chunk function of the loss: (student logits, targets, teacher log-probabilities, top-k indices or
    None) -> [3, c]: each position's loss, alpha x NLL + (1 - alpha) x the divergence (times T^2), then the
    divergence and the NLL without gradient (metrics)."""

    def values(logits, targets, teacher, indices=None):
        div = distill_terms(logits[:, :width], teacher, loss=cfg.loss, temperature=cfg.temperature, beta=cfg.beta,
                            indices=indices)
        nll = torch.nn.functional.cross_entropy(at_least_fp32(logits), targets, reduction="none")
        loss = (1 - alpha) * div + alpha * nll if alpha else div
        return torch.stack([loss, div.detach(), nll.detach()])

    return values


def _live_terms(cfg, width: int, alpha: float, teacher_module, side_is_logits: bool):
    """The per-chunk function with a live teacher: its head over its hidden states at the chunk's positions (or,
    under split parameters, its logits computed in its forward), without gradient, then `_terms`."""
    values = _terms(cfg, width, alpha)

    def live(logits, targets, side):
        with torch.no_grad():
            t_logits = side if side_is_logits else head_logits(teacher_module, side)
            teacher, indices = _teacher_distribution(t_logits, cfg, width)
        return values(logits, targets, teacher, indices)

    return live


def _cached(batch, rows: torch.Tensor, cache: TeacherCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached teacher values of the batch's trained positions, in the order of `rows` (batch-major; each
    sequence's positions in order)."""
    shards, starts = batch["kd_shard"].tolist(), batch["kd_start"].tolist()
    rows = rows.cpu()
    counts = torch.bincount(rows, minlength=len(shards)).tolist()
    indices = logps = None
    for s in range(len(shards)):
        if not counts[s]:
            continue
        idx, lp = cache.read(int(shards[s]), int(starts[s]), counts[s])
        if indices is None:
            indices = torch.empty((rows.numel(), idx.shape[1]), dtype=torch.long)
            logps = torch.empty((rows.numel(), lp.shape[1]), dtype=torch.float32)
        at = rows == s
        if idx.shape[0] != counts[s]:
            raise RuntimeError("the teacher cache does not match the batch's trained positions")
        indices[at], logps[at] = idx, lp
    if indices is None:  # no trained position in this micro-batch
        k = int(cache.meta["top_k"])
        indices, logps = torch.empty((0, k), dtype=torch.long), torch.empty((0, k + 1))
    return indices, logps


def kd_loss(model, batch: dict[str, torch.Tensor], ctx: StepContext) -> LossOutput:
    """The distillation loss summed over the micro-batch's trained tokens (module docstring); metrics: the
    divergence and the student's NLL of the data (on sampled rows: of its own tokens)."""
    cfg, state = ctx.config, ctx.state["kd"]
    width = state["width"]
    alpha = 0.0 if "sampled" in batch else cfg.alpha
    if "kd_shard" in batch:  # offline: the cached top-k distributions
        _, _, rows = trained_positions(batch)
        indices, logps = _cached(batch, rows, state["cache"])
        values, _ = trained_head_values(model, batch, ctx, _terms(cfg, width, alpha), 3,
                                        extras=(logps.to(ctx.device), indices.to(ctx.device)))
    else:
        keep, _, _ = trained_positions(batch)
        with state["teacher"]() as teacher:
            side = _teacher_logits(teacher, batch, keep, ctx)
            fn = _live_terms(cfg, width, alpha, teacher, side_is_logits=side is not None)
            if side is None:
                side = decoder_states(teacher, batch, keep)
        values, _ = trained_head_values(model, batch, ctx, fn, 3, extras=(side,))
    return LossOutput(values[0].sum(), {"divergence": values[1].sum(), "nll": values[2].sum()})


# -------------------------------------------------------------------------------------------------- the cache
def _teacher_rows(frozen, batch, ctx: StepContext, cfg, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k (indices, buckets) at a batch's trained positions, in chunks of the loss's size, and
    the sequence of each position."""
    keep, _, rows = trained_positions(batch)
    with frozen() as teacher:
        side = _teacher_logits(teacher, batch, keep, ctx)
        states = decoder_states(teacher, batch, keep) if side is None else None
        chunk = max(1, min(ctx.loss_chunk or 4096, (32 << 20) // (4 * max(width, 1))))
        n = int(keep.sum())
        out_idx, out_lp = [], []
        for i in range(0, n, chunk):
            t_logits = side[i:i + chunk] if side is not None else head_logits(teacher, states[i:i + chunk])
            lp, idx = _teacher_distribution(t_logits, cfg, width)
            out_idx.append(idx.cpu())
            out_lp.append(lp.float().cpu())
    k = cfg.top_k
    indices = torch.cat(out_idx) if out_idx else torch.empty((0, k), dtype=torch.long)
    logps = torch.cat(out_lp) if out_lp else torch.empty((0, k + 1))
    return indices, logps, rows.cpu()


def _fill_cache(ctx: SetupContext, splits: list[list]) -> None:
    """method.teacher_cache: compute the rows no shard holds yet (split over the processes, each writing shards of
    its own), then give every row its place in the cache (``values["kd_shard"]``, ``values["kd_start"]``)."""
    cfg, state = ctx.config, ctx.step.state["kd"]
    cache: TeacherCache = state["cache"]
    rows = [r for split in splits for r in split]
    cache.refresh()
    missing: dict[str, Encoded] = {}
    for r in rows:
        key = row_key(r)
        if cache.lookup(r) is None and key not in missing:
            missing[key] = r
    todo = list(missing.values())
    share = todo[ctx.rank * len(todo) // ctx.world:(ctx.rank + 1) * len(todo) // ctx.world]
    t0 = time.perf_counter()
    if todo:
        ctx.say(f"kd: computing the teacher's top-{cfg.top_k} distributions of {len(todo)} rows into "
                f"{cfg.teacher_cache} ({len(rows) - len(todo)} rows there already)")
    frozen = state["teacher"]
    for start in range(0, len(share), SHARD_ROWS):
        part = share[start:start + SHARD_ROWS]
        keys, counts, idx_parts, lp_parts = [], [], [], []
        for chunk, batch in ctx.batches(part):
            indices, logps, seq = _teacher_rows(frozen, batch, ctx.step, cfg, state["width"])
            order = torch.argsort(seq, stable=True)  # row by row, each row's positions in order
            idx_parts.append(indices[order])
            lp_parts.append(logps[order])
            for i, r in enumerate(chunk):
                keys.append(row_key(r))
                counts.append(int((seq == i).sum()))
                if counts[-1] != trained_count(r):
                    raise RuntimeError("the teacher's positions do not match the row's trained tokens")
        cache.write_shard(keys, counts, torch.cat(idx_parts), torch.cat(lp_parts), ctx.rank)
    ctx.barrier()
    cache.refresh()
    for r in rows:
        found = cache.lookup(r)
        if found is None:
            raise UserError(f"method.teacher_cache: a row is missing from {cfg.teacher_cache} after computing it; "
                            "is the folder shared with another run writing to it?")
        shard, first, _ = found
        r.values["kd_shard"], r.values["kd_start"] = (float(shard),), (float(first),)
    if todo:
        ctx.say(f"kd: teacher cache ready in {time.perf_counter() - t0:.1f}s")
    else:
        ctx.say(f"kd: teacher cache {cfg.teacher_cache} holds all {len(rows)} rows; nothing computed")


def _prepare_rows(ctx: SetupContext, splits: list[list]) -> None:
    if ctx.config.teacher_cache:
        _fill_cache(ctx, splits)


# ------------------------------------------------------------------------------------------------ on-policy
def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether optimizer step `step` distills on the student's own samples: a draw from (seed, step) below
    lmbda, the same on every process and in a resumed run."""
    if lmbda <= 0:
        return False
    if lmbda >= 1:
        return True
    return sequence_seed(seed + ON_POLICY_STREAM, step, 0, 0) / 2 ** 63 < lmbda


def prompt_of(row: Encoded) -> list[int]:
    """The tokens before the row's last trained run (its last answer): what the student answers on-policy."""
    labels = row.labels
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    begin = end
    while begin > 0 and labels[begin - 1] != IGNORE_INDEX:
        begin -= 1
    return list(row.input_ids[:begin])


def _rollout(model, rows: list, ctx: StepContext):
    cfg = ctx.config
    if ctx.evaluating or not on_policy_step(ctx.seed, ctx.step, cfg.lmbda):
        return Rollout(rows, {"on_policy": (0.0, 1.0)})
    tok = ctx.tokenizer
    prompts = [prompt_of(r) for r in rows]
    seeds = [sequence_seed(ctx.seed, ctx.step, ctx.rollout_offset + i, 0) for i in range(len(rows))]
    opts = SamplingOptions(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sample_temperature,
                           top_p=cfg.sample_top_p,
                           merge_adapter=merges_adapter(cfg.merge_adapter, ctx.device) and not ctx.sharded_params)
    t0 = time.perf_counter()
    completions, truncated = sample(model, prompts, seeds, opts, stop_ids=ctx.template.stop_token_ids(tok),
                                    pad_id=tok.pad_token_id, device=ctx.device)
    seconds = time.perf_counter() - t0
    out = [Encoded(p + c, [IGNORE_INDEX] * len(p) + list(c), cut, r.source, values={"sampled": (1.0,)})
           for p, c, cut, r in zip(prompts, completions, truncated, rows)]
    tokens = float(sum(len(c) for c in completions))
    return Rollout(out, {"on_policy": (1.0, 1.0), "completion_length": (tokens, float(len(out))),
                         "generation_tokens_per_s": (tokens, seconds)})


KD = Method(
    name="kd", data_kind="chat", reads=_reads, loss=kd_loss, weight=trained_tokens, models=_models, setup=_setup,
    prepare_rows=_prepare_rows, rollout=_rollout, rollout_shape=_rollout_shape, rollout_merges=_rollout_merges,
    eval_metrics=perplexity, progress=(("divergence", "kd"), ("nll", "nll")),
    describe="Knowledge distillation: the teacher's next-token distributions on the trained positions "
             "(forward/reverse KL, JSD; top-k, an offline teacher cache, on-policy GKD).")
