"""Guarantees under faults, one test (or a few) each:

- a torn last JSONL line (kill mid-write) is dropped on read and cut before the next append;
  damage before the last line is an error naming file and line;
- an evaluation summary counts each (task, trial) once, whoever wrote the rows;
- a resumed training drops log lines past its saved state, so no epoch is logged twice;
- a CLI error is one ``error:`` line and a non-zero exit; ``--debug`` shows the traceback;
- interrupt: Ctrl-C is never swallowed by LIBERO's reset loop; Ctrl-C / SIGTERM during Phase 3 with
  workers stops the run, keeps finished episodes, exits 130 / 143 and leaves no worker (slow);
  SIGTERM or even SIGKILL of a demo collection leaves no worker; SIGTERM at the CLI edge is an
  interrupt (cleanup runs) with exit 143;
- concurrent writers: a second evaluation into the same ``--out``, tokenizer training into the same
  models dir or Phase 2 training of the same models is refused, naming the first run (pid, command);
- rerun: a finished tokenizer / Phase 2 model is never replaced without ``--resume`` or
  ``--overwrite``; two models dirs never share one Phase 2 summary;
- checked before the first expensive step: ``--num-trials`` vs the task's init states,
  ``--replan-steps`` vs the chunk, ``--coarse-layers`` vs the tokenizer, output folders writable; a
  failed setup leaves no ``eval_config.json`` behind;
- nothing accepted silently: more ``--num-episodes`` than demos, actions outside [-1, 1] and demos
  shorter than a chunk are warned about with counts; an all-too-short split names the split;
- every bad file is one line naming it (empty / non-HDF5 demo files, a non-HDF5 ``--out``);
- the pipeline redoes a stage whose output changed after it was written, or whose stamp is damaged;
- one pipeline run per root: a second ``rsd_pipeline run`` started mid-run is refused and deletes
  nothing; a regular file as ``--root`` is one line (``--plan`` too);
- a task the policy was not trained on is refused before the first episode;
- ``--help`` explains every flag of every entry point, ``--debug`` included.
(Damaged inputs and their messages: ``tests/test_damaged_inputs.py``.)
"""

import json
import subprocess
import sys

import pytest
import torch

from common.eval.closed_loop import unique_rows
from common.jsonl import JsonlError, append_jsonl, read_jsonl
from common.training_loop import RunFiles


def test_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b"')  # killed mid-write
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, {"a": 4})
    assert path.read_text() == '{"a": 1}\n{"a": 2}\n{"a": 4}\n'


def test_damage_before_the_last_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\nnot json\n{"a": 3}\n')
    with pytest.raises(JsonlError, match=r"rows\.jsonl:2: not a JSON row"):
        read_jsonl(path)


def test_each_task_trial_counts_once():
    rows = [{"task": 0, "trial": 0, "status": "success"}, {"task": 0, "trial": 1, "status": "failure"},
            {"task": 0, "trial": 0, "status": "failure"}, {"task": 9, "trial": 0, "status": "success"}]
    kept = unique_rows(rows, planned={(0, 0), (0, 1)})
    assert [(r["task"], r["trial"], r["status"]) for r in kept] == [(0, 0, "success"), (0, 1, "failure")]


