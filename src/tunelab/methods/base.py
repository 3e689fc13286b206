"""The method contract: what a training method gives the one loop, and what the loop gives a method.

A method is a module that builds a `Method`: the data kind it reads (data/kinds.py), its loss as a pure function of
(model, batch, StepContext) and the unit its loss is counted in (`weight`). Optional hooks let it bring what it needs
without the loop knowing about it:

- `models(cfg)`: the models it needs beside the policy (a reference policy, a teacher, a critic), by role; the
  loop builds each one (`ExtraModel`: the policy with its adapter disabled, a second copy of the base model, or
  another model folder), `plan` counts their memory, and `setup` receives the frozen ones as `FrozenModel`s and the
  trainable ones (a critic) as modules in `ctx.trained`;
- `setup(ctx)`: runs once, after the policy and its adapter are built and before the optimizer is: it may change
  what trains (rm's new score head), add modules of its own to `ctx.trained` (PPO's value head) and fills
  `ctx.step` (the `StepContext` every loss call receives). Every module in `ctx.trained` trains beside the policy:
  the loop puts it in the optimizer, wraps it for data parallelism, clips its gradients with the policy's, saves it
  in checkpoints and in RUN/final/<role>, and hands it to the loss as `StepContext.trained[role]`;
- `prepare_rows(ctx, splits)`: runs once over the token rows in memory before the first step (with a stream, over
  each global batch as it is drawn); values it computes live on the rows (`row.values`), and every batch built from
  those rows carries them as tensors (DPO's precomputed reference log-probabilities);
- `rollout(model, rows, ctx)`: turns a global batch of rows of `data_kind` (prompts) into the trainable rows of
  `rollout_kind` before they are split into micro-batches, so the loss weight is counted after the rollout; it may
  return a `Rollout` to log metrics of its own (rewards, lengths), and the loop logs its time apart (rollout_s);
  `rollout_steps(cfg)` > 1 trains that many optimizer steps on each rollout (PPO-style inner epochs);
  `finish_rollout(rows, ctx, limit, last)` then sees the whole rolled-out global batch on every process (statistics
  over the batch: GRPO's batch-scaled advantages, PPO's whitening) and returns the rows to train on, at most
  `limit` (or a `Rollout` with metrics of the whole batch, not summed over processes); when it keeps fewer (DAPO's
  dynamic sampling drops groups without signal) and `rollout_refills(cfg)` > 0, the loop rolls out further prompts
  and calls it again on everything sampled so far; `last` says no refill follows (return a full batch then);
- `progress` and `eval_metrics`: what the progress line, the summary and the evaluation report beside the loss.

The loop owns everything else: accumulation, precision, clipping, logging, checkpointing and distribution.

Normalisation: `loss` returns the loss *summed* over the method's units (trained tokens for language-model losses,
pairs for preference losses) and `weight` counts those units in a micro-batch before the forward pass. The loop divides
by the total weight of the whole accumulated global batch (all micro-batches, all ranks), so the gradient does not
depend on how a batch is split into micro-batches or processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LossOutput:
    loss_sum: torch.Tensor  # scalar: the loss summed over this micro-batch's units
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # also sums over units; the loop averages


@dataclass
class StepContext:
    """What a loss (and a rollout) may need beyond (model, batch): options of the run, and what setup added."""

    loss_chunk: int = 4096  # trained positions per LM-head/cross-entropy chunk (0: naive full logits)
    # the parameters are split across processes (ZeRO-3, FSDP2): the LM head must run inside the model's forward,
    # where the engine gathers it (methods/lm.py: no chunks recomputed outside it), and sampling keeps LoRA unmerged
    sharded_params: bool = False
    config: Any = None  # the method's own config section (beta, loss variant, ...)
    # the reference policy's per-sequence summed log-probabilities of a batch's trained tokens (no grad), for
    # methods with a reference (methods/preference.py: setup_reference)
    reference: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    state: dict[str, Any] = field(default_factory=dict)  # anything else a method's setup keeps (a teacher, ...)
    tokenizer: Any = None
    template: Any = None  # the run's chat template (data.templates.ChatTemplate)
    max_length: int = 0  # data.max_length
    device: Any = None
    seed: int = 0  # train.seed
    step: int = 0  # optimizer steps done before the one in progress
    total_steps: int = 0
    # the index of a rollout's first row within the global batch (each process rolls out a contiguous share), or
    # within the validation rows when `evaluating`
    rollout_offset: int = 0
    evaluating: bool = False
    # the modules that train beside the policy (SetupContext.trained), as the loss calls them (wrapped for DDP)
    trained: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """What a rollout may return instead of a plain list of rows: the rows, and metrics of the rollout itself as
    (sum, count) pairs (reward per function, completion lengths, ...). The loop adds sums and counts over processes
    and the steps of a logging window and logs sum / count (`mean`); a name ending in ``_max``/``_min`` is
    reduced by max/min instead, with count ignored."""

    rows: list
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtraModel:
    """A frozen model a method needs beside the policy.

    source: "adapter_off" (the policy itself with its peft adapter disabled: no second copy in memory), "copy" (the
    base model loaded a second time, as model.* describes it) or "path" (the model folder `path`, e.g. a teacher,
    with `adapter` merged into it when given).
    during_training: False when the method uses it only before the first step (prepare_rows) and lets it go.
    trainable: the model trains beside the policy, in full (a critic; source copy or path); head: "lm" or "score"
    (a scalar head, loaded as transformers' *ForSequenceClassification, e.g. an rm run's model)."""

    source: str
    path: str = ""
    adapter: str = ""  # source path: an adapter folder trained on it, merged into the loaded weights (a teacher)
    what: str = ""  # the config key of `adapter`, for messages (method.teacher.adapter)
    during_training: bool = True
    trainable: bool = False
    head: str = "lm"


class FrozenModel:
    """A model used without gradients, in eval mode (no dropout) and under the run's autocast: a fixed function of
    its inputs. ``with frozen() as model:`` gives the module to call."""

    def __init__(self, module, *, disable: Callable[[], Any] | None = None,
                 autocast: Callable[[], Any] = contextlib.nullcontext, source: str = "copy"):
        self.module, self.source = module, source
        self._disable, self._autocast = disable, autocast

    @contextlib.contextmanager
    def __call__(self) -> Iterator[Any]:
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.no_grad(), (self._disable() if self._disable else contextlib.nullcontext()), self._autocast():
                yield self.module
        finally:
            self.module.train(was_training)


@dataclass
class SetupContext:
    """What the loop hands `Method.setup` and `Method.prepare_rows`."""

    config: Any  # the method's config section
    step: StepContext  # what every loss call receives: setup fills reference / state
    policy: Any  # the model being trained (adapter applied, not yet wrapped for data parallelism)
    models: dict[str, FrozenModel]  # the frozen models `Method.models` asked for, by role
    # modules that train beside the policy, by role: the trainable models `Method.models` asked for, and any setup
    # adds (the module docstring)
    trained: dict[str, torch.nn.Module] = field(default_factory=dict)
    streaming: bool = False  # training rows come from a stream (prepare_rows then sees one global batch at a time)
    # rows -> (rows of one micro-batch, its tensors on the device), padded, train.batch_size rows at a time
    batches: Callable[[list], Iterator[tuple[list, dict[str, torch.Tensor]]]] | None = None
    say: Callable[[str], None] = lambda line: None  # a line for the run's output (main process)
    # the processes of a multi-process run: prepare_rows may split work over them and meet at `barrier`
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Method:
    name: str
    data_kind: str  # the rows it reads: a key of data.kinds.KINDS (chat, text, pairs, kto, prompts)
    loss: Callable[[Any, dict[str, torch.Tensor], StepContext], LossOutput]
    weight: Callable[[dict[str, torch.Tensor]], int]
    describe: str = ""
    head: str = "lm"  # the model the method trains: "lm" (a causal LM) or "score" (a scalar score head: rm)
    # the metrics the progress line and the end-of-run summary show beside the loss: (metric name, short label)
    progress: tuple[tuple[str, str], ...] = ()
    models: Callable[[Any], dict[str, ExtraModel]] | None = None  # (run Config) -> frozen models by role
    setup: Callable[[SetupContext], None] | None = None
    prepare_rows: Callable[[SetupContext, list[list]], None] | None = None
    # (policy, global batch rows, ctx) -> rows, or a Rollout (rows and its own metrics)
    rollout: Callable[[Any, list, StepContext], Any] | None = None
    rollout_kind: str | None = None  # the kind of the rows rollout returns (default: data_kind)
    # (run Config) -> optimizer steps that train on one rollout (inner epochs; default 1): the loop rolls out every
    # that many steps, keeps the rolled-out batch between them (in checkpoints too) and counts epochs in rollouts
    rollout_steps: Callable[[Any], int] | None = None
    # (whole rolled-out global batch, ctx, limit, last) -> the rows to train on, at most limit, or a Rollout
    # (module docstring); in an evaluation it sees one process's rows (ctx.evaluating) and last is True
    finish_rollout: Callable[[list, StepContext, int, bool], Any] | None = None
    # (run Config) -> further rollouts at most when finish_rollout keeps fewer rows than a full batch (0: none)
    rollout_refills: Callable[[Any], int] | None = None
    # (run Config) -> (trainable rows a rollout makes per input row, tokens per rolled-out row at most): how
    # `tunelab plan` sizes the rollout's KV cache and the micro-batches that train on its rows
    rollout_shape: Callable[[Any], tuple[int, int]] | None = None
    # (run Config, device) -> sampling holds a merged copy of the adapted LoRA weights (`tunelab plan` counts it)
    rollout_merges: Callable[[Any, str], bool] | None = None
    # (eval results: eval_loss and eval_<metric>) -> more results (sft/pt: perplexity)
    eval_metrics: Callable[[dict[str, float]], dict[str, float]] | None = None
    # (run Config) -> the data kind it reads, when an option of the method chooses it (kd: method.data);
    # default data_kind
    reads: Callable[[Any], str] | None = None

    def kinds(self, cfg) -> tuple[str, str]:
        """(the kind of the rows it reads, the kind its micro-batches are built from) for the run `cfg`."""
        data_kind = self.reads(cfg) if self.reads is not None else self.data_kind
        return data_kind, self.rollout_kind or data_kind

    @property
    def batch_kind(self) -> str:
        """The kind of the rows its micro-batches are built from: what a rollout returns, else what it reads."""
        return self.rollout_kind or self.data_kind

    @property
    def packs(self) -> bool:
        """Its rows may be packed padding-free: a score head reads one position per row, so it cannot."""
        return self.head == "lm"

    def extra_models(self, cfg) -> dict[str, ExtraModel]:
        return self.models(cfg) if self.models is not None else {}
