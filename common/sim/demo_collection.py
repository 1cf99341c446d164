"""Scripted-expert demonstration collection into the official LIBERO HDF5 layout.

Layout written by `collect_demos` (one file = one suite, any subset of its tasks):

    data/                          attrs: suite, problem_info (json), language_instruction,
                                          bddl_file_name, env_args (json), tasks (json list of
                                          {task_id, task_name, language_instruction, bddl_file_name,
                                          env_args}), versions (json), num_demos, total,
                                          next_episode_index (json {task_id: int}, for resuming)
      demo_N/                      attrs: task_id, language_instruction, init_state_index,
                                          episode_index, seed, success, num_samples
        actions  [T, 7] float64    OSC_POSE deltas in [-1, 1], gripper -1 open / +1 close
        states   [T, S] float64    flattened MuJoCo state *before* actions[t] (LIBERO convention)
        rewards  [T]    float64    env reward (1.0 on the success step)
        dones    [T]    uint8      1 on the success step (and on the last step of a success)
        obs/
          ee_pos [T,3], ee_ori [T,3] (axis-angle), ee_states [T,6] (pos + axis-angle),
          gripper_states [T,2], joint_states [T,7],
          <object>_pos [T,3], <object>_quat [T,4] (x y z w) for every movable object,
          low_dim [T, LOW_DIM_OBS_DIM] float32   (our addition: the wrapper's fixed layout,
                                                  see common/sim/libero_env.py)
          agentview_rgb, eye_in_hand_rgb [T,H,W,3] uint8 (only with record_images; flipped 180°
                                                  like reference evaluators)

When the file holds one task, `language_instruction`, `bddl_file_name`, `problem_info` and
`env_args` describe that task, as in the official files; with several tasks they describe the
lowest task id and `tasks` plus the per-demo attrs are authoritative.

Episodes: episode k of a task uses init state k % num_init_states and an expert seed derived from
(seed, task_id, k); with fresh_layouts, episode k instead starts from a layout robosuite samples
from that seed (init_state_index -1: none of the suite's fixed init states, which the evaluation
uses; one file holds one kind, attrs ``layouts`` = "fixed" | "fresh"). Only successful episodes
are kept unless keep_failures. Re-running with the same file resumes: existing demos stay, each
task is filled up to demos_per_task successful demos, and episode indices continue where the last
run stopped (so retries are new episodes).

DAgger (``dagger``, ``common/sim/dagger.py``): a trained policy executes its actions while the expert
labels each visited state (``expert_actions``, as DART demos carry); every episode is kept and
counted, attrs ``dagger`` (json of its settings) marks the file, and one file holds one setting.

Faults: one collection at a time writes a file (``.<file name>.lock`` next to it); an existing
``--out`` that is not an HDF5 file is refused before anything runs; workers ignore Ctrl-C and exit
with their parent (``common/locks.py``), and on an interrupt or SIGTERM the parent stops them at
once (every demo already written stays; the next run resumes).

Physics runs without cameras (fast); with record_images each kept episode is replayed from its
recorded states in a second, camera-enabled env (rendering is the slow part, ~5 frames/s).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
import os
import queue
from pathlib import Path
from typing import Any, Callable


from common.sim.demo_file import (TMP_GROUP, _existing_counts, _write_demo, _write_file_attrs, check_demo_out,
                                   check_resume_settings, episode_seed)
from common.artifacts import data_dir_of
from common.locks import output_lock
from common.sim.demo_worker import WORKER_POLL_S, worker_main
from common.sim.libero_env import SUITES, get_suite, library_versions, make_env_args, parse_task_spec

_MAX_ATTEMPT_FACTOR = 3  # give a task up after 3x demos_per_task (+10) failed-or-not attempts


@dataclasses.dataclass
class CollectConfig:
    """Flags of ``phase1_improved/collect_demos.py`` (same on the local CLI and ``modal run``)."""

    suite: str = "libero_object"  # libero_spatial | libero_object | libero_goal | libero_10 | libero_90
    tasks: str = "0-9"  # 'all', '0-9' or '0,3,5'
    demos_per_task: int = 50  # successful demos to keep per task (a rerun fills up to this; DAgger: episodes)
    workers: int = 2  # parallel simulator processes (~1.8 GB memory each)
    out: str = "libero_object_demos.hdf5"  # relative to the data dir
    data_dir: str = ""  # "" = $RSD_DATA_DIR or ./data (Modal: /data)
    seed: int = 0  # expert seed base; episode k of task t gets a seed derived from (seed, t, k)
    keep_failures: bool = False  # also store unsuccessful episodes (success=False attribute)
    record_images: bool = False  # replay kept demos with agentview + wrist cameras (slow, ~5 frames/s)
    camera_size: int = 128  # camera images are camera_size x camera_size pixels
    # std of Gaussian noise on the expert's executed arm actions (DART: the robot leaves the expert's
    # path; each demo also stores the expert's intended actions, `expert_actions`, which the tokenizer
    # and the policy learn, so the data show how the expert corrects from where the robot went)
    action_noise: float = 0.0
    operator: str = "none"  # "none" | "human" (common/sim/operator_model.py); stored as data.attrs["operator"]
    # start every episode from a newly sampled object layout instead of init state k % 50: more
    # layouts than the suite's 50, and none of the fixed ones the evaluation runs on
    fresh_layouts: bool = False
    # DAgger (common/sim/dagger.py): the Phase 2 policy under this models folder drives, the expert labels
    # every visited state (`expert_actions`); every episode is kept and counts as one of demos_per_task
    dagger_models_dir: str = ""
    dagger_tokenizer: str = "robust"  # robust | naive: which of that folder's policies drives
    dagger_beta: float = 0.0  # probability that the expert drives a chunk instead of the policy
    dagger_replan_steps: int = 4  # policy actions executed per decoded chunk (Phase 3's --replan-steps)

    def dagger(self) -> dict | None:
        """The DAgger settings for the workers (validated), or None."""
        if not self.dagger_models_dir:
            return None
        from common.sim.dagger import DaggerConfig

        return DaggerConfig(models_dir=str(Path(self.dagger_models_dir).resolve()), tokenizer=self.dagger_tokenizer,
                            beta=self.dagger_beta, replan_steps=self.dagger_replan_steps).as_dict()

    def __post_init__(self) -> None:
        from common.sim.operator_model import OPERATORS

        if self.operator not in OPERATORS:
            raise ValueError(f"operator must be one of {OPERATORS}, got {self.operator!r}")
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid suites: {', '.join(SUITES)}")
        if self.demos_per_task <= 0:
            raise ValueError(f"demos_per_task must be > 0, got {self.demos_per_task}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.camera_size < 16:
            raise ValueError(f"camera_size must be >= 16 pixels, got {self.camera_size}")
        if self.action_noise < 0:
            raise ValueError(f"action_noise must be >= 0, got {self.action_noise}")
        if not self.out.endswith((".hdf5", ".h5")):
            raise ValueError(f"out must be an .hdf5 file path, got {self.out!r}")
        if self.dagger_models_dir and self.action_noise > 0:
            raise ValueError("dagger_models_dir and action_noise > 0: choose one way to leave the expert's path (DAgger or DART)")
        if self.dagger_models_dir and not Path(self.dagger_models_dir).is_dir():
            raise FileNotFoundError(f"dagger_models_dir {self.dagger_models_dir}: not a folder (expected the Phase 2 models of the driving policy)")
        self.dagger()  # the remaining DAgger checks
        if not str(self.tasks).strip():
            raise ValueError("tasks must be 'all', a range like '0-9' or a list like '0,3,5'")

    def out_path(self) -> Path:
        out = Path(self.out)
        return out if out.is_absolute() else data_dir_of(self.data_dir) / out


def run_collection(config: CollectConfig, *, progress: bool = True, driving_policy: Callable | None = None) -> dict:
    """``collect_demos`` for a ``CollectConfig`` (what both front ends and the pipeline call);
    ``driving_policy``: see ``collect_demos`` (needed with ``--dagger-models-dir``)."""
    from common.sim.scripted_expert import ExpertConfig

    import h5py

    out_path = config.out_path()
    check_demo_out(out_path)
    if out_path.exists() and h5py.is_hdf5(out_path):  # one file holds one kind of demos: never mix operators
        # (a file that is not HDF5 is refused by collect_demos with its own message)
        with h5py.File(out_path, "r") as f:
            found = str(f["data"].attrs.get("operator", "none")) if "data" in f else config.operator
        if found != config.operator:
            raise ValueError(f"{out_path} holds operator={found!r} demos; cannot add operator={config.operator!r} demos")
    task_ids = parse_task_spec(config.tasks, get_suite(config.suite).get_num_tasks())
    summary = collect_demos(
        config.suite, task_ids, config.demos_per_task, out_path, workers=config.workers, seed=config.seed,
        keep_failures=config.keep_failures, record_images=config.record_images, camera_size=config.camera_size,
        fresh_layouts=config.fresh_layouts, expert_config=ExpertConfig(action_noise=config.action_noise, seed=config.seed, operator=config.operator),
        dagger=config.dagger(), driving_policy=driving_policy, progress=progress,
    )
    return {**summary, "operator": config.operator}


# ---------------------------------------------------------------------------- parent side
def _task_info(suite: str, task_id: int) -> dict[str, Any]:
    bench = get_suite(suite)
    task = bench.get_task(task_id)
    return {
        "task_id": task_id,
        "task_name": task.name,
        "language_instruction": task.language,
        "bddl_file_name": bench.get_task_bddl_file_path(task_id),
        "problem_name": task.problem,
    }


def collect_demos(
    suite: str,
    task_ids: list[int],
    demos_per_task: int,
    out_path: str | os.PathLike,
    *,
    workers: int = 2,
    seed: int = 0,
    keep_failures: bool = False,
    record_images: bool = False,
    camera_size: int = 128,
    fresh_layouts: bool = False,
    expert_config=None,
    dagger: dict[str, Any] | None = None,
    driving_policy: Callable | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Collect scripted-expert demos (layout and resume rules in the module docstring).

    ``dagger`` (``DaggerConfig.as_dict()``): a trained policy drives and the expert labels
    (``common/sim/dagger.py``); every episode is kept and counts towards ``demos_per_task``. The
    policy is loaded in each worker by ``driving_policy(DaggerConfig, suite)``, a module-level (picklable)
    function such as ``common.eval.policy.dagger_policy``: the simulator layer does not import the
    evaluation, so the caller chooses the policy.

    Returns a summary: per-task kept/attempted/new counts, success rate of this run's episodes,
    tasks given up (too many failures), output path and versions.
    """
    import h5py
    from tqdm import tqdm

    from common.sim.scripted_expert import ExpertConfig

    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")
    if demos_per_task <= 0:
        raise ValueError(f"demos_per_task must be > 0, got {demos_per_task}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    num_tasks = get_suite(suite).get_num_tasks()
    bad = [t for t in task_ids if not 0 <= t < num_tasks]
    if not task_ids or bad:
        raise ValueError(f"task ids {bad or task_ids} invalid for {suite}: valid ids are 0..{num_tasks - 1}")
    if dagger and driving_policy is None:
        raise ValueError("dagger: expected driving_policy (e.g. common.eval.policy.dagger_policy) to load the policy that drives; found None")
    config = expert_config if expert_config is not None else ExpertConfig()
    config_dict = dataclasses.asdict(config)

    out_path = Path(out_path)
    check_demo_out(out_path)
    infos = {t: _task_info(suite, t) for t in task_ids}

    layouts = "fresh" if fresh_layouts else "fixed"
    expert_noise = float(getattr(config, "action_noise", 0.0))
    dagger_attr = json.dumps(dagger, sort_keys=True) if dagger else ""

    def check_resume(data) -> None:
        check_resume_settings(data, out_path, suite=suite, record_images=record_images, camera_size=camera_size,
                              layouts=layouts, dagger_attr=dagger_attr, seed=seed, expert_noise=expert_noise)

    lock = out_path.parent / f".{out_path.name}.lock"
    if out_path.exists():
        # A complete file is left as it is: rewriting even the same attributes changes its bytes,
        # and the pipeline would take that for new demos and retrain everything after them.
        with output_lock(lock, f"demo file {out_path}"), h5py.File(out_path, "r") as f:
            if "data" in f and TMP_GROUP not in f["data"]:
                check_resume(f["data"])
                kept, _, _ = _existing_counts(f["data"], task_ids, count_all=bool(dagger))
                if all(kept[t] >= demos_per_task for t in task_ids):
                    zeros = {t: 0 for t in task_ids}
                    return _summary(out_path, suite, task_ids, dict(kept), kept, zeros, zeros, [], zeros)

    with output_lock(lock, f"demo file {out_path}"), h5py.File(out_path, "a") as f:
        data = f.require_group("data")
        check_resume(data)
        if TMP_GROUP in data:  # left by an interrupted run
            del data[TMP_GROUP]
        data.attrs["layouts"] = layouts
        data.attrs["operator"] = getattr(config, "operator", "none")
        if dagger_attr:
            data.attrs["dagger"] = dagger_attr
        # File-level attrs first, so an interrupted run still leaves a self-describing file.
        _write_file_attrs(data, suite, infos, {t: _env_args(suite, t, infos[t]) for t in task_ids})
        if record_images:
            # Images come from replaying `states` in a camera env of this size (flipped 180°).
            data.attrs["camera_size"] = camera_size
        f.flush()
        kept, next_ep, next_demo = _existing_counts(data, task_ids, count_all=bool(dagger))
        existing = dict(kept)
        needed = {t: max(demos_per_task - kept[t], 0) for t in task_ids}
        attempts = {t: 0 for t in task_ids}
        max_attempts = {t: _MAX_ATTEMPT_FACTOR * needed[t] + 10 for t in task_ids}
        in_flight = {t: 0 for t in task_ids}
        new_success = {t: 0 for t in task_ids}  # new episodes that count towards demos_per_task
        successes = {t: 0 for t in task_ids}  # new episodes that succeeded
        given_up: list[int] = []

        def next_job() -> dict[str, Any] | None:
            # Lowest task id first, so workers stay on one task (one env build per task).
            for t in task_ids:
                if new_success[t] + in_flight[t] < needed[t] and attempts[t] < max_attempts[t]:
                    episode = next_ep[t]
                    next_ep[t] += 1
                    attempts[t] += 1
                    in_flight[t] += 1
                    return {
                        "suite": suite, "task_id": t, "episode_index": episode,
                        "seed": episode_seed(seed, t, episode), "record_images": record_images,
                        "camera_size": camera_size, "keep_failures": keep_failures, "fresh_layout": fresh_layouts,
                        "dagger": dagger,
                    }
            return None

        total_needed = sum(needed.values())
        if total_needed == 0:
            return _summary(out_path, suite, task_ids, existing, kept, attempts, new_success, given_up, successes)

        ctx = mp.get_context("spawn")  # forked MuJoCo/GL state is unsafe in children
        job_queue, result_queue = ctx.Queue(), ctx.Queue()
        procs = [ctx.Process(target=worker_main, args=(job_queue, result_queue, config_dict, os.getpid(), driving_policy if dagger else None), daemon=True)
                 for _ in range(workers)]
        for p in procs:
            p.start()
        bar = None
        try:
            outstanding = 0
            for _ in range(2 * workers):  # keep every worker busy with one job queued behind
                job = next_job()
                if job is None:
                    break
                job_queue.put(job)
                outstanding += 1
            bar = tqdm(total=total_needed, desc=f"{suite} demos", disable=not progress)
            while outstanding:
                try:
                    kind, payload = result_queue.get(timeout=WORKER_POLL_S)
                except queue.Empty:
                    dead = {p.pid: p.exitcode for p in procs if not p.is_alive()}
                    if dead:
                        raise RuntimeError(
                            f"collection worker(s) died without reporting (pid: exit code {dead}); killed for "
                            "memory, or the calling script lacks the `if __name__ == '__main__':` guard spawn needs"
                        ) from None
                    continue
                if kind == "error":
                    raise RuntimeError(f"collection worker failed:\n{payload}")
                outstanding -= 1
                t = payload["task_id"]
                in_flight[t] -= 1
                counts = payload["success"] or bool(dagger)  # DAgger: a failed episode's states are labelled too
                if counts or keep_failures:
                    _write_demo(data, next_demo, payload, infos[t]["language_instruction"])
                    next_demo += 1
                successes[t] += int(payload["success"])
                if counts:
                    new_success[t] += 1
                    kept[t] += 1
                    bar.update(1)
                data.attrs["next_episode_index"] = json.dumps({str(k): v for k, v in next_ep.items()})
                data.attrs["num_demos"] = sum(1 for k in data if k.startswith("demo_"))
                data.attrs["total"] = int(sum(data[k].attrs["num_samples"] for k in data if k.startswith("demo_")))
                f.flush()
                job = next_job()
                if job is not None:
                    job_queue.put(job)
                    outstanding += 1
            bar.close()
        except BaseException:  # an error, Ctrl-C or SIGTERM: stop now; demos written so far stay
            if bar is not None:
                bar.close()
            _stop_workers(procs, job_queue, graceful=False)
            raise
        _stop_workers(procs, job_queue, graceful=True)
        given_up = [t for t in task_ids if new_success[t] < needed[t]]
    return _summary(out_path, suite, task_ids, existing, kept, attempts, new_success, given_up, successes)


def _stop_workers(procs, job_queue, *, graceful: bool) -> None:
    """Graceful: each worker finishes and exits on its end marker. Otherwise: terminate at once
    (an episode in progress is lost; it is rerun as a new episode on resume)."""
    if graceful:
        for _ in procs:
            job_queue.put(None)
    else:
        for p in procs:
            p.terminate()
    for p in procs:
        p.join(timeout=30 if graceful else 10)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def _env_args(suite: str, task_id: int, info: dict[str, Any]) -> dict[str, Any]:
    """The physics env's args, without building an env (same keys as LiberoTaskEnv.env_args)."""
    return {
        "type": "ControlEnv", "suite": suite, "task_id": task_id, "controller": "OSC_POSE",
        "control_freq": 20, **make_env_args(info["bddl_file_name"]),
    }


def _summary(out_path, suite, task_ids, existing, kept, attempts, new_success, given_up, successes) -> dict[str, Any]:
    ran = sum(attempts.values())
    return {
        "out_path": str(out_path),
        "suite": suite,
        "tasks": {
            t: {"existing": existing[t], "new": new_success[t], "kept": kept[t], "attempts": attempts[t]}
            for t in task_ids
        },
        "episodes_run": ran,
        "success_rate": (sum(successes.values()) / ran) if ran else None,
        "given_up_tasks": given_up,
        "versions": library_versions(),
    }
