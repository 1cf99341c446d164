"""Phase 3: closed-loop LIBERO evaluation of a token policy, with and without speculative decoding.

Structure (lerobot / openvla-oft style): ``TokenPolicy.plan`` (one chunk, ``common/eval/policy.py``) → ``run_episode`` (one
trial) → ``run_trial_job`` (one trial in a worker that keeps its policy and env) → ``evaluate``
(process pool over tasks and trials, JSONL rows as episodes finish, ``eval_info.json`` + table +
plots at the end, ``common/eval/summary.py``). ``run_trials`` runs a shard of one task's trials in
one process (the Modal function body). Settings: ``common/eval/config.py``.

Protocol (``common.sim.libero_env``): trial ``i`` uses init state ``i``; seed → reset →
set_init_state → 10 wait steps; per-suite max steps; success from ``check_success()``. An
exception inside an episode is recorded as an *error* with its message, counted apart from
failures. ``--num-trials`` is honoured exactly.

Replanning: the policy decodes an 8-step chunk and executes the first ``replan_steps`` (default 4)
open-loop, then replans from the new observation — half a chunk halves the open-loop drift of a
state-based policy at twice the decode calls (openvla-oft executes all 8; ``--replan-steps 8``).

Faults (``tests/test_fault_handling.py``): everything the run needs is checked before the first
episode (``check_setup``: tasks, ``--num-trials`` against each task's init states, ``--replan-steps``
against the tokenizer's chunk, checkpoints readable); ``eval_config.json`` is written only then.
One run at a time writes an ``--out`` (``<out>/.lock``). Ctrl-C / SIGTERM: finished rows stay in
``episodes.jsonl``, the pool is cancelled and its workers stopped at once (workers ignore SIGINT and
exit if the parent dies), the interrupt propagates (exit 130 / 143 at the CLI).

Decoding: with ``compare_main_only`` (default), every chunk is decoded both speculatively and
main-only from the same features; the speculative tokens drive the robot, the fraction of chunks
with identical tokens is reported (``--assert-lossless`` stops at the first difference with
``LosslessViolation``), and both latencies are measured on the same inputs in the same run.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import multiprocessing as mp
import numpy as np
import torch
from tqdm.auto import tqdm

from common.eval.config import EvalConfig, LosslessViolation
from common.eval.policy import TokenPolicy
from common.eval.summary import summarize, write_outputs
from common.checkpoints import checkpoint_content_hash, read_checkpoint
from common.jsonl import append_jsonl, read_jsonl
from common.locks import exit_with_parent, output_lock
from common.provenance import json_safe, write_json

# --- episode / task -------------------------------------------------------------------------------
def run_episode(env, policy: TokenPolicy, trial: int, *, task_index: int, max_steps: int, replan_steps: int, frames: list | None = None,
                observe: Callable[[int, dict, np.ndarray], None] | None = None) -> dict[str, Any]:
    """One trial; returns a row (success, steps, per-chunk decode records). ``observe(step, obs, actions)``,
    if given, sees the observation and the planned chunk at every replanning (diagnostics)."""
    obs = env.reset_to_trial(trial)
    chunks, steps, success = [], 0, False
    while steps < max_steps and not success:
        actions, info = policy.plan(policy.policy_input(env, obs), task_index)
        if observe is not None:
            observe(steps, obs, actions)
        chunks.append(info)
        info["env_step_s"] = 0.0  # physics + camera rendering of the executed steps
        for action in actions[:replan_steps]:
            t0 = time.perf_counter()
            obs, _, done, _ = env.step(action)
            info["env_step_s"] += time.perf_counter() - t0
            steps += 1
            if frames is not None:
                frames.append(obs["agentview_rgb"])
            if done or env.check_success():
                success = True
                break
            if steps >= max_steps:
                break
    return {"success": success, "steps": steps, "chunks": chunks}


def _episode_row(cfg: EvalConfig, task_id: int, trial: int, instruction: str, outcome: dict | None, error: str | None, seconds: float) -> dict:
    row = {"suite": cfg.task_suite, "task": task_id, "trial": trial, "instruction": instruction, "seconds": seconds}
    if error is not None:
        row.update(status="error", success=False, error=error, steps=0, chunks=[])
    else:
        row.update(status="success" if outcome["success"] else "failure", **outcome)
    return row


_WORKER: dict[str, Any] = {}


def _worker_state(cfg: EvalConfig, task_id: int, *, cameras: tuple[str, ...]) -> tuple[TokenPolicy, Any]:
    """Per-process policy (loaded once) and env (kept while the task stays the same)."""
    from common.sim.libero_env import LiberoTaskEnv

    if _WORKER.get("cfg") != cfg:
        _WORKER.clear()
        _WORKER.update(cfg=cfg, policy=TokenPolicy(cfg))
    policy = _WORKER["policy"]
    cameras = tuple(dict.fromkeys((*policy.cameras, *cameras)))  # the backbone's cameras (VLA) + video
    key = (cfg.task_suite, task_id, cameras)
    if _WORKER.get("env_key") != key:
        if _WORKER.get("env") is not None:
            _WORKER["env"].close()
        _WORKER["env"] = LiberoTaskEnv(suite=cfg.task_suite, task_id=task_id, cameras=cameras, camera_size=policy.camera_size,
                                       seed=cfg.seed, max_steps=cfg.max_steps or None)
        _WORKER["env_key"] = key
    return _WORKER["policy"], _WORKER["env"]


def run_trial_job(cfg: EvalConfig, task_id: int, trial: int) -> dict:
    """One episode in a worker process. Setup errors propagate; episode errors become rows."""
    video = trial < cfg.save_videos
    policy, env = _worker_state(cfg, task_id, cameras=("agentview",) if video else ())
    task_index = policy.task_index(cfg.task_suite, task_id, env.instruction)
    frames: list | None = [] if video else None
    started = time.perf_counter()
    try:
        outcome = run_episode(env, policy, trial, task_index=task_index, max_steps=env.max_steps, replan_steps=cfg.replan_steps, frames=frames)
        error = None
    except LosslessViolation:
        raise
    except Exception as exc:  # recorded as an error row (counted apart from failures), never hidden
        outcome, error = None, f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3).splitlines()[-3:]}"
    row = _episode_row(cfg, task_id, trial, env.instruction, outcome, error, time.perf_counter() - started)
    if video and frames:
        row["video"] = str(save_gif(frames, cfg.out_dir() / "videos" / f"task{task_id}_trial{trial}_{row['status']}.gif"))
    return row


def run_trials(cfg: EvalConfig, task_id: int, trials: list[int]) -> list[dict]:
    """All given trials of one task in this process (the Modal shard body)."""
    check_setup(cfg)
    return [run_trial_job(cfg, task_id, t) for t in trials]


def save_gif(frames: list[np.ndarray], path: Path, *, every: int = 2) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames[::every]]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


# --- the whole evaluation --------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """Episode rows; a torn last line (a kill mid-write) is dropped, so the episode simply reruns."""
    return read_jsonl(path)


def unique_rows(rows: list[dict], planned: set[tuple[int, int]]) -> list[dict]:
    """The first row of every planned (task, trial): each episode counts once, whoever wrote it."""
    seen: dict[tuple[int, int], dict] = {}
    for r in rows:
        key = (r["task"], r["trial"])
        if key in planned and key not in seen:
            seen[key] = r
    return list(seen.values())


def _init_worker(torch_threads: int, parent_pid: int) -> None:
    """Process-pool initializer: a spawned worker's own edge (its thread count; it exits with the
    run that started it and leaves Ctrl-C to it)."""
    exit_with_parent(parent_pid)
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)


def planned_jobs(cfg: EvalConfig) -> list[tuple[int, int]]:
    """(task, trial) pairs in task-major order; trial i is init state i for every task.

    ``--num-trials`` above a task's number of init states is an error (there is no trial 50 of a
    task with 50 init states), raised before anything runs."""
    from common.sim.libero_env import get_suite, parse_task_spec

    suite = get_suite(cfg.task_suite)
    tasks = parse_task_spec(cfg.tasks, suite.get_num_tasks())
    for task in tasks:
        available = len(suite.get_task_init_states(task))
        if cfg.first_trial + cfg.num_trials > available:
            raise ValueError(
                f"--num-trials {cfg.num_trials}" + (f" from --first-trial {cfg.first_trial}" if cfg.first_trial else "")
                + f": {cfg.task_suite} task {task} has {available} init states "
                f"(trial i runs init state i); use --first-trial + --num-trials <= {available}"
            )
    return [(task, trial) for task in tasks for trial in range(cfg.first_trial, cfg.first_trial + cfg.num_trials)]


def check_setup(cfg: EvalConfig) -> tuple[list[tuple[int, int]], dict[str, str]]:
    """Everything an evaluation needs, checked before the first episode: the planned (task, trial)
    pairs, every checkpoint present and readable (their content hashes), ``--replan-steps`` within
    the tokenizer's chunk, every task one the policy was trained on. Returns (jobs, checkpoint hashes)."""
    jobs = planned_jobs(cfg)
    paths = cfg.checkpoint_paths()
    missing = {name: path for name, path in paths.items() if not path.exists()}
    if missing:
        raise FileNotFoundError(
            "; ".join(f"{p}: checkpoint not found (the {name} of --tokenizer {cfg.tokenizer} --strategy {cfg.strategy})" for name, p in missing.items())
            + "; train Phase 1 and Phase 2 first, or pass --models-dir"
        )
    hashes = checkpoint_hashes(cfg)
    chunk_len = int(read_checkpoint(paths["tokenizer"], kind="rfsq_tokenizer")["config"].get("chunk_len", 0))
    if chunk_len and cfg.replan_steps > chunk_len:
        raise ValueError(
            f"--replan-steps {cfg.replan_steps} is longer than the tokenizer's chunk ({chunk_len} steps, {paths['tokenizer']}); "
            f"use 1..{chunk_len}"
        )
    check_trained_tasks(cfg, sorted({task for task, _ in jobs}), paths["head"])
    return jobs, hashes


