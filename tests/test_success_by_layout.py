"""benchmarks.evaluation.success_by_layout: success on the demos' layouts vs held-out ones, with intervals and a paired test."""

import json

import pytest

from benchmarks.evaluation.success_by_layout import main, split_by_layout, wilson_interval


def _row(task, trial, success, status=None):
    return {"task": task, "trial": trial, "success": success, "steps": 100, "status": status or ("success" if success else "failure")}


def test_wilson_interval_known_values_and_edges():
    low, high = wilson_interval(45, 50)
    assert (low, high) == pytest.approx((0.7864, 0.9565), abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_split_counts_each_group_and_leaves_errors_out():
    rows = [_row(0, 0, True), _row(0, 1, False), _row(0, 20, True), _row(0, 21, True), _row(1, 2, True), _row(1, 30, False, status="error")]
    r = split_by_layout(rows, demo_layouts=set(range(20)))
    assert (r["demo_layouts"]["successes"], r["demo_layouts"]["episodes"]) == (2, 3)
    assert (r["held_out_layouts"]["successes"], r["held_out_layouts"]["episodes"]) == (2, 2)
    assert (r["all"]["successes"], r["all"]["episodes"], r["errors"]) == (4, 5, 1)
    assert r["per_task"]["1"]["held_out_layouts"]["episodes"] == 0 and r["per_task"]["0"]["all"]["successes"] == 3


def test_cli_writes_tables_pairs_variants_and_names_what_is_missing(tmp_path):
    variants = {"naive": [_row(0, 0, False), _row(0, 1, True), _row(0, 20, False)],
                "robust-A": [_row(0, 0, True), _row(0, 1, True), _row(0, 20, True)]}
    for name, rows in variants.items():
        (tmp_path / "cmp" / name).mkdir(parents=True)
        (tmp_path / "cmp" / name / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["--compare", str(tmp_path / "cmp"), "--demo-layouts", "0-19", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "success_by_layout.json").read_text())
    assert saved["variants"]["robust-A"]["all"]["successes"] == 3 and saved["variants"]["naive"]["held_out_layouts"]["successes"] == 0
    assert (saved["paired"]["success_only_in_a"], saved["paired"]["success_only_in_b"]) == (2, 0)
    md = (tmp_path / "out" / "success_by_layout.md").read_text()
    assert "| robust-A | 2 / 2 (100.0%, 34–100) | 1 / 1 (100.0%, 21–100) | 3 / 3 (100.0%, 44–100) | 0 |" in md
    with pytest.raises(ValueError, match="no episodes for robust-B"):
        main(["--compare", str(tmp_path / "cmp"), "--demo-layouts", "0-19", "--pair", "robust-B,naive", "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="expected a phase3.compare folder"):
        main(["--compare", str(tmp_path / "out"), "--demo-layouts", "0-19", "--out", str(tmp_path / "x")])
