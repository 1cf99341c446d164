"""Fingerprinted pipeline stages: a stage reruns when its settings or the content of its inputs
changed, or when one of its outputs is missing or no longer what it wrote (``<root>/stamps/<stage>.json``
records the fingerprint and the content hash of every output; a stamp without output hashes, from
before they were recorded, cannot vouch for its outputs and the stage reruns)."""

from __future__ import annotations

import hashlib
import shutil
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

    def _up_to_date(self, stamp: Path, fingerprint: str, outputs: list[Path]) -> str:
        """"" when the stage can be skipped, else why it reruns."""
        if not stamp.exists():
            return "no stamp"
        saved = json.loads(stamp.read_text())
        if saved.get("fingerprint") != fingerprint:
            return "settings or inputs changed"
        missing = [p.name for p in outputs if not p.exists()]
        if missing:
            return f"missing {missing}"
        recorded = saved.get("outputs")
        if recorded is None:
            return "stamp predates output hashes"
        changed = [p.name for p in outputs if recorded.get(str(p)) != file_hash(p)]
        return f"outputs changed since written: {changed}" if changed else ""

    def run(self, name: str, inputs: dict, outputs: list[Path], fn: Callable[[], str], *, stale: tuple[Path, ...] = ()) -> None:
        """Run ``fn`` unless the stage is up to date. ``stale``: folders of an earlier run of this stage
        that a rerun must not resume from (e.g. evaluation episodes of other models); removed first."""
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stamp = self.stamps / f"{name}.json"
        reason = self._up_to_date(stamp, fingerprint, outputs)
        if not reason:
            self.log(f"[{name}] up to date (fingerprint {fingerprint}, outputs unchanged), skipped")
            self.timings[name] = {"seconds": 0.0, "skipped": True}
            return
        if stamp.exists():
            self.log(f"[{name}] rerun: {reason}")
        for folder in stale:
            if folder.exists():
                shutil.rmtree(folder)
        started = time.perf_counter()
        summary = fn()
        seconds = time.perf_counter() - started
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished but did not write {missing}")
        hashes = {str(p): file_hash(p) for p in outputs}
        write_json(stamp, {"fingerprint": fingerprint, "inputs": inputs, "outputs": hashes, "seconds": seconds})
        self.timings[name] = {"seconds": seconds, "skipped": False}
        self.log(f"[{name}] {summary} ({seconds:.0f} s)")
