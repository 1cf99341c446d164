"""What a closed-loop failure looks like: one Phase 3 episode traced step by step, in the frame that
matters for a pick-and-place goal.

    MUJOCO_GL=egl python -m benchmarks.diagnostics.trace_episode --models-dir MODELS --suite libero_spatial --task 5 --trials 21,22 \
        [--tokenizer robust] [--every 8] [--out DIR]

Runs one episode of the token policy in ``--models-dir`` main-only (speculation never changes the
tokens), decoding as Phase 2 chose, replanning every 4 steps, with the suite's step limit. Every
``--every`` steps it records the end effector, the goal's object relative to the end effector and
relative to its target (the first two object slots of the observation: ``common.sim.libero_env``),
the gripper opening and the first action of the chunk. ``summarize_trace`` then names how the
episode ended: success; the object left off its target with the gripper open (``released off
target``); the fingers closed on nothing, the object away from them (``missed grasp``); the arm not
moving over the last steps (``stuck``); or still moving at the step limit.
Writes, per trial, ``trial<N>/trace.json`` and ``trial<N>/trace.md`` (the summary and the table) and,
for all of them, ``endings.md`` to ``--out`` (default ``results/phase3_diagnostics/traces/<suite>_task<task>``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

import rsd_entry
from common.provenance import REPO_ROOT, provenance, write_json
from common.sim.libero_env import OBJECT_SLOT_DIM, ROBOT_OBS_DIM

PROG = "python -m benchmarks.diagnostics.trace_episode"

STUCK_WINDOW = 40  # steps: the arm counts as stuck when its end effector moved less than STUCK_MOVE over them
STUCK_MOVE = 0.01  # m
OPEN_GRIPPER = 0.03  # m: finger joint opening above which the gripper holds nothing
CLOSED_EMPTY = 0.003  # m: an opening below this is fingers closed on nothing (a bowl's rim keeps them ~7 mm apart)


def trace_row(step: int, low_dim: np.ndarray, action: np.ndarray) -> dict[str, Any]:
    """One record from the low-dim observation (``common.sim.libero_env`` layout) and the chunk's first action."""
    eef = low_dim[:3]
    obj = low_dim[ROBOT_OBS_DIM : ROBOT_OBS_DIM + 3]
    target = low_dim[ROBOT_OBS_DIM + OBJECT_SLOT_DIM : ROBOT_OBS_DIM + OBJECT_SLOT_DIM + 3]
    return {"step": int(step), "eef": eef.tolist(), "object_minus_eef": (obj - eef).tolist(), "object_minus_target": (obj - target).tolist(),
            "gripper_opening": float(low_dim[7] - low_dim[8]), "action": np.asarray(action, dtype=float).tolist()}


def summarize_trace(rows: list[dict], *, success: bool, steps: int) -> dict[str, Any]:
    """How the episode ended (see the module docstring) and the last record's offsets."""
    if not rows:
        raise ValueError("summarize_trace: expected at least one record, found none")
    last = rows[-1]
    recent = [r for r in rows if r["step"] >= last["step"] - STUCK_WINDOW]
    moved = float(np.linalg.norm(np.subtract(recent[-1]["eef"], recent[0]["eef"])))
    held = any(r["gripper_opening"] <= OPEN_GRIPPER for r in rows)
    if success:
        ending = "success"
    elif held and last["gripper_opening"] > OPEN_GRIPPER and np.linalg.norm(last["object_minus_target"][:2]) < 0.1:
        ending = "released off target"  # grasped, brought within 10 cm of the target and let go: not "on" it
    elif last["gripper_opening"] < CLOSED_EMPTY and np.linalg.norm(last["object_minus_eef"]) > 0.05:
        ending = "missed grasp"  # the fingers closed on nothing: the object is not between them
    elif last["step"] - recent[0]["step"] >= STUCK_WINDOW - 8 and moved < STUCK_MOVE:
        ending = "stuck"
    else:
        ending = "still moving"
    return {"success": bool(success), "steps": int(steps), "ending": ending, "eef_moved_last_steps": moved, "window_steps": STUCK_WINDOW,
            "final_object_minus_target": last["object_minus_target"], "final_object_minus_eef": last["object_minus_eef"],
            "final_gripper_opening": last["gripper_opening"]}


def run_trace(models_dir: str, suite: str, task: int, trial: int, *, tokenizer: str, every: int, progress: bool = True) -> dict[str, Any]:
    from common.eval.closed_loop import run_episode
    from common.eval.config import EvalConfig
    from common.eval.policy import TokenPolicy
    from common.sim.libero_env import LiberoTaskEnv

    cfg = EvalConfig(task_suite=suite, tasks=str(task), num_trials=1, first_trial=trial, use_speculative_decoding=False,
                     compare_main_only=False, auto_decode=True, tokenizer=tokenizer, strategy="A", models_dir=models_dir, workers=1)
    policy = TokenPolicy(cfg)
    env = LiberoTaskEnv(suite=suite, task_id=task)
    task_index = policy.task_index(suite, task, env.instruction)
    rows: list[dict] = []
    bar = tqdm(total=env.max_steps, desc=f"{suite} task {task} trial {trial}", unit="step", disable=not progress)

    def observe(step: int, obs: dict, actions: np.ndarray) -> None:
        bar.update(step - bar.n)
        if step % every == 0:
            rows.append(trace_row(step, env.low_dim_obs(obs), actions[0]))

    # the evaluation's own episode loop (common.eval.closed_loop), observed at every replanning
    outcome = run_episode(env, policy, trial, task_index=task_index, max_steps=env.max_steps, replan_steps=cfg.replan_steps, observe=observe)
    bar.close()
    success, steps = outcome["success"], outcome["steps"]
    final = env.set_state(env.get_state())  # the observation after the last step (the episode is over)
    rows.append(trace_row(steps, env.low_dim_obs(final), np.zeros(7)))
    env.close()
    return {"models_dir": models_dir, "suite": suite, "task": task, "trial": trial, "instruction": env.instruction, "tokenizer": tokenizer,
            "every": every, "summary": summarize_trace(rows, success=success, steps=steps), "rows": rows}


