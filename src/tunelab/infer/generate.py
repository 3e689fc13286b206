"""`tunelab generate`: answer every prompt of a dataset with a model, writing training rows (distillation data).

The prompts are read as the online RL methods read them (data kind prompts: an alpaca row's instruction + input,
a conversation up to its last answer), rendered with the model's chat template, and answered in batches by the
KV-cache sampler of the RL methods (methods/sampling.py). Each answer draws from a generator seeded by (--seed, the
prompt's index, the answer's index), so it does not depend on the batch it was generated in: a run interrupted and
started again continues with exactly the answers the uninterrupted run would have written (up to the last bits of
logits computed in batches of another size, which can flip a draw that falls within a rounding of a boundary).

The output is JSON lines in the alpaca or sharegpt format `tunelab train` reads: the prompt's messages (system
prompt and earlier turns included) with the generated answer as the last assistant turn, `--n` rows per prompt,
prompt by prompt. Beside it, `FILE.progress.json` records what the file is being generated from (model, adapter,
data, options); it marks the file as this command's, so that a run continues only a file it wrote with the same
settings, and never appends to or cuts a file of anyone else's. Rows are appended a batch at a time and flushed to
disk; after an interruption a partial last line (the only thing an interruption can leave) is cut and generation
goes on from the first missing row.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import UserError

OUTPUT_FORMATS = ("alpaca", "sharegpt")


@dataclass
class SamplingSettings:
    n: int = 1
    batch_size: int = 16
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0

    def check(self) -> None:
        checks = [
            ("n", self.n >= 1, "at least 1"),
            ("batch-size", self.batch_size >= 1, "at least 1"),
            ("max-new-tokens", self.max_new_tokens >= 1, "at least 1"),
            ("temperature", self.temperature >= 0, ">= 0 (0: greedy)"),
            ("top-p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top-k", self.top_k >= 0, ">= 0 (0: no top-k filtering)"),
            ("repetition-penalty", self.repetition_penalty > 0, "> 0 (1: none)"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UserError(f"generate: --{name} must be {rule}, got {getattr(self, name.replace('-', '_'))}")


@dataclass
class GenerateReport:
    out: Path
    prompts: int
    rows: int  # rows in the file now
    written: int  # rows this invocation wrote
    tokens: int = 0
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def text(self) -> str:
        speed = f", {self.tokens / self.seconds:,.0f} tokens/s" if self.seconds > 0 else ""
        return (f"generate: {self.out}: {self.rows} rows for {self.prompts} prompts ({self.written} written now"
                f"{speed})")


# ------------------------------------------------------------------------------------------------ output rows
def _alpaca_row(messages: list[dict[str, Any]], answer: str, where: str) -> dict[str, Any]:
    system = [m["content"] for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    if any(m["role"] not in ("user", "assistant") or not isinstance(m.get("content"), str) for m in turns) \
            or not turns or turns[-1]["role"] != "user" \
            or any(turns[i]["role"] != ("user" if i % 2 == 0 else "assistant") for i in range(len(turns))):
        raise UserError(f"{where}: this prompt has tool turns or turns out of user/assistant order, which the "
                        "alpaca format cannot hold; use --format sharegpt")
    row: dict[str, Any] = {"instruction": turns[-1]["content"], "input": "", "output": answer}
    if system:
        row["system"] = system[0]
    if len(turns) > 1:
        row["history"] = [[turns[i]["content"], turns[i + 1]["content"]] for i in range(0, len(turns) - 1, 2)]
    return row


SHAREGPT_ROLES = {"user": "human", "assistant": "gpt", "tool": "observation"}


def _sharegpt_row(messages: list[dict[str, Any]], answer: str, where: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    turns = []
    for m in messages:
        if m["role"] == "system":
            row["system"] = m["content"]
            continue
        if m.get("tool_calls"):
            turns.append({"from": "function_call", "value": json.dumps(
                m["tool_calls"][0] if len(m["tool_calls"]) == 1 else m["tool_calls"], ensure_ascii=False)})
            continue
        if m["role"] not in SHAREGPT_ROLES or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: a {m['role']} turn cannot be written as sharegpt")
        turns.append({"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]})
    turns.append({"from": "gpt", "value": answer})
    return {"conversations": turns, **row}


WRITERS = {"alpaca": _alpaca_row, "sharegpt": _sharegpt_row}


# --------------------------------------------------------------------------------------------------- progress
def _progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.json")


def _complete_rows(out: Path) -> int:
    """The complete lines of a file this command is writing; a partial last line (an interruption) is cut."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with out.open("r+b") as f:
            f.truncate(end)
    return data[:end].count(b"\n")


