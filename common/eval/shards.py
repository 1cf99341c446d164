"""Phase 3 sharded over containers (the pure logic behind ``phase3/modal_phase3_libero_eval.py``):
(task, trial range) shards, each appending finished episodes to its own JSONL so a preempted shard
resumes and a finished one is never rerun; the guard that an output folder holds one configuration;
merging; and the plan a ``--plan`` run prints. Modal itself stays in the entry file: the functions
that run shards are passed in."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from common.eval.closed_loop import checkpoint_hashes, planned_jobs, run_trial_job, unique_rows
from common.eval.config import EvalConfig
from common.eval.summary import summarize, write_outputs
from common.jsonl import append_jsonl, dumps_row, read_jsonl
from common.provenance import json_safe

TRIALS_PER_SHARD = 10  # state backbone: CPU containers start in seconds
VLA_TRIALS_PER_SHARD = 25  # openvla-oft: a GPU container loads the 7B model once (minutes), so longer shards


def shard_jobs(cfg: EvalConfig, backbone: str = "state") -> list[tuple[int, list[int]]]:
    """(task, trials) shards covering exactly the planned (task, trial) pairs."""
    size = VLA_TRIALS_PER_SHARD if backbone == "openvla-oft" else TRIALS_PER_SHARD
    by_task: dict[int, list[int]] = {}
    for task, trial in planned_jobs(cfg):
        by_task.setdefault(task, []).append(trial)
    return [(task, trials[i : i + size]) for task, trials in by_task.items() for i in range(0, len(trials), size)]


def shard_path(cfg: EvalConfig, task_id: int, trials: list[int]) -> Path:
    return cfg.out_dir() / "shards" / f"task{task_id}_trials{trials[0]}-{trials[-1]}.jsonl"


def run_shard_trials(cfg: EvalConfig, task_id: int, trials: list[int], *, commit: Callable[[], None] | None) -> list[dict]:
    """Run the trials of one shard not yet in its JSONL, appending (and committing) each episode as it
    finishes; returns the shard's rows (one per trial, the first recorded)."""
    path = shard_path(cfg, task_id, trials)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["trial"] for r in read_jsonl(path)}
    for trial in trials:
        if trial in done:
            continue
        append_jsonl(path, run_trial_job(cfg, task_id, trial))
        if commit is not None:
            commit()
    return unique_rows(read_jsonl(path), {(task_id, t) for t in trials})


def head_backbone(cfg: EvalConfig) -> str:
    """The backbone kind recorded in the head checkpoint this configuration evaluates."""
    from common.checkpoints import read_checkpoint
    from common.policy.model import HEAD_KIND

    head = cfg.checkpoint_paths()["head"]
    if not head.exists():
        raise FileNotFoundError(f"{head}: head checkpoint not found; train Phase 2 first (or pass --backbone with --plan)")
    kind = read_checkpoint(head, kind=HEAD_KIND)["config"]["backbone_kind"]
    if cfg.backbone and cfg.backbone != kind:
        raise ValueError(f"--backbone {cfg.backbone}: but {head} was trained with the {kind!r} backbone")
    return kind


def finished_rows(cfg: EvalConfig) -> list[dict]:
    """Episodes already in ``<out>/shards`` (after checking they belong to this configuration and these
    checkpoints; the key is written on first use)."""
    shards = cfg.out_dir() / "shards"
    key_path = shards / "run_config.json"
    # as the file holds it (strict JSON: a NaN setting reads back as null), so a rerun compares like with like
    key = json_safe({"run_key": cfg.resume_key(), "checkpoints": checkpoint_hashes(cfg)})
    if key_path.exists():
        saved = json_safe(json.loads(key_path.read_text()))  # (an older file may hold a bare NaN)
        if saved != key:
            diff = sorted(k for k in key["run_key"] if saved["run_key"].get(k) != key["run_key"][k])
            diff += [f"{k} checkpoint" for k in key["checkpoints"] if saved["checkpoints"].get(k) != key["checkpoints"][k]]
            raise ValueError(f"{cfg.out_dir()}: holds episodes of another configuration ({', '.join(diff)} differ); choose another --out")
    else:
        shards.mkdir(parents=True, exist_ok=True)
        key_path.write_text(json.dumps(key, indent=2, allow_nan=False))
    return [r for p in sorted(shards.glob("task*_trials*.jsonl")) for r in read_jsonl(p)]


