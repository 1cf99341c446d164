"""Closed-loop states for the draft: the backbone features Phase 3 recorded (``--record-features``)
at every chunk its policy decoded, read back for Phase 2's distillation (``--draft-rollouts``).
A data reader, so that Phase 2 (``common/policy``) reads what Phase 3 (``common/eval``) wrote without
importing the evaluation.

The draft is only ever asked at the states the robot reaches under its own policy; demo states
and noise around them miss where the robot drifts, which is where the draft and the main model
disagree most (acceptance in closed loop fell to a third of the held-out figure). Its targets are
the main model's own tokens, so any visited state is a valid training input, with no expert label.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common.jsonl import read_jsonl


def read_rollout_features(run_dir: str | Path, *, head_hash: str) -> torch.Tensor:
    """Features [N, F] (float32) of every recorded chunk of the Phase 3 run in ``run_dir``.

    Episodes are read in (task, trial) order, not in the order the evaluation's workers happened to
    finish them, so the same rollouts always give the same training set (and the same draft).
    Refuses a run whose head was not ``head_hash`` (its features come from another backbone) or
    that recorded no features; names the file and what it found."""
    run_dir = Path(run_dir)
    config_path, rows_path = run_dir / "eval_config.json", run_dir / "episodes.jsonl"
    for path in (config_path, rows_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found; expected a Phase 3 run made with --record-features")
    saved = json.loads(config_path.read_text())
    ran_with = saved.get("checkpoints", {}).get("head")
    if ran_with != head_hash:
        raise ValueError(f"{config_path}: the rollouts ran head {ran_with}, expected {head_hash} (rerun them with this head)")
    rows = sorted(read_jsonl(rows_path), key=lambda r: (r["task"], r["trial"]))
    feats = [c["features"] for r in rows for c in r.get("chunks", []) if "features" in c]
    if not feats:
        raise ValueError(f"{rows_path}: no recorded features; run Phase 3 with --record-features")
    return torch.tensor(feats, dtype=torch.float32)
