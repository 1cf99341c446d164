"""benchmarks.decoding.speculation_terms: the formula's terms read back from closed-loop evaluation folders."""

import json

import pytest

from benchmarks.decoding.speculation_terms import build, markdown
from common.eval.runs import parse_runs


def _write(folder, *, first_trial=0, spec=True, K=3):
    folder.mkdir(parents=True)
    info = {
        "config": {"task_suite": "libero_object", "tasks": "0-9", "num_trials": 5, "first_trial": first_trial,
                   "use_speculative_decoding": spec, "compare_main_only": True},
        "success_rate": 0.96, "episodes": 50, "main_only_passes_per_chunk": 4.0, "main_passes_per_chunk": 2.75,
        "mean_accepted_layers": 1.25, "acceptance_per_layer": [0.75, 0.5, 0.0][:K],
        # one main-only pass = 2.0 / 4 = 0.5 ms; draft 0.2 ms -> c = 0.4; spec main 1.75 ms -> 3.5 passes -> v = 0.75
        "latency_ms": {"draft_ms": {"mean": 0.2}, "main_ms": {"mean": 1.75}, "ref_main_ms": {"mean": 2.0}},
        "token_decode_speedup": 2.0 / 1.95, "lossless_identical_fraction": 1.0, "chunks": 1753,
        "provenance": {"git_sha": "abc"},
    }
    (folder / "eval_info.json").write_text(json.dumps(info))
    return folder


def test_terms_and_formula_match_the_recorded_times(tmp_path):
    result = build([("K = 3", _write(tmp_path / "k3")), ("K = 2", _write(tmp_path / "k2", K=2))])
    r = result["rows"][0]
    assert r["draft_cost_c"] == pytest.approx(0.4) and r["verify_overhead_v"] == pytest.approx(0.75)
    assert r["formula_speedup"] == pytest.approx(4.0 / (4.0 - 1.25 + 0.4 + 0.75))
    assert r["spec_ms_per_chunk"] == pytest.approx(1.95) and r["main_only_ms_per_chunk"] == pytest.approx(2.0)
    assert [row["drafted_layers"] for row in result["rows"]] == [3, 2]
    table = markdown(result)
    assert "| K = 3 | 96.0% | 4 | 3 | 1.25 | 0.75 / 0.50 / 0.00 | 2.75 | 0.40 | 0.75 | 1.03x | 1.03x | 1.95 / 2.00 | 100.00% of 1753 |" in table


def test_refuses_runs_without_both_paths_or_on_other_trials(tmp_path):
    with pytest.raises(ValueError, match="--use-speculative-decoding and --compare-main-only"):
        build([("main-only", _write(tmp_path / "m", spec=False))])
    with pytest.raises(ValueError, match="first init state"):
        build([("a", _write(tmp_path / "a")), ("b", _write(tmp_path / "b", first_trial=20))])
    with pytest.raises(FileNotFoundError, match="expected eval_info.json"):
        build([("missing", tmp_path / "nothing")])
    with pytest.raises(ValueError, match="label=folder"):
        parse_runs("no-equals-sign")
    assert parse_runs("K = 3=a/b, K = 2=c") == [("K = 3", tmp_path.__class__("a/b")), ("K = 2", tmp_path.__class__("c"))]
