"""A method with a teacher, as a module outside tunelab: token-level knowledge distillation.

A worked example of the method contract (docs/architecture.md). tunelab's own method kd (docs/distillation.md)
is the complete version: chunked over trained positions, other divergences, top-k, a teacher cache, on-policy.

The student (the policy, with any adapter) learns the teacher's next-token distribution on the trained positions of
ordinary SFT data: the loss is KL(teacher || student) summed over those positions, with both distributions at
temperature T (and the usual T^2 factor, so gradients keep their scale as T changes). The teacher is a frozen model
folder sharing the student's tokenizer.

What it uses of the method contract (tunelab/methods/base.py):
- `models`: asks for a frozen model by role ("teacher", from a path); the loop loads it beside the policy, frozen, in
  eval mode and the policy's dtype, and `tunelab plan` counts its memory;
- `setup`: keeps the frozen teacher in the step context;
- `loss` / `weight`: the KL summed over trained positions, and the number of those positions (so the loop's global
  normalisation makes it a per-token mean over the whole global batch).

Use it from Python:

    import tunelab
    from examples.methods import distill   # or copy this file into your project

    distill.register()
    tunelab.train({"model": {"path": "student"}, "method": {"type": "distill_example", "teacher": "teacher"},
                   "data": {"train": [{"path": "chat.jsonl"}]}, "output": {"dir": "runs/distill"}})
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from tunelab.config.schema import MethodBase, opt
from tunelab.data.collate import model_inputs
from tunelab.data.tokenize import IGNORE_INDEX
from tunelab.errors import ConfigError
from tunelab.methods import register_method
from tunelab.methods.base import ExtraModel, LossOutput, Method, SetupContext, StepContext
from tunelab.methods.lm import trained_tokens

NAME = "distill_example"


@dataclass
class DistillConfig(MethodBase):
    """Distil a frozen teacher into the policy: KL(teacher || student) on the trained positions of chat data."""

    type: str = opt(NAME, "The training method.")
    teacher: str = opt("", "The teacher model folder (it must share the student's tokenizer).")
    temperature: float = opt(1.0, "Softmax temperature of both distributions (the loss is scaled by its square).")

    def validate(self, prefix: str) -> None:
        if not self.teacher:
            raise ConfigError(f"{prefix}.teacher: required (the teacher model folder)")
        if self.temperature <= 0:
            raise ConfigError(f"{prefix}.temperature: must be positive, got {self.temperature}")


def teacher_model(cfg) -> dict[str, ExtraModel]:
    return {"teacher": ExtraModel(source="path", path=cfg.method.teacher)}


def keep_teacher(ctx: SetupContext) -> None:
    ctx.step.state["teacher"] = ctx.models["teacher"]


def distill_loss(model, batch, ctx: StepContext) -> LossOutput:
    t = ctx.config.temperature
    keep = batch["labels"][:, 1:] != IGNORE_INDEX  # the logits at t predict labels[t + 1]: trained positions only
    student = model(**model_inputs(batch), use_cache=False).logits[:, :-1][keep].float() / t
    with ctx.state["teacher"]() as teacher:
        target = teacher(**model_inputs(batch), use_cache=False).logits[:, :-1][keep].float() / t
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(target, -1), log_target=True, reduction="sum")
    return LossOutput(kl * t * t)


METHOD = Method(name=NAME, data_kind="chat", loss=distill_loss, weight=trained_tokens, models=teacher_model,
                setup=keep_teacher, describe="Distil a frozen teacher into the policy (KL on trained positions).")


def register() -> None:
    register_method(METHOD, DistillConfig, replace=True)
