"""Guarantees under faults, one test each (more follow in issue 14):

- a torn last JSONL line (kill mid-write) is dropped on read and cut before the next append;
  damage before the last line is an error naming file and line;
- an evaluation summary counts each (task, trial) once, whoever wrote the rows;
- a resumed training drops log lines past its saved state, so no epoch is logged twice;
- a CLI error is one ``error:`` line and a non-zero exit; ``--debug`` shows the traceback.
"""

import json
import subprocess
import sys

import pytest
import torch

from common.eval.closed_loop import unique_rows
from common.jsonl import JsonlError, append_jsonl, read_jsonl
from common.training_loop import RunFiles


def test_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')  # killed mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, {"a": 4})
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 4}\n'


def test_damage_before_the_last_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(JsonlError, match=r"rows\.jsonl:2: not a JSON row"):
        read_jsonl(path)


def test_each_task_trial_counts_once():
    rows = [{"task": 0, "trial": 0, "status": "success"}, {"task": 0, "trial": 1, "status": "failure"},
            {"task": 0, "trial": 0, "status": "failure"}, {"task": 9, "trial": 0, "status": "success"}]
    kept = unique_rows(rows, planned={(0, 0), (0, 1)})
    assert [(r["task"], r["trial"], r["status"]) for r in kept] == [(0, 0, "success"), (0, 1, "failure")]


def test_resume_drops_log_lines_past_the_saved_state(tmp_path):
    state, log = tmp_path / "x_last.pt", tmp_path / "x_metrics.jsonl"
    torch.save({"kind": "k", "config": {"lr": 1.0}, "epoch": 2}, state)
    log.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))  # killed after logging epoch 3
    files = RunFiles(state_path=state, metrics_path=log, state_kind="k", config={"lr": 1.0},
                     resumable_changes=(), resume=True, checks={})
    assert files.load_state()["epoch"] == 2
    assert [r["epoch"] for r in read_jsonl(log)] == [1, 2]


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    cmd = [sys.executable, "-m", "phase2_draft_retrain.modal_train_draft_with_projection", "--data", str(tmp_path / "demos.hdf5"),
           "--rfsq-checkpoint", str(tmp_path / "missing.pt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ") and "missing.pt" in out.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
