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
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from common.data.episodes import load_episodes, make_chunks, split_episodes
from common.tokenizer.model import ActionRFSQAE, save_tokenizer
from common.data.normalization import ActionNormalizer
from common.artifacts import models_dir_of, tokenizer_paths
from common.provenance import provenance
from common.tokenizer.residual_fsq import CONDITIONINGS
from common.training_loop import LoopSettings, RunFiles, fit_epochs

LAST_KIND = "rfsq_tokenizer_training_state"
CALIBRATION_CHUNKS = 20_000
# Flags that may change between a run and its --resume (more epochs, quieter output).
_RESUMABLE_CHANGES = ("resume", "progress", "epochs", "torch_threads")


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

    def output_paths(self) -> dict[str, Path]:
        """``best`` checkpoint, ``last`` training state for ``--resume``, ``metrics`` JSONL."""
        return tokenizer_paths(models_dir_of(self.models_dir), self.resolved_conditioning)


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


def loop_settings(cfg: TokenizerTrainConfig, desc: str = "") -> LoopSettings:
    return LoopSettings(
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, weight_decay=0.0, warmup_steps=0,
        clip_grad_norm=None, salt=0, progress=cfg.progress, desc=desc or f"rfsq[{cfg.resolved_conditioning}]",
    )


def _fit(model: ActionRFSQAE, train: torch.Tensor, val: torch.Tensor, cfg: TokenizerTrainConfig, *,
         save_best: Callable[[dict, int], None], files: RunFiles | None = None,
         on_checkpoint: Callable[[], None] | None = None, desc: str = "") -> float:
    """The shared epoch loop with the tokenizer's loss and end-of-epoch calibration; returns the best val MSE."""
    # Fixed subset of training chunks for the end-of-epoch statistics calibration (robust only).
    calibration_idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed + 1))[:CALIBRATION_CHUNKS]

    def batch_loss(idx):
        x = train[idx]
        if len(x) < 2:  # running statistics need >= 2 samples; a lone tail sample is skipped
            return None
        recon, _ = model(x)
        return F.mse_loss(recon, x)

    def evaluate():
        model.calibrate(train[calibration_idx])
        val_mse = evaluate_mse(model, val)
        return {"val_mse": val_mse}, (-val_mse,)

    best_key = fit_epochs(
        model, loop_settings(cfg, desc), num_train=len(train), batch_loss=batch_loss, evaluate=evaluate, save_best=save_best,
        files=files, loss_name="train_mse", on_checkpoint=on_checkpoint,
    )
    return -best_key[0] if best_key else float("inf")


def train_tokenizer_model(model: ActionRFSQAE, train: torch.Tensor, val: torch.Tensor, cfg: TokenizerTrainConfig, *, desc: str = "") -> ActionRFSQAE:
    """Train in memory (no files) and return the model with its best-validation weights (benchmarks)."""
    torch.manual_seed(cfg.seed)
    best: dict[str, Any] = {}
    _fit(model, train, val, cfg, save_best=lambda ev, epoch: best.update(state=copy.deepcopy(model.state_dict())), desc=desc)
    model.load_state_dict(best["state"])
    return model.eval()


def train_tokenizer(cfg: TokenizerTrainConfig, *, on_checkpoint: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train one tokenizer; returns a summary (paths, best validation MSE, wall time).

    ``on_checkpoint`` runs after every checkpoint write (Modal passes ``volume.commit``).
    """
    torch.manual_seed(cfg.seed)
    paths = cfg.output_paths()
    paths["best"].parent.mkdir(parents=True, exist_ok=True)
    data = prepare_chunks(cfg)
    train, val, normalizer = data["train"], data["val"], data["normalizer"]
    model = build_tokenizer(cfg)
    meta = dict(
        data=cfg.data, num_episodes=cfg.num_episodes, train_chunks=len(train), val_chunks=len(val),
        val_episodes=data["val_episodes"],
    )
    started = time.perf_counter()

    def save_best(ev, epoch):
        save_tokenizer(
            paths["best"], model, normalizer,
            metrics={"val_mse": ev["val_mse"], "epoch": epoch, **meta},
            extra={"provenance": provenance(seed=cfg.seed), "train_config": asdict(cfg)},
        )

    files = RunFiles(
        state_path=paths["last"], metrics_path=paths["metrics"], state_kind=LAST_KIND, config=asdict(cfg),
        resumable_changes=_RESUMABLE_CHANGES, resume=cfg.resume, checks={},
    )
    best_val = _fit(model, train, val, cfg, save_best=save_best, files=files, on_checkpoint=on_checkpoint)
    return {
        "conditioning": cfg.resolved_conditioning, "best_checkpoint": str(paths["best"]), "last_state": str(paths["last"]),
        "metrics_jsonl": str(paths["metrics"]), "best_val_mse": best_val, "wall_seconds": time.perf_counter() - started,
        **meta,
    }
