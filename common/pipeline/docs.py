"""Generated documentation: results tables go into marked sections of the docs, never by hand.

A doc marks a generated section like this::

    <!-- results:phase1_synthetic -->
    (generated: do not edit)
    <!-- /results:phase1_synthetic -->

The diagnostics (``docs/diagnostics/``, one file per diagnostic) get their index the same way, from
each file's title and question (section ``diagnostics_index``).

``render_section(name)`` builds the body from the results files a command in this repository wrote
(the markdown table that command produced plus a provenance line from its JSON). ``update_docs``
rewrites every marked section; ``stale_sections`` lists those that differ from what the generator
would write now (the test suite fails on any).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from common.provenance import REPO_ROOT

# section name -> (markdown written by the producing command, its JSON, the command)
SECTIONS: dict[str, tuple[str, str, str]] = {
    "headline": ("headline/headline.md", "headline/headline.json",
                 "python -m rsd_pipeline report (from the suite-protocol comparisons: common/pipeline/headline.py)"),
    "phase1_synthetic": ("phase1/comparison.md", "phase1/comparison.json",
                         "python -m phase1_improved.train_rfsq_robust --no-use-layernorm --num-episodes 50 --epochs 100 --batch-size 64; "
                         "the same with --use-layernorm; python -m phase1_improved.test_layernorm_improvement"),
    "phase1_real": ("phase1_real/comparison.md", "phase1_real/comparison.json",
                    "python -m phase1_improved.test_layernorm_improvement --out results/phase1_real (after training on the demos)"),
    "bench_tokenizers": ("bench_tokenizers.md", "bench_tokenizers.json", "make bench"),
    "bench_tokenizers_real": ("bench_tokenizers_real/bench_tokenizers.md", "bench_tokenizers_real/bench_tokenizers.json",
                              "python -m benchmarks.tokenizer.bench_tokenizers --data <demos> --out results/bench_tokenizers_real"),
    "expert_success": ("expert_success.md", "expert_success.json", "python -m benchmarks.evaluation.expert_success"),
    "bench_collection": ("bench_collection.md", "bench_collection.json", "python -m benchmarks.evaluation.bench_collection"),
    "bench_eval_workers": ("bench_eval_workers.md", "bench_eval_workers.json", "python -m benchmarks.evaluation.bench_eval_workers"),
    "pipeline_layout_ab": ("pipeline_layout_ab/layout_ab.md", "pipeline_layout_ab/layout_ab.json",
                           "python -m rsd_pipeline run --profile default --layout dct|chunk --root ... ; python -m benchmarks.evaluation.pipeline_layout_ab --runs dct=...,chunk=..."),
    "bench_vla_cpu_costs": ("bench_vla_cpu_costs.md", "bench_vla_cpu_costs.json", "python -m benchmarks.decoding.bench_vla_cpu_costs"),
    "phase1_real_all": ("phase1_real_all/comparison.md", "phase1_real_all/comparison.json",
                        "python -m phase1_improved.test_layernorm_improvement --out results/phase1_real_all"),
    "phase2": ("phase2/train_summary.md", "phase2/train_summary.json",
               "make evidence (Phase 2 lines: main + draft, then the draft retrained with $(DRAFT_FLAGS))"),
    "phase2_naive": ("phase2/train_summary_naive.md", "phase2/train_summary_naive.json",
                     "make evidence (Phase 2 lines with --rfsq-checkpoint artifacts/models/rfsq_best.pt)"),
    "phase2_draft_w256": ("phase2/ablation_draft_chained_w256/train_summary.md", "phase2/ablation_draft_chained_w256/train_summary.json",
                          "make evidence's robust draft line with --draft-width 256 --draft-hidden-layers 2 --epochs 15 --models-dir <copy of the models>"),
    "phase3_libero_object": ("phase3/compare_libero_object/comparison.md", "phase3/compare_libero_object/comparison.json",
                             "python -m phase3.compare --task-suite libero_object --tasks 0-9 --num-trials 50 --first-trial 0 "
                             "--variant-trials robust-B=5 --auto-decode --models-dir <models of the default make run> --workers 2 "
                             "--out results/phase3/compare_libero_object"),
    "phase3_libero_object_30epochs": ("phase3_diagnostics/object_30epochs/compare/comparison.md",
                                      "phase3_diagnostics/object_30epochs/compare/comparison.json",
                                      "the phase3_libero_object command on the models of the default make run with 30 policy epochs "
                                      "(commit b3b610f) --out results/phase3_diagnostics/object_30epochs/compare"),
    "phase3_libero_object_30epochs_by_layout": ("phase3_diagnostics/object_30epochs/by_layout/success_by_layout.md",
                                                "phase3_diagnostics/object_30epochs/by_layout/success_by_layout.json",
                                                "python -m benchmarks.evaluation.success_by_layout --compare results/phase3_diagnostics/object_30epochs/compare "
                                                "--demo-layouts 0-19 --pair robust-A,naive --out results/phase3_diagnostics/object_30epochs/by_layout"),
    "phase3_libero_object_by_layout": ("phase3_diagnostics/object_by_layout/success_by_layout.md",
                                       "phase3_diagnostics/object_by_layout/success_by_layout.json",
                                       "python -m benchmarks.evaluation.success_by_layout --compare results/phase3/compare_libero_object "
                                       "--demo-layouts 0-19 --pair robust-A,naive --out results/phase3_diagnostics/object_by_layout"),
    "phase3_draft_float32": ("phase3/draft_float32_libero_object/eval_table.md", "phase3/draft_float32_libero_object/eval_info.json",
                             "python -m phase3.modal_phase3_libero_eval --task-suite libero_object --tasks 0-9 --num-trials 10 "
                             "--tokenizer robust --strategy A --draft-dtype float32 --out results/phase3/draft_float32_libero_object"),
    "phase3_libero_spatial": ("phase3/compare_libero_spatial/comparison.md", "phase3/compare_libero_spatial/comparison.json",
                              "python -m phase3.compare --task-suite libero_spatial --tasks 0-3,5-9 --num-trials 30 --first-trial 20 "
                              "--variant-trials robust-B=5 --auto-decode --models-dir <models of rsd_pipeline run --profile spatial> --results-dir results"),
    "phase3_libero_spatial_demo_layouts": ("phase3_diagnostics/spatial_demo_layouts/comparison.md",
                                           "phase3_diagnostics/spatial_demo_layouts/comparison.json",
                                           "python -m phase3.compare --task-suite libero_spatial --tasks 0-3,5-9 --num-trials 20 --first-trial 0 "
                                           "--variants robust-A,naive --auto-decode --workers 2 --models-dir <models of rsd_pipeline run --profile spatial> "
                                           "--out results/phase3_diagnostics/spatial_demo_layouts"),
    "phase3_libero_spatial_256x4": ("phase3_diagnostics/model_size/compare_held_out/comparison.md",
                                    "phase3_diagnostics/model_size/compare_held_out/comparison.json",
                                    "python -m phase3.compare --task-suite libero_spatial --tasks 0-3,5-9 --num-trials 30 --first-trial 20 "
                                    "--variant-trials robust-B=5 --auto-decode --workers 2 --models-dir <the 256x4 models: "
                                    "results/phase3_diagnostics/model_size/COMMANDS.md> --out results/phase3_diagnostics/model_size/compare_held_out"),
    "phase3_libero_spatial_256x4_demo_layouts": ("phase3_diagnostics/model_size/compare_demo_layouts/comparison.md",
                                                 "phase3_diagnostics/model_size/compare_demo_layouts/comparison.json",
                                                 "python -m phase3.compare --task-suite libero_spatial --tasks 0-3,5-9 --num-trials 20 --first-trial 0 "
                                                 "--variants robust-A,naive --auto-decode --workers 2 --models-dir <the 256x4 models> "
                                                 "--out results/phase3_diagnostics/model_size/compare_demo_layouts"),
    "phase3_retrain_variance_seed1_full": ("phase3_diagnostics/retrain_variance/full_protocol_seed1/success_by_layout.md",
                                           "phase3_diagnostics/retrain_variance/full_protocol_seed1/success_by_layout.json",
                                           "the last commands in results/phase3_diagnostics/retrain_variance/COMMANDS.md "
                                           "(seed 1 at 60 epochs, all 50 init states, then python -m benchmarks.evaluation.success_by_layout)"),
    "phase3_verify_causal_ab": ("phase3_diagnostics/verify_causal_ab/speculation_terms.md",
                                "phase3_diagnostics/verify_causal_ab/speculation_terms.json",
                                "the commands in results/phase3_diagnostics/verify_causal_ab/COMMANDS.md (four Phase 3 runs, explicit "
                                "mask and is_causal alternating; python -m benchmarks.decoding.speculation_terms)"),
    "phase3_chained_drafts": ("phase3_diagnostics/draft_variants/chained_closed_loop/speculation_terms.md",
                              "phase3_diagnostics/draft_variants/chained_closed_loop/speculation_terms.json",
                              "the commands in results/phase3_diagnostics/draft_variants/chained_closed_loop/COMMANDS.md (Phase 2 --train draft "
                              "--draft-mode chained; phase3.compare --variants robust-A; python -m benchmarks.decoding.speculation_terms)"),
    "phase3_main_hidden_drafts": ("phase3_diagnostics/draft_variants/main_hidden_closed_loop/speculation_terms.md",
                                  "phase3_diagnostics/draft_variants/main_hidden_closed_loop/speculation_terms.json",
                                  "the commands in results/phase3_diagnostics/draft_variants/main_hidden_closed_loop/COMMANDS.md "
                                  "(Phase 2 --train draft --draft-input main_hidden; phase3.compare --variants robust-A; "
                                  "python -m benchmarks.decoding.speculation_terms)"),
    "phase3_trained_draft_sweep": ("phase3_diagnostics/trained_draft_sweep/closed_loop/trained_draft_sweep.md",
                                   "phase3_diagnostics/trained_draft_sweep/closed_loop/trained_draft_sweep.json",
                                   "the commands in results/phase3_diagnostics/trained_draft_sweep/COMMANDS.md (Phase 2 --train draft at "
                                   "each width; python -m benchmarks.decoding.trained_draft_sweep)"),
    "phase3_trained_draft_sweep_cold": ("phase3_diagnostics/trained_draft_sweep/closed_loop_cold/trained_draft_sweep.md",
                                        "phase3_diagnostics/trained_draft_sweep/closed_loop_cold/trained_draft_sweep.json",
                                        "the commands in results/phase3_diagnostics/trained_draft_sweep/COMMANDS.md "
                                        "(python -m benchmarks.decoding.trained_draft_sweep --cold)"),
    "phase3_trained_draft_sweep_256x4": ("phase3_diagnostics/trained_draft_sweep/head_256x4/trained_draft_sweep.md",
                                         "phase3_diagnostics/trained_draft_sweep/head_256x4/trained_draft_sweep.json",
                                         "the commands in results/phase3_diagnostics/trained_draft_sweep/COMMANDS.md (a 256 x 4 head; "
                                         "python -m benchmarks.decoding.trained_draft_sweep)"),
    "phase3_draftable_main": ("phase3_diagnostics/draftable_main/make_run/draftable_main.md",
                              "phase3_diagnostics/draftable_main/make_run/draftable_main.json",
                              "the commands in results/phase3_diagnostics/draftable_main/COMMANDS.md (python -m benchmarks.decoding.draftable_main)"),
    "phase3_draftable_main_long": ("phase3_diagnostics/draftable_main/make_run_long/draftable_main.md",
                                   "phase3_diagnostics/draftable_main/make_run_long/draftable_main.json",
                                   "the commands in results/phase3_diagnostics/draftable_main/COMMANDS.md (python -m benchmarks.decoding.draftable_main "
                                   "--epochs 12 --lr 1e-4)"),
    "phase3_tokens_per_layer": ("phase3_diagnostics/tokens_per_layer/speculation_terms.md",
                                "phase3_diagnostics/tokens_per_layer/speculation_terms.json",
                                "the commands in results/phase3_diagnostics/tokens_per_layer/COMMANDS.md (a tokenizer latent of 8 or 4, "
                                "Phase 2, Phase 3 --compare-main-only; python -m benchmarks.decoding.speculation_terms)"),
    "phase3_tokens_per_layer_heldout": ("phase3_diagnostics/tokens_per_layer/heldout_layouts/speculation_terms.md",
                                        "phase3_diagnostics/tokens_per_layer/heldout_layouts/speculation_terms.json",
                                        "the commands in results/phase3_diagnostics/tokens_per_layer/COMMANDS.md (--first-trial 20 --num-trials 10; "
                                        "python -m benchmarks.decoding.speculation_terms)"),
    "phase3_tokenizer_seeds": ("phase3_diagnostics/tokenizer_seeds/heldout_layouts/speculation_terms.md",
                               "phase3_diagnostics/tokenizer_seeds/heldout_layouts/speculation_terms.json",
                               "the commands in results/phase3_diagnostics/tokenizer_seeds/COMMANDS.md (Phase 1 --seed, Phase 2, "
                               "Phase 3 --first-trial 20 --num-trials 10; python -m benchmarks.decoding.speculation_terms)"),
    "phase3_tokenizer_seeds_trials": ("phase3_diagnostics/tokenizer_seeds/speculation_terms.md",
                                      "phase3_diagnostics/tokenizer_seeds/speculation_terms.json",
                                      "the commands in results/phase3_diagnostics/tokenizer_seeds/COMMANDS.md (Phase 3 --first-trial 0 "
                                      "--num-trials 5 on both model folders; python -m benchmarks.decoding.speculation_terms)"),
    "phase3_drafted_layers": ("phase3_diagnostics/drafted_layers/speculation_terms.md", "phase3_diagnostics/drafted_layers/speculation_terms.json",
                              "the commands in results/phase3_diagnostics/drafted_layers/COMMANDS.md (phase3 --drafted-layers K, "
                              "then python -m benchmarks.decoding.speculation_terms)"),
    "phase3_retrain_variance": ("phase3_diagnostics/retrain_variance/levers.md", "phase3_diagnostics/retrain_variance/levers.json",
                                "the commands in results/phase3_diagnostics/retrain_variance/COMMANDS.md, then python -m benchmarks.evaluation.lever_table "
                                "--out results/phase3_diagnostics/retrain_variance --runs label=<eval folder>,..."),
    "bench_rate_distortion": ("bench_rate_distortion.md", "bench_rate_distortion.json",
                              "python -m benchmarks.tokenizer.bench_rate_distortion --epochs 15 (demos: docs/diagnostics/phase1_rate_distortion.md)"),
    "action_statistics": ("action_statistics.md", "action_statistics.json", "python -m benchmarks.tokenizer.action_statistics"),
    "phase3_replay_fidelity": ("phase3_diagnostics/replay_fidelity/replay_fidelity.md", "phase3_diagnostics/replay_fidelity/replay_fidelity.json",
                               "python -m benchmarks.diagnostics.replay_fidelity --data <make run demos> --models-dir <make run models>"),
    "phase3_continuous_reference": ("phase3_diagnostics/continuous_reference/continuous_reference.md",
                                    "phase3_diagnostics/continuous_reference/continuous_reference.json",
                                    "python -m benchmarks.evaluation.continuous_reference --models-dir <make run models>"),
    "phase3_continuous_reference_spatial": ("phase3_diagnostics/continuous_reference_spatial/continuous_reference.md",
                                            "phase3_diagnostics/continuous_reference_spatial/continuous_reference.json",
                                            "python -m benchmarks.evaluation.continuous_reference --models-dir <models of rsd_pipeline run --profile spatial> "
                                            "--suite libero_spatial --tasks 0-3,5-9 --trials 10 --first-trial 20 --workers 2 "
                                            "--out results/phase3_diagnostics/continuous_reference_spatial"),
    "phase3_policy_action_error": ("phase3_diagnostics/policy_action_error.md", "phase3_diagnostics/policy_action_error.json",
                                   "python -m benchmarks.diagnostics.policy_action_error --models-dir <make run models>"),
    "phase3_policy_action_error_naive": ("phase3_diagnostics/policy_action_error_naive.md", "phase3_diagnostics/policy_action_error_naive.json",
                                         "python -m benchmarks.diagnostics.policy_action_error --models-dir <make run models> --tag naive"),
    "phase3_levers": ("phase3_diagnostics/levers/levers.md", "phase3_diagnostics/levers/levers.json",
                      "python -m benchmarks.evaluation.lever_table --runs label=<phase3.compare folder>,... (runs under results/phase3_diagnostics/levers/runs)"),
    "phase3_data_levers": ("phase3_diagnostics/data_levers/levers.md", "phase3_diagnostics/data_levers/levers.json",
                           "the commands in results/phase3_diagnostics/data_levers/COMMANDS.md, then python -m benchmarks.evaluation.lever_table "
                           "--out results/phase3_diagnostics/data_levers --runs label=<eval folder>,..."),
    "phase3_data_rounds": ("phase3_diagnostics/data_rounds/levers.md", "phase3_diagnostics/data_rounds/levers.json",
                           "the commands in results/phase3_diagnostics/data_rounds/COMMANDS.md, then python -m benchmarks.evaluation.lever_table "
                           "--out results/phase3_diagnostics/data_rounds --variants robust-A --runs label=<eval folder>,..."),
    "phase3_relaxed_acceptance": ("phase3_diagnostics/relaxed_acceptance/relaxed_acceptance.md",
                                  "phase3_diagnostics/relaxed_acceptance/relaxed_acceptance.json",
                                  "python -m benchmarks.decoding.relaxed_acceptance --models-dir artifacts/pipeline/default_sbs/models (the default make run's) "
                                  "--tolerances 0,1,2 --relaxed-layers 0,1 --num-trials 5 --workers 2"),
    "phase3_decode_depth_latency": ("phase3_diagnostics/decode_depth_latency.md", "phase3_diagnostics/decode_depth_latency.json",
                                    "python -m benchmarks.decoding.decode_depth_latency --models-dir <models of the default make run> --candidates 1,2,4 --dtype float64"),
    "phase3_decode_depth_latency_float32": ("phase3_diagnostics/decode_depth_latency_float32.md",
                                            "phase3_diagnostics/decode_depth_latency_float32.json",
                                            "python -m benchmarks.decoding.decode_depth_latency --models-dir <models of the default make run> --candidates 1,2,4"),
    "phase3_draft_cost": ("phase3_diagnostics/draft_cost/draft_cost.md", "phase3_diagnostics/draft_cost/draft_cost.json",
                          "python -m benchmarks.decoding.draft_cost"),
    "phase3_decode_trained_graphs_gpu": ("phase3_diagnostics/decode_trained_graphs_gpu/float32/decode_trained_graphs.md",
                                         "phase3_diagnostics/decode_trained_graphs_gpu/float32/decode_trained_graphs.json",
                                         "python -m benchmarks.decoding.decode_trained_graphs export --models-dir <make run models> --bundle B.pt, then "
                                         "on a GPU machine: python -m benchmarks.decoding.decode_trained_graphs run --bundle B.pt --device cuda --chunks 300 --repeats 5"),
    "phase3_decode_trained_graphs_gpu_bf16": ("phase3_diagnostics/decode_trained_graphs_gpu/bfloat16/decode_trained_graphs.md",
                                              "phase3_diagnostics/decode_trained_graphs_gpu/bfloat16/decode_trained_graphs.json",
                                              "the same, run with --dtype bfloat16"),
    "phase3_continuous_reference_spatial_world": ("phase3_diagnostics/eef_relative/continuous_world/continuous_reference.md",
                                                  "phase3_diagnostics/eef_relative/continuous_world/continuous_reference.json",
                                                  "python -m benchmarks.evaluation.continuous_reference --models-dir <spatial profile models> --suite libero_spatial "
                                                  "--tasks 0-3,5-9 --trials 10 --first-trial 20 --workers 2 --no-eef-relative"),
    "phase3_continuous_reference_spatial_eef": ("phase3_diagnostics/eef_relative/continuous_eef_relative/continuous_reference.md",
                                                "phase3_diagnostics/eef_relative/continuous_eef_relative/continuous_reference.json",
                                                "the same with --eef-relative"),
    "phase3_decode_trained_graphs_h100_held_out": ("phase3_diagnostics/decode_trained_graphs_h100/held_out/float32/decode_trained_graphs.md",
                                                   "phase3_diagnostics/decode_trained_graphs_h100/held_out/float32/decode_trained_graphs.json",
                                                   "bash benchmarks/decoding/device_trained_graphs.sh <held-out bundle> on the GPU machine "
                                                   "(results/phase3_diagnostics/decode_trained_graphs_h100/COMMANDS.md)"),
    "phase3_decode_trained_graphs_h100_closed_loop": ("phase3_diagnostics/decode_trained_graphs_h100/closed_loop/float32/decode_trained_graphs.md",
                                                      "phase3_diagnostics/decode_trained_graphs_h100/closed_loop/float32/decode_trained_graphs.json",
                                                      "python -m benchmarks.decoding.decode_trained_graphs export ... --states <Phase 3 run with --record-features>, "
                                                      "then bash benchmarks/decoding/device_trained_graphs.sh <bundle> on the GPU machine "
                                                      "(results/phase3_diagnostics/decode_trained_graphs_h100/COMMANDS.md)"),
    "phase3_decode_compile_cpu_closed_loop": ("phase3_diagnostics/decode_compile_cpu/closed_loop/decode_trained_graphs.md",
                                              "phase3_diagnostics/decode_compile_cpu/closed_loop/decode_trained_graphs.json",
                                              "python -m benchmarks.decoding.decode_trained_graphs run --bundle <closed-loop bundle> --replay compile "
                                              "(results/phase3_diagnostics/decode_compile_cpu/COMMANDS.md)"),
    "bench_decode_sweep": ("bench_decode_sweep/bench_decode_sweep.md", "bench_decode_sweep/bench_decode_sweep.json",
                           "python -m benchmarks.decoding.bench_decode_sweep"),
    "bench_decode_sweep_float32": ("bench_decode_sweep_float32/bench_decode_sweep.md", "bench_decode_sweep_float32/bench_decode_sweep.json",
                                   "python -m benchmarks.decoding.bench_decode_sweep --dtype float32 --out results/bench_decode_sweep_float32"),
    "bench_decode_sweep_gpu": ("bench_decode_sweep_gpu/bench_decode_sweep.md", "bench_decode_sweep_gpu/bench_decode_sweep.json",
                               "bash benchmarks/decoding/device_sweep.sh --budget-s 1.5 --repeats 3000 (on a GPU machine)"),
    "bench_decode_sweep_gpu_bf16": ("bench_decode_sweep_gpu_bf16/bench_decode_sweep.md", "bench_decode_sweep_gpu_bf16/bench_decode_sweep.json",
                                    "python -m benchmarks.decoding.bench_decode_sweep --device cuda --graphs --dtype bfloat16 --sizes 128x2,256x4,512x6,1024x8 "
                                    "--budget-s 1.5 --repeats 3000 --out results/bench_decode_sweep_gpu_bf16 (on a GPU machine)"),
    # the local pipeline's report folder (report/ beside results/), written by `make run`
    "pipeline": ("../report/data/pipeline/pipeline_summary.md", "../report/data/pipeline/pipeline_summary.json", "make run"),
    "pipeline_spatial": ("../report/spatial/data/pipeline/pipeline_summary.md", "../report/spatial/data/pipeline/pipeline_summary.json",
                         "python -m rsd_pipeline run --profile spatial"),
}

MARKER = re.compile(r"(<!-- results:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
DOCS = (
    "README.md",
    "MIGRATION_TO_ROBUST_RFSQ.md",
    "phase1_improved/AGENT_GUIDE.md",
    "phase2_draft_retrain/README.md",
    "phase3/QUICK_START.md",
    "benchmarks/README.md",
)
# The lab notebook: one file per diagnostic, each naming the reader's question it answers with a line
# ``<!-- question: <key> -->`` and stating it in a line that starts with ``**Question.**``. Its README
# holds the index (section ``diagnostics_index``), generated from those lines.
DIAGNOSTICS_DIR = "docs/diagnostics"
QUESTIONS: dict[str, str] = {
    "robust_vs_naive": "Does robust beat naive, and where?",
    "policy_success": "What made the policy succeed?",
    "generalization": "What does not generalize?",
    "speculation": "Where does speculation pay, and what does decoding cost?",
    "trust": "How far can a number be trusted?",
}
QUESTION_TAG = re.compile(r"^<!-- question: (?P<key>[a-z_]+) -->$", re.M)
INDEX_SECTION = "diagnostics_index"


def doc_files(repo_root: Path = REPO_ROOT) -> tuple[str, ...]:
    """Every doc with generated sections: the guides, then the diagnostics (sorted by file name)."""
    notebook = sorted(p.relative_to(repo_root).as_posix() for p in (repo_root / DIAGNOSTICS_DIR).glob("*.md"))
    return DOCS + tuple(notebook)


def diagnostics_index(repo_root: Path = REPO_ROOT) -> str:
    """The notebook's index: per reader's question, each diagnostic's title (linked) and its question."""
    folder = repo_root / DIAGNOSTICS_DIR
    by_question: dict[str, list[str]] = {key: [] for key in QUESTIONS}
    for path in sorted(folder.glob("*.md")):
        if path.name == "README.md":
            continue
        text = path.read_text()
        tag = QUESTION_TAG.search(text)
        if tag is None or tag.group("key") not in QUESTIONS:
            raise ValueError(f"{path.relative_to(repo_root)}: expected a line '<!-- question: <key> -->' with a key "
                             f"from {sorted(QUESTIONS)}, found {tag.group(0) if tag else 'none'}")
        title = re.search(r"^# (.+)$", text, re.M)
        asked = re.search(r"^\*\*Question\.\*\* (.+)$", text, re.M)
        if title is None or asked is None:
            raise ValueError(f"{path.relative_to(repo_root)}: expected a '# title' line and a '**Question.** ...' line")
        by_question[tag.group("key")].append(f"- [{title.group(1)}]({path.name}): {asked.group(1)}")
    parts = [f"### {QUESTIONS[key]}\n\n" + "\n".join(entries) + "\n" for key, entries in by_question.items() if entries]
    return "\n".join(parts) if parts else "_No diagnostics yet._\n"


