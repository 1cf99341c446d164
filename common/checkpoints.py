"""One checkpoint format for every model of the pipeline.

A checkpoint is a single ``.pt`` dict that ``torch.load(path, map_location="cpu", weights_only=True)``
reads::

    {"format_version": 1, "kind": "rfsq_tokenizer" | "rfsq_head" | "draft_with_projection" | ...,
     "model": state_dict,          # the seed's loaders read ckpt["model"]
     "config": constructor kwargs,  # the model is rebuilt from this (nanoGPT style)
     "normalizer": {...} | None,    # the shared action normalizer
     "metrics": {...}, "extra": {...},
     "content_hash": sha256 of model tensors + config + normalizer}

Later phases pin the tokenizer they were trained against by its ``content_hash``. Files are written
atomically (temp file in the same folder, then rename), so a crash or a full disk never leaves half
a checkpoint (a full disk is one ``no space left while writing <path>`` error). A file that does not
load safely is one line naming it ("not readable as a checkpoint (...); re-create it"): never
loaded with ``weights_only=False``, which would run whatever code a pickle holds.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, of the wrong kind, or does not fit the requested model."""


class NoSpaceError(OSError):
    """The disk (or quota) filled up while a file was written; ``errno`` is ``ENOSPC``."""

    def __str__(self) -> str:
        return str(self.strerror)


def content_hash(state_dict: dict[str, torch.Tensor], config: dict, normalizer: dict | None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(json.dumps(normalizer, sort_keys=True).encode())
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tensor.dtype).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(
    path: str | Path,
    *,
    kind: str,
    model: torch.nn.Module,
    config: dict[str, Any],
    normalizer: dict | None = None,
    metrics: dict | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Write the checkpoint atomically; returns the saved dict (with its ``content_hash``)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ckpt = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": state,
        "config": dict(config),
        "normalizer": normalizer,
        "metrics": metrics or {},
        "extra": extra or {},
        "content_hash": content_hash(state, config, normalizer),
    }
    atomic_torch_save(ckpt, path)
    return ckpt


def _out_of_space(exc: BaseException) -> bool:
    """Whether a failed write ran out of disk space (or quota). torch's zip writer reports it as a
    ``RuntimeError`` ("[enforce fail at inline_container.cc ...]") whose context holds the ``OSError``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``: a failed write
    (a full disk) leaves the earlier ``path`` as it was and no temp file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            # through a Python file object: a full disk then surfaces as OSError(ENOSPC), which torch's
            # writer, given a file name, reports only as an opaque "enforce fail"
            with open(tmp, "wb") as fh:
                torch.save(obj, fh)
        except (OSError, RuntimeError) as exc:
            if _out_of_space(exc):
                kept = "the earlier file is unchanged" if path.exists() else "nothing was written"
                raise NoSpaceError(errno.ENOSPC, f"no space left while writing {path} ({kept}); free some space and rerun") from exc
            raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unreadable_reason(exc: BaseException) -> str:
    """What is wrong with a file ``torch.load`` refused, in a few words: torch's own messages run to
    several lines and advise unsafe loading (``weights_only=False``), which this code never does."""
    text = str(exc)
    if isinstance(exc, EOFError) or not text.strip():
        return "the file ends before any data: empty or cut short"
    if "zip archive" in text or "central directory" in text:
        return "a damaged or truncated torch archive"
    global_ = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if global_:
        return f"it holds Python objects ({global_.group(1)}) that a safe load does not run; not written by this code"
    if "Weights only load failed" in text or isinstance(exc, pickle.UnpicklingError):
        return "not a torch checkpoint (damaged, or another kind of file)"
    return f"{type(exc).__name__}: {text.strip().splitlines()[0][:200]}"


def _load(path: Path, what: str = "a checkpoint", remedy: str = "re-create it") -> Any:
    """``torch.load`` (weights only) with one line for a corrupt or foreign file (the one reader of ``.pt`` files)."""
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected {what} file")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol note: the error below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/foreign files; re-raise as one clear error
        raise CheckpointError(f"{path}: not readable as {what} ({_unreadable_reason(exc)}); {remedy}") from exc


def read_checkpoint(path: str | Path, *, kind: str) -> dict[str, Any]:
    """Load and check the envelope: file exists, is a checkpoint of ``kind``, current format."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found (expected a {kind} checkpoint; train it first)")
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: expected a dict with a 'model' state dict; found {type(ckpt).__name__}")
    found_kind = ckpt.get("kind", "<none: pre-RSD checkpoint>")
    if found_kind != kind:
        raise CheckpointError(f"{path}: expected a {kind} checkpoint, found kind {found_kind!r}")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {ckpt.get('format_version')!r}, this code reads format {FORMAT_VERSION}"
        )
    return ckpt


def load_state_strict(model: torch.nn.Module, ckpt: dict, path: str | Path) -> None:
    """``load_state_dict`` with one readable message for missing/unexpected keys or shape mismatches."""
    own = model.state_dict()
    theirs = ckpt["model"]
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, found {tuple(theirs[k].shape)}"
        for k in sorted(set(own) & set(theirs))
        if own[k].shape != theirs[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:3]))
        raise CheckpointError(f"{path}: weights do not fit the model built from its config ({', '.join(parts)})")
    model.load_state_dict(theirs)


def read_training_state(path: str | Path, *, kind: str) -> dict[str, Any]:
    """A trainer's ``*_last.pt`` (what ``--resume`` continues), with the same one-line errors."""
    path = Path(path)
    state = _load(path, "a training state", "it cannot be resumed: rerun with --overwrite to start over")
    found = state.get("kind") if isinstance(state, dict) else type(state).__name__
    if found != kind or "epoch" not in state:
        raise CheckpointError(f"{path}: expected a {kind} training state, found {found!r}; rerun with --overwrite to start over")
    return state


def checkpoint_content_hash(path: str | Path) -> str:
    """The ``content_hash`` a checkpoint of any kind records (to pin which models produced a result)."""
    path = Path(path)
    ckpt = _load(path)
    if not isinstance(ckpt, dict) or "content_hash" not in ckpt:
        raise CheckpointError(f"{path}: expected an RSD checkpoint with a content_hash; found {type(ckpt).__name__} without one")
    return str(ckpt["content_hash"])
