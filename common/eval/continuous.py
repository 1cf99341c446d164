"""The continuous-action baseline in closed loop (``common/policy/continuous.py``'s ``ContinuousPolicy``):
the evaluation protocol of ``common/eval/closed_loop.py`` (trial i = init state i, the suite's step limit,
``run_episode``), one env per task, tasks in the evaluation's worker pool (``run_pool``: spawn, interrupt-safe
shutdown), and the per-task summary."""

from __future__ import annotations

import time
import traceback
from typing import Any

from tqdm.auto import tqdm

from common.eval.closed_loop import run_episode, run_pool
from common.policy.continuous import ContinuousPolicy


def run_task(policy: ContinuousPolicy, suite: str, task_id: int, trials: list[int], replan_steps: int, seed: int = 0) -> list[dict]:
    """All trials of one task with one env; an exception inside an episode becomes an error row."""
    from common.sim.libero_env import LiberoTaskEnv

    rows = []
    env = LiberoTaskEnv(suite=suite, task_id=task_id, seed=seed)
    try:
        task_index = policy.task_index(suite, task_id, env.instruction)
        for trial in trials:
            started = time.perf_counter()
            row = {"task": task_id, "trial": trial, "instruction": env.instruction}
            try:
                out = run_episode(env, policy, trial, task_index=task_index, max_steps=env.max_steps, replan_steps=replan_steps)
                row.update(status="success" if out["success"] else "failure", steps=out["steps"], chunks=len(out["chunks"]))
            except Exception as exc:  # recorded as an error row (counted apart from failures), never hidden
                row.update(status="error", steps=0, error=f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3).splitlines()[-3:]}")
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
    finally:
        env.close()
    return rows


def run_closed_loop(policy: ContinuousPolicy, suite: str, tasks: list[int], trials: list[int], *, replan_steps: int, workers: int,
                    progress: bool = True) -> list[dict]:
    """Every (task, trial): sequentially, or one task per job in the evaluation's spawn pool (MuJoCo must not
    be forked; one torch thread per worker). Rows sorted by (task, trial)."""
    rows: list[dict] = []
    bar = tqdm(total=len(tasks) * len(trials), desc="closed loop", disable=not progress)

    def record(task_rows: list[dict]) -> None:
        rows.extend(task_rows)
        bar.update(len(task_rows))
        bar.set_postfix(success=sum(r["status"] == "success" for r in rows))

    try:
        if workers <= 1:
            for task in tasks:
                record(run_task(policy, suite, task, trials, replan_steps))
        else:
            run_pool(run_task, [(policy, suite, t, trials, replan_steps) for t in tasks], workers, record, torch_threads=1)
    finally:
        bar.close()
    return sorted(rows, key=lambda r: (r["task"], r["trial"]))


def check_trials(suite: str, tasks: list[int], first_trial: int, trials: int) -> list[int]:
    """Init states ``first_trial .. first_trial + trials - 1`` must exist for every task (checked before training)."""
    from common.sim.libero_env import get_suite

    bench = get_suite(suite)
    for task in tasks:
        available = len(bench.get_task_init_states(task))
        if first_trial + trials > available:
            raise ValueError(f"--first-trial {first_trial} --trials {trials}: {suite} task {task} has {available} init states (0..{available - 1})")
    return list(range(first_trial, first_trial + trials))


def select_tasks(task_table: list[dict], suite: str, spec: str) -> list[int]:
    """The task ids of ``spec`` ("0-9", "0,3"; "" = every task of ``suite`` in the head's table), each one the head was trained on."""
    from common.sim.libero_env import get_suite, parse_task_spec

    trained = sorted(int(r["task_id"]) for r in task_table if r["suite"] == suite)
    if not trained:
        raise ValueError(f"--suite {suite}: expected tasks of it in the head's task table, found suites {sorted({r['suite'] for r in task_table})}")
    tasks = trained if not spec else parse_task_spec(spec, get_suite(suite).get_num_tasks())
    missing = sorted(set(tasks) - set(trained))
    if missing:
        raise ValueError(f"--tasks {spec}: tasks {missing} of {suite} are not in the head's task table (trained: {trained})")
    return tasks


def summarize(rows: list[dict], task_table: list[dict], suite: str) -> dict[str, Any]:
    """Per task and overall: trials, successes, errors (counted apart from failures), success rate."""
    instruction = {int(r["task_id"]): r["instruction"] for r in task_table if r["suite"] == suite}
    per_task = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        ok = sum(r["status"] == "success" for r in mine)
        per_task.append({"task": task, "instruction": instruction.get(task, ""), "trials": len(mine), "successes": ok,
                         "errors": sum(r["status"] == "error" for r in mine), "success_rate": ok / len(mine)})
    ok = sum(r["status"] == "success" for r in rows)
    return {"per_task": per_task, "overall": {"trials": len(rows), "successes": ok, "errors": sum(r["status"] == "error" for r in rows),
                                              "success_rate": ok / len(rows) if rows else 0.0}}
