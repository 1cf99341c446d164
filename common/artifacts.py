"""Every artifact's folder and file name, in one place.

Three folders, the same names locally and on Modal:

- models:  checkpoints  (local default ``./artifacts/models``; Modal ``/models``)
- data:    demonstrations and cached features (local ``./data``; Modal ``/data``)
- results: results JSON / tables / plots (local ``./results``; Modal ``/data/results``)

The library never reads the environment: configs carry explicit folders (``models_dir``,
``results_dir``, ...), an empty one meaning the repository default. Entry points resolve
``RSD_MODELS_DIR`` / ``RSD_DATA_DIR`` / ``RSD_RESULTS_DIR`` once, with ``ArtifactDirs.from_env``
and ``with_dirs``, and pass the result down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, TypeVar

from common.provenance import REPO_ROOT

C = TypeVar("C")

NAIVE_TOKENIZER = "rfsq_best.pt"  # the seed's names
ROBUST_TOKENIZER = "rfsq_robust_best.pt"
ENV_VARS = {"models": "RSD_MODELS_DIR", "data": "RSD_DATA_DIR", "results": "RSD_RESULTS_DIR"}


@dataclass(frozen=True)
class ArtifactDirs:
    models: Path
    data: Path
    results: Path

    @classmethod
    def defaults(cls) -> "ArtifactDirs":
        return cls(models=REPO_ROOT / "artifacts" / "models", data=REPO_ROOT / "data", results=REPO_ROOT / "results")

    @classmethod
    def under(cls, root: Path) -> "ArtifactDirs":
        """One run's private folders (the local pipeline keeps each profile apart)."""
        return cls(models=root / "models", data=root / "data", results=root / "results")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "ArtifactDirs":
        """Defaults overridden by ``RSD_*_DIR`` (relative values are taken from the repository root).
        Called by entry points only, with ``os.environ``."""
        base = cls.defaults()
        values = {}
        for name, var in ENV_VARS.items():
            value = environ.get(var)
            path = Path(value) if value else getattr(base, name)
            values[name] = path if path.is_absolute() else REPO_ROOT / path
        return cls(**values)


DEFAULT_DIRS = ArtifactDirs.defaults()
# config field -> which folder an empty value means
_DIR_FIELDS = {"models_dir": "models", "data_dir": "data", "results_dir": "results"}


def with_dirs(cfg: C, dirs: ArtifactDirs) -> C:
    """``cfg`` with its empty folder fields (``models_dir``, ``data_dir``, ``results_dir``) filled from ``dirs``."""
    names = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    changes = {f: str(getattr(dirs, d)) for f, d in _DIR_FIELDS.items() if f in names and not getattr(cfg, f)}
    return dataclasses.replace(cfg, **changes) if changes else cfg  # type: ignore[type-var]


def models_dir_of(value: str) -> Path:
    return Path(value) if value else DEFAULT_DIRS.models


def data_dir_of(value: str) -> Path:
    return Path(value) if value else DEFAULT_DIRS.data


def results_dir_of(value: str) -> Path:
    return Path(value) if value else DEFAULT_DIRS.results


# --- Phase 1: tokenizers ------------------------------------------------------------------------------
def tokenizer_filename(conditioning: str) -> str:
    """``rfsq_robust_best.pt`` for the robust (layernorm) tokenizer, ``rfsq_best.pt`` for naive,
    ``rfsq_<conditioning>_best.pt`` for the other reference conditionings."""
    if conditioning == "layernorm":
        return ROBUST_TOKENIZER
    if conditioning == "none":
        return NAIVE_TOKENIZER
    return f"rfsq_{conditioning}_best.pt"


def tokenizer_paths(models: Path, conditioning: str) -> dict[str, Path]:
    """best checkpoint, training state for ``--resume``, metrics log."""
    best = models / tokenizer_filename(conditioning)
    stem = best.name.removesuffix("_best.pt")
    return {"best": best, "last": models / f"{stem}_last.pt", "metrics": models / f"{stem}_metrics.jsonl"}


def phase1_results(results: Path) -> Path:
    return results / "phase1"


# --- Phase 2: main model and draft ------------------------------------------------------------------
def policy_tag(conditioning: str) -> str:
    """File suffix of the models trained on a tokenizer: "" robust (the seed's names), "naive" naive."""
    return {"layernorm": "", "none": "naive"}.get(conditioning, conditioning)


def policy_paths(models: Path, results: Path, tag: str) -> dict[str, Path]:
    sfx = f"_{tag}" if tag else ""
    return {
        "head": models / f"best_rfsq_head{sfx}.pt",
        "head_last": models / f"rfsq_head{sfx}_last.pt",
        "head_metrics": models / f"rfsq_head{sfx}_metrics.jsonl",
        "draft": models / f"best_draft_with_projection{sfx}.pt",
        "draft_last": models / f"draft_with_projection{sfx}_last.pt",
        "draft_metrics": models / f"draft_with_projection{sfx}_metrics.jsonl",
        "summary_json": results / "phase2" / f"train_summary{sfx}.json",
        "summary_md": results / "phase2" / f"train_summary{sfx}.md",
    }


# --- Phase 3: evaluation --------------------------------------------------------------------------------
def eval_checkpoints(models: Path, *, tokenizer: str, strategy: str) -> dict[str, Path]:
    """Tokenizer / head / draft of a Phase 3 variant: Strategy A pairs each tokenizer with the models
    trained on its tokens; Strategy B pairs the robust decoder with the naive-token models."""
    tag = "" if (tokenizer == "robust" and strategy == "A") else "naive"
    paths = policy_paths(models, models, tag)
    return {
        "tokenizer": models / (ROBUST_TOKENIZER if tokenizer == "robust" else NAIVE_TOKENIZER),
        "head": paths["head"],
        "draft": paths["draft"],
    }


def phase3_results(results: Path, run_name: str) -> Path:
    return results / "phase3" / run_name


def phase3_comparison(results: Path, suite: str) -> Path:
    return results / "phase3" / f"compare_{suite}"


def expert_success_results(results: Path) -> Path:
    return results / "expert_success.json"


def pipeline_summary(results: Path) -> Path:
    return results / "pipeline" / "pipeline_summary.json"
