"""Rewards for online RL (`method.rewards`): the user's own Python functions, built-ins and reward models trained
with method rm, each with a weight.

A reward function is called once per rollout batch with TRL GRPOTrainer's keyword arguments, so reward functions
written for TRL work unchanged:

    fn(prompts, completions, completion_ids, **columns) -> list[float | None]

- ``prompts``: one per completion, the conversation the answer replies to (a list of {"role", "content"} messages,
  the system prompt included), repeated for each completion of a prompt's group;
- ``completions``: one per completion, ``[{"role": "assistant", "content": TEXT}]`` (TRL's conversational form;
  ``completions[i][0]["content"]`` is the text, without the end-of-turn token);
- ``completion_ids``: the generated token ids (with the stop token when the answer ended by itself);
- every other column of the prompt's row, as a list aligned with the completions (``answer=[...]``);
- ``trainer_state``: an object with ``global_step`` (the optimizer steps done) and ``max_steps``.

It returns one number per completion, or ``None`` for "no opinion" on that completion (it then does not count for
that function; a completion every function has no opinion on gets advantage 0). A function that raises, returns the
wrong count or a NaN/inf stops the run with one line naming the function, the step and the prompt.

Loading a file runs its code: naming it in `method.rewards[].file` is the opt-in.
"""

from __future__ import annotations

import importlib.util
import math
import re
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tunelab.errors import UserError


@dataclass
class RewardFunction:
    name: str  # how messages and metrics name it: the function's name, or file:function
    fn: Callable[..., list]
    weight: float


# --------------------------------------------------------------------------------------------------- built-ins
def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else str(completion)


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: "The answer: 42." -> "the answer 42"."""
    return " ".join(str(text).lower().translate(_PUNCT).split())


def exact_match(column: str) -> Callable[..., list]:
    """1.0 when the completion, stripped of surrounding whitespace, equals the row's `column`, else 0.0."""
    def reward(prompts, completions, completion_ids, **columns):
        answers = _column(columns, column)
        return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answers)]

    return reward


def normalized_match(column: str) -> Callable[..., list]:
    """1.0 when the normalised completion equals the normalised `column` or ends with it ("... so it is 42" for
    42), else 0.0 (`normalize_answer`)."""
    def reward(prompts, completions, completion_ids, **columns):
        out = []
        for c, a in zip(completions, _column(columns, column)):
            got, want = normalize_answer(_text(c)), normalize_answer(a)
            out.append(float(bool(want) and (got == want or got.endswith(" " + want))))
        return out

    return reward


