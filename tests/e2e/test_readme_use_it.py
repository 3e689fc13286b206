"""README.md's "Use it" section is a sequence a new user runs top to bottom: every command must parse, every config
it names must load, and every model, adapter or run folder it uses must have been made by a command before it.

Running the whole section takes minutes (the quickstart training alone is 280 steps), so this test checks what can
go stale cheaply; the section's commands were last run for real in a fresh copy of the repository.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tunelab.cli import _parse, build_parser
from tunelab.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def use_it_commands() -> list[list[str]]:
    """The shell commands of the "Use it" section's bash blocks, in order, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Use it\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _folder(path: str) -> str:
    return path.rstrip("/")


def test_use_it_commands_parse_and_use_only_what_earlier_commands_made(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = use_it_commands()
    assert commands and all(c[0] in ("tunelab", "torchrun") for c in commands), commands
    made: set[str] = set()  # folders the commands so far have written
    parser = build_parser()
    for words in commands:
        argv = words[1:] if words[0] == "tunelab" else words[words.index("tunelab") + 1:]
        args = _parse(parser, argv)
        command = " ".join(words)
        for attr in ("model", "run", "out"):
            value = getattr(args, attr, None)
            if attr != "out" and isinstance(value, str) and _folder(value) not in made:
                pytest.fail(f"README: `{command}` uses {value}, which no earlier command made")
        adapters = getattr(args, "adapter", None) or []
        for adapter in [adapters] if isinstance(adapters, str) else adapters:
            if _folder(adapter) not in made:
                pytest.fail(f"README: `{command}` uses the adapter {adapter}, which no earlier command trained")
        if argv[0] == "init-model":
            made.add(_folder(args.dir))
        elif argv[0] == "export":
            made.add(_folder(args.out))
        config = getattr(args, "config", None) or getattr(args, "source", None)
        if config:
            cfg = load_config(config, getattr(args, "overrides", None) or [])
            assert _folder(cfg.model.path) in made, f"README: `{command}` needs {cfg.model.path} made first"
            if argv[0] == "train":
                out = _folder(cfg.output.dir)
                # a second run into a finished run's folder only says "already complete"
                assert out not in made or cfg.output.overwrite, f"README: `{command}` trains into {out} again"
                made |= {out, f"{out}/final"}
