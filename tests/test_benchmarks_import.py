"""Every benchmark command imports (a refactor of the library must not silently break one), and benchmarks/
holds only its topic folders, each a package with a docstring."""

import importlib
import pkgutil
import re

import pytest

import benchmarks

TOPICS = ("tokenizer", "decoding", "evaluation", "diagnostics")
MODULES = sorted(m.name for m in pkgutil.walk_packages(benchmarks.__path__, prefix="benchmarks.") if not m.ispkg)


def test_benchmarks_are_grouped_by_topic():
    top = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))
    assert top == sorted(TOPICS)
    for topic in TOPICS:
        assert importlib.import_module(f"benchmarks.{topic}").__doc__, f"benchmarks/{topic}/__init__.py needs a docstring"
    assert {m.split(".")[1] for m in MODULES} == set(TOPICS)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name.replace('.', '/')}.py needs an opening docstring saying what it measures"


# Every benchmark flag as it was before the benchmarks moved into topic folders and their CLIs were built from
# config dataclasses: the same names must still be accepted (a bool may gain its --no- / plain twin).
FLAGS = {
    ("benchmarks.decoding.bench_decode_loop", ""): "--baseline-path --baseline-ref --compile --dtype --out --repeats",
    ("benchmarks.decoding.bench_decode_sweep", ""): "--budget-s --device --dtype --graphs --out --repeats --sizes --threads",
    ("benchmarks.decoding.bench_vla_cpu_costs", ""): "--assumed-forward-s --assumed-load-s --cache-steps --camera-size --frames --out "
                                                     "--replan-steps --steps --task-suite --tasks --trials --trials-per-container",
    ("benchmarks.decoding.decode_depth_latency", ""): "--candidates --chunks --dtype --models-dir --out --repeats --tag",
    ("benchmarks.decoding.decode_trained_graphs", "export"): "--bundle --models-dir --states --tag",
    ("benchmarks.decoding.decode_trained_graphs", "run"): "--bundle --chunks --cold --device --drafted-layers --dtype --out --repeats --replay --threads",
    ("benchmarks.decoding.draft_cost", ""): "--dtype --out --repeats --threads",
    ("benchmarks.decoding.draftable_main", ""): "--batch-size --bundle --chunks --epochs --lr --models-dir --out --repeats --seed --threads --weights",
    ("benchmarks.decoding.relaxed_acceptance", ""): "--full-depth --models-dir --num-trials --out --relaxed-layers --suite --tasks --tolerances --workers",
    ("benchmarks.decoding.speculation_terms", ""): "--out --runs",
    ("benchmarks.decoding.trained_draft_sweep", ""): "--bundle --chunks --cold --drafts --out --repeats --threads",
    ("benchmarks.diagnostics.compare_run_outputs", ""): "",
    ("benchmarks.diagnostics.episode_agreement", ""): "--a --b --label-a --label-b --out",
    ("benchmarks.diagnostics.policy_action_error", ""): "--models-dir --out --print-only --tag",
    ("benchmarks.diagnostics.replay_fidelity", ""): "--data --demos-per-task --depths --models-dir --out --suite",
    ("benchmarks.diagnostics.slim_demos", ""): "--out --overwrite",
    ("benchmarks.diagnostics.trace_episode", ""): "--every --models-dir --no-progress --out --suite --task --tokenizer --trials",
    ("benchmarks.evaluation.bench_collection", ""): "--episodes --out --task --workers",
    ("benchmarks.evaluation.bench_eval_workers", ""): "--max-steps --models-dir --num-trials --out --results-dir --task-suite --tasks",
    ("benchmarks.evaluation.continuous_reference", ""): "--batch-size --eef-relative --epochs --first-trial --hidden --hidden-layers --lr --models-dir "
                                                        "--no-eef-relative --no-progress --out --overwrite --replan-steps --seed --suite --tag --tasks "
                                                        "--trials --weight-decay --workers",
    ("benchmarks.evaluation.expert_success", ""): "--action-noise --out --suites --tasks --trials --workers",
    ("benchmarks.evaluation.lever_table", ""): "--out --runs --variants",
    ("benchmarks.evaluation.pipeline_layout_ab", ""): "--out --runs",
    ("benchmarks.evaluation.success_by_layout", ""): "--compare --demo-layouts --out --pair",
    ("benchmarks.tokenizer.action_statistics", ""): "--files --out",
    ("benchmarks.tokenizer.bench_rate_distortion", ""): "--batch-size --epochs --human --no-tables-only --out --plain-loop-steps --scripted --seed "
                                                        "--synthetic-episodes --tables-only",
    ("benchmarks.tokenizer.bench_tokenizers", ""): "--batch-size --data --epochs --latent-dim --layout-sweep --no-layout-sweep --num-episodes --out "
                                                   "--seed --throughput-seconds",
}


def test_every_benchmark_has_a_flag_table():
    assert sorted({m for m, _ in FLAGS}) == MODULES


@pytest.mark.parametrize("name,command", sorted(FLAGS))
def test_help_works_and_every_flag_keeps_its_name(name, command, capsys):
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(name).main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out.split("\n\n")[0]  # the usage lines list every option, and nothing else
    found = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", usage))  # metavars are upper case
    found.discard("--debug")
    expected = set(FLAGS[(name, command)].split())
    assert expected <= found, f"{name} {command}: flags gone: {sorted(expected - found)}"
    twin = lambda f: f.replace("--no-", "--") if f.startswith("--no-") else f.replace("--", "--no-", 1)
    assert all(twin(f) in found for f in found - expected), f"{name} {command}: new flags {sorted(found - expected)}"