def regex_format(pattern: str) -> Callable[..., list]:
    """1.0 when the whole completion matches `pattern` (Python re, DOTALL), else 0.0: a format reward."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts, completions, completion_ids, **columns):
        return [float(compiled.fullmatch(_text(c).strip()) is not None) for c in completions]

    return reward


def overlong_penalty(max_length: int, buffer: int) -> Callable[..., list]:
    """DAPO's soft overlong punishment on the completion's tokens L: 0 up to max_length - buffer, then falling
    linearly to -1 at max_length, and -1 beyond."""
    def reward(prompts, completions, completion_ids, **columns):
        out = []
        for ids in completion_ids:
            n = len(ids)
            if n <= max_length - buffer:
                out.append(0.0)
            elif n <= max_length:
                out.append((max_length - buffer - n) / buffer)
            else:
                out.append(-1.0)
        return out

    return reward


BUILTINS = ("exact_match", "normalized_match", "regex_format", "overlong_penalty")


def _column(columns: dict[str, list], column: str) -> list:
    if column not in columns:
        have = ", ".join(sorted(k for k in columns if k != "trainer_state")) or "none"
        raise UserError(f"method.rewards: the prompts have no column {column!r} to compare with (columns: {have})")
    return columns[column]


# ------------------------------------------------------------------------------------------------------ loading
def load_file_function(file: str, function: str, where: str) -> Callable[..., list]:
    """`function` from the Python file `file` (running the file: the user named it)."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise UserError(f"{where}.file: {file} does not exist")
    name = f"tunelab_rewards_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error it raises is reported in one line
        raise UserError(f"{where}.file: importing {file} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise UserError(f"{where}.function: {file} has no function {function!r} (it has: {', '.join(found)})")
    return fn


def reward_model(spec, where: str, device=None, batch_size: int = 16) -> Callable[..., list]:
    """A reward model trained with method rm, as a reward function: each prompt's conversation with its completion
    as the last assistant turn, rendered with the model's own chat template and scored at its last token."""
    from tunelab.data.templates import resolve_template
    from tunelab.models.reward_model import load_reward_model, score_conversations

    model, tokenizer = load_reward_model(spec.model, spec.adapter or None, model_key=f"{where}.model",
                                         adapter_key=f"{where}.adapter")
    model = model.to(device or "cpu")
    template = resolve_template("auto", tokenizer)

    def reward(prompts, completions, completion_ids, **columns):
        conversations = [[*p, {"role": "assistant", "content": _text(c)}] for p, c in zip(prompts, completions)]
        return score_conversations(model, tokenizer, template, conversations, batch_size=batch_size, device=device)

    return reward


def build_rewards(specs, max_new_tokens: int, device=None) -> list[RewardFunction]:
    """The configured reward functions (`method.rewards`, validated by the config); reward models on `device`."""
    out = []
    for i, spec in enumerate(specs):
        where = f"method.rewards[{i}]"
        if spec.model:
            fn, name = reward_model(spec, where, device), f"rm:{Path(spec.adapter or spec.model).name}"
        elif spec.file:
            fn, name = load_file_function(spec.file, spec.function, where), f"{Path(spec.file).name}:{spec.function}"
        elif spec.function == "exact_match":
            fn, name = exact_match(spec.column), "exact_match"
        elif spec.function == "normalized_match":
            fn, name = normalized_match(spec.column), "normalized_match"
        elif spec.function == "regex_format":
            fn, name = regex_format(spec.pattern), "regex_format"
        else:  # overlong_penalty (the config admits only these)
            limit = spec.max_length or max_new_tokens
            fn, name = overlong_penalty(limit, min(spec.buffer, limit)), "overlong_penalty"
        out.append(RewardFunction(name, fn, spec.weight))
    return out


# ------------------------------------------------------------------------------------------------------ scoring
def score(rewards: list[RewardFunction], prompts: list, completions: list, completion_ids: list[list[int]],
          columns: dict[str, list], *, step: int, max_steps: int, first_prompt: int = 0,
          group: int = 1) -> tuple[list[list[float]], list[float]]:
    """Every function's rewards ([function][completion], NaN for None) and the weighted total per completion
    (NaN when every function had no opinion). `first_prompt` and `group` turn a completion's index into the
    prompt index errors name."""
    n = len(completions)
    state = SimpleNamespace(global_step=step, max_steps=max_steps)
    per_function = []
    for r in rewards:
        try:
            values = r.fn(prompts=prompts, completions=completions, completion_ids=completion_ids,
                          trainer_state=state, **columns)
        except UserError:
            raise
        except Exception as e:  # the user's code: its error is reported in one line
            raise UserError(f"reward {r.name}: raised {type(e).__name__}: {e} at step {step + 1} "
                            f"(prompts {first_prompt}-{first_prompt + n // max(group, 1) - 1} of the batch)") from None
        values = list(values) if values is not None else []
        if len(values) != n:
            raise UserError(f"reward {r.name}: returned {len(values)} rewards for {n} completions at step {step + 1} "
                            "(one number, or None, per completion)")
        row = []
        for i, v in enumerate(values):
            if v is None:
                row.append(math.nan)
                continue
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise UserError(f"reward {r.name}: returned {v!r} for prompt {first_prompt + i // group} at step "
                                f"{step + 1}; expected a number or None") from None
            if not math.isfinite(v):
                raise UserError(f"reward {r.name}: returned {v} for prompt {first_prompt + i // group} at step "
                                f"{step + 1}; rewards must be finite (None means no opinion)")
            row.append(v)
        per_function.append(row)
    totals = []
    for i in range(n):
        given = [(r.weight, values[i]) for r, values in zip(rewards, per_function) if not math.isnan(values[i])]
        totals.append(sum(w * v for w, v in given) if given else math.nan)
    return per_function, totals


def columns_for(rows: list, group: int) -> dict[str, list[Any]]:
    """The prompts' other columns as lists aligned with their completions (each repeated `group` times)."""
    names = sorted({k for r in rows for k in r.extra})
    return {k: [r.extra.get(k) for r in rows for _ in range(group)] for k in names}
