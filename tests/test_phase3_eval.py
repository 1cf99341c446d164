"""Phase 3 evaluation: real LIBERO episodes with tiny models, resume, error accounting, the
--num-trials contract, strategies, and the Modal module."""

import json

import h5py
import numpy as np
import pytest
import torch

import rsd_entry
from common.data.episodes import synthetic_episodes
from common.checkpoints import CheckpointError
from common.eval.closed_loop import evaluate, planned_jobs, read_rows, run_trial_job
from common.eval.config import EvalConfig
from common.eval.summary import summarize
from common.sim.libero_env import LOW_DIM_OBS_DIM, get_suite
from common.policy.train import PolicyTrainConfig, train_policy
from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

SUITE = "libero_object"
TINY_POLICY = dict(epochs=1, batch_size=64, d_model=32, num_blocks=1, num_heads=2, draft_width=16, timing_repeats=3, progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny robust + naive tokenizers and policies trained on demos labelled as libero_object task 0."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("phase3")
    mp = pytest.MonkeyPatch()
    mp.setenv("RSD_RESULTS_DIR", str(root / "results"))
    instruction = get_suite(SUITE).get_task(0).language
    demos = root / "demos.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(demos, "w") as f:
        data = f.create_group("data")
        for i, ep in enumerate(synthetic_episodes(6, seed=2, length=(40, 60))):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=ep.actions)
            g.create_dataset("obs/low_dim", data=rng.normal(size=(len(ep), LOW_DIM_OBS_DIM)).astype(np.float32))
            g.attrs["task_id"] = 0
            g.attrs["language_instruction"] = instruction
    models = root / "models"
    for layernorm in (True, False):
        train_tokenizer(TokenizerTrainConfig(data=str(demos), epochs=1, num_episodes=6, layout="chunk", latent_dim=4, batch_size=256,
                                             models_dir=str(models), progress=False, use_layernorm=layernorm))
    results = str(root / "results")
    train_policy(PolicyTrainConfig(data=str(demos), models_dir=str(models), results_dir=results, **TINY_POLICY))
    train_policy(PolicyTrainConfig(data=str(demos), models_dir=str(models), results_dir=results, rfsq_checkpoint=str(models / "rfsq_best.pt"), **TINY_POLICY))
    yield {"root": root, "models": models}
    mp.undo()


def _cfg(models, out, **kw):
    base = dict(task_suite=SUITE, tasks="0", num_trials=2, max_steps=12, workers=1, models_dir=str(models["models"]), out=str(out))
    return EvalConfig(**{**base, **kw})


def test_real_episodes_end_to_end_lossless_and_resumable(models, tmp_path):
    cfg = _cfg(models, tmp_path / "run", assert_lossless=True)
    info = evaluate(cfg, progress=False)
    rows = read_rows(tmp_path / "run" / "episodes.jsonl")
    assert [(r["task"], r["trial"]) for r in rows] == [(0, 0), (0, 1)]
    assert all(r["status"] in ("success", "failure") and 0 < r["steps"] <= 12 for r in rows)
    assert info["episodes"] == 2 and info["errors"] == 0
    assert info["lossless_identical_fraction"] == 1.0  # speculative == main-only on every chunk
    assert info["main_only_passes_per_chunk"] == 8
    assert 5 <= info["main_passes_per_chunk"] <= 8
    assert set(info["latency_ms"]) >= {"backbone_ms", "draft_ms", "main_ms", "tokenizer_decode_ms", "ref_main_ms"}
    assert (tmp_path / "run" / "eval_plots.png").exists() and (tmp_path / "run" / "eval_table.md").exists()
    assert info["libraries"]["mujoco"] and info["provenance"]["git_sha"]
    # resume: one more trial runs only the missing episode
    info3 = evaluate(_cfg(models, tmp_path / "run", num_trials=3, assert_lossless=True), progress=False)
    assert info3["episodes_run_this_call"] == 1 and info3["episodes"] == 3
    assert len(read_rows(tmp_path / "run" / "episodes.jsonl")) == 3
    with pytest.raises(ValueError, match="different configuration"):
        evaluate(_cfg(models, tmp_path / "run", replan_steps=2), progress=False)


