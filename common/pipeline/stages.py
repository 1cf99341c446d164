"""Fingerprinted pipeline stages: a stage reruns only when its settings or the content of its inputs
changed (``<root>/stamps/<stage>.json``)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from common.provenance import write_json


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class Stages:
    """Fingerprinted stages: ``run(name, fingerprint_inputs, outputs, fn)``."""

    def __init__(self, root: Path, log: Callable[[str], None]):
        self.stamps = root / "stamps"
        self.stamps.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.timings: dict[str, dict[str, Any]] = {}

    def run(self, name: str, inputs: dict, outputs: list[Path], fn: Callable[[], str]) -> None:
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stamp = self.stamps / f"{name}.json"
        if stamp.exists() and json.loads(stamp.read_text())["fingerprint"] == fingerprint and all(p.exists() for p in outputs):
            self.log(f"[{name}] up to date (fingerprint {fingerprint}), skipped")
            self.timings[name] = {"seconds": 0.0, "skipped": True}
            return
        started = time.perf_counter()
        summary = fn()
        seconds = time.perf_counter() - started
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished but did not write {missing}")
        write_json(stamp, {"fingerprint": fingerprint, "inputs": inputs, "seconds": seconds})
        self.timings[name] = {"seconds": seconds, "skipped": False}
        self.log(f"[{name}] {summary} ({seconds:.0f} s)")
