"""What the OpenVLA-OFT Phase 3 path costs outside the 7B forward, measured on this CPU, and the
GPU-hours of the seed's Modal experiment ESTIMATED from it.

    python -m benchmarks.decoding.bench_vla_cpu_costs [--task-suite libero_object --steps 40 --assumed-forward-s 0.1]

Measured here: a LIBERO env step with the two OFT cameras (agentview + wrist) rendered at
``--camera-size`` (physics + software rendering), the same step without cameras, ``reset_to_trial``,
and the per-frame OFT preprocessing (JPEG round trip, resize to 224, center crop: the functions the
extractor calls). NOT measurable here (no GPU, no weights): the 7B forward (``--assumed-forward-s``)
and the model load per container (``--assumed-load-s``); both are inputs of the estimate, written as
assumptions. Writes ``results/bench_vla_cpu_costs.json`` / ``.md``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import rsd_entry
from common.artifacts import results_dir_of
from common.provenance import provenance, write_results

PROG = "python -m benchmarks.decoding.bench_vla_cpu_costs"


@dataclass
class BenchVLACostsConfig:
    """What the OpenVLA-OFT Phase 3 path costs outside the 7B forward on this CPU, and the GPU-hours estimated from it."""

    task_suite: str = "libero_object"  # LIBERO suite (task 0 is timed)
    steps: int = 40  # env steps timed per camera setting
    camera_size: int = 128  # LIBERO HDF5 frames are 128x128
    frames: int = 20  # frames preprocessed
    assumed_forward_s: float = 0.1  # ASSUMPTION: one bf16 OFT-7B forward, batch 1, on the GPU (not measured here)
    assumed_load_s: float = 180.0  # ASSUMPTION: load the 7B weights from the volume into a GPU container
    cache_steps: int = 0  # demo steps to cache; 0 = train + val steps of results/phase2/train_summary.json
    tasks: int = 10  # estimate: tasks evaluated
    trials: int = 50  # estimate: trials per task
    replan_steps: int = 4  # estimate: actions executed per predicted chunk
    trials_per_container: int = 25  # estimate: trials per GPU container
    out: str = ""  # output folder ("" = $RSD_RESULTS_DIR or ./results)


def _time_env(suite: str, cameras: tuple[str, ...], size: int, steps: int) -> dict:
    from common.sim.libero_env import LiberoTaskEnv

    t0 = time.perf_counter()
    env = LiberoTaskEnv(suite=suite, task_id=0, cameras=cameras, camera_size=size)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    env.reset_to_trial(0)
    reset = time.perf_counter() - t0
    action = np.array([0.1, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    t0 = time.perf_counter()
    for i in range(steps):
        env.step(action if i % 20 < 10 else -action * np.array([1, 1, 1, 1, 1, 1, -1]))
    step = (time.perf_counter() - t0) / steps
    env.close()
    return {"cameras": list(cameras), "build_s": build, "reset_to_trial_s": reset, "step_s": step}


def _time_preprocess(size: int, frames: int) -> float:
    from common.policy.backbones.openvla_preprocessing import _jpeg_roundtrip, preprocess_image_for_openvla

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    for img in images:
        preprocess_image_for_openvla(_jpeg_roundtrip(img), flip=False, center_crop=True)
    return (time.perf_counter() - t0) / frames


def run(cfg: BenchVLACostsConfig) -> dict:
    import json

    from common.sim.libero_env import SUITE_MAX_STEPS

    cams = _time_env(cfg.task_suite, ("agentview", "wrist"), cfg.camera_size, cfg.steps)
    physics = _time_env(cfg.task_suite, (), cfg.camera_size, cfg.steps)
    frame_s = _time_preprocess(cfg.camera_size, cfg.frames)
    cache_steps = cfg.cache_steps
    if not cache_steps:
        summary = json.loads((results_dir_of("") / "phase2" / "train_summary.json").read_text())
        cache_steps = int(summary["train_steps"] + summary["val_steps"])
    max_steps = SUITE_MAX_STEPS[cfg.task_suite]
    chunks = math.ceil(max_steps / cfg.replan_steps)
    episodes = cfg.tasks * cfg.trials
    containers = cfg.tasks * math.ceil(cfg.trials / cfg.trials_per_container)
    # per episode, upper bound (every episode runs to the step limit; CPU software rendering)
    episode_s = cams["reset_to_trial_s"] + max_steps * cams["step_s"] + chunks * (cfg.assumed_forward_s + 2 * frame_s)
    eval_hours = (episodes * episode_s + containers * (cfg.assumed_load_s + cams["build_s"])) / 3600.0
    cache_hours = (cache_steps * (cfg.assumed_forward_s + 2 * frame_s) + cfg.assumed_load_s) / 3600.0
    result = {
        "config": asdict(cfg),
        "measured": {"env_with_cameras": cams, "env_physics_only": physics, "preprocess_s_per_frame": frame_s,
                     "rendering_s_per_step": cams["step_s"] - physics["step_s"]},
        "assumed": {"forward_s": cfg.assumed_forward_s, "load_s": cfg.assumed_load_s},
        "estimate": {
            "cache_steps": cache_steps, "cache_gpu_hours": cache_hours,
            "eval_episodes": episodes, "eval_containers": containers, "eval_max_steps": max_steps, "eval_chunks_per_episode": chunks,
            "eval_episode_s_upper_bound": episode_s, "eval_gpu_hours_upper_bound": eval_hours,
        },
        "provenance": provenance(),
    }
    out = Path(cfg.out) if cfg.out else results_dir_of("")
    md = [
        f"OpenVLA-OFT Phase 3 costs outside the 7B forward, `{cfg.task_suite}` task 0, this CPU (measured), and GPU-hours (ESTIMATE).",
        "",
        "| measured on this CPU | seconds |", "|---|---|",
        f"| env step, agentview + wrist at {cfg.camera_size}² (physics + rendering) | {cams['step_s']:.4f} |",
        f"| env step, no cameras (physics) | {physics['step_s']:.4f} |",
        f"| reset_to_trial with cameras | {cams['reset_to_trial_s']:.2f} |",
        f"| env build with cameras | {cams['build_s']:.2f} |",
        f"| OFT preprocessing per frame (JPEG + resize 224 + center crop) | {frame_s:.4f} |",
        "",
        f"Assumed (not measurable here): 7B forward {cfg.assumed_forward_s} s per call, model load {cfg.assumed_load_s} s per container.",
        "",
        "| step | estimate |", "|---|---|",
        f"| cache features for {cache_steps} demo steps | {cache_hours:.2f} GPU-h |",
        f"| Phase 3, {episodes} episodes in {containers} containers, ≤ {max_steps} steps / {chunks} chunks each | ≤ {eval_hours:.2f} GPU-h |",
    ]
    write_results(out, "bench_vla_cpu_costs", result, "\n".join(md))
    return result


def main(argv: list[str]) -> dict:
    return run(rsd_entry.parse_config(BenchVLACostsConfig, argv, prog=PROG))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
