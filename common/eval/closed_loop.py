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

Decoding: with ``compare_main_only`` (default), every chunk is decoded both speculatively and
main-only from the same features; the speculative tokens drive the robot, the fraction of chunks
with identical tokens is reported (``--assert-lossless`` stops at the first difference with
``LosslessViolation``), and both latencies are measured on the same inputs in the same run.
"""

from __future__ import annotations

import json
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import multiprocessing as mp
import numpy as np
import torch
from tqdm.auto import tqdm

from common.eval.config import EvalConfig, LosslessViolation
from common.eval.policy import TokenPolicy
from common.eval.summary import summarize, write_outputs
from common.checkpoints import checkpoint_content_hash
from common.jsonl import append_jsonl, read_jsonl
from common.provenance import write_json

# --- episode / task -------------------------------------------------------------------------------
def run_episode(env, policy: TokenPolicy, trial: int, *, task_index: int, max_steps: int, replan_steps: int, frames: list | None = None) -> dict[str, Any]:
    """One trial; returns a row (success, steps, per-chunk decode records)."""
    obs = env.reset_to_trial(trial)
    chunks, steps, success = [], 0, False
    while steps < max_steps and not success:
        actions, info = policy.plan(env.low_dim_obs(obs), task_index)
        chunks.append(info)
        for action in actions[:replan_steps]:
            obs, _, done, _ = env.step(action)
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
    key = (cfg.task_suite, task_id, cameras)
    if _WORKER.get("env_key") != key:
        if _WORKER.get("env") is not None:
            _WORKER["env"].close()
        _WORKER["env"] = LiberoTaskEnv(suite=cfg.task_suite, task_id=task_id, cameras=cameras, seed=cfg.seed, max_steps=cfg.max_steps or None)
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


def _init_worker(torch_threads: int) -> None:
    """Process-pool initializer: a spawned worker's own edge (its thread count)."""
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)


def planned_jobs(cfg: EvalConfig) -> list[tuple[int, int]]:
    """(task, trial) pairs in task-major order; trial i is init state i for every task."""
    from common.sim.libero_env import get_suite, parse_task_spec

    num_tasks = get_suite(cfg.task_suite).get_num_tasks()
    return [(task, trial) for task in parse_task_spec(cfg.tasks, num_tasks) for trial in range(cfg.num_trials)]


def checkpoint_hashes(cfg: EvalConfig) -> dict[str, str]:
    """Content hashes of the tokenizer/head/draft files this run loads (missing files are left out:
    the policy loader reports them with the full message)."""
    out = {}
    for name, path in cfg.checkpoint_paths().items():
        if path.exists():
            out[name] = checkpoint_content_hash(path)
    return out


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Run (or resume) the evaluation; returns the eval_info dict (also written to ``out``)."""
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "episodes.jsonl"
    key_path = out / "eval_config.json"
    checkpoints = checkpoint_hashes(cfg)
    if key_path.exists():
        saved = json.loads(key_path.read_text())
        if saved["resume_key"] != cfg.resume_key():
            raise ValueError(f"{out}: holds results of a different configuration ({key_path}); choose another --out")
        # finished episodes are only reusable when they were run with the very same models
        changed = sorted(k for k, h in saved.get("checkpoints", checkpoints).items() if checkpoints.get(k) != h)
        if changed:
            raise ValueError(
                f"{out}: finished episodes were run with other {', '.join(changed)} checkpoints than "
                f"{', '.join(str(cfg.checkpoint_paths()[k]) for k in changed)} now hold; choose another --out or delete {out}"
            )
    write_json(key_path, {"resume_key": cfg.resume_key(), "config": asdict(cfg), "checkpoints": checkpoints})

    jobs = planned_jobs(cfg)
    done = {(r["task"], r["trial"]) for r in read_rows(rows_path)}
    todo = [j for j in jobs if j not in done]
    started = time.perf_counter()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"eval {cfg.run_name}", disable=not progress)
    workers = min(cfg.resolved_workers(), max(1, len(todo)))

    def record(row: dict) -> None:
        append_jsonl(rows_path, row)
        bar.update(1)
        bar.set_postfix(success=row["status"])

    if workers == 1:
        for task, trial in todo:
            record(run_trial_job(cfg, task, trial))
    elif todo:
        # spawn: MuJoCo/EGL state must not be forked; each worker keeps one env and one policy
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                 initializer=_init_worker, initargs=(cfg.torch_threads,)) as pool:
            futures = [pool.submit(run_trial_job, cfg, task, trial) for task, trial in todo]
            for fut in as_completed(futures):
                record(fut.result())
    bar.close()
    wall = time.perf_counter() - started
    planned = set(jobs)
    rows = unique_rows(read_rows(rows_path), planned)
    info = summarize(cfg, rows, wall_seconds=wall, episodes_run=len(todo), workers=workers)
    write_outputs(info, out)
    return info