def test_resume_refuses_episodes_run_with_other_checkpoints(models, tmp_path):
    import shutil

    copy = {**models, "models": tmp_path / "models"}
    shutil.copytree(models["models"], copy["models"])
    evaluate(_cfg(copy, tmp_path / "run", num_trials=1), progress=False)
    # a retrained draft (other seed) changes the draft checkpoint's content hash
    train_policy(PolicyTrainConfig(data=str(models["root"] / "demos.hdf5"), models_dir=str(copy["models"]), train="draft",
                                   results_dir=str(tmp_path / "results"), overwrite=True, **{**TINY_POLICY, "seed": 5}))
    with pytest.raises(ValueError, match=r"finished episodes were run with other draft checkpoints than .*best_draft_with_projection\.pt"):
        evaluate(_cfg(copy, tmp_path / "run", num_trials=2), progress=False)
    # a fresh --out is fine
    assert evaluate(_cfg(copy, tmp_path / "run2", num_trials=1), progress=False)["episodes"] == 1


def test_strategy_b_pairs_naive_models_with_robust_decoder_explicitly(models, tmp_path):
    info = evaluate(_cfg(models, tmp_path / "b", strategy="B", num_trials=1, max_steps=4), progress=False)
    assert info["episodes"] == 1 and info["errors"] == 0
    # Strategy A's robust path must refuse naive-token models (swap the files to simulate the mistake)
    m = models["models"]
    bad = tmp_path / "bad_models"
    bad.mkdir()
    for name in ("rfsq_robust_best.pt",):
        (bad / name).write_bytes((m / name).read_bytes())
    for src, dst in (("best_rfsq_head_naive.pt", "best_rfsq_head.pt"), ("best_draft_with_projection_naive.pt", "best_draft_with_projection.pt")):
        (bad / dst).write_bytes((m / src).read_bytes())
    from common.eval.policy import TokenPolicy

    with pytest.raises(CheckpointError, match="tokenizer"):
        TokenPolicy(_cfg({"models": bad}, tmp_path / "x"))


def test_episode_exception_is_an_error_row_not_a_failure(models, tmp_path, monkeypatch):
    import common.eval.closed_loop as ev

    def broken(*args, **kwargs):
        raise RuntimeError("simulated controller fault")

    monkeypatch.setattr(ev, "run_episode", broken)
    row = run_trial_job(_cfg(models, tmp_path / "err"), 0, 0)
    assert row["status"] == "error" and "simulated controller fault" in row["error"]
    ok = {"suite": SUITE, "task": 0, "trial": 1, "instruction": "x", "status": "failure", "success": False, "steps": 5, "chunks": []}
    info = summarize(_cfg(models, tmp_path / "err"), [row, ok], wall_seconds=1.0, episodes_run=2, workers=1)
    assert info["errors"] == 1 and info["success_episodes"] == 1 and info["success_rate"] == 0.0


def test_num_trials_is_honoured_exactly(models, tmp_path):
    cfg = _cfg(models, tmp_path / "n", tasks="0-2", num_trials=7)
    jobs = planned_jobs(cfg)
    assert len(jobs) == 21 and jobs[:8] == [(0, t) for t in range(7)] + [(1, 0)]


def test_float32_decoding_option_runs(models, tmp_path):
    info = evaluate(_cfg(models, tmp_path / "f32", decode_dtype="float32", num_trials=1, max_steps=4), progress=False)
    assert info["episodes"] == 1 and info["lossless_identical_fraction"] is not None


def test_float32_draft_next_to_float64_main_stays_lossless(models, tmp_path):
    info = evaluate(_cfg(models, tmp_path / "d32", draft_dtype="float32", num_trials=1, max_steps=8, assert_lossless=True), progress=False)
    assert info["episodes"] == 1 and info["lossless_identical_fraction"] == 1.0
    with pytest.raises(ValueError, match="--draft-dtype must be"):
        EvalConfig(draft_dtype="float16")


def test_config_validation():
    with pytest.raises(ValueError, match="strategy B"):
        EvalConfig(tokenizer="naive", strategy="B")
    with pytest.raises(ValueError, match="--tolerance needs --acceptance relaxed"):
        EvalConfig(tolerance=1)
    with pytest.raises(ValueError, match="--relaxed-layers needs --acceptance relaxed"):
        EvalConfig(relaxed_layers=1)
    assert EvalConfig(acceptance="relaxed", tolerance=1, relaxed_layers=1).run_name.endswith("_relaxed1_rl1")
    with pytest.raises(ValueError, match="--task-suite"):
        EvalConfig(task_suite="libero_100")


