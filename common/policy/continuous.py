"""The continuous-action baseline: the ceiling of what the token policy's data and observation allow.

On exactly the train / held-out split a Phase 2 head was trained on (``load_reference_data``: its demo
files, ``val_episode_keys``, task table and tokenizer, whose action normalizer and chunk length define
the targets), the same ``StateBackbone`` feeds an MLP that regresses the normalized action chunk starting
at each step (``ChunkRegressor``, MSE, ``train_regressor``). No tokens: whatever this policy cannot do in
closed loop, the tokenizer and token head cannot be blamed for. ``ContinuousPolicy`` has ``TokenPolicy``'s
interface, so the evaluation's episode loop runs it (``common/eval/continuous.py``).

Training keeps its own short loop rather than ``common.training_loop.fit_epochs``: that loop reshuffles
with a per-epoch seed and schedules by LambdaLR, so it would give other weights for the same seed than
the committed results (one shuffling generator over all epochs, ``CosineAnnealingLR``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from common.artifacts import policy_paths
from common.checkpoints import read_checkpoint
from common.data.episodes import future_chunks
from common.data.normalization import ACTION_DIM, ActionNormalizer
from common.policy.backbones.state import StateBackbone
from common.policy.labels import load_policy_episodes
from common.policy.model import HEAD_KIND
from common.provenance import REPO_ROOT


# --- data: the head's own split --------------------------------------------------------------------
def _existing(path: str, head_path: Path, what: str) -> Path:
    """A path recorded in a checkpoint (relative to where training ran: the repo root, usually)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{head_path}: its {what} {path} is not found (relative to {Path.cwd()} or {REPO_ROOT})")


def step_arrays(chosen: list[dict], normalizer: ActionNormalizer, chunk_len: int) -> dict[str, torch.Tensor]:
    """Episodes -> per-step ``inputs`` [N, D] (obs/low_dim), ``task_ids`` [N], ``targets`` [N, chunk_len, 7]
    (the normalized future chunk of ``Episode.actions`` starting at each step)."""
    inputs, task_ids, targets = [], [], []
    for item in chosen:
        ep = item["episode"]
        if ep.low_dim_obs is None or ep.low_dim_obs.shape[0] != len(ep):
            found = "none" if ep.low_dim_obs is None else f"{ep.low_dim_obs.shape[0]} rows"
            raise ValueError(f"{item['file']}: data/{ep.name}: expected obs/low_dim with {len(ep)} rows (one per action), found {found}")
        inputs.append(ep.low_dim_obs.astype(np.float32))
        task_ids.append(np.full(len(ep), item["task_index"], np.int64))
        targets.append(normalizer.normalize(future_chunks(ep.actions, chunk_len=chunk_len)))
    return {"inputs": torch.from_numpy(np.concatenate(inputs)), "task_ids": torch.from_numpy(np.concatenate(task_ids)),
            "targets": torch.from_numpy(np.concatenate(targets))}


def load_reference_data(models_dir: Path, tag: str = "") -> dict[str, Any]:
    """Everything the head ``best_rfsq_head{_tag}.pt`` of ``models_dir`` was trained on: train / held-out
    step arrays, task table, normalizer, chunk length, backbone config (and the files they came from)."""
    from common.tokenizer.model import load_tokenizer

    head_path = policy_paths(models_dir, models_dir, tag)["head"]
    ckpt = read_checkpoint(head_path, kind=HEAD_KIND)
    train_cfg, metrics, config = ckpt["extra"]["train_config"], ckpt["metrics"], ckpt["config"]
    if config.get("backbone_kind") != "state":
        raise ValueError(f"{head_path}: expected a head trained on the state backbone, found {config.get('backbone_kind')!r}")
    held_out_keys = set(metrics.get("val_episode_keys") or [])
    if not held_out_keys:
        raise ValueError(f"{head_path}: expected val_episode_keys in its metrics, found none (retrain Phase 2 with this code)")
    recorded = ckpt["extra"]["tokenizer_path"]
    tok_path = models_dir / Path(recorded).name if (models_dir / Path(recorded).name).exists() else _existing(recorded, head_path, "tokenizer")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.content_hash != ckpt["extra"]["tokenizer_hash"]:
        raise ValueError(f"{head_path}: trained against tokenizer {ckpt['extra']['tokenizer_hash']}, but {tok_path} is {tokenizer.content_hash}")
    data_paths = [str(_existing(p.strip(), head_path, "demo file")) for p in train_cfg["data"].split(",") if p.strip()]
    chosen, task_table = load_policy_episodes(data_paths, num_episodes=int(train_cfg.get("num_episodes", 0)))
    # Episode keys are "<file stem>/<demo>", independent of where the file lies now.
    train = [c for c in chosen if c["key"] not in held_out_keys]
    held_out = [c for c in chosen if c["key"] in held_out_keys]
    expected = (metrics.get("train_episodes", len(train)), len(held_out_keys))
    if (len(train), len(held_out)) != expected:
        raise ValueError(f"{head_path}: expected {expected[0]} train / {expected[1]} held-out episodes, found {len(train)} / {len(held_out)} in {data_paths}")
    if [(r["suite"], r["task_id"]) for r in task_table] != [(r["suite"], r["task_id"]) for r in config["task_table"]]:
        raise ValueError(f"{head_path}: expected its task table {config['task_table']}, the demo files give {task_table}")
    chunk_len = int(tokenizer.model.chunk_len)
    return {
        "head": str(head_path), "tokenizer": str(tok_path), "data": data_paths, "task_table": config["task_table"],
        "normalizer": tokenizer.normalizer, "chunk_len": chunk_len, "backbone_config": config["backbone_config"],
        "train": step_arrays(train, tokenizer.normalizer, chunk_len), "held_out": step_arrays(held_out, tokenizer.normalizer, chunk_len),
        "train_episodes": len(train), "held_out_episodes": len(held_out),
    }