def _provenance_line(json_path: Path, rel: str) -> str:
    data = json.loads(json_path.read_text())
    prov = data.get("provenance") or {k: data[k] for k in ("git_sha", "versions") if data.get(k)}
    shown = rel[3:] if rel.startswith("../") else f"results/{rel}"
    bits = [f"source `{shown}`"]
    if prov.get("git_sha"):
        bits.append(f"git `{prov['git_sha']}`")
    if prov.get("created_utc"):
        bits.append(prov["created_utc"])
    if prov.get("device"):
        bits.append(prov["device"])
    versions = prov.get("versions") or data.get("libraries") or {}
    if versions.get("mujoco"):
        bits.append(f"mujoco {versions['mujoco']}")
    return "<sub>" + " · ".join(bits) + "</sub>"


def render_section(name: str, results_root: Path) -> str:
    """The generated body of one section (ends with a newline)."""
    if name not in SECTIONS:
        raise KeyError(f"unknown results section {name!r}; known: {sorted(SECTIONS)}")
    md_rel, json_rel, command = SECTIONS[name]
    md, js = results_root / md_rel, results_root / json_rel
    if not md.exists() or not js.exists():
        return f"_Not produced yet: run `{command}`._\n"
    return md.read_text().rstrip() + "\n\n" + _provenance_line(js, json_rel) + "\n"