def _identity(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _start(out: Path, settings: dict) -> int:
    """Rows already written by an earlier run with the same settings (0 for a new file); a file that is not this
    command's, or was generated with other settings, is refused."""
    progress = _progress_path(out)
    if out.exists() and not progress.exists():
        raise UserError(f"--out: {out} exists and was not written by tunelab generate (no {progress.name}); give "
                        "another file, or move it away")
    if progress.exists():
        try:
            found = json.loads(progress.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"--out: {progress} cannot be read ({e}); give another --out") from None
        if found.get("identity") != _identity(settings):
            changed = [k for k in settings if found.get("settings", {}).get(k) != settings[k]]
            raise UserError(f"--out: {out} was generated with other settings ({', '.join(changed) or 'unknown'} "
                            "differ); give another file to generate anew, or the same settings to continue it")
        return _complete_rows(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = progress.with_name(f".{progress.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"identity": _identity(settings), "settings": settings}, indent=1))
    os.replace(tmp, progress)
    return 0


def _data_digest(specs) -> list[list]:
    """The datasets' files by path, size and modification time: a changed dataset is other settings."""
    out = []
    for spec in specs:
        path = Path(spec.path) if getattr(spec, "path", "") else None
        if path is not None and path.is_file():
            st = path.stat()
            out.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
        else:
            out.append([str(getattr(spec, "path", "") or getattr(spec, "name", "")), 0, 0])
    return out


# ------------------------------------------------------------------------------------------------------- run
def generate_rows(*, model: str, adapter: list[str] | None, cfg, out: str | os.PathLike, fmt: str = "alpaca",
                  settings: SamplingSettings, allow_pickle: bool = False, trust_remote_code: bool = False,
                  echo: bool = True) -> GenerateReport:
    """Answer every prompt of `cfg.data.train` (a Config from a data file or a training config) and append the
    rows to `out` (module docstring)."""
    import torch

    from tunelab.data.kinds import PROMPTS
    from tunelab.data.load import load_conversations
    from tunelab.data.templates import resolve_template
    from tunelab.data.tokenize import encode_prompt_row
    from tunelab.infer.loading import load_for_inference, mergeable_folder
    from tunelab.methods.sampling import SamplingOptions, sample, sequence_seed
    from tunelab.models.adapters import PROMPT_LEARNING, adapter_folder_kind

    if fmt not in OUTPUT_FORMATS:
        raise UserError(f"generate: --format must be one of {', '.join(OUTPUT_FORMATS)}, got {fmt!r}")
    settings.check()
    out = Path(out)
    adapters = list(adapter or [])
    for a in adapters:
        if adapter_folder_kind(a) == "peft" and json.loads((Path(a) / "adapter_config.json").read_text()).get(
                "peft_type") in PROMPT_LEARNING:
            raise UserError(f"--adapter: {a} is a prompt-learning adapter; generate samples through the model's "
                            "weights (use tunelab chat for it)")
    convs, report = load_conversations(cfg.data.train, on_bad_row=cfg.data.on_bad_row, kind=PROMPTS,
                                       replace=cfg.data.replace)
    if not convs:
        raise UserError("generate: the data holds no prompts")
    identity = {"model": str(Path(model).resolve()), "adapter": [str(Path(a).resolve()) for a in adapters],
                "data": _data_digest(cfg.data.train), "template": cfg.data.template, "system": cfg.data.system,
                "max_length": cfg.data.max_length, "format": fmt, **asdict(settings)}
    identity.pop("batch_size")  # answers do not depend on it
    done = _start(out, identity)
    total = len(convs) * settings.n
    if done >= total:
        if echo:
            print(f"generate: {out} already holds all {total} rows", file=sys.stderr)
        return GenerateReport(out, len(convs), done, 0, skipped=report.bad)
    merge = bool(adapters) and all(mergeable_folder(a) for a in adapters)
    net, tok = load_for_inference(model, adapters or None, merge=merge, allow_pickle=allow_pickle,
                                  trust_remote_code=trust_remote_code)
    template = resolve_template(cfg.data.template, tok)
    stop_ids = template.stop_token_ids(tok)
    device = next(net.parameters()).device
    opts = SamplingOptions(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                           top_p=settings.top_p, top_k=settings.top_k,
                           repetition_penalty=settings.repetition_penalty)
    writer = WRITERS[fmt]
    encoded: dict[int, Any] = {}

    def prompt(i: int):
        if i not in encoded:
            encoded.clear() if len(encoded) > 4 * settings.batch_size else None
            encoded[i] = encode_prompt_row(convs[i], tok, template, max_length=cfg.data.max_length,
                                           system=cfg.data.system or None)
        return encoded[i]

    t0, tokens, written = time.perf_counter(), 0, 0
    with out.open("ab") as f:
        for start in range(done, total, settings.batch_size):
            jobs = [(k // settings.n, k % settings.n) for k in range(start, min(start + settings.batch_size, total))]
            rows = [prompt(p) for p, _ in jobs]
            seeds = [sequence_seed(settings.seed, 0, p, s) for p, s in jobs]
            with torch.no_grad():
                completions, _ = sample(net, [r.prompt_ids for r in rows], seeds, opts, stop_ids=stop_ids,
                                        pad_id=tok.pad_token_id, device=device)
            lines = []
            for (p, _), row, ids in zip(jobs, rows, completions):
                answer = tok.decode(ids, skip_special_tokens=True).strip()
                lines.append(json.dumps(writer(row.messages, answer, convs[p].source), ensure_ascii=False) + "\n")
                tokens += len(ids)
            f.write("".join(lines).encode())
            f.flush()
            os.fsync(f.fileno())
            written += len(lines)
            if echo:
                elapsed = time.perf_counter() - t0
                now = start + len(jobs)
                eta = elapsed / written * (total - now)
                print(f"generate: {now}/{total} rows, {tokens / max(elapsed, 1e-9):,.0f} tokens/s, "
                      f"eta {int(eta) // 60}:{int(eta) % 60:02d}", file=sys.stderr)
    return GenerateReport(out, len(convs), done + written, written, tokens, time.perf_counter() - t0, report.bad)
