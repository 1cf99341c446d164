"""The local pipeline end to end on the tiny profile (real simulator), its idempotence, and the
generated docs sections."""

import json
from pathlib import Path

import pytest
import torch

from common.pipeline.report import headline_markdown
from common.pipeline.run import PROFILES, run_pipeline
from common.pipeline.docs import SECTIONS, render_doc, stale_sections


# ``tiny_run`` (tests/conftest.py): the tiny profile, branches side by side; the rerun below is sequential


def test_tiny_pipeline_produces_a_report_whose_numbers_match_the_json(tiny_run):
    report = (tiny_run["root"] / "report" / "REPORT.md").read_text()
    data = tiny_run["root"] / "report" / "data"
    phase1 = json.loads((data / "phase1" / "comparison.json").read_text())
    phase3 = json.loads((data / "phase3" / "compare_libero_object" / "comparison.json").read_text())
    assert f"{phase1['naive_mse']:.3e}" in report and f"{phase1['robust_mse']:.3e}" in report
    for name, v in phase3["variants"].items():
        assert f"| {name} | {100 * v['success_rate']:.1f}% |" in report
        assert v["lossless_identical_fraction"] == 1.0
    assert headline_markdown(json.loads((data / "pipeline" / "pipeline_summary.json").read_text())) in report
    assert list((tiny_run["root"] / "report" / "data").rglob("*.png"))
    robust = tiny_run["summary"]["phase2"]["robust"]  # the draft saw the policy's own closed-loop states
    assert sum(robust["draft_rollout_states"].values()) > 0 and "1" in robust["draft"]["candidate_acceptance"]
    # the policies learn the clean, the DART and the fresh-layout DART demos; the tokenizers the clean ones only
    assert robust["num_episodes"] == 3 + 1 + 1, robust
    assert [Path(f).name for f in robust["data"].split(",")] == [
        "libero_object_demos.hdf5", "libero_object_dart0.2.hdf5", "libero_object_fresh_dart0.2.hdf5"], robust["data"]
    assert "+ 1 DART demos per task (action noise 0.2" in report
    assert "+ 0 clean and 1 DART demos per task on fresh layouts, observations relative to the end effector" in report
    head = torch.load(tiny_run["root"] / "artifacts" / "models" / "best_rfsq_head.pt", map_location="cpu", weights_only=False)
    assert head["config"]["backbone_config"]["eef_relative"] is True
    assert tiny_run["summary"]["stages_found_complete"] == []  # a run from scratch: every stage did its work
    assert set(tiny_run["summary"]["stages"]) == {
        "demos", "demos_dart", "demos_fresh_dart", "tokenizer_none", "tokenizer_layernorm", "phase1_compare", "main_layernorm", "rollouts_layernorm", "draft_layernorm",
        "main_none", "rollouts_none", "draft_none", "phase3_compare"
    }
    # the branch processes' stage lines reached the caller's log; their full output is in logs/
    assert any(line.startswith("[draft_none]") for line in tiny_run["logs"]), tiny_run["logs"]
    assert "[main_layernorm]" in (tiny_run["root"] / "artifacts" / "logs" / "branch_layernorm.log").read_text()
    assert tiny_run["summary"]["side_by_side"] and tiny_run["summary"]["branch_stages"]["none"] == [
        "draft_none", "main_none", "rollouts_none", "tokenizer_none"]


def test_rerun_reuses_every_finished_stage(tiny_run):
    logs: list[str] = []
    summary = run_pipeline(PROFILES["tiny"], root=tiny_run["root"] / "artifacts", report_dir=tiny_run["root"] / "report2", log=logs.append,
                           branches=1)
    assert all(t["skipped"] for t in summary["stages"].values()), logs
    assert (tiny_run["root"] / "report2" / "REPORT.md").exists()
    assert not summary["side_by_side"]


def test_plan_names_what_would_run_and_why_and_touches_nothing(tiny_run, monkeypatch):
    import dataclasses

    root = tiny_run["root"] / "artifacts"
    snapshot = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "stamps").iterdir()}
    # the same root spelled relative to the working directory: still every stage up to date
    monkeypatch.chdir(tiny_run["root"])
    plan = run_pipeline(PROFILES["tiny"], root=Path("artifacts"), report_dir=tiny_run["root"] / "report_plan", log=lambda line: None,
                        plan=True)["plan"]
    assert set(plan) == set(tiny_run["summary"]["stages"]) and all(t["skipped"] for t in plan.values()), plan

    logs: list[str] = []
    more_epochs = dataclasses.replace(PROFILES["tiny"], policy_epochs=2)
    plan = run_pipeline(more_epochs, root=root, report_dir=tiny_run["root"] / "report_plan", log=logs.append, plan=True)["plan"]
    todo = {name: t["planned"] for name, t in plan.items() if not t["skipped"]}
    assert todo == {
        "main_layernorm": "settings or inputs changed: cfg.epochs", "main_none": "settings or inputs changed: cfg.epochs",
        "rollouts_layernorm": "after main_layernorm", "rollouts_none": "after main_none",
        "draft_layernorm": "after main_layernorm, rollouts_layernorm", "draft_none": "after main_none, rollouts_none",
        "phase3_compare": "after draft_layernorm, draft_none, main_layernorm, main_none"}, todo
    assert plan["main_none"]["seconds"] > 0  # the time it took when it last ran
    assert any(line.startswith("[main_none] would run: settings or inputs changed: cfg.epochs; took") for line in logs), logs
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (root / "stamps").iterdir()} == snapshot
    assert not (tiny_run["root"] / "report_plan").exists()


