"""Bad input refused in one clear line, in-process: duplicate YAML keys, non-UTF-8 and unreachable config files,
overrides blamed on the command line, `tunelab config QUERY`, the --help description, generation options, chat's
slash commands, and options placed before overrides. Subprocess runs of the same are in tests/e2e."""

from __future__ import annotations

import builtins
import os

import pytest
import yaml

from tunelab.config import load as config_load
from tunelab.config import load_config
from tunelab.config.docs import options_text
from tunelab.config.load import parse_override, read_yaml
from tunelab.config.schema import ADAPTER_CONFIGS, METHOD_CONFIGS
from tunelab.errors import ConfigError, UserError

BASE = "model: {path: m}\ndata: {train: [{path: d.json}]}\n"


def _write(tmp_path, text: str | bytes, name: str = "config.yaml"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return p


# ------------------------------------------------------------------------------------------ duplicate YAML keys
def test_duplicate_key_names_the_key_and_both_lines(tmp_path):
    p = _write(tmp_path, BASE + "train:\n  lr: 1.0e-4\n  batch_size: 2\n  lr: 5.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.message == f"{p}:6: train.lr given twice (first at line 4)"


def test_duplicate_section_and_nested_list_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"config.yaml:3: model given twice \(first at line 1\)"):
        load_config(_write(tmp_path, BASE + "model: {path: n}\n"))
    text = "model: {path: m}\ndata:\n  train:\n    - {path: a.json}\n    - {path: b.json, path: c.json}\n"
    with pytest.raises(ConfigError, match=r":5: data.train\[1\].path given twice \(first at line 5\)"):
        load_config(_write(tmp_path, text))


def test_merge_keys_may_still_be_overridden(tmp_path):
    # `<<: *base` then an explicit key is YAML's way to override, not a duplicate
    data = config_load.load_yaml_text("base: &b {lr: 1, seed: 3}\ntrain:\n  <<: *b\n  lr: 2\n")
    assert data["train"] == {"lr": 2, "seed": 3}
    assert issubclass(config_load.StrictLoader, yaml.SafeLoader)
    with pytest.raises(yaml.constructor.ConstructorError):  # still safe: no python objects
        config_load.load_yaml_text("x: !!python/object/apply:os.getcwd []\n")


def test_duplicate_key_inside_an_override_value():
    with pytest.raises(ConfigError, match="override 'adapter={r: 4, r: 8}': r given twice"):
        parse_override("adapter={r: 4, r: 8}")


# ------------------------------------------------------------------------------ unreadable config files
def test_non_utf8_config_names_the_file_and_line(tmp_path):
    p = _write(tmp_path, BASE.encode() + "output: {dir: caf\u00e9}\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        read_yaml(p)
    assert e.value.message.startswith(f"{p}:3: not UTF-8 text (byte 0xe9")


def test_symlink_loop_and_broken_symlink_are_named(tmp_path):
    loop = tmp_path / "loop.yaml"
    os.symlink(loop, loop)
    with pytest.raises(ConfigError, match="loop.yaml: config file is a symlink loop"):
        load_config(loop)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    os.symlink(b, a)
    os.symlink(a, b)
    with pytest.raises(ConfigError, match="a.yaml: config file is a symlink loop"):
        load_config(a)
    broken = tmp_path / "broken.yaml"
    os.symlink(tmp_path / "gone.yaml", broken)
    with pytest.raises(ConfigError, match="broken.yaml: config file is a broken symlink"):
        load_config(broken)
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_data_file_symlink_loop_is_named(tmp_path):
    from tunelab import api

    loop = tmp_path / "loop.json"
    os.symlink(loop, loop)
    with pytest.raises(UserError, match="loop.json: data file is a symlink loop"):
        api.data_check(loop)


# ------------------------------------------------------------------------------------ overrides are blamed
def test_unknown_override_key_is_blamed_on_the_command_line(tmp_path):
    p = _write(tmp_path, BASE)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.lr=1", "train.lrr=1"])
    assert e.value.message == "command-line override 'train.lrr=1': train.lrr: unknown key; did you mean 'train.lr'?"
    assert str(p) not in e.value.message
    with pytest.raises(ConfigError, match=r"^command-line override 'trian.lr=1': trian: unknown key"):
        load_config(p, ["trian.lr=1"])
    with pytest.raises(ConfigError, match=r"^command-line override 'data.train.0.format=x': data.train\[0\].format"):
        load_config(p, ["data.train.0.format=x"])
    with pytest.raises(ConfigError, match=r"^command-line override 'data.train.3.path=x': .*out of range"):
        load_config(p, ["data.train.3.path=x"])
    # a bad key of the file itself is still the file's, even with an override of the same section
    bad = _write(tmp_path, BASE + "train: {lrr: 1}\n", "bad.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["train.lr=1"])
    assert e.value.message == f"{bad}: train.lrr: unknown key; did you mean 'train.lr'?"


# ----------------------------------------------------------------------------------- tunelab config QUERY
def test_config_query_filters_keys_or_refuses_with_a_suggestion():
    text = options_text("train.lr")
    assert "train.lr (number" in text and "train.batch_size" not in text and "model:" not in text
    assert "train.lr (number" in options_text("lr") and "lr_ratio" not in options_text("lr")
    assert "method.label_smoothing" in options_text("smoothing")  # part of a name when nothing matches whole
    assert "train.batch_size" in options_text("train") and "model.path" not in options_text("train")
    with pytest.raises(ConfigError, match=r"config: no section or key matches 'foo'; sections: model, data"):
        options_text("foo")
    with pytest.raises(ConfigError, match=r"no section or key matches 'tran'; did you mean 'train'"):
        options_text("tran")


# --------------------------------------------------------------------------------------- --help description
def test_help_description_lists_every_method_and_adapter_and_its_epilog_model_matches_the_examples():
    from tunelab.cli import QUICKSTART_MODEL, build_parser

    parser = build_parser()
    words = " ".join(parser.description.split())
    for name in [*METHOD_CONFIGS, *ADAPTER_CONFIGS]:
        assert f" {name}" in words, name
    assert "ipo" in words and "LoRA" not in words  # the DPO loss variants; not the old "full, freeze or LoRA"
    example = yaml.safe_load(open(os.path.join(os.path.dirname(__file__), "../../examples/sft_lora.yaml")))
    assert example["model"]["path"] == QUICKSTART_MODEL
    assert f"init-model tiny-llama {QUICKSTART_MODEL} " in parser.epilog


# ----------------------------------------------------------------------------------- arguments and options
def test_options_may_come_before_or_after_overrides():
    from tunelab.cli import _parse, build_parser

    parser = build_parser()
    a = _parse(parser, ["data", "preview", "f.json", "--model", "m", "--rows", "2", "data.max_length=64"])
    b = _parse(parser, ["data", "preview", "f.json", "data.max_length=64", "--model", "m", "-n", "2"])
    for args in (a, b):
        assert (args.source, args.model, args.n, args.overrides) == ("f.json", "m", 2, ["data.max_length=64"])
    c = _parse(parser, ["data", "check", "f.json", "--method", "dpo", "data.max_length=8", "--model", "m",
                        "data.template=chatml"])
    assert c.method == "dpo" and c.overrides == ["data.max_length=8", "data.template=chatml"]
    t = _parse(parser, ["train", "c.yaml", "--nproc", "1", "train.lr=1"])
    assert t.overrides == ["train.lr=1"]
    with pytest.raises(SystemExit):
        _parse(parser, ["data", "check", "f.json", "--no-such-option"])


@pytest.mark.parametrize("kw", [{"max_new_tokens": 0}, {"max_new_tokens": -5}, {"num_beams": 0},
                                {"temperature": -1.0}, {"top_p": 0.0}, {"top_k": -1}, {"repetition_penalty": 0.0}])
def test_generation_options_are_checked_before_loading(kw):
    from tunelab.infer.chat import GenerationOptions

    flag = "--" + next(iter(kw)).replace("_", "-")
    with pytest.raises(UserError, match=f"^chat: {flag} "):
        GenerationOptions(**kw)


def test_cli_max_new_tokens_zero_is_one_line_and_exit_2(capsys):
    from tunelab.cli import main

    assert main(["chat", "--model", "does-not-matter", "--max-new-tokens", "0", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: chat: --max-new-tokens (generation option max_new_tokens) must be at least 1, got 0"]


# ------------------------------------------------------------------------------------------ chat commands
class _FakeSession:
    def __init__(self):
        self.sent: list[str] = []
        self.template = type("T", (), {"name": "fake"})()

    def adapters(self):
        return []

    def reply(self, messages, options, stream=None):
        self.sent.append(messages[-1]["content"])
        return "ok"


def _chat(monkeypatch, capsys, lines: list[str]) -> tuple[_FakeSession, str]:
    from tunelab.infer import chat

    session = _FakeSession()
    monkeypatch.setattr(chat.ChatSession, "load", classmethod(lambda cls, *a, **k: session))
    feed = iter(lines)

    def fake_input(prompt=""):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    code = chat.run_chat(model="m", adapter=None, template="auto", system=None, prompt=None,
                         options=chat.GenerationOptions(), stream=False)
    assert code == 0
    return session, capsys.readouterr().err


def test_chat_help_and_unknown_commands_never_reach_the_model(monkeypatch, capsys):
    session, err = _chat(monkeypatch, capsys, ["/help", "/xyz", "/adapter", "hello", "//etc is a folder",
                                               "/clear", "/reset", "/exit", "never read"])
    assert session.sent == ["hello", "/etc is a folder"]
    listing = err.split("commands:\n", 1)[1]
    assert "/help" in listing and "/clear" in listing and "/exit" in listing and "list these commands" in listing
    assert "error: unknown command /xyz; /help lists the commands" in err
    assert err.count("(history cleared)") == 2


def test_chat_allow_pickle_and_trust_remote_code_reach_the_loader(monkeypatch):
    from tunelab.cli import main
    from tunelab.infer import loading

    seen = {}

    class Stop(Exception):
        pass

    def fake_load(model, adapter=None, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(loading, "load_for_inference", fake_load)
    with pytest.raises(Stop):
        main(["chat", "--model", "m", "--prompt", "hi"])
    assert seen == {"allow_pickle": False, "trust_remote_code": False}  # off unless asked for
    with pytest.raises(Stop):
        main(["chat", "--model", "m", "--allow-pickle", "--trust-remote-code", "--prompt", "hi"])
    assert seen == {"allow_pickle": True, "trust_remote_code": True}


def test_export_allow_pickle_flags_reach_the_api(monkeypatch, capsys):
    from tunelab import api
    from tunelab.cli import main

    seen = {}
    monkeypatch.setattr(api, "export", lambda **kw: seen.update(kw) or "out")
    assert main(["export", "--model", "m", "--out", "o"]) == 0
    # not given: None, so that with --run the run's config decides
    assert seen["allow_pickle"] is None and seen["trust_remote_code"] is None
    assert main(["export", "--model", "m", "--out", "o", "--allow-pickle", "--trust-remote-code"]) == 0
    assert seen["allow_pickle"] is True and seen["trust_remote_code"] is True
