"""Nothing in a model folder runs as code unless opted in by name; broken folders give one line; the export folder
keeps the user's files. In-process checks of models/load.py, infer/loading.py, infer/export.py and utils/env.py
(the CLI runs are in tests/e2e/test_export_safety.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tunelab.config.schema import ModelConfig
from tunelab.errors import UserError
from tunelab.models.load import load_model, load_tokenizer


class _Creates:
    """Unpickling this creates a file: the marker of code run from a weights file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return dst


@pytest.fixture(scope="module")
def pickle_model(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with its weights as pytorch_model.bin only (what torch.save writes: a zip of pickles)."""
    from safetensors.torch import load_file

    dst = _copy_without_weights(tiny_model_dir, tmp_path_factory.mktemp("pkl") / "model")
    torch.save(load_file(str(tiny_model_dir / "model.safetensors")), dst / "pytorch_model.bin")
    return dst


@pytest.fixture()
def evil_model(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """A model folder whose pytorch_model.bin creates a file when unpickled; (folder, marker)."""
    dst = _copy_without_weights(tiny_model_dir, tmp_path / "evil")
    marker = tmp_path / "code-ran"
    with open(dst / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Creates(marker)}, f)
    return dst, marker


def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------------------------------------ pickle weights
@pytest.mark.parametrize("names", [["pytorch_model.bin"],
                                   ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                                    "pytorch_model.bin.index.json"],
                                   ["model.pt"]], ids=["bin", "bin-shards", "pt"])
def test_pickle_only_folders_are_refused_naming_the_folder_and_key(tmp_path, names):
    from tunelab.models.load import check_weights_format

    (tmp_path / "config.json").write_text("{}")
    for n in names:
        (tmp_path / n).write_bytes(b"")
    with pytest.raises(UserError) as e:
        check_weights_format(str(tmp_path), allow_pickle=False)
    line = _one_line(e)
    assert str(tmp_path) in line and "model.allow_pickle=true" in line and names[0] in line
    check_weights_format(str(tmp_path), allow_pickle=True)  # opted in
    (tmp_path / "model.safetensors").write_bytes(b"")
    check_weights_format(str(tmp_path), allow_pickle=False)  # safetensors are there: transformers uses them


def test_config_naming_a_pickle_weights_file_is_refused(tmp_path):
    """config.json may name its weights file (transformers_weights); a pickle named so loads despite safetensors."""
    from tunelab.models.load import check_weights_format

    (tmp_path / "config.json").write_text(json.dumps({"transformers_weights": "adapter_model.bin"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as e:
        check_weights_format(str(tmp_path), allow_pickle=False)
    assert "adapter_model.bin" in _one_line(e) and "model.allow_pickle=true" in str(e.value)


def test_pickle_model_loads_only_with_allow_pickle(pickle_model, tiny_model_dir):
    with pytest.raises(UserError) as e:
        load_model(ModelConfig(path=str(pickle_model)), dtype=torch.float32)
    assert str(pickle_model) in _one_line(e) and "model.allow_pickle=true" in str(e.value)
    model = load_model(ModelConfig(path=str(pickle_model), allow_pickle=True), dtype=torch.float32).eval()
    safe = load_model(ModelConfig(path=str(tiny_model_dir)), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, safe(input_ids=ids).logits)  # the same weights, bit for bit


def test_crafted_pickle_runs_no_code(evil_model):
    folder, marker = evil_model
    with pytest.raises(UserError) as e:
        load_model(ModelConfig(path=str(folder)), dtype=torch.float32)
    assert "model.allow_pickle=true" in _one_line(e)
    assert not marker.exists()
    # opted in: transformers unpickles with torch's weights-only loader, which refuses the object; one line still
    with pytest.raises(UserError) as e:
        load_model(ModelConfig(path=str(folder), allow_pickle=True), dtype=torch.float32)
    assert str(folder) in _one_line(e)
    assert not marker.exists()


def test_chat_and_export_loading_names_the_flag(pickle_model, tiny_model_dir, tmp_path):
    from tunelab.infer.loading import load_for_inference

    with pytest.raises(UserError) as e:
        load_for_inference(str(pickle_model))
    line = _one_line(e)
    assert line.startswith("--model: ") and str(pickle_model) in line and "--allow-pickle" in line
    model, _ = load_for_inference(str(pickle_model), allow_pickle=True)
    assert model is not None
    # a peft adapter saved as adapter_model.bin is a pickle too
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_for_inference(str(tiny_model_dir), str(adapter))
    assert _one_line(e).startswith("--adapter: ") and "--allow-pickle" in str(e.value)


# ------------------------------------------------------------------------------------------ tokenizer, remote code
def test_model_without_tokenizer_gives_one_line(tiny_model_dir, tmp_path):
    folder = tmp_path / "notok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model_dir / name, folder / name)
    with pytest.raises(UserError) as e:
        load_tokenizer(ModelConfig(path=str(folder)))
    line = _one_line(e)
    assert line.startswith("model.path: ") and str(folder) in line and "model.tokenizer" in line
    tok = load_tokenizer(ModelConfig(path=str(folder), tokenizer=str(tiny_model_dir)))  # the way out it names
    assert tok.pad_token_id is not None


@pytest.fixture()
def remote_model(tiny_model_dir, tmp_path) -> tuple[Path, Path]:
    """A model whose config.json maps to code shipped with it; the code creates a marker file when it runs."""
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="shipped-llama", auto_map={"AutoConfig": "configuration_shipped.ShippedConfig",
                                                        "AutoModelForCausalLM": "modeling_shipped.ShippedModel"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (folder / "configuration_shipped.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nfrom transformers import LlamaConfig\n\n\n"
        "class ShippedConfig(LlamaConfig):\n    model_type = 'shipped-llama'\n")
    return folder, marker


def test_remote_code_refusal_names_the_key(remote_model):
    folder, marker = remote_model
    from tunelab.engine.plan import ModelShape

    for load in (lambda: load_tokenizer(ModelConfig(path=str(folder))),
                 lambda: load_model(ModelConfig(path=str(folder)), dtype=torch.float32),
                 lambda: ModelShape.from_pretrained(str(folder))):  # `tunelab plan` reads the config too
        with pytest.raises(UserError) as e:
            load()
        line = _one_line(e)
        assert str(folder) in line and "model.trust_remote_code=true" in line
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ noise
def test_quiet_transformers_hides_only_transformers_bars(tiny_model_dir, capfd):
    from transformers.utils import logging as hf_logging

    from tunelab.utils.env import quiet_transformers

    with quiet_transformers():
        assert isinstance(hf_logging.tqdm(range(3), desc="x"), hf_logging.EmptyTqdm)
    if hf_logging.is_progress_bar_enabled():  # restored afterwards (unless bars are off in this environment)
        assert not isinstance(hf_logging.tqdm(range(3), desc="x", disable=True), hf_logging.EmptyTqdm)
    capfd.readouterr()
    load_model(ModelConfig(path=str(tiny_model_dir)), dtype=torch.float32)
    tok = load_tokenizer(ModelConfig(path=str(tiny_model_dir)))
    tok("word " * (tok.model_max_length + 10))  # longer than the model: transformers would warn here
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "Loading weights" not in text and "Token indices sequence length" not in text


# ------------------------------------------------------------------------------------------------ export folder
def test_export_out_may_not_overlap_its_inputs(tmp_path):
    from tunelab.infer.export import check_out

    model, adapter = tmp_path / "models" / "base", tmp_path / "run" / "final"
    model.mkdir(parents=True)
    adapter.mkdir(parents=True)
    inputs = {"--model": [str(model)], "--adapter": [str(adapter)], "--run": [str(tmp_path / "run")]}
    for out, words in [(model, "is the --model folder"), (model / "exported", "is inside the --model folder"),
                       (tmp_path / "models", "contains the --model folder"), (adapter, "is the --adapter folder"),
                       (tmp_path / "run", "contains the --adapter folder"), (tmp_path, "contains the --model")]:
        with pytest.raises(UserError) as e:
            check_out(out, inputs)
        assert words in _one_line(e) and str(out) in str(e.value), (out, str(e.value))
    assert check_out(tmp_path / "exported", inputs) is None
    # beside what a run folder holds, as the quickstart exports (RUN/exported): nothing read is replaced
    assert check_out(tmp_path / "run" / "exported", inputs) is None
    with pytest.raises(UserError, match="is inside the --adapter folder"):
        check_out(adapter / "exported", inputs)
    (tmp_path / "exported").mkdir()
    assert check_out(tmp_path / "exported", inputs) is None  # empty
    (tmp_path / "exported" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no earlier export"):
        check_out(tmp_path / "exported", inputs)
    for files in (["../model.safetensors"], ["/etc/passwd"], "config.json"):
        (tmp_path / "exported" / "tunelab_export.json").write_text(json.dumps({"files": files}))
        with pytest.raises(UserError) as e:
            check_out(tmp_path / "exported", inputs)
        assert "tunelab_export.json" in _one_line(e)
    (tmp_path / "exported" / "tunelab_export.json").write_text(json.dumps({"files": ["config.json"]}))
    assert check_out(tmp_path / "exported", inputs) == ["config.json"]


def test_install_replaces_only_export_files(tmp_path):
    from tunelab.infer.export import MANIFEST, _install, _write_manifest

    out = tmp_path / "exported"
    out.mkdir()
    for name in ("config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json"):
        (out / name).write_text("old")
    _write_manifest(out, ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                          "model.safetensors.index.json"], {})
    (out / "notes.txt").write_text("mine")
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "config.json").write_text("new")
    (staged / "model.safetensors").write_text("new")
    _install(staged, out, out, {})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt", MANIFEST]
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").read_text() == "new"
    assert json.loads((out / MANIFEST).read_text())["files"] == ["config.json", "model.safetensors"]
    # a file of the user's under a name the new export writes is not overwritten
    (out / "tokenizer.json").write_text("mine")
    (staged / "tokenizer.json").write_text("new")
    with pytest.raises(UserError, match="tokenizer.json was not written by tunelab export"):
        _install(staged, out, out, {})
    assert (out / "tokenizer.json").read_text() == "mine"
    assert not os.path.exists(out / ".tunelab_export.json.tmp")


def test_a_model_path_that_is_a_symlink_loop_is_named_as_such(tmp_path):
    from tunelab.models.load import check_model_path

    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    with pytest.raises(UserError, match=r"model\.path: .*a is a symlink loop"):
        check_model_path(str(tmp_path / "a"))
    with pytest.raises(UserError, match="model folder not found"):
        check_model_path(str(tmp_path / "absent"))
