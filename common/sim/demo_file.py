"""Reading and writing demonstration files in the official LIBERO HDF5 layout (see
``common/sim/demo_collection.py`` for the layout): the output check, resume counts, one demo per
atomic group write, file attributes, and the checks that a resumed file was collected the same way."""

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


def episode_seed(seed: int, task_id: int, episode_index: int) -> int:
    """Deterministic per-episode expert seed."""
    return (int(seed) * 1_000_003 + int(task_id) * 10_007 + int(episode_index)) % (2**31)


def check_resume_settings(data, out_path: Path, *, suite: str, record_images: bool, camera_size: int, layouts: str,
                          dagger_attr: str, seed: int, expert_noise: float) -> None:
    """Raise if the demos in ``data`` (an open file's ``data`` group) were collected another way than
    a ``collect_demos`` call with these settings asks for: one file, one way of collecting."""
    if data.attrs.get("suite", suite) != suite:
        raise ValueError(f"{out_path} holds {data.attrs['suite']} demos; cannot add {suite} demos")
    if not any(k.startswith("demo_") for k in data):
        return
    file_size = data.attrs.get("camera_size")  # present iff the file's demos carry images
    if (file_size is not None) != record_images or (record_images and file_size not in (None, camera_size)):
        raise ValueError(
            f"{out_path} was collected with record_images={file_size is not None}"
            f"{f', camera_size={file_size}' if file_size is not None else ''}; resume with the same settings"
        )
    found = str(data.attrs.get("layouts", "fixed"))  # files from before the attr hold fixed layouts
    if found != layouts:
        raise ValueError(f"{out_path} holds demos from {found} layouts; cannot add demos from {layouts} layouts")
    found_dagger = str(data.attrs.get("dagger", ""))
    if found_dagger != dagger_attr:
        raise ValueError(f"{out_path} holds demos with dagger={found_dagger or 'none'}; cannot add demos with "
                         f"dagger={dagger_attr or 'none'} (one file, one way of collecting)")
    # the expert's seed and noise, read back from the first demo: its seed derives from the seed base,
    # and a DART demo stores the expert's intended actions beside the executed ones
    first = data[min((k for k in data if k.startswith("demo_")), key=lambda k: int(k.split("_")[1]))]
    task, episode = int(first.attrs["task_id"]), int(first.attrs["episode_index"])
    if "seed" in first.attrs and int(first.attrs["seed"]) != episode_seed(seed, task, episode):
        raise ValueError(f"{out_path} holds demos of another expert seed base than {seed} ({first.name} has seed "
                         f"{int(first.attrs['seed'])}, expected {episode_seed(seed, task, episode)}); resume with the same --seed")
    noisy = "expert_actions" in first
    if not dagger_attr and noisy != (expert_noise > 0):
        raise ValueError(f"{out_path} holds {'DART (action-noise)' if noisy else 'noise-free'} demos; cannot add "
                         f"{'DART' if expert_noise > 0 else 'noise-free'} demos (action noise {expert_noise:g})")
