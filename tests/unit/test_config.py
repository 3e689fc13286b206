"""Config loading: precedence, strictness, suggestions, types, round trip, help text coverage."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from tunelab.config import config_to_dict, load_config, save_config
from tunelab.config.docs import markdown, options_text
from tunelab.config.load import iter_fields
from tunelab.config.schema import ADAPTER_CONFIGS, METHOD_CONFIGS, Config, DatasetSpec
from tunelab.errors import ConfigError

BASE = {"model": {"path": "m"}, "data": {"train": [{"path": "d.json"}]}}


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_issue_example_shape_loads(tmp_path):
    text = """
model:   {path: models/tiny-llama}
data:
  train: [{path: data/alpaca.json, format: alpaca}]
  template: auto
  max_length: 512
  val_size: 0.05
adapter: {type: lora, r: 8, alpha: 16, target: all-linear}
method:  {type: sft}
train:   {batch_size: 8, grad_accum: 1, lr: 2.0e-4, epochs: 1, max_steps: -1, log_every: 10, save_every: 100, seed: 42}
output:  {dir: runs/quickstart}
"""
    cfg = load_config(write(tmp_path, text))
    assert cfg.model.path == "models/tiny-llama"
    assert cfg.data.train == [DatasetSpec(path="data/alpaca.json", format="alpaca")]
    assert cfg.adapter.type == "lora" and cfg.adapter.r == 8 and cfg.adapter.alpha == 16.0
    assert cfg.train.lr == 2e-4 and cfg.train.max_steps == -1
    assert cfg.output.dir == "runs/quickstart"


def test_precedence_defaults_yaml_overrides(tmp_path):
    p = write(tmp_path, {**BASE, "train": {"lr": 1.0e-3, "batch_size": 4}})
    cfg = load_config(p, ["train.lr=5e-5", "adapter.r=16", "data.train.0.max_samples=10"])
    assert cfg.train.lr == 5e-5  # override beats YAML
    assert cfg.train.batch_size == 4  # YAML beats default
    assert cfg.train.grad_accum == 1  # default
    assert cfg.adapter.r == 16
    assert cfg.data.train[0].max_samples == 10


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "train.lrr: unknown key; did you mean 'train.lr'?"),
        ("trian.lr=1", "trian: unknown key; did you mean 'train'?"),
        ("train.batch_size=eight", "train.batch_size: expected an integer, got 'eight'"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing: expected true/false, got 'maybe'"),
        ("adapter.type=lorra", "adapter.type: unknown type 'lorra'; did you mean 'lora'?"),
        ("train.scheduler=cosin", "train.scheduler: 'cosin' is not one of cosine, linear, constant; did you mean 'cosine'?"),
        ("train.batch_size=0", "train.batch_size: must be >= 1, got 0"),
        ("data.train.0.formatt=alpaca", "data.train[0].formatt: unknown key; did you mean 'data.train[0].format'?"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, [override])
    assert e.value.message == message


def test_keys_of_another_adapter_type_are_rejected():
    with pytest.raises(ConfigError, match=r"adapter.r: unknown key for adapter.type 'full'"):
        load_config({**BASE, "adapter": {"type": "full", "r": 8}})


def test_yaml_errors_name_file_and_line(tmp_path):
    p = write(tmp_path, "model:\n  path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+:\d+: malformed YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml: train.lrr: unknown key"):
        load_config(write(tmp_path, {**BASE, "train": {"lrr": 1}}))


def test_required_fields():
    with pytest.raises(ConfigError, match="model.path: required"):
        load_config({"data": BASE["data"]})
    with pytest.raises(ConfigError, match="data.train: at least one dataset"):
        load_config({"model": {"path": "m"}})
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        load_config({"model": {"path": "m"}, "data": {"train": [{"format": "alpaca"}]}})


def test_yaml_scientific_without_dot_is_a_number():
    # YAML 1.1 reads 2e-4 as a string; we accept it as the number the user meant.
    assert load_config({**BASE, "train": {"lr": "2e-4"}}).train.lr == 2e-4


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(BASE, ["adapter.type=freeze", "adapter.layers=1", "train.adam_betas=[0.8, 0.9]"])
    save_config(cfg, tmp_path / "r.yaml")
    again = load_config(tmp_path / "r.yaml")
    assert again == cfg
    assert config_to_dict(again)["adapter"] == {"type": "freeze", "layers": 1, "modules": [], "embeddings": False,
                                                "norms": False}


def test_every_field_has_help_and_appears_in_docs():
    doc = markdown()
    text = options_text()
    classes = [Config, DatasetSpec, *ADAPTER_CONFIGS.values(), *METHOD_CONFIGS.values()]
    for cls in classes:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    for key, _, _, _ in iter_fields(Config):
        assert f"`{key}`" in doc, key
        assert key in text, key


def test_docs_config_md_is_current():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert path.read_text().strip() == markdown().strip(), "run `make docs` to regenerate docs/config.md"


def test_docs_methods_md_is_current():
    """docs/methods.md is generated from the adapter registry, the schema and benchmarks/methods.json."""
    import runpy
    from pathlib import Path

    from tunelab.models.adapters import ADAPTERS

    root = Path(__file__).resolve().parents[2]
    text = runpy.run_path(str(root / "scripts" / "methods_doc.py"))["markdown"]()  # repository tooling, not a module
    path = root / "docs" / "methods.md"
    assert path.read_text().strip() == text.strip(), "run `make docs` to regenerate docs/methods.md"
    for name in ADAPTERS:
        assert f"### `{name}`" in text


@pytest.mark.parametrize("method,message", [
    ({}, "method.teacher.path: required"),
    ({"teacher": {"path": "t"}, "loss": "jsd", "beta": 1.0}, "method.beta: jsd needs beta in (0, 1)"),
    ({"teacher": {"path": "t"}, "teacher_cache": "c"}, "method.teacher_cache: needs top_k"),
    ({"teacher": {"path": "t"}, "top_k": 8, "teacher_cache": "c", "lmbda": 0.5},
     "method.teacher_cache: the student's own samples"),
    ({"teacher": {"path": "t"}, "lmbda": 0.5, "data": "text"}, "method.lmbda: on-policy distillation"),
    ({"teacher": {"path": "t"}, "alpha": 1.5}, "method.alpha: in [0, 1]"),
    ({"teacher": {"path": "t"}, "temperature": 0}, "method.temperature: must be positive"),
    ({"teacher": {"path": "t", "adaptr": "a"}}, "method.teacher.adaptr: unknown key; did you mean"),
])
def test_kd_options_are_checked(method, message):
    with pytest.raises(ConfigError) as e:
        load_config({**BASE, "method": {"type": "kd", **method}})
    assert e.value.message.startswith(message), e.value.message
