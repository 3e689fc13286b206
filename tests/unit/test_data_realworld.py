"""Real-world data as it is shipped elsewhere: LLaMA-Factory's pre-training entries (c4_demo, wiki_demo), plain .txt
files, its identity data with {{name}}/{{author}} placeholders (data.replace), hub entries without a hub."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import base_config
from tunelab.cli import main
from tunelab.config.schema import DataConfig, DatasetSpec, ModelConfig
from tunelab.data.load import PLACEHOLDER, load_conversations
from tunelab.data.readers import BadRow, read_rows
from tunelab.errors import UserError

C4_ROWS = [f"Document {i}: the quick brown fox jumps over the lazy dog, {i} times over." for i in range(12)]
WIKI_LINES = [f"Anarchism is a political philosophy, paragraph {i}." for i in range(10)]


def lf_data(root: Path) -> Path:
    """Small copies of LLaMA-Factory's data/ folder: c4_demo.jsonl, wiki_demo.txt, identity.json and the
    dataset_info.json entries that describe them, as LLaMA-Factory ships them."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "c4_demo.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in C4_ROWS))
    # wiki_demo.txt: one paragraph per line; a blank line and a CRLF ending, as files from the wild have.
    wiki = "\n".join(WIKI_LINES[:5]) + "\n\n" + "\r\n".join(WIKI_LINES[5:]) + "\n"
    (root / "wiki_demo.txt").write_text(wiki, newline="")
    identity = [
        {"instruction": "hi", "input": "", "output": "Hello! I am {{name}}, an AI assistant developed by {{author}}."},
        {"instruction": "Who are you?", "input": "", "output": "I am {{name}}, an AI assistant."},
        {"instruction": "Who made you?", "input": "", "output": "I was made by {{author}}."},
        {"instruction": "What is 2+2?", "input": "", "output": "4."},
    ]
    (root / "identity.json").write_text(json.dumps(identity, indent=2))
    info = {
        "identity": {"file_name": "identity.json"},
        "c4_demo": {"file_name": "c4_demo.jsonl", "columns": {"prompt": "text"}},
        "wiki_demo": {"file_name": "wiki_demo.txt", "columns": {"prompt": "text"}},
        "alpaca_en": {"hf_hub_url": "llamafactory/alpaca_en"},
    }
    (root / "dataset_info.json").write_text(json.dumps(info, indent=2))
    return root / "dataset_info.json"


def entry(registry: Path, name: str) -> DatasetSpec:
    return DatasetSpec(name=name, registry=str(registry))


# ------------------------------------------------------------------------------------- pre-training entries, .txt
def test_lf_pretraining_entries_are_plain_text_for_pt(tmp_path):
    registry = lf_data(tmp_path)
    rows, report = load_conversations([entry(registry, "c4_demo"), entry(registry, "wiki_demo")], kind="text")
    assert report.per_dataset == {"c4_demo": 12, "wiki_demo": 10} and not report.bad
    assert [r.text for r in rows] == C4_ROWS + WIKI_LINES and not any(r.messages for r in rows)
    wiki = tmp_path / "wiki_demo.txt"  # one row per line, blank line 6 skipped, line numbers as in an editor
    assert [r.source for r in rows[12:]] == [f"{wiki}:{n}" for n in (1, 2, 3, 4, 5, 7, 8, 9, 10, 11)]


