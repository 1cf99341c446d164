"""Phase 2 data: demo episodes -> per-step model inputs, task indices and RFSQ token labels.

* One HDF5 file or several (LIBERO layout ``data/demo_N/actions``, ``obs/low_dim``, per-demo attrs
  ``task_id`` / ``language_instruction``). Policy task indices are unique per task, (suite, task_id)
  (per (file, task_id) for a file that names no suite), so two files of one suite's task (e.g. clean
  and DART demos) share its index; the table is recorded in every checkpoint (``config["task_table"]``).
* ``num_episodes`` caps the TOTAL number of demos, taken round-robin over the (file, task) groups in
  demo order, so a cap keeps every task represented; a cap above the demos available warns and
  uses them all (the training summary records the number used).
* Label of step t = the tokenizer's codes of the action chunk that starts at t (``future_chunks``:
  actions t..t+chunk_len-1; near the episode end the window is padded by repeating the episode's last
  action, so every step has a label), normalized with the tokenizer checkpoint's own normalizer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common.data.episodes import future_chunks, load_hdf5_episodes
from common.policy.feature_cache import read_cached_features
from common.tokenizer.model import LoadedTokenizer

LABEL_CONVENTION = "codes of the chunk starting at each step; episode end padded by repeating the last action"


@dataclass
class PolicyData:
    """Per-step tensors of one split (all on CPU)."""

    inputs: torch.Tensor  # [N, D] low-dim obs (state) or cached features (openvla-oft)
    task_ids: torch.Tensor  # [N] policy task index
    codes: torch.Tensor  # [N, T, L] uint8/int16 tokenizer codes of the chunk starting at each step
    episodes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.codes.shape[0])


def file_suite(path: str) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        value = f["data"].attrs.get("suite", "") if "data" in f else ""
    return value.decode() if isinstance(value, bytes) else str(value)


def load_policy_episodes(data_paths: list[str], *, num_episodes: int = 0) -> tuple[list[dict], list[dict]]:
    """Read every file; returns (episodes, task_table).

    episode dict: ``episode`` (``Episode``), ``file_index``, ``file``, ``task_index``, ``key``
    (``<file stem>/<demo name>``). task_table rows: ``index, file, file_stem, suite, task_id,
    instruction`` (index = position in the table = the policy's task index; ``file`` / ``file_stem``:
    the first file holding the task, ``files``: every one).
    """
    groups: dict[tuple[int, int], list] = {}
    task_table: list[dict] = []
    row_of: dict[tuple, dict] = {}  # task identity -> its row
    index_of: dict[tuple[str, int], int] = {}  # (file stem, task_id) -> policy task index
    stems = [Path(p).stem for p in data_paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"--data files must have distinct names (episodes are keyed by file stem); got {data_paths}")
    for fi, path in enumerate(data_paths):
        eps = load_hdf5_episodes(path)  # first: it names the file for every problem (missing, not HDF5, ...)
        suite = file_suite(path)
        for ep in eps:
            key = (fi, ep.task_id)
            if key not in groups:
                groups[key] = []
            groups[key].append(ep)
        for task_id in sorted({ep.task_id for ep in eps}):
            instr = next(ep.instruction for ep in eps if ep.task_id == task_id)
            identity = (suite, int(task_id)) if suite else (f"file:{stems[fi]}", int(task_id))
            row = row_of.get(identity)
            if row is None:
                row = row_of[identity] = {
                    "index": len(task_table), "file": str(path), "file_stem": stems[fi], "suite": suite,
                    "task_id": int(task_id), "instruction": instr, "files": [],
                }
                task_table.append(row)
            elif row["instruction"].strip().lower() != instr.strip().lower():
                raise ValueError(f"{suite} task {task_id}: {row['file']} says {row['instruction']!r}, {path} says {instr!r}")
            row["files"].append(str(path))
            index_of[(stems[fi], int(task_id))] = row["index"]
    available = sum(len(v) for v in groups.values())
    if num_episodes > available:
        warnings.warn(
            f"--num-episodes {num_episodes}: --data holds only {available} demos; using all {available} "
            "(the summary records the number used)", stacklevel=2,
        )
    order = sorted(groups, key=lambda k: (index_of[(stems[k[0]], k[1])], k[0]))
    limit = num_episodes if num_episodes > 0 else sum(len(v) for v in groups.values())
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(groups[k]) for k in order):
        for k in order:
            if depth < len(groups[k]) and len(chosen) < limit:
                ep = groups[k][depth]
                chosen.append({
                    "episode": ep, "file_index": k[0], "file": data_paths[k[0]],
                    "task_index": index_of[(stems[k[0]], k[1])], "key": f"{stems[k[0]]}/{ep.name}",
                })
        depth += 1
    return chosen, task_table


@torch.no_grad()
def encode_labels(tokenizer: LoadedTokenizer, actions: np.ndarray, *, batch_size: int = 4096) -> torch.Tensor:
    """Codes ``[T, tokens_per_layer, num_layers]`` of the chunk starting at every step (see module doc)."""
    model = tokenizer.model
    chunks = future_chunks(actions, chunk_len=model.chunk_len)
    x = torch.from_numpy(tokenizer.normalizer.normalize(chunks))
    dtype = torch.uint8 if model.num_levels <= 256 else torch.int16
    out = [model.encode(x[s : s + batch_size]).to(dtype) for s in range(0, len(x), batch_size)]
    return torch.cat(out)


def build_split(
    tokenizer: LoadedTokenizer, chosen: list[dict], *, backbone: str, data_paths: list[str], feature_cache_paths: list[Path]
) -> PolicyData:
    """Episodes -> per-step inputs (``obs/low_dim`` for the state backbone, cached features for
    openvla-oft), task ids and codes."""
    inputs: list[np.ndarray] = []
    if backbone == "state":
        for item in chosen:
            ep = item["episode"]
            if ep.low_dim_obs is None:
                raise ValueError(
                    f"{item['file']}: data/{ep.name} has no obs/low_dim; --backbone state needs the low-dimensional "
                    "observations our collector writes (`python -m phase1_improved.collect_demos`); for other "
                    "files use --backbone openvla-oft with a feature cache"
                )
            if ep.low_dim_obs.shape[0] != len(ep):
                raise ValueError(f"{item['file']}: data/{ep.name}: obs/low_dim has {ep.low_dim_obs.shape[0]} rows, actions {len(ep)}")
            inputs.append(ep.low_dim_obs)
        dims = {a.shape[1] for a in inputs}
        if len(dims) != 1:
            raise ValueError(f"obs/low_dim sizes differ between demos/files: {sorted(dims)}")
    else:
        caches = feature_cache_paths
        by_file: dict[int, list[dict]] = {}
        for item in chosen:
            by_file.setdefault(item["file_index"], []).append(item)
        feats: dict[str, np.ndarray] = {}
        for fi, items in by_file.items():
            arrays = read_cached_features(
                caches[fi], [i["episode"].name for i in items], [len(i["episode"]) for i in items], data_paths[fi]
            )
            feats.update({i["key"]: a for i, a in zip(items, arrays)})
        inputs = [feats[i["key"]] for i in chosen]
        dims = {a.shape[1] for a in inputs}
        if len(dims) != 1:
            raise ValueError(f"cached feature sizes differ between files: {sorted(dims)}")
    codes = [encode_labels(tokenizer, item["episode"].actions) for item in chosen]
    task_ids = [np.full(len(item["episode"]), item["task_index"], np.int64) for item in chosen]
    return PolicyData(
        inputs=torch.from_numpy(np.concatenate(inputs).astype(np.float32)),
        task_ids=torch.from_numpy(np.concatenate(task_ids)),
        codes=torch.cat(codes),
        episodes=[item["key"] for item in chosen],
    )



def batches(n: int, batch_size: int):
    """Consecutive slices covering ``range(n)``."""
    for s in range(0, n, batch_size):
        yield slice(s, min(s + batch_size, n))