def check_trained_tasks(cfg: EvalConfig, tasks: list[int], head_path: Path) -> None:
    """Every requested task is one the head was trained on (its ``task_table``, matched as the workers
    match it: by the suite's instruction), checked before the first episode rather than when a worker
    reaches that task, after the earlier tasks' episodes."""
    from common.policy.model import HEAD_KIND, task_index_in
    from common.sim.libero_env import get_suite

    table = read_checkpoint(head_path, kind=HEAD_KIND)["config"]["task_table"]
    suite = get_suite(cfg.task_suite)
    untrained = []
    for task in tasks:
        try:
            task_index_in(table, suite=cfg.task_suite, task_id=task, instruction=suite.get_task(task).language)
        except KeyError:
            untrained.append(task)
    if untrained:
        # (a row without a suite, from a demo file that names none, is matched by its instruction)
        trained = ", ".join(f"{r['suite']} {r['task_id']}" if r["suite"] else repr(r["instruction"]) for r in table)
        raise ValueError(
            f"--tasks {cfg.tasks}: {cfg.task_suite} task{'s' if len(untrained) > 1 else ''} {', '.join(map(str, untrained))} "
            f"{'are' if len(untrained) > 1 else 'is'} not among the tasks {head_path} was trained on ({trained}); "
            "choose --tasks among those, or train Phase 2 on demos of these tasks"
        )