def test_resume_drops_log_lines_past_the_saved_state(tmp_path):
    state, log = tmp_path / "x_last.pt", tmp_path / "x_metrics.jsonl"
    torch.save({"kind": "k", "config": {"lr": 1.0}, "epoch": 2}, state)
    log.write_text("".join(json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)))  # killed after logging epoch 3
    files = RunFiles(state_path=state, metrics_path=log, state_kind="k", config={"lr": 1.0},
                     resumable_changes=(), resume=True, checks={})
    assert files.load_state()["epoch"] == 2
    assert [r["epoch"] for r in read_jsonl(log)] == [1, 2]


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    cmd = [sys.executable, "-m", "phase2_draft_retrain.modal_train_draft_with_projection", "--data", str(tmp_path / "demos.hdf5"),
           "--rfsq-checkpoint", str(tmp_path / "missing.pt")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: ") and "missing.pt" in out.stderr
    debug = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr


# ================================================================================ issue 14
# Fixtures: tiny tokenizer + policy on synthetic demos labelled as libero_object task 0 (seconds).
import os
import signal
import time
from pathlib import Path

import h5py
import numpy as np

import rsd_entry
from common.data.episodes import load_episodes, load_hdf5_episodes, make_chunks, synthetic_episodes
from common.eval.closed_loop import evaluate, read_rows
from common.eval.config import EvalConfig
from common.locks import RunLockedError, check_writable_dir, output_lock
from common.pipeline.stages import Stages
from common.policy.config import PolicyTrainConfig
from common.policy.labels import load_policy_episodes
from common.policy.train import train_policy
from common.sim.libero_env import LOW_DIM_OBS_DIM, get_suite
from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = dict(epochs=1, num_episodes=6, latent_dim=4, batch_size=256, progress=False)
TINY_POLICY = dict(epochs=1, batch_size=64, d_model=32, num_blocks=1, num_heads=2, draft_width=16, timing_repeats=3, progress=False)


def _write_demos(path: Path, episodes: list[np.ndarray] | None = None) -> Path:
    instruction = get_suite("libero_object").get_task(0).language
    rng = np.random.default_rng(0)
    actions = episodes if episodes is not None else [e.actions for e in synthetic_episodes(6, seed=2, length=(40, 60))]
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, a in enumerate(actions):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=a)
            g.create_dataset("obs/low_dim", data=rng.normal(size=(len(a), LOW_DIM_OBS_DIM)).astype(np.float32))
            g.attrs["task_id"] = 0
            g.attrs["language_instruction"] = instruction
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A models dir with a robust tokenizer, head and draft (robust, Strategy A)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("faults")
    demos = _write_demos(root / "demos.hdf5")
    models = root / "models"
    train_tokenizer(TokenizerTrainConfig(data=str(demos), models_dir=str(models), **TINY_TOKENIZER))
    train_policy(PolicyTrainConfig(data=str(demos), models_dir=str(models), results_dir=str(root / "results"), **TINY_POLICY))
    return {"root": root, "demos": demos, "models": models}


