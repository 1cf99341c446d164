"""Reading and writing demonstration files in the official LIBERO HDF5 layout (see
``common/sim/demo_collection.py`` for the layout): the output check, resume counts, one demo per
atomic group write, file attributes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.locks import check_writable_dir
from common.sim.libero_env import library_versions

TMP_GROUP = "_incomplete_demo"


def check_demo_out(out_path: Path) -> None:
    """``--out`` is a new file or an HDF5 file (a demo file to resume) in a writable folder."""
    import h5py

    check_writable_dir(out_path.parent, "--out folder")
    if out_path.exists() and not (out_path.is_file() and h5py.is_hdf5(out_path)):
        kind = "an empty file" if out_path.is_file() and out_path.stat().st_size == 0 else "not an HDF5 file"
        raise ValueError(f"--out {out_path}: exists and is {kind}; choose another --out (a new file or an earlier demo file)")


def _existing_counts(data, task_ids: list[int], *, count_all: bool = False) -> tuple[dict[int, int], dict[int, int], int]:
    """(successful demos per task -- every demo with ``count_all``, as DAgger keeps them --, next
    episode index per task, next demo number)."""
    kept = {t: 0 for t in task_ids}
    next_ep = {int(k): int(v) for k, v in json.loads(data.attrs.get("next_episode_index", "{}")).items()}
    next_demo = 0
    for name, group in data.items():
        if not name.startswith("demo_"):
            continue
        next_demo = max(next_demo, int(name.split("_")[1]) + 1)
        t = int(group.attrs["task_id"])
        if t in kept and (count_all or bool(group.attrs["success"])):
            kept[t] += 1
        next_ep[t] = max(next_ep.get(t, 0), int(group.attrs["episode_index"]) + 1)
    return kept, {t: next_ep.get(t, 0) for t in task_ids}, next_demo


def _write_demo(data, number: int, demo: dict[str, Any], instruction: str) -> None:
    """Write into a temporary group, then rename: an interrupted write never looks like a demo."""
    if TMP_GROUP in data:
        del data[TMP_GROUP]
    group = data.create_group(TMP_GROUP)
    for key in ("actions", "states", "rewards", "dones"):
        group.create_dataset(key, data=demo[key])
    if "expert_actions" in demo and not np.array_equal(demo["expert_actions"], demo["actions"]):
        # with action noise (DART): what the expert intended at each visited state; the executed,
        # noisy actions stay in `actions` so the file still replays exactly
        group.create_dataset("expert_actions", data=demo["expert_actions"])
    obs_group = group.create_group("obs")
    for key, value in demo["obs"].items():
        if value.dtype == np.uint8 and value.ndim == 4:
            obs_group.create_dataset(key, data=value, chunks=(1,) + value.shape[1:], compression="gzip", compression_opts=4)
        else:
            obs_group.create_dataset(key, data=value)
    group.attrs.update({
        "task_id": demo["task_id"],
        "language_instruction": instruction,
        "init_state_index": demo["init_state_index"],
        "episode_index": demo["episode_index"],
        "seed": demo["seed"],
        "success": demo["success"],
        "num_samples": int(demo["actions"].shape[0]),
    })
    data.move(TMP_GROUP, f"demo_{number}")


def _write_file_attrs(data, suite: str, infos: dict[int, dict], env_args: dict[int, dict]) -> None:
    tasks = json.loads(data.attrs.get("tasks", "[]"))
    known = {t["task_id"] for t in tasks}
    for t, info in infos.items():
        if t not in known:
            tasks.append({**info, "env_args": env_args[t]})
    tasks.sort(key=lambda t: t["task_id"])
    first = tasks[0]
    data.attrs.update({
        "suite": suite,
        "tasks": json.dumps(tasks),
        "problem_info": json.dumps({
            "problem_name": first["problem_name"],
            "domain_name": "robosuite",
            "language_instruction": first["language_instruction"],
        }),
        "language_instruction": first["language_instruction"],
        "bddl_file_name": first["bddl_file_name"],
        "env_args": json.dumps(first["env_args"]),
        "versions": json.dumps(library_versions()),
    })