def checkpoint_hashes(cfg: EvalConfig) -> dict[str, str]:
    """Content hashes of the tokenizer/head/draft files this run loads (missing files are left out:
    the policy loader reports them with the full message)."""
    out = {}
    for name, path in cfg.checkpoint_paths().items():
        if path.exists():
            out[name] = checkpoint_content_hash(path)
    return out


def _check_resume(cfg: EvalConfig, out: Path, key_path: Path, checkpoints: dict[str, str], has_rows: bool) -> None:
    """Finished rows are reusable only by the same configuration and the very same models. A saved
    key without finished rows (a setup that failed before any episode) constrains nothing."""
    if not (key_path.exists() and has_rows):
        return
    saved = json.loads(key_path.read_text())
    # the key on disk went through write_json (its models_dir repo-relative, common.provenance.portable_path;
    # older keys hold it absolute): both sides in that one form
    if json_safe(saved["resume_key"]) != json_safe(cfg.resume_key()):
        raise ValueError(f"{out}: holds results of a different configuration ({key_path}); choose another --out")
    saved_hashes = saved.get("checkpoints", checkpoints)
    changed = sorted(k for k, h in checkpoints.items() if saved_hashes.get(k, h) != h)
    if changed:
        raise ValueError(
            f"{out}: finished episodes were run with other {', '.join(changed)} checkpoints than "
            f"{', '.join(str(cfg.checkpoint_paths()[k]) for k in changed)} now hold; choose another --out or delete {out}"
        )