def _session_processes(session_id: int) -> list[int]:
    """Live (non-zombie) processes of a session, read from /proc (psutil is not installed)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _wait_gone(session_id: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = _session_processes(session_id)
        if not alive:
            return []
        time.sleep(0.5)
    return _session_processes(session_id)


def _env(tiny, tmp_path) -> dict:
    return {**os.environ, "RSD_MODELS_DIR": str(tiny["models"]), "RSD_RESULTS_DIR": str(tmp_path / "results"),
            "RSD_DATA_DIR": str(tmp_path / "data"), "MUJOCO_GL": "egl", "PYTHONPATH": str(REPO)}


# --- interrupts: stop within seconds, keep finished work, non-zero exit, no orphans ----------------
def test_libero_reset_loop_swallows_ctrl_c_and_our_reset_lets_it_through():
    from libero.libero.envs.env_wrapper import ControlEnv

    from common.sim.libero_env import LiberoTaskEnv

    class Inner:
        calls = 0

        def reset(self):
            Inner.calls += 1
            if Inner.calls == 1:
                raise KeyboardInterrupt  # Ctrl-C lands inside the reset
            return {"reset": Inner.calls}

    upstream = ControlEnv.__new__(ControlEnv)
    upstream.env = Inner()
    assert upstream.reset() == {"reset": 2}  # LIBERO's `finally: continue` swallowed the interrupt
    ours = LiberoTaskEnv.__new__(LiberoTaskEnv)
    ours.env, Inner.calls = upstream, 0
    with pytest.raises(KeyboardInterrupt):
        ours.reset()
    assert Inner.calls == 1  # no retry after an interrupt


def _start_eval(tiny, tmp_path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "phase3.modal_phase3_libero_eval", "--tasks", "0", "--num-trials", "6", "--workers", "2",
           "--out", str(out), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(tiny, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_rows(out: Path, proc: subprocess.Popen, n: int, seconds: float = 240) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        rows = len(read_rows(out / "episodes.jsonl"))
        if rows >= n:
            return rows
        time.sleep(0.3)
    raise AssertionError(f"no {n} finished episodes (exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}")


@pytest.mark.slow  # ~80 s each on 2 shared cores: spawned workers import torch + LIBERO and build envs
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_phase3_with_workers_stops_keeps_episodes_and_leaves_no_worker(tiny, tmp_path, how):
    out = tmp_path / "run"
    proc = _start_eval(tiny, tmp_path, out)
    try:
        before = _wait_rows(out, proc, 1)  # the other worker is mid-episode now
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
        else:
            os.kill(proc.pid, signal.SIGTERM)  # timeout / docker stop / schedulers signal the parent only
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == (130 if how == "ctrl-c" else 143), stderr
    assert "finished work is kept" in stderr.strip().splitlines()[-1]
    assert _wait_gone(proc.pid, 15) == []  # no worker survives its run
    rows = read_rows(out / "episodes.jsonl")
    assert len(rows) >= before and len({(r["task"], r["trial"]) for r in rows}) == len(rows) < 6


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_terminated_or_killed_collection_leaves_no_worker(tmp_path, sig):
    """SIGTERM: the parent stops its workers and exits 143. Even SIGKILL (no cleanup at all in the
    parent): the workers exit with their parent."""
    out = tmp_path / "data" / "demos.hdf5"
    cmd = [sys.executable, "-m", "phase1_improved.collect_demos", "--tasks", "0", "--demos-per-task", "20", "--workers", "2",
           "--out", str(out)]
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while len(_session_processes(proc.pid)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
        assert len(_session_processes(proc.pid)) >= 3, "collection workers did not start"
        time.sleep(3)  # workers are building envs / running episodes
        os.kill(proc.pid, sig)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == (143 if sig == signal.SIGTERM else -signal.SIGKILL), stderr
        assert _wait_gone(proc.pid, 15) == []
    finally:
        for pid in _session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_at_the_cli_edge_is_an_interrupt_with_exit_143():
    previous = signal.getsignal(signal.SIGTERM)
    cleaned = []

    def cli(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        finally:
            cleaned.append(True)  # the library's cleanup runs

    try:
        with pytest.raises(SystemExit) as exc:
            rsd_entry.main(cli, [])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exc.value.code == 143 and cleaned == [True]


# --- concurrent writers are excluded ---------------------------------------------------------------
def test_a_second_writer_is_refused_with_the_first_runs_pid_and_command(tmp_path):
    lock = tmp_path / "out" / ".lock"
    with output_lock(lock, "evaluation results in out"):
        with pytest.raises(RunLockedError, match=rf"another run \(pid {os.getpid()}, started .*: .*python") as exc:
            with output_lock(lock, "evaluation results in out"):
                pass
        assert "evaluation results in out" in str(exc.value)
    with output_lock(lock, "evaluation results in out"):  # released when the holder ends
        pass


def test_evaluations_into_one_out_and_trainings_into_one_models_dir_exclude_each_other(tiny, tmp_path):
    out = tmp_path / "run"
    with output_lock(out / ".lock", "held by the test"):
        with pytest.raises(RunLockedError, match="evaluation results in"):
            evaluate(EvalConfig(tasks="0", num_trials=1, workers=1, models_dir=str(tiny["models"]), out=str(out)), progress=False)
    models = tmp_path / "models"
    with output_lock(models / ".rfsq_robust_best.lock", "held by the test"):
        with pytest.raises(RunLockedError, match="tokenizer .*rfsq_robust_best.pt"):
            train_tokenizer(TokenizerTrainConfig(data=str(tiny["demos"]), models_dir=str(models), **TINY_TOKENIZER))
    with output_lock(tiny["models"] / ".policy.lock", "held by the test"):
        with pytest.raises(RunLockedError, match="Phase 2 models"):
            train_policy(PolicyTrainConfig(data=str(tiny["demos"]), models_dir=str(tiny["models"]), overwrite=True,
                                           results_dir=str(tiny["root"] / "results"), **TINY_POLICY))


# --- reruns are refused without --resume / --overwrite ----------------------------------------------
def test_rerun_refuses_to_replace_a_finished_tokenizer_unless_resume_or_overwrite(tiny, tmp_path):
    models = tmp_path / "models"
    cfg = dict(data=str(tiny["demos"]), models_dir=str(models), **TINY_TOKENIZER)
    first = train_tokenizer(TokenizerTrainConfig(**cfg))
    best = Path(first["best_checkpoint"]).read_bytes()
    with pytest.raises(FileExistsError, match=r"rfsq_robust_best\.pt.*pass --resume .* or --overwrite"):
        train_tokenizer(TokenizerTrainConfig(**cfg))
    assert Path(first["best_checkpoint"]).read_bytes() == best  # untouched
    train_tokenizer(TokenizerTrainConfig(**{**cfg, "epochs": 2}, resume=True))
    assert [r["epoch"] for r in read_jsonl(first["metrics_jsonl"])] == [1, 2]
    train_tokenizer(TokenizerTrainConfig(**cfg, overwrite=True))
    assert [r["epoch"] for r in read_jsonl(first["metrics_jsonl"])] == [1]
    with pytest.raises(ValueError, match="pass one of them"):
        TokenizerTrainConfig(**cfg, overwrite=True, resume=True)


def test_rerun_refuses_to_replace_finished_policy_models(tiny):
    cfg = dict(data=str(tiny["demos"]), models_dir=str(tiny["models"]), results_dir=str(tiny["root"] / "results"), **TINY_POLICY)
    with pytest.raises(FileExistsError, match=r"best_rfsq_head\.pt.*--overwrite"):
        train_policy(PolicyTrainConfig(**cfg))
    with pytest.raises(FileExistsError, match=r"best_draft_with_projection\.pt"):
        train_policy(PolicyTrainConfig(**cfg, train="draft"))


def test_two_models_dirs_never_share_one_phase2_summary(tiny, tmp_path):
    cfg = dict(data=str(tiny["demos"]), results_dir=str(tiny["root"] / "results"), **TINY_POLICY)
    other = tmp_path / "other_models"
    other.mkdir()
    (other / "rfsq_robust_best.pt").write_bytes((tiny["models"] / "rfsq_robust_best.pt").read_bytes())
    with pytest.raises(FileExistsError, match=r"train_summary\.json: holds the summary of the models in .*models.*--results-dir"):
        train_policy(PolicyTrainConfig(**cfg, models_dir=str(other)))
    assert not (other / "best_rfsq_head.pt").exists()


# --- checks before the first expensive step ---------------------------------------------------------
def test_num_trials_beyond_the_init_states_is_refused_before_anything_runs(tiny, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--num-trials 51: libero_object task 0 has 50 init states"):
        evaluate(EvalConfig(tasks="0", num_trials=51, workers=1, models_dir=str(tiny["models"]), out=str(out)), progress=False)
    assert not (out / "episodes.jsonl").exists() and not (out / "eval_config.json").exists()


def test_failed_setup_writes_no_eval_config_and_the_corrected_rerun_runs(tiny, tmp_path):
    out, empty = tmp_path / "run", tmp_path / "no_models"
    with pytest.raises(FileNotFoundError, match=r"best_rfsq_head\.pt: checkpoint not found"):
        evaluate(EvalConfig(tasks="0", num_trials=1, workers=1, max_steps=4, models_dir=str(empty), out=str(out)), progress=False)
    assert not (out / "eval_config.json").exists()
    info = evaluate(EvalConfig(tasks="0", num_trials=1, workers=1, max_steps=4, models_dir=str(tiny["models"]), out=str(out)), progress=False)
    assert info["episodes"] == 1


def test_replan_steps_longer_than_the_chunk_is_refused(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"--replan-steps 99 is longer than the tokenizer's chunk \(8 steps"):
        evaluate(EvalConfig(tasks="0", num_trials=1, workers=1, replan_steps=99, models_dir=str(tiny["models"]),
                            out=str(tmp_path / "r")), progress=False)


def test_policy_training_checks_coarse_layers_and_output_folders_before_training(tiny, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "rfsq_robust_best.pt").write_bytes((tiny["models"] / "rfsq_robust_best.pt").read_bytes())
    cfg = dict(data=str(tiny["demos"]), models_dir=str(models), results_dir=str(tmp_path / "results"), **TINY_POLICY)
    with pytest.raises(ValueError, match=r"--coarse-layers must be in \[1, 7\] for the 8-layer tokenizer"):
        train_policy(PolicyTrainConfig(**cfg, coarse_layers=9))
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"--results-dir .*file is a regular file"):
        train_policy(PolicyTrainConfig(**{**cfg, "results_dir": str(tmp_path / "file" / "results")}))
    assert not list(models.glob("*head*"))  # nothing trained, nothing left behind
    with pytest.raises(NotADirectoryError, match="--models-dir"):
        check_writable_dir(tmp_path / "file" / "models", "--models-dir")


# --- values are never accepted silently --------------------------------------------------------------
def test_more_episodes_than_demos_warns_and_the_summary_records_the_number_used(tiny):
    with pytest.warns(UserWarning, match=r"--num-episodes 1000: --data holds only 6 demos; using all 6"):
        chosen, _ = load_policy_episodes([str(tiny["demos"])], num_episodes=1000)
    assert len(chosen) == 6
    with pytest.warns(UserWarning, match=r"--num-episodes 1000: .*demos\.hdf5 holds only 6 demos; using all 6"):
        assert len(load_episodes(str(tiny["demos"]), num_episodes=1000)) == 6


def test_out_of_range_actions_and_short_demos_are_counted_and_the_message_names_the_split(tmp_path):
    actions = [np.zeros((20, 7), np.float32), np.full((5, 7), 1.5, np.float32)]
    path = _write_demos(tmp_path / "d.hdf5", actions)
    with pytest.warns(UserWarning, match=r"d\.hdf5: 5 of 25 action rows have values outside \[-1, 1\]"):
        eps = load_hdf5_episodes(path)
    with pytest.warns(UserWarning, match=r"1 of 2 episodes of the train split are shorter than chunk_len=8 .*demo_1"):
        assert len(make_chunks(eps, chunk_len=8, split="train")) == 13
    with pytest.raises(ValueError, match=r"every episode of the validation split is shorter than one chunk \(1 episode\(s\): demo_1 \(5 steps\)\)"):
        make_chunks(eps[1:], chunk_len=8, split="validation")


# --- every bad file: one line naming it ---------------------------------------------------------------
def test_empty_or_non_hdf5_demo_files_are_named(tmp_path):
    (tmp_path / "empty.hdf5").write_bytes(b"")
    (tmp_path / "notes.hdf5").write_text("not demos")
    with pytest.raises(ValueError, match=r"empty\.hdf5: an empty file, expected a LIBERO-format HDF5 demo file"):
        load_policy_episodes([str(tmp_path / "empty.hdf5")])
    with pytest.raises(ValueError, match=r"notes\.hdf5: not an HDF5 file"):
        load_policy_episodes([str(tmp_path / "notes.hdf5")])
    from common.sim.demo_collection import collect_demos

    with pytest.raises(ValueError, match=r"--out .*notes\.hdf5: exists and is not an HDF5 file"):
        collect_demos("libero_object", [0], 1, tmp_path / "notes.hdf5", workers=1, progress=False)
    assert (tmp_path / "notes.hdf5").read_text() == "not demos"  # untouched


# --- the pipeline redoes a stage whose output changed ------------------------------------------------
def test_pipeline_redoes_a_stage_whose_output_was_corrupted(tmp_path):
    out, runs, log = tmp_path / "model.pt", [], []

    def stage():
        runs.append(1)
        out.write_bytes(b"weights")
        return "trained"

    stages = Stages(tmp_path, log.append)
    stages.run("train", {"lr": 1}, [out], stage)
    stages.run("train", {"lr": 1}, [out], stage)
    assert len(runs) == 1  # unchanged: skipped
    out.write_bytes(b"weights, half overwritten")
    stages.run("train", {"lr": 1}, [out], stage)
    assert len(runs) == 2 and out.read_bytes() == b"weights" and "outputs changed since written" in log[-2]


def test_stamp_says_when_a_stage_found_its_outputs_complete(tmp_path):
    """A demo stage that resumes a full file leaves it as it was: its stamp says so, and the report
    then keeps its (near-zero) time out of the from-scratch estimate."""
    out, log = tmp_path / "demos.hdf5", []
    stages = Stages(tmp_path, log.append)
    stages.run("demos", {"per_task": 2}, [out], lambda: out.write_bytes(b"two demos") and "collected")
    assert json.loads((tmp_path / "stamps" / "demos.json").read_text())["outputs_unchanged"] is False
    stages.run("demos", {"per_task": 2, "workers": 1}, [out], lambda: "nothing to add")  # settings changed, file complete
    assert json.loads((tmp_path / "stamps" / "demos.json").read_text())["outputs_unchanged"] is True


# --- --help says what every flag means ----------------------------------------------------------------
def test_help_of_every_entry_point_explains_every_flag():
    from common.eval.compare import ComparisonConfig
    from common.sim.demo_collection import CollectConfig
    from common.tokenizer.compare import TokenizerComparisonConfig

    for cls in (TokenizerTrainConfig, PolicyTrainConfig, EvalConfig, ComparisonConfig, TokenizerComparisonConfig, CollectConfig):
        docs = rsd_entry.field_help(cls)
        assert all(docs.get(name) for name in (f.lstrip("-").replace("-", "_") for f in rsd_entry.cli_flags(cls))), cls.__name__
    text = rsd_entry.build_parser(PolicyTrainConfig).format_help()
    assert "AdamW weight decay (default: 0.01)" in text
    assert "What the draft learns" in text  # a comment block above the field


def test_a_rerun_stage_starts_from_a_clean_folder_not_the_old_runs_partial_work(tmp_path):
    """A stage redone because its inputs changed (e.g. an evaluation of retrained models) must not
    resume the earlier run's episodes: its stale folders are removed first."""
    folder, out, log = tmp_path / "eval", tmp_path / "eval" / "summary.json", []

    def stage():
        assert not (folder / "old_episode.jsonl").exists()
        folder.mkdir(exist_ok=True)
        out.write_text("{}")
        return "evaluated"

    stages = Stages(tmp_path, log.append)
    folder.mkdir()
    (folder / "old_episode.jsonl").write_text('{"task": 0}\n')
    stages.run("eval", {"models": "a"}, [out], stage, stale=(folder,))
    (folder / "old_episode.jsonl").write_text('{"task": 0}\n')
    stages.run("eval", {"models": "a"}, [out], stage, stale=(folder,))  # up to date: nothing removed
    assert (folder / "old_episode.jsonl").exists()
    stages.run("eval", {"models": "b"}, [out], stage, stale=(folder,))
    assert not (folder / "old_episode.jsonl").exists() and out.exists()


