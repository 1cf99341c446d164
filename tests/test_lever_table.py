"""benchmarks.evaluation.lever_table: phase3.compare folders and single-evaluation folders side by side."""

import json

import pytest

from benchmarks.evaluation.lever_table import build, markdown


def _eval_info(tokenizer, strategy, success, first_trial=20):
    return {"config": {"task_suite": "libero_spatial", "tasks": "0-1", "num_trials": 2, "first_trial": first_trial,
                       "tokenizer": tokenizer, "strategy": strategy},
            "success_rate": success, "success_episodes": 4, "per_task": {"0": {}, "1": {}},
            "decoding": [{"layers": 2, "rule": "expected"}], "main_passes_per_chunk": 2.0, "main_only_passes_per_chunk": None,
            "provenance": {"git_sha": "abc"}}


def test_compare_and_single_eval_folders_make_one_table(tmp_path):
    compare = tmp_path / "baseline"
    compare.mkdir()
    (compare / "comparison.json").write_text(json.dumps({
        "config": {"task_suite": "libero_spatial", "tasks": "0-1", "num_trials": 2, "first_trial": 20},
        "variants": {"naive": {"success_rate": 0.5, "success_episodes": 4, "trials_per_task": 2,
                               "decoding": [{"layers": 7, "rule": "argmax"}], "main_passes_per_chunk": 6.5,
                               "main_only_passes_per_chunk": 7.0}}}))
    single = tmp_path / "dart" / "eval_robust"
    single.mkdir(parents=True)
    (single / "eval_info.json").write_text(json.dumps(_eval_info("robust", "A", 0.75)))
    result = build([("20 demos", compare), ("+ DART", single)])
    assert [(r["run"], r["variant"], r["success_rate"], r["main_only_passes_per_chunk"]) for r in result["rows"]] == [
        ("20 demos", "naive", 0.5, 7.0), ("+ DART", "robust-A", 0.75, 2.0)]
    assert result["first_trial"] == 20
    assert [r["variant"] for r in build([("20 demos", compare), ("+ DART", single)], ("robust-A",))["rows"]] == ["robust-A"]
    table = markdown(result)
    assert "| + DART | robust-A | 75.0% | 2 layers, last by expected value | 2.00 (2) | — |" in table
    assert "from init state 20" in table


def test_runs_on_other_init_states_are_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, first in ((a, 20), (b, 0)):
        folder.mkdir()
        (folder / "eval_info.json").write_text(json.dumps(_eval_info("naive", "A", 0.5, first)))
    with pytest.raises(ValueError, match="first init state"):
        build([("a", a), ("b", b)])
    with pytest.raises(FileNotFoundError, match="expected comparison.json .* or eval_info.json"):
        build([("missing", tmp_path / "nothing")])
