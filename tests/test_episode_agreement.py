"""benchmarks.diagnostics.episode_agreement: episode-by-episode agreement of two runs of the same trials."""

import json

import pytest

from benchmarks.diagnostics.episode_agreement import main
from common.eval.runs import agreement, sign_test_p


def _row(task, trial, success, steps, status=None):
    return {"task": task, "trial": trial, "success": success, "steps": steps, "status": status or ("success" if success else "failure")}


def test_sign_test_matches_the_exact_binomial():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)  # 2 * 0.5**5
    assert sign_test_p(11, 4) == pytest.approx(2 * sum(__import__("math").comb(15, i) for i in range(5)) / 2 ** 15)
    assert sign_test_p(3, 3) == 1.0


def test_agreement_counts_steps_flips_and_leaves_out_errors_and_unshared(tmp_path):
    a = {(0, 0): _row(0, 0, True, 90), (0, 1): _row(0, 1, True, 100), (1, 0): _row(1, 0, False, 220), (1, 1): _row(1, 1, True, 80),
         (2, 0): _row(2, 0, True, 50)}
    b = {(0, 0): _row(0, 0, True, 90), (0, 1): _row(0, 1, False, 220), (1, 0): _row(1, 0, True, 150),
         (1, 1): _row(1, 1, False, 3, status="error")}
    r = agreement(a, b)
    assert r["episodes"] == 3 and r["left_out"] == {"only_in_a": 1, "only_in_b": 0, "errored": 1}
    assert (r["success_a"], r["success_b"], r["same_steps"]) == (2, 2, 1)
    assert (r["outcome_differs"], r["success_only_in_a"], r["success_only_in_b"]) == (2, 1, 1)
    assert r["per_task"]["0"] == {"episodes": 2, "success_a": 2, "success_b": 1, "same_steps": 1}
    assert r["differing_episodes"] == [{"task": 0, "trial": 1, "success_a": True}, {"task": 1, "trial": 0, "success_a": False}]
    with pytest.raises(ValueError, match="share no finished episode"):
        agreement({(0, 0): _row(0, 0, True, 9)}, {(0, 1): _row(0, 1, True, 9)})


def test_cli_writes_json_and_markdown_and_names_a_missing_file(tmp_path):
    for name, rows in (("a", [_row(0, 0, True, 90), _row(0, 1, False, 220)]), ("b", [_row(0, 0, True, 91), _row(0, 1, True, 120)])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--label-a", "main-only", "--label-b", "spec", "--out", str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "episode_agreement.json").read_text())
    assert saved["labels"] == ["main-only", "spec"] and saved["outcome_differs"] == 1 and saved["success_only_in_b"] == 1
    assert "| successes | 1 (50.0%) | 2 (100.0%) |" in (tmp_path / "out" / "episode_agreement.md").read_text()
    with pytest.raises(FileNotFoundError, match="no episodes.jsonl"):
        main(["--a", str(tmp_path / "out"), "--b", str(tmp_path / "b"), "--out", str(tmp_path / "x")])