# ================================================================================ issue 38
# --- the pipeline is one writer per root -------------------------------------------------------------
def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_second_pipeline_run_on_the_same_root_is_refused_mid_run_and_deletes_nothing(tmp_path):
    """The second run is refused by the root's lock before it reads a stamp or removes a stale folder
    (it used to skip the first's stamped stages and delete the folder the first was writing)."""
    root, report = tmp_path / "root", tmp_path / "report"
    episodes = root / "results" / "phase3" / "compare_libero_object" / "naive" / "episodes.jsonl"  # a stage's folder
    episodes.parent.mkdir(parents=True)
    episodes.write_text('{"task": 0, "trial": 0, "status": "success"}\n')
    (root / "stamps").mkdir()
    (root / "stamps" / "phase3_compare.json").write_text('{"fingerprint": "0"}')
    cmd = [sys.executable, "-m", "rsd_pipeline", "run", "--profile", "tiny", "--root", str(root), "--report-dir", str(report)]
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lock, deadline = root / ".pipeline.lock", time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            try:
                if json.loads(lock.read_text() or "{}").get("pid") == first.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        os.killpg(first.pid, signal.SIGSTOP)  # mid-run, frozen: whatever is on disk now must stay
        before = _tree(root)
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert second.returncode == 1, second.stderr
        assert second.stderr.count("\n") == 1 and second.stderr.startswith("error: ")
        assert f"the pipeline root {root.resolve()} is being written by another run (pid {first.pid}, started " in second.stderr
        assert _tree(root) == before and episodes.exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        os.killpg(first.pid, signal.SIGCONT)
        first.wait(timeout=30)
    assert _wait_gone(first.pid, 15) == []