def markdown(r: dict) -> str:
    s = r["summary"]
    fmt = lambda v: "(" + ", ".join(f"{x:+.3f}" for x in v) + ")"
    lines = [
        f"`{r['suite']}` task {r['task']} ({r['instruction']}), trial {r['trial']}, {r['tokenizer']} tokens, main-only, "
        f"models `{r['models_dir']}`: **{s['ending']}** after {s['steps']} steps. Final object - target {fmt(s['final_object_minus_target'])} m, "
        f"object - end effector {fmt(s['final_object_minus_eef'])} m, gripper opening {s['final_gripper_opening']:.3f} m; "
        f"the end effector moved {s['eef_moved_last_steps']:.3f} m over the last {s['window_steps']} steps.",
        "",
        "| step | end effector (m) | object - end effector (m) | object - target (m) | gripper opening (m) | first action of the chunk |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(f"| {row['step']} | {fmt(row['eef'])} | {fmt(row['object_minus_eef'])} | {fmt(row['object_minus_target'])} | "
                     f"{row['gripper_opening']:.3f} | {fmt(row['action'])} |")
    return "\n".join(lines) + "\n"


def parse_trials(text: str) -> list[int]:
    """'21,22' or '20-23' -> trial indices (each >= 0, no repeats)."""
    trials: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"--trials: expected a list '21,22' or a range '20-23' of init state indices, found {text!r}")
        trials += range(int(lo), int(hi or lo) + 1)
    if len(set(trials)) != len(trials):
        raise ValueError(f"--trials: a trial is listed twice in {text!r}")
    return trials


def endings_table(results: list[dict]) -> str:
    """One line per traced trial: how it ended, the final offsets (the per-trial tables are beside it)."""
    fmt = lambda v: "(" + ", ".join(f"{x:+.3f}" for x in v) + ")"
    lines = ["| trial | ending | steps | final object - target (m) | final object - end effector (m) | gripper opening (m) |",
             "|---|---|---|---|---|---|"]
    for r in results:
        s = r["summary"]
        lines.append(f"| {r['trial']} | {s['ending']} | {s['steps']} | {fmt(s['final_object_minus_target'])} | "
                     f"{fmt(s['final_object_minus_eef'])} | {s['final_gripper_opening']:.3f} |")
    return "\n".join(lines) + "\n"


@dataclass
class TraceEpisodeConfig:
    """What a closed-loop failure looks like: Phase 3 episodes traced step by step, in the frame of a pick-and-place goal."""

    models_dir: str = ""  # Phase 2 models folder of the policy (required)
    suite: str = "libero_spatial"  # LIBERO suite
    task: int = -1  # task id in the suite (required)
    trials: str = ""  # trials (= init state indices): a list '21,22' or a range '20-23' (required)
    tokenizer: str = "robust"  # which of the folder's policies: robust or naive
    every: int = 8  # record every N env steps (a multiple of the replanning interval, 4)
    out: str = ""  # output folder (default results/phase3_diagnostics/traces/<suite>_task<T>)
    progress: bool = True  # progress bar

    def __post_init__(self) -> None:
        if not self.models_dir:
            raise ValueError("--models-dir: expected the Phase 2 models folder, found none")
        if self.task < 0:
            raise ValueError(f"--task: expected a task id >= 0, found {self.task}")
        if self.tokenizer not in ("robust", "naive"):
            raise ValueError(f"--tokenizer: expected robust or naive, found {self.tokenizer!r}")
        if self.every < 4 or self.every % 4:
            raise ValueError(f"--every: expected a multiple of 4 (the policy replans every 4 steps), found {self.every}")
        parse_trials(self.trials)


def main(argv: list[str]) -> list[dict]:
    cfg = rsd_entry.parse_config(TraceEpisodeConfig, argv, prog=PROG)
    trials = parse_trials(cfg.trials)
    rsd_entry.setup_process(torch_threads=1)
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "phase3_diagnostics" / "traces" / f"{cfg.suite}_task{cfg.task}"
    results = []
    for trial in trials:
        result = run_trace(cfg.models_dir, cfg.suite, cfg.task, trial, tokenizer=cfg.tokenizer, every=cfg.every, progress=cfg.progress)
        result["provenance"] = provenance(seed=0)
        write_json(out / f"trial{trial}" / "trace.json", result)
        (out / f"trial{trial}" / "trace.md").write_text(markdown(result))
        results.append(result)
    head = results[0]
    (out / "endings.md").write_text(f"`{cfg.suite}` task {cfg.task} ({head['instruction']}), {cfg.tokenizer} tokens, main-only, "
                                    f"models `{cfg.models_dir}`; `python -m benchmarks.diagnostics.trace_episode`:\n\n" + endings_table(results))
    print((out / "endings.md").read_text())
    return results


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