def test_pt_alpaca_rows_prompt_only_answer_or_refused(tmp_path):
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps([
        {"instruction": "First line.", "input": "Second line."},  # no answer: text, instruction then input
        {"instruction": "Q?", "output": "A."},  # an answer: a conversation, rendered with the template under pt
        {"instruction": "Q?", "system": "Be brief."},  # a conversation missing its answer
        {"instruction": "", "input": ""},
    ]))
    rows, report = load_conversations([DatasetSpec(path=str(data), format="alpaca")], kind="text", on_bad_row="skip")
    assert rows[0].text == "First line.\nSecond line."
    assert rows[1].text is None and rows[1].messages[-1] == {"role": "assistant", "content": "A."}
    assert report.bad == [
        f"{data}:row 2: output: missing or empty; a row with a system column is a conversation and needs its answer "
        "(a pre-training row holds only instruction, and optionally input)",
        f"{data}:row 3: instruction, input and output: all missing or empty (a pre-training row needs its text in "
        "instruction)",
    ]
    # sft still needs the answer: the same c4_demo entry is refused there, row by row
    registry = lf_data(tmp_path / "lf")
    with pytest.raises(UserError, match=r"all 12 rows invalid") as e:
        load_conversations([entry(registry, "c4_demo")], kind="chat", on_bad_row="skip")
    assert e.value.details[0] == f"{tmp_path / 'lf' / 'c4_demo.jsonl'}:1: output: missing or empty"


def test_txt_files_rows_and_folders(tmp_path):
    text = tmp_path / "t.txt"
    text.write_bytes("\ufeffone\n  indented stays  \n\n   \nbad \xff\nlast".encode().replace(b"\xc3\xbf", b"\xff"))
    assert list(read_rows(text)) == [
        (f"{text}:1", {"text": "one"}),
        (f"{text}:2", {"text": "  indented stays  "}),
        (f"{text}:5", BadRow("not valid UTF-8 text")),
        (f"{text}:6", {"text": "last"}),
    ]
    # format auto reads a .txt as text rows
    rows, _ = load_conversations([DatasetSpec(path=str(text))], kind="text", on_bad_row="skip")
    assert [r.text for r in rows] == ["one", "  indented stays  ", "last"]
    # a folder's notes are not data: README.txt next to a JSON file is not trained on, and a folder of .txt only
    # says how to use them
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "row"}) + "\n")
    rows, _ = load_conversations([DatasetSpec(path=str(tmp_path))], kind="text", on_bad_row="skip")
    assert [r.text for r in rows] == ["row"]
    only_txt = tmp_path / "notes"
    only_txt.mkdir()
    (only_txt / "README.txt").write_text("not data\n")
    with pytest.raises(UserError, match=r"no data files in this folder .*; a \.txt file is read only when a dataset"):
        list(read_rows(only_txt))


def test_pt_run_on_lf_entries_trains_and_data_check_agrees(tiny_model_dir, tmp_path, capsys):
    """End to end: `data check` and `train` of one pt config over the c4_demo and wiki_demo entries."""
    registry = lf_data(tmp_path / "data")
    cfg = base_config(tiny_model_dir, tmp_path / "unused", tmp_path / "run", method={"type": "pt"},
                      train={"max_steps": 2, "batch_size": 4})
    cfg["data"]["train"] = [{"name": n, "registry": str(registry)} for n in ("c4_demo", "wiki_demo")]
    config = tmp_path / "pt.yaml"
    config.write_text(yaml.safe_dump(cfg))
    assert main(["data", "check", str(config)]) == 0
    check = capsys.readouterr()
    assert check.out.splitlines()[:3] == ["rows: 22 valid, 0 invalid", "  c4_demo: 12 rows", "  wiki_demo: 10 rows"]
    assert main(["train", str(config)]) == 0, capsys.readouterr().err
    assert "data: 22 training rows loaded" in capsys.readouterr().out
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2]