def run_pool(job: Callable[..., Any], jobs: list[tuple], workers: int, record: Callable[[Any], None], *, torch_threads: int = 0) -> None:
    """``job(*args)`` for every ``args`` in ``jobs`` in a spawn process pool, each result handed to ``record``
    as it finishes (the token policy's episodes here, the continuous baseline's tasks in
    ``common/eval/continuous.py``). On any exception or interrupt the pending jobs are cancelled and the
    workers stopped at once (a running job is lost and reruns on resume; a finished one is already recorded)."""
    # spawn: MuJoCo/EGL state must not be forked; each worker keeps one env and one policy
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_init_worker, initargs=(torch_threads, os.getpid()))
    try:
        futures = [pool.submit(job, *args) for args in jobs]
        for fut in as_completed(futures):
            record(fut.result())
    except BaseException:
        processes = list((pool._processes or {}).values())  # the executor has no public way to stop running calls
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in processes:
            proc.terminate()
        for proc in processes:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        raise
    pool.shutdown(wait=True)


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Run (or resume) the evaluation; returns the eval_info dict (also written to ``out``)."""
    out = cfg.out_dir()
    with output_lock(out / ".lock", f"evaluation results in {out}"):
        return _evaluate_locked(cfg, out, progress=progress)


def _evaluate_locked(cfg: EvalConfig, out: Path, *, progress: bool) -> dict:
    rows_path = out / "episodes.jsonl"
    key_path = out / "eval_config.json"
    jobs, checkpoints = check_setup(cfg)
    finished = read_rows(rows_path)
    _check_resume(cfg, out, key_path, checkpoints, has_rows=bool(finished))
    write_json(key_path, {"resume_key": cfg.resume_key(), "config": asdict(cfg), "checkpoints": checkpoints})

    done = {(r["task"], r["trial"]) for r in finished}
    todo = [j for j in jobs if j not in done]
    started = time.perf_counter()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"eval {cfg.run_name}", disable=not progress)
    workers = min(cfg.resolved_workers(), max(1, len(todo)))

    def record(row: dict) -> None:
        append_jsonl(rows_path, row)
        bar.update(1)
        bar.set_postfix(success=row["status"])

    try:
        if workers == 1:
            for task, trial in todo:
                record(run_trial_job(cfg, task, trial))
        elif todo:
            run_pool(run_trial_job, [(cfg, task, trial) for task, trial in todo], workers, record, torch_threads=cfg.torch_threads)
    finally:
        bar.close()
    wall = time.perf_counter() - started
    planned = set(jobs)
    rows = unique_rows(read_rows(rows_path), planned)
    info = summarize(cfg, rows, wall_seconds=wall, episodes_run=len(todo), workers=workers)
    write_outputs(info, out)
    return info
