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
from common.tokenizer.model import LAYOUTS, ActionRFSQAE, save_tokenizer
from common.data.normalization import ActionNormalizer
from common.artifacts import models_dir_of, tokenizer_paths
from common.provenance import provenance
from common.tokenizer.residual_fsq import CONDITIONINGS, REACHES
from common.locks import check_writable_dir, output_lock
from common.checkpoints import atomic_torch_save
from common.jsonl import append_jsonl
from common.training_loop import LoopSettings, RunFiles, fit_epochs, refuse_empty_resume, refuse_to_replace

LAST_KIND = "rfsq_tokenizer_training_state"
CALIBRATION_CHUNKS = 20_000
# Flags that may change between a run and its --resume (more epochs, quieter output).
_RESUMABLE_CHANGES = ("resume", "overwrite", "progress", "epochs", "torch_threads")


@dataclass
class TokenizerTrainConfig:
    """Flags of ``train_rfsq_robust`` (same names on the local CLI and ``modal run``)."""

    use_layernorm: bool = True  # robust (LayerNorm-conditioned) residual FSQ; --no-use-layernorm = naive
    conditioning: str = ""  # "" = from --use-layernorm; or one of none/layernorm/scale/fixed
    num_episodes: int = 50  # demos (episodes) read from --data, or generated for "synthetic"
    epochs: int = 100  # passes over the training chunks
    batch_size: int = 64  # chunks per optimizer step
    lr: float = 2e-3  # peak AdamW learning rate (cosine decay to 0)
    seed: int = 0  # seeds the split, the initialization and the shuffles
    data: str = "synthetic"  # "synthetic", or LIBERO-format HDF5 path(s), comma-separated
    chunk_len: int = 8  # actions per chunk (env steps; 20 Hz control)
    stride: int = 1  # steps between the starts of consecutive training chunks
    layout: str = "chunk"  # chunk (default: 16 tokens per layer) | dct (exact, 56 tokens per layer) | timestep (common/tokenizer/model.py)
    latent_dim: int = 16  # chunk: latent size; timestep: per-step size (not used by dct)
    dct_frequencies: int = 0  # dct: lowest frequencies kept per action dim; 0 = all chunk_len (exact)
    reach: str = "absmax"  # robust stages >= 1: absmax | quantile | std (residual_fsq.py)
    # Robust stages span their reach x this margin (stage 0: x --first-stage-margin too). A margin > 1
    # makes the code redundant: a stage can undo part of an error of the stage before it (a policy's
    # wrong coarse token), at the cost of a coarser step per stage.
    reach_margin: float = 1.05
    first_stage_margin: float = 1.5  # extra margin of stage 0 (its reach is the training data's largest deviation)
    num_layers: int = 8  # residual FSQ layers (tokens per chunk = layers x tokens per layer)
    num_levels: int = 7  # quantization levels per token
    val_fraction: float = 0.2  # fraction of EPISODES held out for validation (never frames)
    models_dir: str = ""  # "" = $RSD_MODELS_DIR or ./artifacts/models (Modal: /models)
    resume: bool = False  # continue from <stem>_last.pt (the same configuration; more --epochs allowed)
    overwrite: bool = False  # replace the outputs of an earlier run (default: refuse when they exist)
    progress: bool = True  # show progress bars
    torch_threads: int = 1  # the models are tiny: one thread is fastest on a shared laptop CPU; 0 = torch default

    def __post_init__(self):
        if self.conditioning and self.conditioning not in CONDITIONINGS:
            raise ValueError(f"--conditioning must be one of {CONDITIONINGS} or empty; got {self.conditioning!r}")
        if self.reach not in REACHES:
            raise ValueError(f"--reach must be one of {REACHES}; got {self.reach!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout must be one of {LAYOUTS}; got {self.layout!r}")
        if not 0 <= self.dct_frequencies <= self.chunk_len:
            raise ValueError(f"--dct-frequencies must be in [0, --chunk-len={self.chunk_len}]; got {self.dct_frequencies}")
        for name in ("num_episodes", "epochs", "batch_size", "chunk_len", "stride", "latent_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if self.reach_margin <= 0 or self.first_stage_margin <= 0:
            raise ValueError(f"--reach-margin and --first-stage-margin must be > 0; got {self.reach_margin}, {self.first_stage_margin}")
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the earlier run, --overwrite replaces it: pass one of them")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1); got {self.val_fraction}")

    @property
    def resolved_conditioning(self) -> str:
        """The one setting the quantizer takes (``--use-layernorm`` is the seed's switch for it)."""
        return self.conditioning or ("layernorm" if self.use_layernorm else "none")

    def output_paths(self) -> dict[str, Path]:
        """``best`` checkpoint, ``last`` training state for ``--resume``, ``metrics`` JSONL."""
        return tokenizer_paths(models_dir_of(self.models_dir), self.resolved_conditioning)


