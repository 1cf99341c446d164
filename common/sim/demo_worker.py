"""The worker side of demonstration collection: one process keeps one physics env (and, with
images, one camera env) for its current task, rolls the scripted expert out per job and sends the
recorded arrays back to the collector (``common/sim/demo_collection.py``)."""

from __future__ import annotations

import os
import queue
import traceback
from typing import Any

import numpy as np

from common.locks import exit_with_parent
from common.sim.libero_env import quat_to_axis_angle

WORKER_POLL_S = 5.0


def rollout_episode(env, expert, job: dict[str, Any], driver=None) -> dict[str, Any]:
    """Physics-only rollout; returns arrays for one demo. The expert acts at every step; ``driver``
    (DAgger, ``common/sim/dagger.py``) may execute another action instead, the expert's staying the label."""
    if job.get("fresh_layout"):  # a newly sampled layout (seeded by the episode's seed), not a fixed init state
        init_index = -1
        obs = env.reset_to_fresh_layout(job["seed"])
    else:
        init_index = job["episode_index"] % env.num_init_states
        obs = env.reset_to_trial(init_index)
    expert.reseed(job["seed"])
    expert.reset()
    if driver is not None:
        driver.reset(job["seed"])
    objects = sorted(env.env.env.objects_dict)
    rec: dict[str, list] = {k: [] for k in ("actions", "expert_actions", "states", "rewards", "dones", "low_dim", "eef_pos", "eef_quat", "gripper", "joints")}
    obj_rec: dict[str, list] = {f"{n}_{s}": [] for n in objects for s in ("pos", "quat")}
    done = False
    for _ in range(env.max_steps):
        rec["states"].append(env.get_state())
        rec["low_dim"].append(env.low_dim_obs(obs))
        rec["eef_pos"].append(obs["robot0_eef_pos"])
        rec["eef_quat"].append(obs["robot0_eef_quat"])
        rec["gripper"].append(obs["robot0_gripper_qpos"])
        rec["joints"].append(obs["robot0_joint_pos"])
        for name in objects:
            obj_rec[f"{name}_pos"].append(obs[f"{name}_pos"])
            obj_rec[f"{name}_quat"].append(obs[f"{name}_quat"])
        if driver is not None:
            expert.sync_to_state(obs)  # the policy moved the hand: the expert's phase follows the scene
        action = expert.act(obs)
        rec["expert_actions"].append(expert.last_clean_action)
        if driver is not None:
            action = driver(env, obs, action)
        obs, reward, done, _ = env.step(action)
        rec["actions"].append(action)
        rec["rewards"].append(reward)
        rec["dones"].append(done)
        if done:
            break
    eef_ori = quat_to_axis_angle(np.asarray(rec["eef_quat"]))
    eef_pos = np.asarray(rec["eef_pos"], dtype=np.float64)
    obs_out = {
        "ee_pos": eef_pos,
        "ee_ori": eef_ori,
        "ee_states": np.concatenate([eef_pos, eef_ori], axis=1),
        "gripper_states": np.asarray(rec["gripper"], dtype=np.float64),
        "joint_states": np.asarray(rec["joints"], dtype=np.float64),
        "low_dim": np.asarray(rec["low_dim"], dtype=np.float32),
        **{k: np.asarray(v, dtype=np.float64) for k, v in obj_rec.items()},
    }
    return {
        **job,
        "init_state_index": init_index,
        "success": bool(done),
        "actions": np.asarray(rec["actions"], dtype=np.float64),
        # what the expert intended at each visited state (differs from the executed actions with
        # action noise, DART, or when a policy drives, DAgger; see CollectConfig)
        "expert_actions": np.asarray(rec["expert_actions"], dtype=np.float64),
        "states": np.asarray(rec["states"], dtype=np.float64),
        "rewards": np.asarray(rec["rewards"], dtype=np.float64),
        "dones": np.asarray(rec["dones"], dtype=np.uint8),
        "obs": obs_out,
    }


def render_images(camera_env, demo: dict[str, Any]) -> dict[str, np.ndarray]:
    """Replay recorded states in a camera env (same seed -> same fixture placement)."""
    if demo["init_state_index"] < 0:
        camera_env.reset_to_fresh_layout(demo["seed"])
    else:
        camera_env.reset_to_trial(demo["init_state_index"])
    frames: dict[str, list] = {"agentview_rgb": [], "eye_in_hand_rgb": []}
    for i, state in enumerate(demo["states"]):
        obs = camera_env.set_state(state)
        # The replay must reproduce the rollout; a mismatch means the two envs differ.
        if not np.allclose(obs["robot0_eef_pos"], demo["obs"]["ee_pos"][i], atol=1e-5):
            raise RuntimeError(f"image replay diverged from the rollout at step {i} (task {demo['task_id']})")
        for key in frames:
            frames[key].append(obs[key])
    return {k: np.stack(v) for k, v in frames.items()}


def _dagger_driver(job: dict[str, Any], env, policy, driving_policy):
    """The DAgger driver for this task, loading the policy once per process with the collector's
    ``driving_policy(config, suite)`` (-> driver, policy)."""
    import torch

    from common.sim.dagger import DaggerConfig, PolicyDriver

    config = DaggerConfig(**job["dagger"])
    if policy is None or getattr(policy, "dagger_config", None) != config:
        torch.set_num_threads(1)  # batch-1 decoding: one thread is fastest, and the workers share the cores
        policy = driving_policy(config, job["suite"])
        policy.dagger_config = config
    task_index = policy.task_index(job["suite"], job["task_id"], env.instruction)
    driver = PolicyDriver(policy, task_index=task_index, replan_steps=config.replan_steps, beta=config.beta, seed=job["seed"])
    return driver, policy


def worker_main(job_queue, result_queue, expert_config: dict[str, Any], parent_pid: int, driving_policy=None) -> None:
    """One process: keeps one physics env (and one camera env) for the current task; exits with
    its parent (and leaves Ctrl-C to it). ``driving_policy``: DAgger's policy loader (picklable)."""
    exit_with_parent(parent_pid)
    from common.sim.libero_env import LiberoTaskEnv
    from common.sim.scripted_expert import ExpertConfig, ScriptedExpert

    current: tuple | None = None
    env = camera_env = expert = driver = policy = None
    try:
        while True:
            try:
                job = job_queue.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                if os.getppid() != parent_pid:
                    break  # orphaned (the platform has no parent-death signal)
                continue
            if job is None:
                break
            key = (job["suite"], job["task_id"], job["record_images"], job["camera_size"])
            if key != current:
                for old in (env, camera_env):
                    if old is not None:
                        old.close()
                env = LiberoTaskEnv(suite=job["suite"], task_id=job["task_id"])
                expert = ScriptedExpert(env, ExpertConfig(**expert_config))
                camera_env = None
                if job["record_images"]:
                    camera_env = LiberoTaskEnv(
                        suite=job["suite"], task_id=job["task_id"],
                        cameras=("agentview", "wrist"), camera_size=job["camera_size"],
                    )
                current = key
                driver = None
                if job.get("dagger"):
                    driver, policy = _dagger_driver(job, env, policy, driving_policy)
            demo = rollout_episode(env, expert, job, driver)
            if camera_env is not None and (demo["success"] or job["keep_failures"]):
                demo["obs"].update(render_images(camera_env, demo))
            result_queue.put(("demo", demo))
    except BaseException:  # report to the parent, which raises: never a silent worker death
        result_queue.put(("error", traceback.format_exc()))
        raise
    finally:
        for old in (env, camera_env):
            if old is not None:
                old.close()
