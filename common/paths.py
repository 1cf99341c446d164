"""Where artifacts live: one environment variable each, the same names locally and on Modal.

- ``RSD_MODELS_DIR``  checkpoints  (local default ``./artifacts/models``; Modal images set ``/models``)
- ``RSD_DATA_DIR``    demonstrations and cached features (local ``./data``; Modal ``/data``)
- ``RSD_RESULTS_DIR`` results JSON / tables / plots (local ``./results``; Modal ``/data/results``)

Relative defaults are resolved against the repository root, so commands behave the same from any
working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.provenance import REPO_ROOT

NAIVE_TOKENIZER = "rfsq_best.pt"  # the seed's names
ROBUST_TOKENIZER = "rfsq_robust_best.pt"


def _dir(var: str, default: str) -> Path:
    value = os.environ.get(var)
    path = Path(value) if value else REPO_ROOT / default
    return path if path.is_absolute() else REPO_ROOT / path


def models_dir() -> Path:
    return _dir("RSD_MODELS_DIR", "artifacts/models")


def data_dir() -> Path:
    return _dir("RSD_DATA_DIR", "data")


def results_dir() -> Path:
    return _dir("RSD_RESULTS_DIR", "results")


def tokenizer_filename(conditioning: str) -> str:
    """``rfsq_robust_best.pt`` for the robust (layernorm) tokenizer, ``rfsq_best.pt`` for naive,
    ``rfsq_<conditioning>_best.pt`` for the other reference conditionings."""
    if conditioning == "layernorm":
        return ROBUST_TOKENIZER
    if conditioning == "none":
        return NAIVE_TOKENIZER
    return f"rfsq_{conditioning}_best.pt"