def build_tokenizer(cfg: TokenizerTrainConfig) -> ActionRFSQAE:
    if cfg.layout == "dct":
        return ActionRFSQAE(
            chunk_len=cfg.chunk_len, conditioning=cfg.resolved_conditioning, layout="dct",
            latent_dim=(cfg.dct_frequencies or cfg.chunk_len) * 7,
            num_layers=cfg.num_layers, num_levels=cfg.num_levels, reach=cfg.reach,
            reach_margin=cfg.reach_margin, first_stage_margin=cfg.first_stage_margin,
        )
    return ActionRFSQAE(
        chunk_len=cfg.chunk_len, conditioning=cfg.resolved_conditioning, layout=cfg.layout,
        latent_dim=cfg.latent_dim, hidden_dim=cfg.latent_dim, num_layers=cfg.num_layers, num_levels=cfg.num_levels,
        reach=cfg.reach, reach_margin=cfg.reach_margin, first_stage_margin=cfg.first_stage_margin,
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
    to_tensor = lambda eps, split: torch.from_numpy(normalizer.normalize(make_chunks(eps, chunk_len=cfg.chunk_len, stride=cfg.stride, split=split)))
    return {
        "normalizer": normalizer,
        "train": to_tensor(train_eps, "train"),
        "val": to_tensor(val_eps, "validation"),
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

    if not any(p.requires_grad for p in model.parameters()):
        return _fit_fixed_transform(model, cfg, evaluate, save_best, files, on_checkpoint)

    best_key = fit_epochs(
        model, loop_settings(cfg, desc), num_train=len(train), batch_loss=batch_loss, evaluate=evaluate, save_best=save_best,
        files=files, loss_name="train_mse", on_checkpoint=on_checkpoint,
    )
    return -best_key[0] if best_key else float("inf")


def _fit_fixed_transform(model: ActionRFSQAE, cfg: TokenizerTrainConfig, evaluate, save_best, files: RunFiles | None,
                         on_checkpoint: Callable[[], None] | None) -> float:
    """A fixed transform (``layout="dct"``) has nothing to optimize: each "epoch" is the exact calibration
    and a held-out evaluation, with the same log line, best checkpoint and resumable state as ``fit_epochs``."""
    state = files.load_state() if files is not None else None
    start = int(state["epoch"]) if state is not None else 0
    if state is None and files is not None and files.metrics_path.exists():
        files.metrics_path.unlink()
    best = -float(state["best_key"][0]) if state is not None and state.get("best_key") else float("inf")
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        ev, _ = evaluate()
        record = {"epoch": epoch + 1, "train_mse": None, **ev, "lr": 0.0, "seconds": time.perf_counter() - t0,
                  "best": ev["val_mse"] < best}
        if record["best"]:
            best = ev["val_mse"]
            save_best(ev, epoch + 1)
        if files is not None:
            append_jsonl(files.metrics_path, record)
            atomic_torch_save({"kind": files.state_kind, "config": files.config, "model": model.state_dict(),
                               "epoch": epoch + 1, "best_key": [-best], **files.checks}, files.state_path)
        if on_checkpoint is not None:
            on_checkpoint()
    return best


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
    paths = cfg.output_paths()
    refuse_empty_resume([paths["last"]], resume=cfg.resume)  # (before the folder is created: it may be a typo)
    check_writable_dir(paths["best"].parent, "--models-dir")
    stem = paths["best"].name.removesuffix(".pt")
    with output_lock(paths["best"].parent / f".{stem}.lock", f"tokenizer {paths['best']}"):
        refuse_to_replace([paths["best"], paths["last"], paths["metrics"]], resume=cfg.resume, overwrite=cfg.overwrite)
        return _train_tokenizer_locked(cfg, paths, on_checkpoint)


def _train_tokenizer_locked(cfg: TokenizerTrainConfig, paths: dict, on_checkpoint: Callable[[], None] | None) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    data = prepare_chunks(cfg)
    train, val, normalizer = data["train"], data["val"], data["normalizer"]
    model = build_tokenizer(cfg)
    meta = dict(
        data=cfg.data, num_episodes=len(data["train_episodes"]) + len(data["val_episodes"]), train_chunks=len(train), val_chunks=len(val),
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
