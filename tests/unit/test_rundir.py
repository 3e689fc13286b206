"""The run folder's rules (engine/rundir.py) and safe checkpoint states (engine/checkpoint.py), as units."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tunelab.engine import checkpoint as ck
from tunelab.engine import rundir
from tunelab.errors import UserError

CFG = {
    "model": {"path": "models/m", "dtype": "auto"},
    "data": {"train": [{"path": "a.json", "format": "alpaca"}], "max_length": 64},
    "train": {"lr": 0.01, "batch_size": 4, "grad_accum": 2, "max_steps": 10, "log_every": 1, "seed": 0},
    "output": {"dir": "runs/x"},
}


def _with(**changes):
    import copy

    cfg = copy.deepcopy(CFG)
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        cfg[section][key] = value
    return cfg


def test_config_changes_sorts_keys_into_refused_and_allowed():
    refused, allowed = rundir.config_changes(CFG, _with(train__lr=0.02, train__max_steps=20, output__dir="runs/y"),
                                             old_world=1, new_world=1)
    assert refused == {"train.lr": (0.01, 0.02)}
    assert allowed == {"train.max_steps": (10, 20), "output.dir": ("runs/x", "runs/y")}


def test_the_global_batch_is_compared_not_its_split():
    # 4 x 2 x 1 process == 2 x 2 x 2 processes: allowed; 4 x 1 x 1: refused
    refused, allowed = rundir.config_changes(CFG, _with(train__batch_size=2), old_world=1, new_world=2)
    assert refused == {} and "train.batch_size" in allowed
    refused, _ = rundir.config_changes(CFG, _with(train__grad_accum=1), old_world=1, new_world=1)
    assert list(refused) == ["global batch (batch_size x grad_accum x processes)"]


def test_an_added_dataset_and_a_changed_path_are_refused(tmp_path):
    two = _with(data__train=[{"path": "a.json", "format": "alpaca"}, {"path": "b.json", "format": "alpaca"}])
    refused, _ = rundir.config_changes(CFG, two, old_world=1, new_world=1)
    assert "data.train#len" in refused
    # the same file written another way is the same input
    (tmp_path / "a.json").write_text("[]")
    old = _with(data__train=[{"path": str(tmp_path / "a.json"), "format": "alpaca"}])
    new = _with(data__train=[{"path": str(tmp_path / "." / "a.json"), "format": "alpaca"}])
    assert rundir.config_changes(old, new, old_world=1, new_world=1) == ({}, {})


def test_keys_new_to_the_config_are_not_compared():
    new = _with(train__some_new_option=True)
    assert rundir.config_changes(CFG, new, old_world=1, new_world=1) == ({}, {})


def test_run_folder_recognition_and_clear_run_keep_foreign_files(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert not rundir.is_run_folder(out)
    with pytest.raises(UserError, match="not a tunelab run folder"):
        rundir.check_output_dir(out, overwrite=True)
    with pytest.raises(UserError, match="not a tunelab run folder"):
        rundir.clear_run(out)
    rundir.record_start(out, version="t", resumed_from=None, step=0)
    (out / "checkpoints").mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    assert rundir.is_run_folder(out)
    rundir.check_output_dir(out, overwrite=True)
    assert sorted(rundir.clear_run(out)) == ["checkpoints", "metrics.jsonl", "run.json"]
    assert [p.name for p in out.iterdir()] == ["notes.md"]


def test_a_run_written_before_run_json_is_still_recognised(tmp_path):
    (tmp_path / "config.yaml").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    assert rundir.is_run_folder(tmp_path)


def test_rng_states_are_plain_data_and_restore_every_generator(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ck.write_rng(tmp_path, 0)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.load_rng(tmp_path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    torch.load(tmp_path / "rng-rank0.pt", weights_only=True)  # tensors and plain data only


def test_rng_files_written_before_plain_data_still_load(tmp_path):
    """tunelab's earlier RNG files held numpy's state tuple (a numpy array): read with numpy's array rebuild
    allow-listed, not with a general unpickler."""
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()},
               tmp_path / "rng-rank0.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.load_rng(tmp_path, 0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _Evil:
    def __reduce__(self):
        return (print, ("ran",))


def test_a_state_file_with_any_other_object_is_refused_and_a_truncated_one_is_damaged(tmp_path, capsys):
    torch.save({"x": _Evil()}, tmp_path / "extra.pt")
    with pytest.raises(UserError, match="could run code"):
        ck.load_state_file(tmp_path / "extra.pt")
    assert "ran" not in capsys.readouterr().out
    torch.save({"x": torch.ones(1000)}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "ok.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.DamagedCheckpoint, match="ok.pt: truncated or damaged"):
        ck.load_state_file(tmp_path / "ok.pt")
    with pytest.raises(ck.DamagedCheckpoint, match="missing"):
        ck.load_state_file(tmp_path / "absent.pt")
