"""Measure the scripted expert's success rate per task (no cameras, standard step limits).

    .venv/bin/python -m benchmarks.evaluation.expert_success --suites libero_object libero_spatial \
        --trials 20 --workers 2

Writes results/expert_success.json and results/expert_success.md (suite, task, instruction,
success/n, mean episode length). Trial i uses init state i, the evaluation protocol's
`reset_to_trial`. An episode ends on success (LIBERO's done) or at the suite's max steps.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

from tqdm import tqdm

from common.sim.libero_env import get_suite, library_versions, parse_task_spec
from common.provenance import git_sha


def run_task(job: tuple[str, int, int, float]) -> dict:
    """Worker: one env for one task, `trials` episodes. Returns the task's row."""
    suite, task_id, trials, noise = job
    from common.sim.libero_env import LiberoTaskEnv
    from common.sim.scripted_expert import ExpertConfig, ScriptedExpert, UnsupportedGoalError

    with LiberoTaskEnv(suite=suite, task_id=task_id) as env:
        row = {"suite": suite, "task_id": task_id, "instruction": env.instruction, "n": trials}
        try:
            expert = ScriptedExpert(env, ExpertConfig(action_noise=noise))
        except UnsupportedGoalError as err:
            return {**row, "supported": False, "error": str(err), "successes": 0, "lengths": []}
        successes, lengths, fail_phases = 0, [], []
        for trial in range(trials):
            obs = env.reset_to_trial(trial)
            expert.reseed(trial)
            expert.reset()
            done = False
            for step in range(env.max_steps):
                obs, _, done, _ = env.step(expert.act(obs))
                if done:
                    break
            successes += int(done)
            lengths.append(step + 1)
            if not done:
                fail_phases.append((trial, expert.phase))
        return {**row, "supported": True, "successes": successes, "lengths": lengths, "failures": fail_phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suites", nargs="+", default=["libero_object", "libero_spatial"])
    parser.add_argument("--tasks", default="all", help="'all', '0-9' or '0,3,5' (applied to every suite)")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--action-noise", type=float, default=0.0)
    parser.add_argument("--out", default="results/expert_success")
    args = parser.parse_args()

    jobs = []
    for suite in args.suites:
        for task_id in parse_task_spec(args.tasks, get_suite(suite).get_num_tasks()):
            jobs.append((suite, task_id, args.trials, args.action_noise))

    start = time.time()
    rows = []
    # spawn: a forked MuJoCo/GL state is not safe to reuse in the children.
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for row in tqdm(pool.imap_unordered(run_task, jobs), total=len(jobs), desc="tasks"):
            rows.append(row)
    rows.sort(key=lambda r: (args.suites.index(r["suite"]), r["task_id"]))

    result = {
        "command": "python -m benchmarks.evaluation.expert_success " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()
        ),
        "versions": library_versions(),
        "git_sha": git_sha(),
        "wall_s": round(time.time() - start, 1),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))

    lines = [
        f"Command: `{result['command']}`  ",
        f"Versions: {result['versions']}, wall {result['wall_s']} s",
        "",
        "| suite | task | instruction | success/n | mean length |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["supported"]:
            lines.append(f"| {r['suite']} | {r['task_id']} | {r['instruction']} | unsupported | - |")
            continue
        mean_len = sum(r["lengths"]) / max(len(r["lengths"]), 1)
        lines.append(f"| {r['suite']} | {r['task_id']} | {r['instruction']} | {r['successes']}/{r['n']} | {mean_len:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