@pytest.mark.filterwarnings("ignore:The run_shard function is executing locally")
def test_modal_module_imports_without_token_flags_match_and_shard_runs(models, tmp_path, monkeypatch):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    from modal.cli.run import _get_click_command_for_local_entrypoint

    import phase3.modal_phase3_libero_eval as mod

    click_cmd = _get_click_command_for_local_entrypoint(mod.app, mod.main)
    assert {o for p in click_cmd.params for o in p.opts} == set(rsd_entry.cli_flags(EvalConfig))
    assert "--no-use-speculative-decoding" in {o for p in click_cmd.params for o in p.secondary_opts}
    cfg = _cfg(models, tmp_path / "shard", max_steps=4)
    from common.eval.shards import shard_jobs

    shards = shard_jobs(_cfg(models, tmp_path / "shard", tasks="0-1", num_trials=25))
    assert sorted((t, tr) for t, trials in shards for tr in trials) == planned_jobs(_cfg(models, tmp_path / "s", tasks="0-1", num_trials=25))
    rows = mod.run_shard.local(cfg.__dict__, 0, [1])
    assert len(rows) == 1 and rows[0]["trial"] == 1 and rows[0]["status"] in ("success", "failure")


def test_evaluation_and_comparison_flags_have_one_definition_each():
    """phase3.compare and the single-variant evaluation share EpisodeSettings: each shared flag is declared
    once (one default, one help text), a comparison passes all of them to every variant, and only `out`
    (a different folder layout) is declared by both."""
    import dataclasses

    import rsd_entry
    from common.eval.compare import ComparisonConfig
    from common.eval.config import EpisodeSettings, EvalConfig

    shared = {f.name for f in dataclasses.fields(EpisodeSettings)}
    own = lambda cls: set(cls.__dict__.get("__annotations__", {}))
    assert own(EvalConfig) & own(ComparisonConfig) == {"out"} and not (own(EvalConfig) | own(ComparisonConfig)) & shared
    assert ComparisonConfig().num_trials == EvalConfig().num_trials == 50
    assert rsd_entry.field_help(ComparisonConfig)["decode_dtype"] == rsd_entry.field_help(EvalConfig)["decode_dtype"] != ""
    cfg = ComparisonConfig(tasks="3", num_trials=7, first_trial=20, decode_dtype="float64", drafted_layers=1, seed=5)
    assert EvalConfig(**cfg.episode_settings()).episode_settings() == cfg.episode_settings()
    with pytest.raises(ValueError, match="--decode-rule must be one of"):
        ComparisonConfig(decode_rule="mean")  # checked up front, not when the first variant starts


def test_compare_variant_trials_override_and_validation():
    from common.eval.compare import ComparisonConfig as CompareConfig

    cfg = CompareConfig(num_trials=50, variant_trials="robust-B=10")
    assert cfg.trials_for_variant == {"naive": 50, "robust-A": 50, "robust-B": 10}
    assert CompareConfig(num_trials=7).trials_for_variant == {"naive": 7, "robust-A": 7, "robust-B": 7}
    for bad in ("robust-C=3", "robust-B", "robust-B=0", "naive=x"):
        with pytest.raises(ValueError, match="--variant-trials: expected"):
            CompareConfig(variant_trials=bad)
    with pytest.raises(ValueError, match="--variant-trials"):
        CompareConfig(variants="naive", variant_trials="robust-B=10")  # not among --variants


