"""Episodes of actions (and aligned observations), from LIBERO-format HDF5 or a synthetic generator.

One reader serves the official LIBERO demonstration files and the ones our scripted expert writes
(same layout: ``data/demo_N/actions`` ``[T, 7]``, optional ``obs/low_dim``). Splits are by
**episode**, never by frame: neighbouring frames of one episode are nearly identical, so a frame
split leaks the validation set into training.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.data.normalization import ACTION_DIM, check_actions

SYNTHETIC = "synthetic"


@dataclass
class Episode:
    # [T, 7] raw env actions: what the expert intended at each step (the labels), which for demos
    # collected with action noise (DART) differ from the executed ones kept in ``executed_actions``
    actions: np.ndarray
    task_id: int = 0
    instruction: str = ""
    low_dim_obs: np.ndarray | None = None  # [T, D] fixed-layout state vector, when recorded
    name: str = ""
    attrs: dict = field(default_factory=dict)
    executed_actions: np.ndarray | None = None  # [T, 7] when they differ from ``actions`` (DART demos)

    def __len__(self) -> int:
        return int(self.actions.shape[0])


# --- LIBERO HDF5 -------------------------------------------------------------------------------
def _demo_sort_key(name: str) -> tuple[int, str]:
    m = re.fullmatch(r"demo_(\d+)", name)
    return (int(m.group(1)) if m else 1 << 30, name)


def _attr_str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _instruction_from_attrs(data_attrs, demo_attrs) -> str:
    if "language_instruction" in demo_attrs:
        return _attr_str(demo_attrs["language_instruction"])
    if "language_instruction" in data_attrs:
        return _attr_str(data_attrs["language_instruction"])
    if "problem_info" in data_attrs:  # official LIBERO files: json with "language_instruction"
        info = json.loads(_attr_str(data_attrs["problem_info"]))
        return str(info.get("language_instruction", ""))
    return ""


def _dataset(demo, key: str, path: Path, name: str) -> np.ndarray:
    """``demo[key]`` read as an array; anything else (a group where a dataset belongs) names the file and demo."""
    import h5py

    node = demo[key]
    if not isinstance(node, h5py.Dataset):
        raise ValueError(f"{path}:data/{name}/{key}: expected a dataset (an array), found an HDF5 {type(node).__name__.lower()}")
    return node[()]


def _observations(demo, path: Path, name: str) -> np.ndarray:
    """``obs/low_dim`` as float32 ``[T, D]``, checked finite here, where the file and demo are known: a
    NaN in a demo that lands in the validation split would otherwise pass silently (NaN held-out
    metrics, checkpoints still written), and one in the training split fail far from its source."""
    where = f"{path}:data/{name}/obs/low_dim"
    obs = np.asarray(_dataset(demo, "obs/low_dim", path, name))
    if obs.ndim != 2 or obs.size == 0:
        raise ValueError(f"{where}: observations must be a non-empty [T, D] array; got shape {obs.shape}")
    if not np.issubdtype(obs.dtype, np.number):
        raise ValueError(f"{where}: observations must be numbers; got dtype {obs.dtype}")
    obs = obs.astype(np.float32)
    bad = ~np.isfinite(obs).all(axis=-1)
    if bad.any():
        raise ValueError(f"{where}: observations contain NaN/inf in {int(bad.sum())} of {len(obs)} rows (first: row {int(np.argmax(bad))})")
    return obs


def load_hdf5_episodes(path: str | Path, *, num_episodes: int | None = None) -> list[Episode]:
    """Read ``data/demo_N`` episodes from a LIBERO-format HDF5 file, in (task, episode index) order when
    the demos record them (our collector's files), else by N (official files).

    ``num_episodes`` keeps the first N demos. Every problem raises one ``ValueError`` naming the file.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (generate demos with `python -m phase1_improved.collect_demos`)")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, expected a LIBERO-format HDF5 demo file")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path}: {'an empty file' if path.stat().st_size == 0 else 'not an HDF5 file'}, expected a LIBERO-format HDF5 demo file")
    episodes: list[Episode] = []
    clipped_rows = 0
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path}: no 'data' group (expected the LIBERO layout data/demo_N/actions)")
        data = f["data"]
        names = sorted((k for k in data.keys() if k.startswith("demo")), key=_demo_sort_key)
        if not names:
            raise ValueError(f"{path}: 'data' group holds no demos (expected data/demo_N)")
        if all("episode_index" in data[n].attrs and "task_id" in data[n].attrs for n in names):
            # IMPORTANT: parallel collection writes demos in the order workers finish them, which
            # varies from run to run; (task, episode index) is fixed by the seed, so every later
            # split and label sees the same episodes in the same order whatever the timing was.
            names.sort(key=lambda n: (int(data[n].attrs["task_id"]), int(data[n].attrs["episode_index"]), _demo_sort_key(n)))
        if num_episodes is not None:
            if num_episodes < 1:
                raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
            names = names[:num_episodes]
        for name in names:
            demo = data[name]
            if "actions" not in demo:
                raise ValueError(f"{path}: data/{name} has no 'actions' dataset")
            actions = check_actions(_dataset(demo, "actions", path, name), where=f"{path}:data/{name}/actions")
            executed = None
            if "expert_actions" in demo:  # DART demos: learn the expert's intent, keep what was executed
                executed = actions
                actions = check_actions(_dataset(demo, "expert_actions", path, name), where=f"{path}:data/{name}/expert_actions")
                if actions.shape != executed.shape:
                    raise ValueError(f"{path}:data/{name}: expert_actions {actions.shape} and actions {executed.shape} differ in shape")
            if actions.ndim != 2:
                raise ValueError(f"{path}:data/{name}/actions must be [T, {ACTION_DIM}]; got {actions.shape}")
            low_dim = _observations(demo, path, name) if "obs/low_dim" in demo else None
            outside = int((np.abs(actions) > 1.0).any(axis=-1).sum()) if actions.ndim == 2 else 0
            if outside:
                clipped_rows += outside
            episodes.append(
                Episode(
                    actions=actions,
                    task_id=int(demo.attrs.get("task_id", data.attrs.get("task_id", 0))),
                    instruction=_instruction_from_attrs(data.attrs, demo.attrs),
                    low_dim_obs=low_dim,
                    name=name,
                    attrs={k: _attr_str(v) if isinstance(v, bytes) else v for k, v in demo.attrs.items()},
                    executed_actions=executed,
                )
            )
    if clipped_rows:
        total = sum(len(e) for e in episodes)
        warnings.warn(
            f"{path}: {clipped_rows} of {total} action rows have values outside [-1, 1] (LIBERO clips them when "
            "executed; the action normalizer clips them to its q01/q99 range)", stacklevel=2,
        )
    return episodes


