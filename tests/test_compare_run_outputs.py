"""benchmarks.diagnostics.compare_run_outputs: two runs' JSON compared with paths, timings and missing values
(NaN as older writers wrote it, null as they write it now) treated as the same."""

import json
import math

from benchmarks.diagnostics.compare_run_outputs import compare, main, walk


def _write(root, name, payload):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def test_nan_and_null_are_the_same_missing_value():
    diffs = []
    walk({"rate": float("nan"), "mse": None, "x": [None, math.nan]}, {"rate": None, "mse": float("nan"), "x": [math.nan, None]}, "", diffs)
    assert diffs == []
    walk({"rate": None}, {"rate": 0.5}, "", diffs)
    walk({"rate": float("nan")}, {"rate": 0.0}, "", diffs)
    assert diffs == ["/rate: None vs 0.5", "/rate: nan vs 0.0"]


def test_paths_under_each_runs_root_compare_equal_other_strings_do_not(tmp_path):
    before, after = tmp_path / "before" / "report", tmp_path / "after" / "report"
    _write(before, "eval/info.json", {"models": str(tmp_path / "before" / "artifacts" / "models"), "suite": "libero_object",
                                      "wall_seconds": 3.0, "rate": float("nan")})
    _write(after, "eval/info.json", {"models": str(tmp_path / "after" / "artifacts" / "models"), "suite": "libero_object",
                                     "wall_seconds": 9.0, "rate": None})
    lines = []
    assert compare(before, after, out=lines.append) == 0
    assert lines == ["identical: eval/info.json", "1 JSON files and the checkpoints compared, 0 differences"]
    # a key that is a path (e.g. states per rollout folder) matches the same key under the other root
    _write(before, "states.json", {str(tmp_path / "before" / "rollouts_none"): 211})
    _write(after, "states.json", {str(tmp_path / "after" / "rollouts_none"): 211})
    assert compare(before, after, out=lambda line: None) == 0
    _write(after, "eval/info.json", {"models": str(tmp_path / "after" / "artifacts" / "other"), "suite": "libero_spatial", "rate": 0.1})
    lines = []
    assert compare(before, after, out=lines.append) == 3
    assert lines[0] == "3 DIFFERENCES: eval/info.json" and any("libero_spatial" in line for line in lines)


def test_jsonl_rows_are_matched_by_task_and_trial_and_a_missing_file_counts(tmp_path, capsys):
    before, after = tmp_path / "a", tmp_path / "b"
    rows = [{"task": 0, "trial": 1, "success": True}, {"task": 0, "trial": 0, "success": False}]
    (before / "run").mkdir(parents=True)
    (after / "run").mkdir(parents=True)
    (before / "run" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (after / "run" / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    _write(before, "only_before.json", {})
    assert main([str(before), str(after)]) == 1
    out = capsys.readouterr().out
    assert "identical: run/episodes.jsonl" in out and "MISSING after: only_before.json" in out and "1 differences" in out