def test_from_scratch_time_counts_the_longer_branch_when_side_by_side():
    from common.pipeline.report import from_scratch_seconds

    summary = {"stage_seconds": {"demos": 10.0, "tokenizer_none": 5.0, "main_none": 20.0, "tokenizer_layernorm": 6.0,
                                 "main_layernorm": 30.0, "phase3_compare": 7.0},
               "branch_stages": {"none": ["main_none", "tokenizer_none"], "layernorm": ["main_layernorm", "tokenizer_layernorm"]}}
    assert from_scratch_seconds({**summary, "side_by_side": True}) == 10 + 36 + 7
    assert from_scratch_seconds({**summary, "side_by_side": False}) == 78


def test_from_scratch_time_names_demo_stages_that_found_their_files_complete():
    from common.pipeline.report import _from_scratch

    summary = {"stage_seconds": {"demos": 0.2, "demos_dart": 600.0, "main_none": 60.0}, "side_by_side": False,
               "stages": {"demos": {"skipped": True}, "demos_dart": {"skipped": True}, "main_none": {"skipped": False}}}
    assert _from_scratch(summary) == (" (this call, reusing finished stages; from scratch the stages' recorded times sum to 11.0 min; "
                                      "demos found its file complete (recorded under 1 s), so their work is not in that sum)")
    # summaries that record it: the stamps' "outputs unchanged", whatever the time
    summary = {**summary, "stages_found_complete": ["demos", "demos_dart"]}
    assert _from_scratch(summary).endswith("; demos, demos_dart found their files complete (outputs unchanged), so their work is not in that sum)")


def test_committed_docs_match_the_generator():
    assert stale_sections() == []


def test_generated_section_shows_missing_results_instead_of_numbers(tmp_path):
    text = "intro\n<!-- results:phase2 -->\nold\n<!-- /results:phase2 -->\n"
    out = render_doc(text, tmp_path)
    assert "Not produced yet" in out and "old" not in out and SECTIONS["phase2"][2] in out


def test_plan_summary_line():
    from rsd_pipeline import plan_summary

    plan = {"demos": {"skipped": True}, "main_none": {"skipped": False, "planned": "no stamp", "seconds": None},
            "draft_none": {"skipped": False, "planned": "after main_none", "seconds": 120.0}}
    assert plan_summary(plan, Path("r")) == ("2 of 3 stages would run under r: main_none, draft_none; they took 2.0 min when they "
                                             "last ran (one after the other); never run here: main_none")
    assert plan_summary({"demos": {"skipped": True}}, Path("r")).startswith("every stage under r is up to date")


def test_diagnostics_index_groups_files_by_the_readers_question(tmp_path):
    from common.pipeline.docs import diagnostics_index, update_docs

    folder = tmp_path / "docs" / "diagnostics"
    folder.mkdir(parents=True)
    (folder / "b_drafts.md").write_text("<!-- question: speculation -->\n# Chained drafts\n\n**Question.** Do chained drafts pay?\n")
    (folder / "a_fidelity.md").write_text("<!-- question: robust_vs_naive -->\n# Tokenizer fidelity\n\n**Question.** Do tokens replay?\n")
    (folder / "README.md").write_text("# Notebook\n<!-- results:diagnostics_index -->\n<!-- /results:diagnostics_index -->\n")
    assert update_docs(repo_root=tmp_path, results_root=tmp_path) == ["docs/diagnostics/README.md"]
    index = (folder / "README.md").read_text()
    assert "### Does robust beat naive, and where?\n\n- [Tokenizer fidelity](a_fidelity.md): Do tokens replay?" in index
    assert index.index("robust beat naive") < index.index("- [Chained drafts](b_drafts.md): Do chained drafts pay?")
    (folder / "c_bad.md").write_text("# No question\n")
    with pytest.raises(ValueError, match=r"c_bad.md: expected a line '<!-- question: <key> -->'"):
        diagnostics_index(tmp_path)