# ------------------------------------------------------------------------------------ identity data, data.replace
def test_replace_fills_every_text_field(tmp_path):
    replace = {"name": "Ada", "author": "Lab"}
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{
        "instruction": "Hi {{name}}", "input": "from {{ author }}", "output": "I am {{name}} by {{author}}.",
        "system": "You are {{name}}.", "history": [["Name?", "{{name}}"]],
    }]))
    rows, report = load_conversations([DatasetSpec(path=str(chat))], replace=replace)
    assert [m["content"] for m in rows[0].messages] == [
        "You are Ada.", "Name?", "Ada", "Hi Ada\nfrom Lab", "I am Ada by Lab."
    ] and report.warnings == []
    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps([{"instruction": "Who?", "chosen": "{{name}}.", "rejected": "Not {{name}}."}]))
    rows, _ = load_conversations([DatasetSpec(path=str(pairs))], kind="pairs", replace=replace)
    assert (rows[0].chosen["content"], rows[0].rejected["content"]) == ("Ada.", "Not Ada.")
    text = tmp_path / "t.txt"
    text.write_text("{{author}} wrote {{name}}; {{unknown}} stays\n")
    rows, report = load_conversations([DatasetSpec(path=str(text))], kind="text", replace=replace)
    assert rows[0].text == "Lab wrote Ada; {{unknown}} stays"
    assert len(report.warnings) == 1 and "{{unknown}}" in report.warnings[0]
    with pytest.raises(UserError, match=r"^data\.replace\.my name: a placeholder name is letters, digits and _"):
        load_conversations([DatasetSpec(path=str(text))], kind="text", replace={"my name": "x"})


def test_placeholders_left_are_one_warning_per_dataset(tmp_path):
    registry = lf_data(tmp_path)
    identity = entry(registry, "identity")
    rows, report = load_conversations([identity, identity])
    warning = (
        f"data: warning: identity: 3 of 4 rows hold unreplaced placeholders {{{{author}}}}, {{{{name}}}} (first at "
        f"{tmp_path / 'identity.json'}:row 0); they would be trained literally: set data.replace "
        "(data.replace.author=..., data.replace.name=...) to fill them"
    )
    assert report.warnings == [warning, warning]  # once per dataset, not once per row
    assert PLACEHOLDER.search(rows[0].messages[-1]["content"])  # left as written, not dropped
    _, report = load_conversations([identity], replace={"name": "Ada"})
    assert report.warnings == [warning.replace("3 of 4", "2 of 4").replace("{{author}}, {{name}}", "{{author}}")
                               .replace(", data.replace.name=...", "")]


def test_train_and_stream_apply_replace_and_warn(tiny_model_dir, tmp_path):
    """The token rows training sees hold the replaced words, streamed or not; the run prints the warning."""
    from tunelab.data.prepare import prepare_data, prepare_stream
    from tunelab.models.load import load_tokenizer

    registry = lf_data(tmp_path)
    tok = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    data = DataConfig(train=[entry(registry, "identity")], max_length=64, cache=False)
    prepared = prepare_data(data, tok, kind="chat", seed=0)
    assert any(line.startswith("data: warning: identity: 3 of 4 rows hold") for line in prepared.lines)
    assert "{{name}}" in tok.decode(prepared.train[0].input_ids)

    data.replace = {"name": "Ada", "author": "Lab"}
    prepared = prepare_data(data, tok, kind="chat", seed=0)
    assert not any("warning" in line for line in prepared.lines)
    decoded = [tok.decode(e.input_ids) for e in prepared.train]
    assert "I am Ada, an AI assistant developed by Lab." in decoded[0] and not any("{{" in d for d in decoded)

    data.streaming, data.shuffle = True, False
    stream = prepare_stream(data, tok, kind="chat", seed=0)[1]
    streamed = [tok.decode(e.input_ids) for _, (_, e) in zip(range(4), stream)]
    assert sorted(streamed) == sorted(decoded)
    data.replace = {"name": "Ada"}
    lines = prepare_stream(data, tok, kind="chat", seed=0)[0].lines
    assert [line for line in lines if "warning" in line] == [
        f"data: warning: identity: 2 of 4 rows hold unreplaced placeholders {{{{author}}}} (first at "
        f"{tmp_path / 'identity.json'}:row 0); they would be trained literally: set data.replace "
        "(data.replace.author=...) to fill them"
    ]