def _render_marked(name: str, results_root: Path, repo_root: Path) -> str:
    return diagnostics_index(repo_root) if name == INDEX_SECTION else render_section(name, results_root)


def render_doc(text: str, results_root: Path, repo_root: Path = REPO_ROOT) -> str:
    return MARKER.sub(lambda m: m.group(1) + _render_marked(m.group("name"), results_root, repo_root) + m.group(4), text)


def _existing_docs(repo_root: Path, docs) -> list[tuple[str, Path]]:
    docs = doc_files(repo_root) if docs is None else docs
    return [(rel, repo_root / rel) for rel in docs if (repo_root / rel).exists()]


def update_docs(*, repo_root: Path = REPO_ROOT, results_root: Path | None = None, docs=None) -> list[str]:
    """Rewrite the generated sections of every doc; returns the docs that changed."""
    results_root = results_root or repo_root / "results"
    changed = []
    for rel, path in _existing_docs(repo_root, docs):
        text = path.read_text()
        new = render_doc(text, results_root, repo_root)
        if new != text:
            path.write_text(new)
            changed.append(rel)
    return changed


def stale_sections(*, repo_root: Path = REPO_ROOT, results_root: Path | None = None, docs=None) -> list[str]:
    """``doc:section`` for every generated section that differs from the generator's output."""
    results_root = results_root or repo_root / "results"
    return [
        f"{rel}:{m.group('name')}"
        for rel, path in _existing_docs(repo_root, docs)
        for m in MARKER.finditer(path.read_text())
        if m.group("body") != _render_marked(m.group("name"), results_root, repo_root)
    ]