def drive(cfg: EvalConfig, prepare: Callable[[dict], dict], shard_function: Callable[[EvalConfig, str], Any]) -> tuple[dict, list[dict]]:
    """Launch the unfinished shards, merge every finished episode; returns (eval info, rows)."""
    started = time.perf_counter()
    prep = prepare(asdict(cfg))
    backbone, rows = prep["backbone"], prep["rows"]
    done = {(r["task"], r["trial"]) for r in rows}
    shards = shard_jobs(cfg, backbone)
    todo = [(t, trials) for t, trials in shards if not all((t, tr) in done for tr in trials)]
    print(f"{len(shards) - len(todo)} of {len(shards)} shards already finished on the volume; launching {len(todo)}", flush=True)
    fn = shard_function(cfg, backbone)
    for shard_rows in fn.starmap([(asdict(cfg), t, trials) for t, trials in todo], order_outputs=False):
        rows.extend(shard_rows)
    rows = unique_rows(rows, set(planned_jobs(cfg)))
    run = sum(len(trials) for _, trials in todo)
    info = summarize(cfg, rows, wall_seconds=time.perf_counter() - started, episodes_run=run, workers=len(todo))
    return info, rows


def write_run(info: dict, rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "episodes.jsonl").write_text("".join(dumps_row(r) + "\n" for r in sorted(rows, key=lambda r: (r["task"], r["trial"]))))
    write_outputs(info, out)


def plan_backbone(cfg: EvalConfig) -> str:
    if cfg.backbone:
        return cfg.backbone
    head = cfg.checkpoint_paths()["head"]
    if head.exists():
        return head_backbone(cfg)
    raise ValueError(f"--plan: pass --backbone state|openvla-oft: the head checkpoint {head} is not on this machine (it lives on the Modal volume)")


def plan_text(cfg: EvalConfig, describe_function: Callable[[str], str]) -> str:
    """Shards, function, GPU type and episodes per container of a Modal run (nothing is started);
    ``describe_function(backbone)`` says which Modal function runs a shard and on what hardware."""
    from common.sim.libero_env import SUITE_MAX_STEPS

    backbone = plan_backbone(cfg)
    shards = shard_jobs(cfg, backbone)
    vla = backbone == "openvla-oft"
    sizes = [len(trials) for _, trials in shards]
    max_steps = cfg.max_steps or SUITE_MAX_STEPS[cfg.task_suite]
    chunks = math.ceil(max_steps / cfg.replan_steps)
    hardware = describe_function(backbone)
    by_task: dict[int, list[str]] = {}
    for task, trials in shards:
        by_task.setdefault(task, []).append(f"{trials[0]}-{trials[-1]}")
    lines = [
        f"plan {cfg.run_name}: suite {cfg.task_suite}, tasks {cfg.tasks}, {cfg.num_trials} trials per task, backbone {backbone}",
        f"function: {hardware}",
        f"containers (shards): {len(shards)}; episodes: {sum(sizes)}; episodes per container: {min(sizes)}-{max(sizes)}",
        f"per episode: at most {max_steps} env steps = {chunks} chunks (replan every {cfg.replan_steps} steps)"
        + ("; one backbone forward per chunk; the feature cache's cameras (OFT: agentview + wrist) rendered every step" if vla else ""),
        f"results: {cfg.out or f'<volume rsd-data>/results/phase3/{cfg.run_name}'}/shards/*.jsonl (finished shards are skipped on rerun)",
        "shards: " + "; ".join(f"task {t}: trials {', '.join(r)}" for t, r in by_task.items()),
        "mode: " + ("--spawn: one detached driver (use `modal run --detach`)" if cfg.spawn else "wait for the shards (`--spawn` + `modal run --detach` for long runs)"),
    ]
    return "\n".join(lines)