def test_a_regular_file_as_pipeline_root_is_one_line_also_for_plan(tmp_path):
    import rsd_pipeline

    (tmp_path / "root").write_text("x")
    for extra in ([], ["--plan"]):
        with pytest.raises(NotADirectoryError, match=r"--root .*root: .*root is a regular file, not a folder; choose another --root"):
            rsd_pipeline.main(["run", "--profile", "tiny", "--root", str(tmp_path / "root"), "--report-dir", str(tmp_path / "r"), *extra])
    assert (tmp_path / "root").read_text() == "x" and not (tmp_path / "r").exists()


def test_a_damaged_stamp_reruns_its_stage_and_the_log_names_it(tmp_path):
    out, runs, log = tmp_path / "model.pt", [], []

    def stage():
        runs.append(1)
        out.write_bytes(b"weights")
        return "trained"

    Stages(tmp_path, log.append).run("train", {"lr": 1}, [out], stage)
    stamp = tmp_path / "stamps" / "train.json"
    stamp.write_text(stamp.read_text()[:20])  # cut short
    Stages(tmp_path, log.append, plan=True).run("train", {"lr": 1}, [out], stage)
    assert len(runs) == 1 and f"{stamp}: damaged stage stamp (" in log[-1]
    Stages(tmp_path, log.append).run("train", {"lr": 1}, [out], stage)
    assert len(runs) == 2 and f"rerun: {stamp}: damaged stage stamp" in log[-2]
    assert json.loads(stamp.read_text())["fingerprint"]  # rewritten


