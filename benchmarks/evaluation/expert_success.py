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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

import rsd_entry
from common.sim.libero_env import get_suite, library_versions, parse_task_spec
from common.provenance import git_sha

PROG = "python -m benchmarks.evaluation.expert_success"


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


@dataclass
class ExpertSuccessConfig:
    """Measure the scripted expert's success rate per task (no cameras, standard step limits)."""

    suites: list[str] = field(default_factory=lambda: ["libero_object", "libero_spatial"])  # LIBERO suites, several: --suites a b
    tasks: str = "all"  # 'all', '0-9' or '0,3,5' (applied to every suite)
    trials: int = 20  # episodes per task (trial i = init state i)
    workers: int = 2  # processes (one task per job)
    action_noise: float = 0.0  # std of Gaussian noise added to the expert's 6 arm dims (not the gripper)
    out: str = "results/expert_success"  # output path without suffix: <out>.json and <out>.md

    def __post_init__(self) -> None:
        if not self.suites:
            raise ValueError("--suites: expected at least one LIBERO suite")
        if self.trials < 1 or self.workers < 1:
            raise ValueError(f"--trials and --workers: expected >= 1, found {self.trials} and {self.workers}")


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``ExpertSuccessConfig``. Built here, not by ``rsd_entry.build_parser``: ``--suites`` takes
    several values (``--suites libero_object libero_spatial``), and that builder makes one-value flags only."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs, defaults = rsd_entry.field_help(ExpertSuccessConfig), ExpertSuccessConfig()
    parser.add_argument("--suites", nargs="+", default=defaults.suites, help=f"{docs['suites']} (default: {defaults.suites})")
    for name, tp in (("tasks", str), ("trials", int), ("workers", int), ("action_noise", float), ("out", str)):
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=tp, default=default, help=f"{docs[name]} (default: {default!r})")
    rsd_entry.add_debug_flag(parser)
    return parser


def main(argv: list[str]) -> None:
    parser = build_parser()
    try:
        cfg = ExpertSuccessConfig(**{k: v for k, v in vars(parser.parse_args(argv)).items() if k != "debug"})
    except ValueError as exc:
        parser.error(str(exc))

    jobs = []
    for suite in cfg.suites:
        for task_id in parse_task_spec(cfg.tasks, get_suite(suite).get_num_tasks()):
            jobs.append((suite, task_id, cfg.trials, cfg.action_noise))

    start = time.time()
    rows = []
    # spawn: a forked MuJoCo/GL state is not safe to reuse in the children.
    with mp.get_context("spawn").Pool(cfg.workers) as pool:
        for row in tqdm(pool.imap_unordered(run_task, jobs), total=len(jobs), desc="tasks"):
            rows.append(row)
    rows.sort(key=lambda r: (cfg.suites.index(r["suite"]), r["task_id"]))

    result = {
        "command": "python -m benchmarks.evaluation.expert_success " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in asdict(cfg).items()
        ),
        "versions": library_versions(),
        "git_sha": git_sha(),
        "wall_s": round(time.time() - start, 1),
        "rows": rows,
    }
    out = Path(cfg.out)
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
    rsd_entry.main(main, sys.argv[1:])