# ------------------------------------------------------------------------------------------- hub without a hub
def test_unreachable_hub_dataset_fails_at_once(tiny_model_dir, tmp_path, capsys):
    """A hub dataset (a registry's hf_hub_url, or a path that is a hub id) where the hub cannot be reached: one line
    at once, not `datasets` retrying for ~25 s (its retries alone sleep 1+2+4+8+8 s, printing a line each). The hub
    is a closed loopback port, so nothing leaves the machine. The time is compared with the same command in offline
    mode (which fails fast inside `datasets`) so that a loaded machine does not make the bound flaky."""
    registry = lf_data(tmp_path)
    configs = {}
    for how, spec in (("registry", {"name": "alpaca_en", "registry": str(registry)}),
                      ("path", {"path": "llamafactory/alpaca_en"})):
        cfg = base_config(tiny_model_dir, "unused", tmp_path / "run")
        cfg["data"]["train"] = [spec]
        configs[how] = tmp_path / f"{how}.yaml"
        configs[how].write_text(yaml.safe_dump(cfg))

    def run(*command, offline):
        # in this process: conftest switched the hub off before huggingface_hub and datasets were imported, which
        # is the offline case; the online case switches it back on with an endpoint on a closed loopback port
        with pytest.MonkeyPatch.context() as mp:
            if not offline:
                for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
                    mp.setenv(name, "0")
                mp.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
            mp.chdir(tmp_path)
            capsys.readouterr()
            start = time.perf_counter()
            code = main(list(command))
            seconds = time.perf_counter() - start
        lines = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(lines) == 1, lines  # no "Retrying in 8s" lines
        return lines[0], seconds

    for how, config in configs.items():
        for command in [("data", "check", str(config))] + [("train", str(config))] * (how == "registry"):
            line, seconds = run(*command, offline=False)
            local = "not a local file or folder, and " if how == "path" else ""
            assert line == (
                f"error: llamafactory/alpaca_en: {local}could not load this dataset from the Hugging Face hub: "
                "127.0.0.1 cannot be reached from here. Download it and point data.train[].path (or the registry's "
                "file_name) at the local file, or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face "
                "cache."
            )
            # a refused loopback connection answers at once; datasets' retries alone would sleep 1+2+4+8+8 s
            assert seconds < 5, seconds
    # offline mode: `datasets` looks in its cache only (failing fast), and the message says so
    line, _ = run("data", "check", str(configs["registry"]), offline=True)
    assert "HF_HUB_OFFLINE is set, so only the local cache is read" in line
    # a mistyped local path is a missing file, not a hub id
    with pytest.raises(UserError, match=r"^nosuchdir/train\.jsonl: no such file or folder$"):
        load_conversations([DatasetSpec(path="nosuchdir/train.jsonl")])


def test_data_check_fills_placeholders_and_warns(tiny_model_dir, tmp_path):
    """`data check` on a training config reads the rows as the run does: data.replace filled, leftovers warned."""
    from tunelab import api

    registry = lf_data(tmp_path)
    cfg = base_config(tiny_model_dir, "unused", tmp_path / "run")
    cfg["data"]["train"] = [{"name": "identity", "registry": str(registry)}]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    lines = api.data_check(config).lines
    assert [line for line in lines if "warning" in line] == [
        f"data: warning: identity: 3 of 4 rows hold unreplaced placeholders {{{{author}}}}, {{{{name}}}} (first at "
        f"{tmp_path / 'identity.json'}:row 0); they would be trained literally: set data.replace "
        "(data.replace.author=..., data.replace.name=...) to fill them"
    ]
    preview = api.data_preview(config, n=1, overrides=["data.replace.name=Ada", "data.replace.author=Lab"])
    assert "I am Ada, an AI assistant developed by Lab." in preview
    assert not any("warning" in line for line in api.data_check(config, overrides=["data.replace.name=Ada",
                                                                                   "data.replace.author=Lab"]).lines)
