"""Branches of the pipeline side by side (common/pipeline/branches.py): results and stage lines come
back, each branch's output lands in its log file, and a failing branch stops the others."""

import multiprocessing as mp
import os
import subprocess
import time

import pytest

from common.pipeline.branches import run_side_by_side


def report_pid(name, log):
    log(f"[{name}] step done")
    print(f"{name} detail for the log file")
    subprocess.run(["sh", "-c", f"echo {name} grandchild on stderr >&2"], check=True)  # like a simulator worker's output
    return {"name": name, "pid": os.getpid()}


def fail(log):
    log("[bad] about to fail")
    raise ValueError("expected 3 layers, found 2")


def sleep_long(log):
    log("[slow] started")
    time.sleep(120)
    return {}


def test_branches_run_in_their_own_processes_and_return_results(tmp_path):
    from functools import partial

    lines = []
    results = run_side_by_side({"a": partial(report_pid, "a"), "b": partial(report_pid, "b")},
                               log_dir=tmp_path, log=lines.append, progress=False, expected_lines=2)
    assert {k: v["name"] for k, v in results.items()} == {"a": "a", "b": "b"}
    assert len({results["a"]["pid"], results["b"]["pid"], os.getpid()}) == 3
    assert "[a] step done" in lines and "[b] step done" in lines
    assert "a detail for the log file" in (tmp_path / "branch_a.log").read_text()
    assert "a grandchild on stderr" in (tmp_path / "branch_a.log").read_text()
    assert "a detail" not in (tmp_path / "branch_b.log").read_text()


def test_a_failing_branch_names_itself_and_stops_the_others(tmp_path):
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match=r"branch bad failed: ValueError: expected 3 layers, found 2 \(traceback in .*branch_bad.log\)"):
        run_side_by_side({"bad": fail, "slow": sleep_long}, log_dir=tmp_path, log=lambda line: None, progress=False)
    assert time.perf_counter() - started < 60  # the sleeping branch was stopped, not waited for
    assert mp.active_children() == []
    assert "Traceback" in (tmp_path / "branch_bad.log").read_text()
