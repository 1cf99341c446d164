"""Compare two runs' outputs (e.g. before and after a refactor): every JSON / JSONL file, ignoring wall
times, paths, hashes of path-bearing configs and provenance, plus the weights of every checkpoint.

    python -m benchmarks.diagnostics.compare_run_outputs BEFORE_DIR AFTER_DIR

Path-insensitive: a string that names a file under one run's root equals the same string under the other
run's root (the roots are where the two folders' paths differ, e.g. ``/tmp/before`` and ``/tmp/after`` for
``/tmp/before/report`` and ``/tmp/after/report``). A missing value is a missing value: NaN (older JSON
writers) equals NaN and ``null`` (JSON writers now write null for NaN). JSONL rows are matched by their
(task, trial, epoch, stage). Prints one line per file and the total number of differences; exits 1 on any.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

import rsd_entry

VOLATILE = re.compile(r"(seconds|_s$|_ms$|time|wall|created|git_sha|episodes_per_minute|provenance|^path$|_path$|checkpoint$|^cache$|^data$|metrics_jsonl|summary_(json|md)|models_dir|results_dir|data_dir|^out$|expert_results|tokenizer_path|head_path|^source$|latency|policy_ms|speedup|draft_cost|verify_overhead|costs|rfsq_checkpoint|last_state|best_checkpoint|^file$|^video$|^error$|content_hash|head_hash|^checkpoints$)")
ROW_KEY = ("task", "trial", "epoch", "stage")


def run_roots(before: Path, after: Path) -> tuple[list[str], list[str]]:
    """The prefixes by which the two folders' paths differ (as given, when that names a folder path, and
    absolute), longest first: what a path recorded inside each run starts with. ``/tmp/before/report`` vs
    ``/tmp/after/report`` -> ``/tmp/before`` and ``/tmp/after``."""
    roots: tuple[list[str], list[str]] = ([], [])
    for a, b in ((before, after), (before.resolve(), after.resolve())):
        pa, pb = list(a.parts), list(b.parts)
        while len(pa) > 1 and len(pb) > 1 and pa[-1] == pb[-1]:  # drop the common tail
            pa.pop()
            pb.pop()
        for found, parts in zip(roots, (pa, pb)):
            root = str(Path(*parts))
            # a bare name ("a") would also match inside words: only prefixes with a separator count
            if "/" in root.rstrip("/") and root not in found:
                found.append(root)
    return sorted(roots[0], key=len, reverse=True), sorted(roots[1], key=len, reverse=True)


def _missing(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _unrooted(text: str, roots: list[str]) -> str:
    for root in roots:
        text = text.replace(root, "<run>")
    return text


def walk(a: Any, b: Any, path: str, diffs: list[str], roots: tuple[list[str], list[str]] = ([], [])) -> None:
    """Append one line to ``diffs`` per difference between ``a`` (before) and ``b`` (after)."""
    if isinstance(a, dict) and isinstance(b, dict):
        # keys may be paths too (e.g. the states each rollout folder gave): match them without their run root
        a = {_unrooted(k, roots[0]): v for k, v in a.items()}
        b = {_unrooted(k, roots[1]): v for k, v in b.items()}
        for k in sorted(set(a) | set(b)):
            if VOLATILE.search(k):
                continue
            if k not in a or k not in b:
                diffs.append(f"{path}/{k}: only in {'after' if k not in a else 'before'}")
                continue
            walk(a[k], b[k], f"{path}/{k}", diffs, roots)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            diffs.append(f"{path}: len {len(a)} vs {len(b)}")
            return
        for i, (x, y) in enumerate(zip(a, b)):
            walk(x, y, f"{path}[{i}]", diffs, roots)
    elif isinstance(a, str) and isinstance(b, str):
        if _unrooted(a, roots[0]) != _unrooted(b, roots[1]):
            diffs.append(f"{path}: {a!r} vs {b!r}")
    elif _missing(a) and _missing(b):
        pass
    elif a != b:
        diffs.append(f"{path}: {a!r} vs {b!r}")


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: json.dumps({k: r.get(k) for k in ROW_KEY}, sort_keys=True))


def compare(before: Path, after: Path, out=print) -> int:
    """Print (``out``) the comparison of every JSON / JSONL file and checkpoint of ``before`` with its
    namesake in ``after``; returns the number of differences (a missing file counts as one)."""
    for folder in (before, after):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (expected a run's output folder)")
    roots = run_roots(before, after)
    files = sorted(p.relative_to(before) for p in before.rglob("*.json*") if "stamps" not in p.parts)
    total = 0
    for rel in files:
        pa, pb = before / rel, after / rel
        if not pb.exists():
            out(f"MISSING after: {rel}")
            total += 1
            continue
        if rel.suffix == ".jsonl":
            a, b = _rows(pa), _rows(pb)
        else:
            a, b = json.loads(pa.read_text()), json.loads(pb.read_text())
        diffs: list[str] = []
        walk(a, b, "", diffs, roots)
        total += len(diffs)
        out(f"{'identical' if not diffs else f'{len(diffs)} DIFFERENCES'}: {rel}")
        for d in diffs[:8]:
            out(f"    {d}")
    for pa in sorted(before.rglob("*.pt")):
        pb = after / pa.relative_to(before)
        if pb.name.endswith("_last.pt") or not pb.exists():
            continue
        a, b = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
        same = a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        total += not same
        out(f"{'identical weights' if same else 'DIFFERENT WEIGHTS'}: {pa.relative_to(before)}")
    out(f"{len(files)} JSON files and the checkpoints compared, {total} differences")
    return total


def main(argv: list[str]) -> int:
    # Two positional folders, as every earlier use of this command spelled them; the config-dataclass
    # CLI builder (rsd_entry.build_parser) makes --flags only, so this one keeps its own small parser.
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnostics.compare_run_outputs", description=__doc__.split("\n")[0])
    parser.add_argument("before", help="the first run's output folder")
    parser.add_argument("after", help="the second run's output folder (the same layout)")
    rsd_entry.add_debug_flag(parser)
    args = parser.parse_args(argv)
    return compare(Path(args.before), Path(args.after))


def _cli(argv: list[str]) -> None:
    if main(argv):
        sys.exit(1)


if __name__ == "__main__":
    rsd_entry.main(_cli, sys.argv[1:])
