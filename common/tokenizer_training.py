"""Phase 1: train a naive or robust RFSQ action tokenizer (the pure function behind
``phase1_improved/train_rfsq_robust.py``, locally and on Modal).

Recipe: episode-level train/validation split; the action normalizer is fitted on the training
episodes only; sliding chunks (stride 1) of normalized actions; AdamW with a cosine schedule; plain
``mse_loss(recon, x)``. Each epoch appends one JSON line to ``<stem>_metrics.jsonl``, the best
validation MSE is saved as ``rfsq_robust_best.pt`` / ``rfsq_best.pt`` and every epoch as
``<stem>_last.pt`` for ``--resume``.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.action_data import load_episodes, make_chunks, split_episodes
from common.action_tokenizer import ActionRFSQAE, save_tokenizer
from common.checkpoints import CheckpointError, atomic_torch_save
from common.normalization import ActionNormalizer
from common.paths import models_dir as default_models_dir
from common.paths import tokenizer_filename
from common.provenance import provenance
from common.residual_fsq import CONDITIONINGS

LAST_KIND = "rfsq_tokenizer_training_state"
CALIBRATION_CHUNKS = 20_000
# Flags that may change between a run and its --resume (more epochs, quieter output).
_RESUMABLE_CHANGES = ("resume", "progress", "epochs", "torch_threads")


def _resume_key(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES}


@dataclass
class TokenizerTrainConfig:
    """Flags of ``train_rfsq_robust`` (same names on the local CLI and ``modal run``)."""

    use_layernorm: bool = True
    conditioning: str = ""  # "" = from --use-layernorm; or one of none/layernorm/scale/fixed
    num_episodes: int = 50
    epochs: int = 100
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    data: str = "synthetic"
    chunk_len: int = 8
    stride: int = 1
    layout: str = "chunk"
    latent_dim: int = 16
    num_layers: int = 8
    num_levels: int = 7
    val_fraction: float = 0.2
    models_dir: str = ""  # "" = $RSD_MODELS_DIR or ./artifacts/models (Modal: /models)
    resume: bool = False
    progress: bool = True
    torch_threads: int = 1  # the models are tiny: one thread is fastest on a shared laptop CPU; 0 = torch default

    def __post_init__(self):
        if self.conditioning and self.conditioning not in CONDITIONINGS:
            raise ValueError(f"--conditioning must be one of {CONDITIONINGS} or empty; got {self.conditioning!r}")
        for name in ("num_episodes", "epochs", "batch_size", "chunk_len", "stride", "latent_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1); got {self.val_fraction}")

    @property
    def resolved_conditioning(self) -> str:
        return self.conditioning or ("layernorm" if self.use_layernorm else "none")

    def output_paths(self) -> tuple[Path, Path, Path]:
        """``(best checkpoint, last-state for resume, metrics JSONL)``."""
        root = Path(self.models_dir) if self.models_dir else default_models_dir()
        best = root / tokenizer_filename(self.resolved_conditioning)
        stem = best.name.removesuffix("_best.pt")
        return best, root / f"{stem}_last.pt", root / f"{stem}_metrics.jsonl"


def build_tokenizer(cfg: TokenizerTrainConfig) -> ActionRFSQAE:
    return ActionRFSQAE(
        chunk_len=cfg.chunk_len, conditioning=cfg.resolved_conditioning, layout=cfg.layout,
        latent_dim=cfg.latent_dim, hidden_dim=cfg.latent_dim, num_layers=cfg.num_layers, num_levels=cfg.num_levels,
    )


@torch.no_grad()
def evaluate_mse(model: ActionRFSQAE, chunks: torch.Tensor, *, batch_size: int = 4096) -> float:
    """Mean squared error of the full reconstruction, in normalized action units (eval mode)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(chunks), batch_size):
        x = chunks[start : start + batch_size]
        recon, _ = model(x)
        total += F.mse_loss(recon, x, reduction="sum").item()
    model.train(was_training)
    return total / chunks.numel()


def prepare_chunks(cfg: TokenizerTrainConfig) -> dict[str, Any]:
    """Episodes -> split -> normalizer (train only) -> normalized chunk tensors."""
    episodes = load_episodes(cfg.data, num_episodes=cfg.num_episodes, seed=cfg.seed)
    train_eps, val_eps = split_episodes(episodes, val_fraction=cfg.val_fraction, seed=cfg.seed)
    normalizer = ActionNormalizer.fit(np.concatenate([e.actions for e in train_eps]))
    to_tensor = lambda eps: torch.from_numpy(normalizer.normalize(make_chunks(eps, chunk_len=cfg.chunk_len, stride=cfg.stride)))
    return {
        "normalizer": normalizer,
        "train": to_tensor(train_eps),
        "val": to_tensor(val_eps),
        "train_episodes": [e.name for e in train_eps],
        "val_episodes": [e.name for e in val_eps],
    }


