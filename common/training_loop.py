"""The one epoch loop every trainer uses (tokenizer, main model, draft): AdamW with warmup + cosine,
seeded per-epoch shuffling, held-out evaluation, one JSONL line per epoch, the best checkpoint, and a
``*_last.pt`` training state that ``--resume`` continues exactly as an uninterrupted run would.
A fresh run refuses to replace an earlier run's outputs unless told to (``refuse_to_replace``);
``--resume`` with no state to continue is refused (``refuse_empty_resume``); a resume is keyed on
the settings that change training, not on folders (a copied models folder resumes), and a refusal
names each differing setting with both values.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from common.checkpoints import CheckpointError, atomic_torch_save, read_training_state
from common.jsonl import append_jsonl, dumps_row, read_jsonl


@dataclass(frozen=True)
class LoopSettings:
    """What the loop needs from a trainer's config."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warmup, then cosine decay to 0 over the whole run
    clip_grad_norm: float | None = None
    salt: int = 0  # separates the shuffles of stages that share a seed
    progress: bool = True
    desc: str = "train"


def make_optimizer(model: nn.Module, s: LoopSettings, num_train: int):
    """AdamW with ``warmup_steps`` of linear warmup, then a per-step cosine decay to the end of the run."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    total = max(1, s.epochs * math.ceil(num_train / s.batch_size))
    warmup = s.warmup_steps

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def epoch_order(num_train: int, s: LoopSettings, epoch: int) -> torch.Tensor:
    # seeded per epoch, so a resumed run shuffles exactly as an uninterrupted one
    return torch.randperm(num_train, generator=torch.Generator().manual_seed(s.seed * 100_003 + s.salt * 7_919 + epoch))


def refuse_to_replace(paths: list[Path], *, resume: bool, overwrite: bool) -> None:
    """A fresh run (neither ``--resume`` nor ``--overwrite``) never replaces an earlier run's
    checkpoints or metrics log: a 1-epoch run must not silently replace a 14-epoch one."""
    if resume or overwrite:
        return
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        raise FileExistsError(
            f"{', '.join(existing)}: outputs of an earlier run exist; pass --resume to continue that run "
            "or --overwrite to replace it (or choose another --models-dir)"
        )


def refuse_empty_resume(states: list[Path], *, resume: bool) -> None:
    """``--resume`` with no training state to continue is an error, not a silent fresh start: a typo
    in ``--models-dir`` must not cost a user the run they meant to continue."""
    if not resume or any(Path(p).exists() for p in states):
        return
    folders = sorted({str(Path(p).parent) for p in states})
    raise FileNotFoundError(
        f"--resume: nothing to resume in {', '.join(folders)}: no training state ({', '.join(Path(p).name for p in states)}; "
        "one is written after each epoch); check --models-dir, or rerun without --resume to start from scratch"
    )


# Where a run reads and writes, not what it learns: they stay out of the resume key, so a models folder
# copied or moved elsewhere resumes. (What a Phase 2 stage trains against is pinned by content, the
# tokenizer's and head's hashes in ``RunFiles.checks``, not by path; a feature cache holds what --data does.)
LOCATION_SETTINGS = ("models_dir", "results_dir", "data_dir", "rfsq_checkpoint", "feature_cache")
_UNSET = "(not recorded)"


def resume_key(config: dict, resumable_changes: tuple[str, ...]) -> dict:
    """The settings that change training and so must match for ``--resume`` (the others, and the
    folders of ``LOCATION_SETTINGS``, may change between runs)."""
    return {k: v for k, v in config.items() if k not in resumable_changes and k not in LOCATION_SETTINGS}


def resume_differences(saved: dict, current: dict) -> list[str]:
    """``--flag <this run's value> (saved run: <its value>)`` for every setting that differs."""
    return [f"--{k.replace('_', '-')} {current.get(k, _UNSET)!r} (saved run: {saved.get(k, _UNSET)!r})"
            for k in sorted(set(saved) | set(current)) if saved.get(k, _UNSET) != current.get(k, _UNSET)]