# --- synthetic -----------------------------------------------------------------------------------
def _min_jerk(n: int) -> np.ndarray:
    """Velocity profile of a minimum-jerk move over ``n`` steps (sums to 1)."""
    t = (np.arange(n) + 0.5) / n
    v = 30 * t**2 * (1 - t) ** 2
    return v / v.sum()


def synthetic_episodes(num_episodes: int, *, seed: int = 0, length: tuple[int, int] = (90, 160)) -> list[Episode]:
    """Smooth pick-and-place-like action sequences (varied speeds, pauses, gripper toggles).

    Each episode: reach a random object, descend, close the gripper, lift, carry, lower, open,
    retreat; moves follow minimum-jerk velocity profiles at random speeds, with random pauses,
    occasional small wrist turns and a little controller jitter. Actions are deltas in the LIBERO range ([-1, 1], gripper ±1).
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be >= 1, got {num_episodes}")
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(num_episodes):
        target_len = int(rng.integers(length[0], length[1] + 1))
        moves = [  # (displacement, gripper during the move)
            (np.r_[rng.uniform(-0.3, 0.3, 2), rng.uniform(0.0, 0.1)], -1.0),  # reach above the object
            (np.r_[rng.normal(0, 0.01, 2), -rng.uniform(0.1, 0.2)], -1.0),  # descend
            (np.zeros(3), 1.0),  # grasp (pause while closing)
            (np.r_[rng.normal(0, 0.01, 2), rng.uniform(0.15, 0.25)], 1.0),  # lift
            (np.r_[rng.uniform(-0.4, 0.4, 2), rng.normal(0, 0.02)], 1.0),  # carry
            (np.r_[rng.normal(0, 0.01, 2), -rng.uniform(0.1, 0.2)], 1.0),  # lower
            (np.zeros(3), -1.0),  # release
            (np.r_[rng.normal(0, 0.02, 2), rng.uniform(0.1, 0.2)], -1.0),  # retreat
        ]
        weights = rng.uniform(0.6, 1.6, len(moves))
        steps = np.maximum(4, (weights / weights.sum() * target_len).astype(int))
        rows = []
        for (disp, grip), n in zip(moves, steps):
            # Velocity command: unit direction x min-jerk bell (peak 1) x a random peak speed.
            bell = _min_jerk(n)[:, None] / _min_jerk(n).max()
            direction = disp / max(np.linalg.norm(disp), 1e-9)
            xyz = bell * direction * rng.uniform(0.3, 0.9) if np.any(disp) else np.zeros((n, 3))
            # Wrist rotation: occasional small smooth turns (orienting to the object), else still.
            rot = bell * rng.normal(0, 0.15, 3) if rng.random() < 0.5 else np.zeros((n, 3))
            grip_col = np.full((n, 1), grip)
            rows.append(np.concatenate([xyz, rot, grip_col], axis=1))
            if rng.random() < 0.3:  # hesitation: a short pause with the gripper held
                k = int(rng.integers(2, 8))
                rows.append(np.concatenate([np.zeros((k, 6)), np.full((k, 1), grip)], axis=1))
        actions = np.concatenate(rows).astype(np.float32)
        actions[:, :6] += rng.normal(0, 0.002, actions[:, :6].shape).astype(np.float32)  # controller jitter
        actions[:, :6] = np.clip(actions[:, :6], -1.0, 1.0)
        episodes.append(Episode(actions=actions, task_id=0, instruction="synthetic pick and place", name=f"synthetic_{i}"))
    return episodes


def load_episodes(data: str | Path, *, num_episodes: int | None = None, seed: int = 0) -> list[Episode]:
    """``data``: ``"synthetic"`` (``num_episodes`` generated episodes), an HDF5 path, or several
    comma-separated paths — then episodes are taken round-robin across the files, so the first
    ``num_episodes`` cover every file (e.g. libero_object + libero_spatial demos)."""
    if str(data) == SYNTHETIC:
        return synthetic_episodes(num_episodes or 50, seed=seed)
    paths = [p.strip() for p in str(data).split(",") if p.strip()]
    if len(paths) == 1:
        episodes = load_hdf5_episodes(paths[0], num_episodes=num_episodes)
    else:
        per_file = [load_hdf5_episodes(p) for p in paths]
        for path, eps in zip(paths, per_file):
            for e in eps:
                e.name = f"{Path(path).stem}/{e.name}"
        interleaved = [e for group in itertools.zip_longest(*per_file) for e in group if e is not None]
        episodes = interleaved[:num_episodes] if num_episodes else interleaved
    if num_episodes and len(episodes) < num_episodes:
        warnings.warn(f"--num-episodes {num_episodes}: {data} holds only {len(episodes)} demos; using all {len(episodes)}", stacklevel=2)
    return episodes


# --- splitting and chunking ----------------------------------------------------------------------
def split_episodes(episodes: list[Episode], *, val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Episode], list[Episode]]:
    """Episode-level random split; at least one episode on each side."""
    if len(episodes) < 2:
        raise ValueError(f"need >= 2 episodes for a train/validation split; got {len(episodes)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(episodes))
    n_val = min(len(episodes) - 1, max(1, round(len(episodes) * val_fraction)))
    val_idx = set(order[:n_val].tolist())
    train = [e for i, e in enumerate(episodes) if i not in val_idx]
    val = [e for i, e in enumerate(episodes) if i in val_idx]
    return train, val


def make_chunks(episodes: list[Episode], *, chunk_len: int, stride: int = 1, split: str = "") -> np.ndarray:
    """Sliding windows ``[N, chunk_len, 7]`` of raw actions, inside each episode (no padding).

    Episodes shorter than one chunk give no window: they are counted in a warning; if no episode of
    ``split`` (e.g. "validation", for the messages) is long enough, that is an error naming them."""
    if chunk_len < 1 or stride < 1:
        raise ValueError(f"chunk_len and stride must be >= 1; got {chunk_len}, {stride}")
    which = f"{split} split" if split else "episode set"
    short = [e for e in episodes if len(e) < chunk_len]
    if len(short) == len(episodes):
        listed = ", ".join(f"{e.name or '?'} ({len(e)} steps)" for e in short[:5]) + (" ..." if len(short) > 5 else "")
        raise ValueError(
            f"chunk_len={chunk_len}: every episode of the {which} is shorter than one chunk "
            f"({len(short)} episode(s): {listed or 'none'}); use more episodes, another --seed for the split, or a smaller --chunk-len"
        )
    if short:
        warnings.warn(
            f"{len(short)} of {len(episodes)} episodes of the {which} are shorter than chunk_len={chunk_len} and give no "
            f"chunk ({', '.join(e.name or '?' for e in short[:5])}{' ...' if len(short) > 5 else ''})", stacklevel=2,
        )
    chunks = [
        e.actions[s : s + chunk_len] for e in episodes for s in range(0, len(e) - chunk_len + 1, stride)
    ]
    return np.stack(chunks).astype(np.float32)


def future_chunks(actions: np.ndarray, *, chunk_len: int) -> np.ndarray:
    """The chunk starting at every step: ``[T, chunk_len, 7]``.

    Near the episode end the window runs past the last action; it is padded by repeating the last
    action (the policy's target is then "keep doing what the demo did last", the usual convention of
    action-chunking policies), so every step has a label.
    """
    actions = np.asarray(actions, np.float32)
    padded = np.concatenate([actions, np.repeat(actions[-1:], chunk_len - 1, axis=0)])
    idx = np.arange(len(actions))[:, None] + np.arange(chunk_len)[None, :]
    return padded[idx]