def make_optimizer(model: ActionRFSQAE, cfg: TokenizerTrainConfig, num_train: int):
    """AdamW with a per-step cosine decay over the whole run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    total_steps = cfg.epochs * math.ceil(num_train / cfg.batch_size)
    schedule = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def fit_epochs(
    model: ActionRFSQAE, train: torch.Tensor, val: torch.Tensor, cfg: TokenizerTrainConfig, *,
    optimizer, scheduler, start_epoch: int = 0, desc: str = "rfsq",
) -> Iterator[dict[str, float]]:
    """The training loop; yields one metrics record per epoch (after calibration and validation)."""
    epochs = tqdm(range(start_epoch, cfg.epochs), desc=desc, disable=not cfg.progress, initial=start_epoch, total=cfg.epochs)
    # Fixed subset of training chunks for the end-of-epoch statistics calibration (robust only).
    calibration_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))[:CALIBRATION_CHUNKS]
    for epoch in epochs:
        model.train()
        # Seeded per epoch, so a resumed run shuffles exactly as an uninterrupted one.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
        running = 0.0
        for start in range(0, len(train), cfg.batch_size):
            x = train[order[start : start + cfg.batch_size]]
            if len(x) < 2:  # running statistics need >= 2 samples; a lone tail sample is skipped
                continue
            recon, _ = model(x)
            loss = F.mse_loss(recon, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(x)
        model.calibrate(train[calibration_idx])
        record = {"epoch": epoch + 1, "train_mse": running / len(train), "val_mse": evaluate_mse(model, val), "lr": scheduler.get_last_lr()[0]}
        epochs.set_postfix(train=f"{record['train_mse']:.2e}", val=f"{record['val_mse']:.2e}")
        yield record


def train_tokenizer_model(model: ActionRFSQAE, train: torch.Tensor, val: torch.Tensor, cfg: TokenizerTrainConfig, *, desc: str = "rfsq") -> ActionRFSQAE:
    """Train in memory (no files) and return the model with its best-validation weights (benchmarks)."""
    torch.manual_seed(cfg.seed)
    optimizer, scheduler = make_optimizer(model, cfg, len(train))
    best_val, best_state = float("inf"), None
    for record in fit_epochs(model, train, val, cfg, optimizer=optimizer, scheduler=scheduler, desc=desc):
        if record["val_mse"] < best_val:
            best_val, best_state = record["val_mse"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model.eval()


def train_tokenizer(cfg: TokenizerTrainConfig, *, on_checkpoint: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train one tokenizer; returns a summary (paths, best validation MSE, wall time).

    ``on_checkpoint`` runs after every checkpoint write (Modal passes ``volume.commit``).
    """
    torch.manual_seed(cfg.seed)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    best_path, last_path, metrics_path = cfg.output_paths()
    best_path.parent.mkdir(parents=True, exist_ok=True)
    data = prepare_chunks(cfg)
    train, val, normalizer = data["train"], data["val"], data["normalizer"]
    model = build_tokenizer(cfg)
    optimizer, scheduler = make_optimizer(model, cfg, len(train))
    start_epoch, best_val = 0, float("inf")

    if cfg.resume and last_path.exists():
        state = torch.load(last_path, map_location="cpu", weights_only=True)
        if state.get("kind") != LAST_KIND or _resume_key(state["config"]) != _resume_key(asdict(cfg)):
            raise CheckpointError(
                f"{last_path}: training state was written by a different configuration; rerun without --resume"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_val = int(state["epoch"]), float(state["best_val_mse"])
    elif not cfg.resume and metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log

    meta = dict(
        data=cfg.data, num_episodes=cfg.num_episodes, train_chunks=len(train), val_chunks=len(val),
        val_episodes=data["val_episodes"],
    )
    started = time.perf_counter()
    desc = f"rfsq[{cfg.resolved_conditioning}]"
    for record in fit_epochs(model, train, val, cfg, optimizer=optimizer, scheduler=scheduler, start_epoch=start_epoch, desc=desc):
        record["best"] = record["val_mse"] < best_val
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if record["best"]:
            best_val = record["val_mse"]
            save_tokenizer(
                best_path, model, normalizer,
                metrics={"val_mse": best_val, "epoch": record["epoch"], **meta},
                extra={"provenance": provenance(seed=cfg.seed), "train_config": asdict(cfg)},
            )
        atomic_torch_save(
            {
                "kind": LAST_KIND, "config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": record["epoch"], "best_val_mse": best_val,
            },
            last_path,
        )
        if on_checkpoint is not None:
            on_checkpoint()
    return {
        "conditioning": cfg.resolved_conditioning, "best_checkpoint": str(best_path), "last_state": str(last_path),
        "metrics_jsonl": str(metrics_path), "best_val_mse": best_val, "wall_seconds": time.perf_counter() - started,
        **meta,
    }
