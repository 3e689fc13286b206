"""Registry: LLaMA-Factory's dataset_info.json entries resolve to readable datasets, or fail clearly."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from tunelab.config.schema import DatasetSpec
from tunelab.data.load import load_conversations
from tunelab.data.registry import ResolvedDataset, load_registry, resolve_dataset
from tunelab.errors import UserError

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
REGISTRY = str(FIXTURES / "dataset_info.json")


def named(name: str, **kw) -> DatasetSpec:
    return DatasetSpec(name=name, registry=REGISTRY, **kw)


def test_file_entry_defaults_to_alpaca_relative_to_the_registry():
    assert resolve_dataset(named("alpaca_demo")) == ResolvedDataset(
        path=str(FIXTURES / "alpaca.json"), format="alpaca"
    )


def test_path_spec_passes_through():
    spec = DatasetSpec(path="data/x.jsonl", format="openai", columns={"messages": "dialog"}, max_samples=5)
    assert resolve_dataset(spec) == ResolvedDataset(
        path="data/x.jsonl", format="openai", columns={"messages": "dialog"}, max_samples=5
    )


def test_entry_columns_tags_and_the_spec_overriding_them():
    resolved = resolve_dataset(named("openai_demo", tags={"system_tag": "developer"}))
    assert resolved.format == "sharegpt"
    assert resolved.columns == {"messages": "messages"}
    assert resolved.tags == {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
        "observation_tag": "tool",
        "system_tag": "developer",
    }
    assert resolve_dataset(named("alpaca_demo", format="sharegpt")).format == "sharegpt"


def test_num_samples_caps_max_samples():
    assert resolve_dataset(named("csv_demo")).max_samples == 2
    assert resolve_dataset(named("csv_demo", max_samples=1)).max_samples == 1
    assert resolve_dataset(named("csv_demo", max_samples=9)).max_samples == 2


def test_lf_sharegpt_entry_with_openai_tags_just_works():
    rows, report = load_conversations([named("openai_demo")])
    assert report.per_dataset == {"openai_demo": 2}
    assert rows[0].messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
    ]
    assert rows[1].messages[1]["tool_calls"] == [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    ]
    assert rows[1].source == f"{FIXTURES / 'openai.jsonl'}:2"


def test_every_local_fixture_entry_loads():
    specs = [named(n) for n in ("alpaca_demo", "csv_demo", "sharegpt_demo", "openai_demo")]
    _, report = load_conversations(specs)
    assert report.per_dataset == {"alpaca_demo": 3, "csv_demo": 2, "sharegpt_demo": 3, "openai_demo": 2}


def test_unknown_name_suggests_the_closest():
    with pytest.raises(
        UserError, match=rf"^dataset 'alpaca_dem' is not defined in {REGISTRY}; did you mean 'alpaca_demo'\?$"
    ):
        resolve_dataset(named("alpaca_dem"))
    with pytest.raises(
        UserError, match=r"^dataset 'zzz' is not defined in .*dataset_info\.json \(it defines 7 datasets\)$"
    ):
        resolve_dataset(named("zzz"))


def test_hub_entry_resolves_and_an_unreachable_hub_is_a_user_error(monkeypatch):
    resolved = resolve_dataset(named("hub_demo"))
    assert (resolved.hub_id, resolved.subset, resolved.split, resolved.path) == (
        "llamafactory/alpaca_en",
        "default",
        "train",
        None,
    )

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'llamafactory/alpaca_en' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match=r"^llamafactory/alpaca_en: could not load .* the hub is unreachable"):
        load_conversations([named("hub_demo")])


def test_unsupported_sources_and_ranking():
    with pytest.raises(UserError, match=r"'modelscope_demo': ms_hub_url datasets are not supported"):
        resolve_dataset(named("modelscope_demo"))
    assert resolve_dataset(named("dpo_demo")).ranking
    with pytest.raises(UserError, match=r"^dpo_demo: a ranking \(preference\) dataset"):
        load_conversations([named("dpo_demo")])


def write_registry(tmp_path: Path, registry: object) -> str:
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(registry) if not isinstance(registry, str) else registry)
    return str(path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            {"file_name": "d.jsonl", "formating": "sharegpt"},
            r"'d': unknown key 'formating'; did you mean 'formatting'\?",
        ),
        (
            {"file_name": "d.jsonl", "formatting": "chatml"},
            r"'d': formatting 'chatml' is not one of alpaca, sharegpt, openai, text",
        ),
        (
            {"file_name": "d.jsonl", "num_samples": 0},
            r"'d': num_samples must be a positive whole number, got 0",
        ),
        (
            {"formatting": "alpaca"},
            r"'d': needs file_name \(a file or folder next to the registry\) or hf_hub_url",
        ),
        (
            {"file_name": "d.jsonl", "columns": ["prompt"]},
            r"'d': columns must be an object mapping names, got list",
        ),
        ({"script_url": "my_script"}, r"'d': script_url datasets are not supported"),
        ("not an object", r"'d': expected an object, got str"),
    ],
)
def test_bad_entries(tmp_path, entry, message):
    registry = write_registry(tmp_path, {"d": entry})
    with pytest.raises(UserError, match=message):
        resolve_dataset(DatasetSpec(name="d", registry=registry))


def test_bad_registry_files(tmp_path):
    with pytest.raises(UserError, match=r"nope\.json: registry file not found"):
        load_registry(tmp_path / "nope.json")
    with pytest.raises(UserError, match=r"dataset_info\.json:2: invalid JSON"):
        load_registry(write_registry(tmp_path, '{"a": {},\n "b": }'))
    with pytest.raises(UserError, match="expected a JSON object mapping dataset names to entries"):
        load_registry(write_registry(tmp_path, "[]"))


def test_registry_entry_with_unknown_column_key_fails_at_load(tmp_path):
    (tmp_path / "d.json").write_text('[{"instruction": "q", "output": "a"}]')
    registry = write_registry(tmp_path, {"d": {"file_name": "d.json", "columns": {"images": "images"}}})
    with pytest.raises(UserError, match=r"^d: columns\.images: multimodal data is not supported"):
        load_conversations([DatasetSpec(name="d", registry=registry)])


def test_a_key_given_twice_in_the_registry_is_an_error_with_its_lines(tmp_path):
    path = tmp_path / "dataset_info.json"
    path.write_text('{\n  "a": {"file_name": "a.json"},\n  "b": {"file_name": "b.json"},\n  "a": {"file_name": "c.json"}\n}\n')
    with pytest.raises(UserError, match=r'dataset_info\.json: "a" given twice in one object \(the key appears at '
                                        r'lines 2, 4\)'):
        load_registry(path)