def test_compare_tables_only_rebuilds_from_finished_runs_and_checks_trials(models, tmp_path, monkeypatch):
    from common.eval.compare import ComparisonConfig as CompareConfig, run_comparison as compare

    monkeypatch.setattr("common.eval.compare.fine_motion_rows", lambda models_dir: {
        "heldout": {"num_chunks": 3}, "naive": {"all_mse": 1.0, "fine_motion_mse": 2.0, "fine_motion_chunks": 1},
        "robust": {"all_mse": 0.5, "fine_motion_mse": 1.0, "fine_motion_chunks": 1}})
    base = dict(task_suite=SUITE, tasks="0", variants="robust-A", max_steps=12, workers=1, models_dir=str(models["models"]), out=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--tables-only needs the finished evaluation of variant 'robust-A'"):
        compare(CompareConfig(num_trials=1, tables_only=True, **base))
    first = compare(CompareConfig(num_trials=1, **base))
    again = compare(CompareConfig(num_trials=1, tables_only=True, **base))
    # same numbers (compared as the files hold them: per-task keys become strings, a rate without episodes null)
    from common.provenance import json_safe

    assert json.dumps(json_safe(again["variants"]), sort_keys=True) == json.dumps(json_safe(first["variants"]), sort_keys=True)
    v = first["variants"]["robust-A"]
    assert v["trials_per_task"] == 1 and v["draft_cost_in_main_passes"] > 0
    lat = v["latency_ms"]
    assert v["draft_cost_in_main_passes"] == pytest.approx(lat["draft_ms"]["mean"] / (lat["ref_main_ms"]["mean"] / 8))
    one_pass = lat["ref_main_ms"]["mean"] / v["main_only_passes_per_chunk"]
    assert v["verify_overhead_in_main_passes"] == pytest.approx(lat["main_ms"]["mean"] / one_pass - v["main_passes_per_chunk"])
    assert "| robust-A | 1 |" in (tmp_path / "comparison.md").read_text()
    with pytest.raises(ValueError, match="was run with 1 trials per task, expected 2"):
        compare(CompareConfig(num_trials=2, tables_only=True, **base))


def test_prefix_depth_decoding_runs_fewer_main_passes_and_stays_lossless(models, tmp_path):
    """--decode-layers 2: both decodes stop after 2 layers (the tokenizer decodes the prefix), the
    tokens still equal main-only greedy, and the run gets its own name."""
    cfg = _cfg(models, tmp_path / "k2", num_trials=1, decode_layers=2)
    assert cfg.run_name.endswith("_k2")
    info = evaluate(cfg, progress=False)
    assert info["errors"] == 0 and info["lossless_identical_fraction"] == 1.0
    assert info["main_only_passes_per_chunk"] == 2 and info["main_passes_per_chunk"] <= 2
    with pytest.raises(ValueError, match="--decode-layers 9"):
        from common.eval.policy import TokenPolicy

        TokenPolicy(_cfg(models, tmp_path / "k9", decode_layers=9))


def test_expected_value_decoding_uses_the_last_layers_mean_and_keeps_argmax_layers_lossless(models, tmp_path):
    """--decode-rule expected: the layers before the last are the verified argmax tokens; the last decoded
    layer becomes the probability-weighted mean of its level values (a chunk of actions differs from argmax)."""
    from common.eval.policy import TokenPolicy
    from common.tokenizer.token_code import TokenCode

    cfg = _cfg(models, tmp_path / "ev", num_trials=1, decode_layers=2, decode_rule="expected")
    assert cfg.run_name.endswith("_k2_ev")
    policy = TokenPolicy(cfg)
    obs = torch.linspace(-1, 1, LOW_DIM_OBS_DIM).numpy()
    actions, info = policy.plan(obs, 0)
    assert info["identical_to_main_only"] and info["main_passes"] <= 2
    # the executed and the main-only expected values agree to float precision (not bit for bit: the
    # verify pass computes the last layer's distribution with other kernel shapes)
    assert 0.0 <= info["action_max_abs_vs_main_only"] < 1e-5
    features = policy.policy.features(torch.as_tensor(obs, dtype=torch.float32)[None], torch.tensor([0])).to(policy.dtype)
    codes, logits = policy.policy.head.greedy_decode(features, 2, return_last_logits=True)
    expected = TokenCode(policy.tokenizer.model).decode_expected(codes[..., :1], torch.softmax(logits, -1))
    np.testing.assert_allclose(actions, policy.tokenizer.normalizer.unnormalize(expected[0].numpy()), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        argmax = policy.tokenizer.normalizer.unnormalize(policy.tokenizer.model.decode_from_indices(codes)[0].numpy())
    assert not np.allclose(actions, argmax)
    info = evaluate(cfg, progress=False)
    assert info["errors"] == 0 and info["lossless_identical_fraction"] == 1.0
    assert 0.0 <= info["action_max_abs_vs_main_only_identical_tokens"] < 1e-5
    assert "differ from main-only's by at most" in (tmp_path / "ev" / "eval_table.md").read_text()
    with pytest.raises(ValueError, match="--decode-rule"):
        _cfg(models, tmp_path / "bad", decode_rule="mean")


def test_auto_decode_executes_the_depth_and_rule_phase2_chose_on_held_out_data(models, tmp_path):
    from common.checkpoints import read_checkpoint
    from common.policy.model import HEAD_KIND

    choice = read_checkpoint(models["models"] / "best_rfsq_head.pt", kind=HEAD_KIND)["metrics"]["decode_choice"]
    assert 1 <= choice["layers"] <= 8 and choice["rule"] in ("argmax", "expected")
    assert len(choice["val_action_mse_by_depth"]["expected"]) == 8
    cfg = _cfg(models, tmp_path / "auto", num_trials=1, auto_decode=True)
    assert cfg.run_name.endswith("_auto")
    info = evaluate(cfg, progress=False)
    assert info["decoding"] == [{"layers": choice["layers"], "rule": choice["rule"]}]
    assert info["main_only_passes_per_chunk"] == choice["layers"] and info["lossless_identical_fraction"] == 1.0
    with pytest.raises(ValueError, match="--auto-decode takes the depth"):
        _cfg(models, tmp_path / "bad", auto_decode=True, decode_layers=2)


def test_relaxed_acceptance_benchmark_reports_the_executed_chunks_deviation_from_main_only(models, tmp_path):
    from benchmarks.decoding.relaxed_acceptance import run

    result = run(str(models["models"]), suite=SUITE, tasks="0", num_trials=1, tolerances=[0, 6], workers=1,
                 auto_decode=False, out=tmp_path, max_steps=12, relaxed_layers=(0, 1))
    exact, loose, coarse = result["rows"]
    assert [(r["tolerance"], r["relaxed_layers"]) for r in result["rows"]] == [(0, 0), (6, 0), (6, 1)]
    assert (tmp_path / "tolerance_6_layers1" / "eval_info.json").exists()
    # r = 6 on the coarsest drafted layer only: the finer ones are accepted exactly, so never more
    assert coarse["mean_accepted_layers"] <= loose["mean_accepted_layers"]
    assert exact["identical_fraction"] == 1.0 and exact["action_mse_vs_main_only"] == 0.0
    # r = 6 accepts every drafted layer of 7-level tokens: all K coarse layers come from the draft
    assert loose["mean_accepted_layers"] == pytest.approx(3.0)
    if loose["identical_fraction"] < 1.0:
        assert loose["action_mse_vs_main_only"] > 0.0
    table = (tmp_path / "relaxed_acceptance.md").read_text()
    assert "| 6 | all |" in table and "| 6 | the coarsest 1 |" in table and "| 0 | none (exact) |" in table


def test_first_trial_offsets_the_init_states_and_is_checked(models, tmp_path):
    jobs = planned_jobs(_cfg(models, tmp_path / "a", num_trials=3, first_trial=20))
    assert jobs == [(0, 20), (0, 21), (0, 22)]
    with pytest.raises(ValueError, match="from --first-trial 48"):
        planned_jobs(_cfg(models, tmp_path / "b", num_trials=3, first_trial=48))
    with pytest.raises(ValueError, match="--first-trial must be >= 0"):
        _cfg(models, tmp_path / "c", first_trial=-1)


def test_dagger_collection_keeps_policy_driven_episodes_with_the_experts_labels(models, tmp_path):
    """A trained policy drives (common/sim/dagger.py), the expert labels: the episode is kept whatever
    its outcome, its labels differ from what was executed, a rerun finds the task full, and a file of
    DAgger episodes refuses plain demos."""
    import json

    h5py = pytest.importorskip("h5py")
    from common.eval.policy import dagger_policy
    from common.sim.dagger import DaggerConfig
    from common.sim.demo_collection import collect_demos

    dagger = DaggerConfig(models_dir=str(models["models"]), replan_steps=4).as_dict()
    out = tmp_path / "dagger.hdf5"
    summary = collect_demos(SUITE, [0], 1, out, workers=1, seed=4, dagger=dagger, driving_policy=dagger_policy, progress=False)
    assert summary["episodes_run"] == 1 and summary["tasks"][0]["kept"] == 1 and summary["given_up_tasks"] == []
    with h5py.File(out, "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["dagger"]) == dagger and data.attrs["num_demos"] == 1
        demo = data["demo_0"]
        executed, labels = demo["actions"][()], demo["expert_actions"][()]
        assert executed.shape == labels.shape and not np.allclose(executed, labels)
        assert bool(demo.attrs["success"]) == (summary["success_rate"] == 1.0)
    assert collect_demos(SUITE, [0], 1, out, workers=1, seed=4, dagger=dagger, driving_policy=dagger_policy, progress=False)["episodes_run"] == 0
    with pytest.raises(ValueError, match="dagger: expected driving_policy"):
        collect_demos(SUITE, [0], 2, out, workers=1, seed=4, dagger=dagger, progress=False)
    with pytest.raises(ValueError, match="cannot add demos with dagger=none"):
        collect_demos(SUITE, [0], 2, out, workers=1, progress=False)


def test_lossless_column_never_rounds_a_difference_away():
    from common.eval.summary import identical_label

    assert identical_label(1.0, 10198) == "100.0%"
    assert identical_label(10197 / 10198, 10198) == "99.99% (1 of 10198 chunks differ)"
    assert identical_label(0.5) == "50.00% (not every chunk identical)"
    assert identical_label(None) == "—"
