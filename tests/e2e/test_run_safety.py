"""Nothing the user had is lost, nothing a checkpoint holds runs code, no run drifts silently: output.overwrite,
the run lock, safe and checked checkpoint loading, non-finite losses, config drift on resume (issue 11)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import ROOT, alpaca_rows, base_config, run_main, write_json
from tunelab.cli import main
from tunelab.engine import rundir
from tunelab.engine.metrics import read_metrics


@pytest.fixture()
def tunelab(capsys):
    """The CLI in this process (tests/helpers.py run_main), as tests/e2e/test_runs.py runs it."""
    return lambda *args, check=False: run_main(capsys, *args, check=check)


def _cfg(tmp_path, tiny_model_dir, data_path, out, name="c.yaml", **sections):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(base_config(tiny_model_dir, data_path, out, **sections)))
    return path


def _one_line_error(proc, code=2):
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return write_json(tmp_path_factory.mktemp("data") / "train.json", alpaca_rows(24))


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, data_path, tmp_path_factory):
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by the tests that change it)."""
    tmp = tmp_path_factory.mktemp("finished")
    out = tmp / "run"
    cfg = _cfg(tmp, tiny_model_dir, data_path, out, train={"max_steps": 4, "save_every": 2})
    assert main(["train", str(cfg)]) == 0
    return cfg, out


def _copy_run(finished_run, tmp_path):
    import shutil

    cfg_path, out = finished_run
    cfg = yaml.safe_load(cfg_path.read_text())
    new_out = tmp_path / "run"
    shutil.copytree(out, new_out)
    cfg["output"]["dir"] = str(new_out)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, new_out


# ------------------------------------------------------------------------------------------------ output.overwrite
def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tunelab, tiny_model_dir, data_path, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("mine")
    cfg = _cfg(tmp_path, tiny_model_dir, data_path, notes)
    for extra in ([], ["output.overwrite=true"]):
        line = _one_line_error(tunelab("train", str(cfg), *extra))
        assert str(notes.resolve()) in line and "not a tunelab run folder" in line
        assert (notes / "ideas.txt").read_text() == "mine"


def test_empty_output_dir_is_refused_not_the_current_folder(tunelab, tiny_model_dir, data_path, tmp_path,
                                                            monkeypatch):
    (tmp_path / "keep.txt").write_text("x")
    cfg = _cfg(tmp_path, tiny_model_dir, data_path, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(tunelab("train", str(cfg), "output.dir=", "output.overwrite=true"))
    assert "output.dir" in line
    assert (tmp_path / "keep.txt").exists() and (tmp_path / "c.yaml").exists()


def test_overwrite_replaces_only_what_the_run_wrote(tunelab, finished_run, tmp_path):
    cfg, out = _copy_run(finished_run, tmp_path)
    (out / "notes.txt").write_text("mine")
    data_inside = write_json(out / "more.json", alpaca_rows(12))  # data kept in the run folder, not written by it
    proc = tunelab("train", str(cfg), f"data.train=[{{path: {data_inside}, format: alpaca}}]",
                   "output.overwrite=true", "train.max_steps=2", check=True)
    assert "cleared the earlier run" in proc.stdout
    assert (out / "notes.txt").read_text() == "mine" and data_inside.exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2]  # the new run's records only
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000002"]
    history = rundir.read_run(out)["history"]
    assert [h["event"] for h in history] == ["start"]


def test_overwrite_refuses_an_input_inside_what_it_would_delete(tunelab, finished_run, tmp_path):
    cfg, out = _copy_run(finished_run, tmp_path)
    data_in_final = write_json(out / "final" / "rows.json", alpaca_rows(8))
    line = _one_line_error(tunelab("train", str(cfg), f"data.train=[{{path: {data_in_final}, format: alpaca}}]",
                                   "output.overwrite=true"))
    assert "rows.json" in line and "input" in line
    assert data_in_final.exists() and (out / "checkpoints").is_dir()


