"""Fingerprinted pipeline stages: a stage reruns when its settings or the content of its inputs
changed, or when one of its outputs is missing or no longer what it wrote (``<root>/stamps/<stage>.json``
records the fingerprint and the content hash of every output; a stamp without output hashes, from
before they were recorded, or a damaged one cannot vouch for its outputs and the stage reruns, the
log naming the file). One run at a time works on a root: ``run_pipeline`` holds its lock.

A plan (``Stages(..., plan=True)``) runs nothing and writes nothing: it logs which stages would run
and why. A stage that would run cannot give its outputs' hashes yet, so ``hash`` names it instead,
and every stage whose inputs hold such a name would run after it."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from common.provenance import json_safe, write_json


PENDING = "(pending: "  # a plan's placeholder for the hash of an output a stage would rewrite


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class StampError(ValueError):
    """A stage stamp that is not the JSON object a stage writes (cut short, edited by hand)."""


def read_stamp(path: Path) -> dict:
    """A stage's stamp; ``StampError`` naming the file when it does not read as one."""
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StampError(f"{path}: damaged stage stamp ({exc})") from None
    if not isinstance(saved, dict):
        raise StampError(f"{path}: damaged stage stamp (a JSON {type(saved).__name__}, expected an object)")
    return saved


def recorded_seconds(path: Path) -> float | None:
    """What the stage took when it last ran, as its stamp says (None: no stamp, or a damaged one)."""
    try:
        return read_stamp(path).get("seconds") if path.exists() else None
    except StampError:
        return None


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two fingerprint inputs (``cfg.epochs``, ``demos``)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return [] if old == new else [prefix or "inputs"]
    keys = sorted(set(old) | set(new))
    return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)]


class Stages:
    """Fingerprinted stages: ``run(name, fingerprint_inputs, outputs, fn)``."""

    def __init__(self, root: Path, log: Callable[[str], None], plan: bool = False):
        self.stamps = root / "stamps"
        self.plan = plan
        if not plan:
            self.stamps.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.timings: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, str] = {}  # plan: output path -> the stage that would (re)write it

    def hash(self, path: Path) -> str:
        """The content hash of a stage's output; in a plan, for an output a stage would rewrite, a
        placeholder naming that stage (its content is not known before it runs)."""
        stage = self.pending.get(str(path))
        return f"{PENDING}{stage})" if stage else file_hash(path)

    def adopt(self, timings: dict[str, dict[str, Any]]) -> None:
        """Take over the stages another ``Stages`` ran or planned (a branch's), with their pending outputs."""
        self.timings.update(timings)
        for name, t in timings.items():
            self.pending.update({out: name for out in t.get("outputs", ())})

    def _up_to_date(self, stamp: Path, fingerprint: str, inputs: dict, outputs: list[Path]) -> str:
        """"" when the stage can be skipped, else why it reruns."""
        if not stamp.exists():
            return "no stamp"
        upstream = sorted(set(re.findall(re.escape(PENDING) + r"([^)]+)\)", json.dumps(inputs, default=str))))
        if upstream:  # (plan only)
            return "after " + ", ".join(upstream)
        try:
            saved = read_stamp(stamp)
        except StampError as exc:  # (the stage rewrites it when it reruns)
            return f"{exc}, which cannot vouch for the outputs"
        if saved.get("fingerprint") != fingerprint:
            # the stamp holds its inputs as write_json wrote them (paths repo-relative): compare like with like
            changed = changed_keys(saved.get("inputs", {}), json.loads(json.dumps(json_safe(inputs), default=str)))
            return "settings or inputs changed" + (f": {', '.join(changed)}" if changed else "")
        missing = [p.name for p in outputs if not p.exists()]
        if missing:
            return f"missing {missing}"
        recorded = saved.get("outputs")
        if recorded is None:
            return "stamp predates output hashes"
        # by file name (a stage's outputs have distinct names): the same root spelled relative or
        # absolute, which stamps before the root was resolved recorded as given, is the same output
        recorded = {Path(k).name: h for k, h in recorded.items()}
        changed = [p.name for p in outputs if recorded.get(p.name) != file_hash(p)]
        return f"outputs changed since written: {changed}" if changed else ""

    def run(self, name: str, inputs: dict, outputs: list[Path], fn: Callable[[], str], *, stale: tuple[Path, ...] = ()) -> None:
        """Run ``fn`` unless the stage is up to date. ``stale``: folders of an earlier run of this stage
        that a rerun must not resume from (e.g. evaluation episodes of other models); removed first."""
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stamp = self.stamps / f"{name}.json"
        reason = self._up_to_date(stamp, fingerprint, inputs, outputs)
        if not reason:
            self.log(f"[{name}] up to date (fingerprint {fingerprint}, outputs unchanged), skipped")
            self.timings[name] = {"seconds": 0.0, "skipped": True}
            return
        if self.plan:
            last = recorded_seconds(stamp)
            took = f"; took {last / 60:.1f} min when it last ran" if last is not None else ""
            self.log(f"[{name}] would run: {reason}{took}")
            self.timings[name] = {"seconds": last, "skipped": False, "planned": reason, "outputs": [str(p) for p in outputs]}
            self.pending.update({str(p): name for p in outputs})
            return
        if stamp.exists():
            self.log(f"[{name}] rerun: {reason}")
        for folder in stale:
            if folder.exists():
                shutil.rmtree(folder)
        before = {str(p): file_hash(p) for p in outputs if p.exists()}
        started = time.perf_counter()
        summary = fn()
        seconds = time.perf_counter() - started
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished but did not write {missing}")
        hashes = {str(p): file_hash(p) for p in outputs}
        # a stage that resumed outputs already complete (a demo file with all its demos) did none of
        # its work: its recorded time is not what it takes from scratch
        unchanged = bool(outputs) and before == hashes
        write_json(stamp, {"fingerprint": fingerprint, "inputs": inputs, "outputs": hashes, "seconds": seconds,
                           "outputs_unchanged": unchanged})
        self.timings[name] = {"seconds": seconds, "skipped": False}
        self.log(f"[{name}] {summary} ({seconds:.0f} s)")