@dataclass
class RunFiles:
    """Where one trainer keeps its training state and metrics log, and how it checks a resume."""

    state_path: Path
    metrics_path: Path
    state_kind: str
    config: dict  # asdict(train config), stored with the state
    resumable_changes: tuple[str, ...]
    resume: bool
    checks: dict  # hashes of what this stage was trained against; must match on resume

    def load_state(self) -> dict | None:
        if not (self.resume and self.state_path.exists()):
            return None
        state = read_training_state(self.state_path, kind=self.state_kind)
        differ = resume_differences(resume_key(state["config"], self.resumable_changes), resume_key(self.config, self.resumable_changes))
        if differ:
            raise CheckpointError(
                f"{self.state_path}: cannot resume, a different configuration: {'; '.join(differ)}; rerun with the saved "
                f"value{'s' if len(differ) > 1 else ''} to continue that run, or with --overwrite instead of --resume to start over"
            )
        for key, value in self.checks.items():
            if state.get(key) != value:
                raise CheckpointError(
                    f"{self.state_path}: cannot resume: that run trained against {key.replace('_', ' ')} {state.get(key)!r}, this run's is "
                    f"{value!r}; pass the inputs it was trained on to continue it, or --overwrite instead of --resume to start over"
                )
        self._truncate_log(int(state["epoch"]))
        return state

    def _truncate_log(self, epochs_done: int) -> None:
        """Keep the log lines of the epochs the state holds (and a torn last line never)."""
        rows = read_jsonl(self.metrics_path)
        kept = [r for r in rows if int(r.get("epoch", 0)) <= epochs_done]
        if len(kept) != len(rows) or self.metrics_path.exists():
            self.metrics_path.write_text("".join(dumps_row(r) + "\n" for r in kept))


def fit_epochs(
    model: nn.Module,
    s: LoopSettings,
    *,
    num_train: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor | None],
    evaluate: Callable[[], tuple[dict, tuple]],
    save_best: Callable[[dict, int], None],
    files: RunFiles | None = None,
    record_prefix: dict | None = None,
    loss_name: str = "train_loss",
    on_checkpoint: Callable[[], None] | None = None,
) -> tuple | None:
    """Train ``s.epochs`` epochs; returns the best key.

    ``batch_loss(indices)`` returns the loss of one shuffled batch (``None`` skips it);
    ``evaluate()`` returns (held-out metrics, key) where a larger key is better;
    ``save_best(metrics, epoch)`` runs when the key improves. With ``files``, every epoch appends one
    JSON line and writes the training state, and ``files.resume`` continues from it. A fresh run
    starts a fresh log.
    """
    optimizer, scheduler = make_optimizer(model, s, num_train)
    start_epoch, best_key = 0, None
    state = files.load_state() if files is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        best_key = tuple(state["best_key"]) if state.get("best_key") is not None else None
    elif files is not None and files.metrics_path.exists():
        files.metrics_path.unlink()
    bar = tqdm(range(start_epoch, s.epochs), desc=s.desc, disable=not s.progress, initial=start_epoch, total=s.epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        order = epoch_order(num_train, s, epoch)
        running, count = 0.0, 0
        for start in range(0, num_train, s.batch_size):
            idx = order[start : start + s.batch_size]
            loss = batch_loss(idx)
            if loss is None:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.clip_grad_norm)
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(idx)
            count += len(idx)
        ev, key = evaluate()
        record: dict[str, Any] = {**(record_prefix or {}), "epoch": epoch + 1, loss_name: running / max(count, 1), **ev,
                                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        record["best"] = best_key is None or key > best_key
        bar.set_postfix(loss=f"{record[loss_name]:.3g}", score=f"{key[0]:.4g}")
        if record["best"]:
            best_key = key
            save_best(ev, epoch + 1)
        if files is not None:
            # log line, then state: a kill between the two re-runs this epoch on --resume, and
            # load_state drops the log lines past the state's epoch, so no epoch is logged twice
            append_jsonl(files.metrics_path, record)
            atomic_torch_save(
                {"kind": files.state_kind, "config": files.config, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_key": list(best_key), **files.checks},
                files.state_path,
            )
        if on_checkpoint is not None:
            on_checkpoint()
    return best_key