# ------------------------------------------------------------------------------------------------------------ lock
def test_a_second_run_on_a_locked_folder_is_refused_with_the_holders_pid(tunelab, tiny_model_dir, data_path,
                                                                         tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = _cfg(tmp_path, tiny_model_dir, data_path, out)
    with rundir.RunLock(out):  # a different open file description: flock conflicts as with another process
        line = _one_line_error(tunelab("train", str(cfg)))
    assert f"PID {os.getpid()}" in line and "in use by another tunelab run" in line
    assert not (out / "metrics.jsonl").exists()


def test_a_lock_left_by_a_killed_process_is_not_in_the_way(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from tunelab.engine.rundir import "
         "RunLock; RunLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"PID {holder.pid}"):
        rundir.RunLock(out).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with rundir.RunLock(out):  # the kernel dropped the dead process's flock; the stale file is harmless
        pass


# ------------------------------------------------------------------------------------------ checkpoints run no code
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_crafted_checkpoint_state_is_refused_and_runs_nothing(tunelab, finished_run, tmp_path):
    cfg, out = _copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "checkpoint-000004"
    marker = tmp_path / "pwned"
    for name in ("extra.pt", "optimizer.pt", "rng-rank0.pt"):
        original = (ckpt / name).read_bytes()
        torch.save({"window": _Evil(str(marker))}, ckpt / name)
        line = _one_line_error(tunelab("train", str(cfg), f"train.resume={ckpt}", "train.max_steps=6"))
        assert name in line and "could run code" in line
        assert not marker.exists()
        (ckpt / name).write_bytes(original)


# --------------------------------------------------------------------------------------- damaged checkpoints
@pytest.mark.parametrize("damaged", ["optimizer.pt", "rng-rank0.pt", "weights"])
def test_resume_auto_skips_a_damaged_checkpoint_with_one_line(tunelab, finished_run, tmp_path, damaged):
    cfg, out = _copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "checkpoint-000004"
    target = next((ckpt / "weights").glob("*.safetensors")) if damaged == "weights" else ckpt / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    proc = tunelab("train", str(cfg), "train.max_steps=6", check=True)
    assert "Traceback" not in proc.stderr
    assert re.search(r"resume: checkpoint-000004 is damaged \(.*(optimizer|rng|safetensors).*\); trying the one "
                     r"before", proc.stdout), proc.stdout
    assert "continuing from" in proc.stdout and "checkpoint-000002" in proc.stdout
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_an_explicit_damaged_checkpoint_is_one_line(tunelab, finished_run, tmp_path):
    cfg, out = _copy_run(finished_run, tmp_path)
    ckpt = out / "checkpoints" / "checkpoint-000004"
    (ckpt / "scheduler.pt").write_bytes(b"\x80\x02garbage")
    line = _one_line_error(tunelab("train", str(cfg), f"train.resume={ckpt}", "train.max_steps=6"))
    assert "scheduler.pt" in line


# ------------------------------------------------------------------------------------------------- non-finite
def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tunelab, tiny_model_dir, data_path,
                                                                            tmp_path):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, tiny_model_dir, data_path, out,
               train={"max_steps": 6, "save_every": 1, "lr": 1e30, "max_grad_norm": 0})
    proc = tunelab("train", str(cfg))
    line = _one_line_error(proc, code=3)
    m = re.search(r"non-finite .* at step (\d+) \(rows: ([^)]*)\)", line)
    assert m, line
    step = int(m.group(1))
    assert "train.json:" in m.group(2)  # the rows of the batch, by file and line
    assert not (out / "final").exists()
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved and saved[-1] == f"checkpoint-{step - 1:06d}" and saved[-1] in line
    assert all(r["step"] < step for r in read_metrics(out))
    for bad in ("inf", "nan", "-1"):
        line = _one_line_error(tunelab("train", str(cfg), f"train.lr={bad}"))
        assert "train.lr" in line


# ------------------------------------------------------------------------------------------------- config drift
def test_resume_refuses_a_config_that_changes_the_trajectory(tunelab, finished_run, tmp_path, data_path):
    cfg, out = _copy_run(finished_run, tmp_path)
    before = (out / "metrics.jsonl").read_text()
    line = _one_line_error(tunelab("train", str(cfg), "train.max_steps=6", "train.lr=0.5"))
    assert "train.lr: 0.01 -> 0.5" in line and "output.overwrite=true" in line
    extra = write_json(tmp_path / "extra.json", alpaca_rows(6))
    two = f"data.train=[{{path: {data_path}, format: alpaca}}, {{path: {extra}, format: alpaca}}]"
    line = _one_line_error(tunelab("train", str(cfg), "train.max_steps=6", two))
    assert "data.train" in line
    line = _one_line_error(tunelab("train", str(cfg), "train.max_steps=6", "train.batch_size=2"))
    assert "global batch" in line
    assert (out / "metrics.jsonl").read_text() == before


def test_resume_allows_raising_max_steps_and_records_it(tunelab, finished_run, tmp_path):
    cfg, out = _copy_run(finished_run, tmp_path)
    done = tunelab("train", str(cfg), check=True)
    assert "already complete" in done.stdout
    proc = tunelab("train", str(cfg), "train.max_steps=6", "train.log_every=2", check=True)
    resumed = next(line for line in proc.stdout.splitlines() if line.startswith("resume: continuing"))
    assert "train.log_every: 1 -> 2" in resumed and "train.max_steps: 4 -> 6" in resumed
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4, 6]
    last = rundir.read_run(out)["history"][-1]
    assert last["event"] == "resume" and last["step"] == 4
    assert last["changes"]["train.max_steps"] == {"was": 4, "now": 6}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 6


# ------------------------------------------------------------------------------------------------- summary
def test_train_ends_with_a_summary(tunelab, finished_run, tmp_path):
    cfg, out = _copy_run(finished_run, tmp_path)
    proc = tunelab("train", str(cfg), "train.max_steps=5", check=True)
    text = proc.stdout
    assert re.search(r"done: 5 steps in \d+:\d\d .*tokens/s mean", text), text
    records = read_metrics(out)
    assert f"loss: {records[0]['loss']:.4f} (step 1) -> {records[-1]['loss']:.4f} (step 5)" in text
    assert f"model: {out / 'final'}" in text and f"metrics: {out / 'metrics.jsonl'}" in text
    json.loads((out / "run.json").read_text())