# --- Phase 3 checks the policy's tasks before the first episode -------------------------------------------
def test_a_task_the_policy_was_not_trained_on_is_refused_before_the_first_episode(tiny, tmp_path):
    out = tmp_path / "run"
    trained = get_suite("libero_object").get_task(0).language  # the fixture's demo file names no suite: matched by instruction
    with pytest.raises(ValueError, match=r"--tasks 0-1: libero_object task 1 is not among the tasks .*best_rfsq_head\.pt was trained on "
                                         rf"\('{trained}'\); choose --tasks among those"):
        evaluate(EvalConfig(tasks="0-1", num_trials=1, workers=1, max_steps=4, models_dir=str(tiny["models"]), out=str(out)), progress=False)
    assert not (out / "episodes.jsonl").exists() and not (out / "eval_config.json").exists()


# --- --help: --debug everywhere, the pipeline's --profile ------------------------------------------------
def test_every_entry_points_help_shows_debug_and_the_pipeline_explains_its_profiles():
    import rsd_pipeline
    from common.eval.compare import ComparisonConfig
    from common.sim.demo_collection import CollectConfig
    from common.tokenizer.compare import TokenizerComparisonConfig

    for cls in (TokenizerTrainConfig, PolicyTrainConfig, EvalConfig, ComparisonConfig, TokenizerComparisonConfig, CollectConfig):
        assert "--debug" in rsd_entry.build_parser(cls).format_help(), cls.__name__
    assert "env steps per episode" in rsd_entry.build_parser(EvalConfig).format_help()  # --max-steps' unit
    out = subprocess.run([sys.executable, "-m", "rsd_pipeline", "run", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    text = " ".join(out.stdout.split())  # (argparse wraps the lines)
    assert "--debug" in text and "tiny: libero_object tasks 0, per task 3 demos and 1 trial, 1 policy epoch" in text
    assert rsd_pipeline.profile_help().startswith("which settings to run (default: libero_object tasks 0-9")