# --- model and training ------------------------------------------------------------------------------
class ChunkRegressor(nn.Module):
    """StateBackbone features -> MLP -> the normalized action chunk [B, chunk_len, 7]."""

    def __init__(self, backbone_config: dict, *, chunk_len: int, hidden: int = 512, hidden_layers: int = 2) -> None:
        super().__init__()
        self.backbone = StateBackbone(**backbone_config)
        self.chunk_len = int(chunk_len)
        layers, width = [], self.backbone.feature_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, self.chunk_len * ACTION_DIM))

    def forward(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.backbone(obs, task_ids)).view(-1, self.chunk_len, ACTION_DIM)


@torch.no_grad()
def chunk_mse(model: ChunkRegressor, split: dict[str, torch.Tensor], batch_size: int = 4096) -> float:
    """Mean squared error over every step, chunk position and action dim (normalized units)."""
    model.eval()
    total = 0.0
    for s in range(0, len(split["targets"]), batch_size):
        pred = model(split["inputs"][s : s + batch_size], split["task_ids"][s : s + batch_size])
        total += float(((pred - split["targets"][s : s + batch_size]) ** 2).sum())
    return total / split["targets"].numel()


def train_regressor(model: ChunkRegressor, train: dict, held_out: dict, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
                    weight_decay: float = 0.01, seed: int = 0, progress: bool = True) -> list[dict]:
    """AdamW + cosine schedule; per epoch the running train MSE and the held-out MSE. Leaves the model
    holding the weights of the epoch with the lowest held-out MSE (as Phase 2 keeps its best checkpoint)."""
    torch.manual_seed(seed)
    model.backbone.fit_normalizer(train["inputs"])
    n = len(train["targets"])
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    history, best = [], (float("inf"), None)
    bar = tqdm(range(1, epochs + 1), desc="train continuous reference", disable=not progress)
    for epoch in bar:
        model.train()
        order, seen, loss_sum = torch.randperm(n, generator=gen), 0, 0.0
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            loss = nn.functional.mse_loss(model(train["inputs"][idx], train["task_ids"][idx]), train["targets"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
        held = chunk_mse(model, held_out)
        history.append({"epoch": epoch, "train_mse": loss_sum / seen, "held_out_mse": held})
        if held < best[0]:
            best = (held, {k: v.detach().clone() for k, v in model.state_dict().items()})
        bar.set_postfix(train=f"{loss_sum / seen:.2e}", held_out=f"{held:.2e}")
    model.load_state_dict(best[1])
    model.eval()
    return history


# --- the policy the closed loop runs (TokenPolicy's interface) ------------------------------------
class ContinuousPolicy:
    """``plan(low-dim obs, task index)`` -> (raw actions [chunk_len, 7], info), like ``TokenPolicy``."""

    cameras: tuple[str, ...] = ()
    camera_size = 128

    def __init__(self, model: ChunkRegressor, normalizer: ActionNormalizer, task_table: list[dict]) -> None:
        self.model, self.normalizer, self.task_table = model.eval(), normalizer, task_table

    def policy_input(self, env, obs: dict[str, np.ndarray]) -> np.ndarray:
        return env.low_dim_obs(obs)

    def task_index(self, suite: str, task_id: int, instruction: str) -> int:
        hits = [r for r in self.task_table if r["instruction"].strip().lower() == instruction.strip().lower() and r["suite"] in ("", suite)]
        if len(hits) != 1:
            raise KeyError(f"task ({suite}, {task_id}, {instruction!r}): expected one match in the trained task table, found {len(hits)}")
        return int(hits[0]["index"])

    @torch.no_grad()
    def plan(self, observation: np.ndarray, task_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        started = time.perf_counter()
        obs = torch.as_tensor(np.asarray(observation, np.float32))[None]
        normalized = self.model(obs, torch.tensor([int(task_index)]))[0].numpy()
        return self.normalizer.unnormalize(normalized), {"policy_s": time.perf_counter() - started}
