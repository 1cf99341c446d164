"""Do two Phase 3 runs of the same trials end the same way? Episode by episode, for runs that should
agree (one model decoded two ways, a rerun, a refactor): how many episodes took the same number of
steps, how many ended the other way and in whose favour, with a two-sided sign test on those.

    python -m benchmarks.diagnostics.episode_agreement --a DIR --b DIR [--label-a main-only --label-b speculative] --out DIR

Each DIR is a Phase 3 evaluation folder (its ``episodes.jsonl``; a ``phase3.compare`` variant folder is
one). Only episodes present in both count; an episode that errored in either run is left out and
counted. Writes ``episode_agreement.json`` (with the source files' hashes) and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import rsd_entry
from common.eval.closed_loop import read_rows
from common.eval.runs import agreement
from common.pipeline.stages import file_hash
from common.provenance import provenance, write_results


def _episodes(folder: Path) -> dict[tuple[int, int], dict]:
    path = folder / "episodes.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no episodes.jsonl in {folder} (expected a Phase 3 evaluation folder)")
    return {(r["task"], r["trial"]): r for r in read_rows(path)}


def render(result: dict, label_a: str, label_b: str) -> str:
    n = result["episodes"]
    return "\n".join([
        f"`{label_a}` (a) against `{label_b}` (b), the same {n} episodes (task, trial).",
        "",
        f"| | {label_a} | {label_b} |",
        "|---|---|---|",
        f"| successes | {result['success_a']} ({100 * result['success_a'] / n:.1f}%) | {result['success_b']} ({100 * result['success_b'] / n:.1f}%) |",
        f"| successes the other run lacks | {result['success_only_in_a']} | {result['success_only_in_b']} |",
        "",
        f"Same number of steps: {result['same_steps']} of {n} episodes; outcome differs: {result['outcome_differs']} "
        f"(two-sided sign test p = {result['sign_test_p']:.2f}).",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.diagnostics.episode_agreement", description=__doc__.split("\n")[0])
    parser.add_argument("--a", required=True, help="Phase 3 evaluation folder (episodes.jsonl)")
    parser.add_argument("--b", required=True, help="the other run's folder")
    parser.add_argument("--label-a", default="a")
    parser.add_argument("--label-b", default="b")
    parser.add_argument("--out", required=True, help="folder for episode_agreement.json / .md")
    args = parser.parse_args(argv)
    a_dir, b_dir, out = Path(args.a), Path(args.b), Path(args.out)
    result = agreement(_episodes(a_dir), _episodes(b_dir))
    sources = {label: {"folder": str(d), "episodes_sha": file_hash(d / "episodes.jsonl")} for label, d in ((args.label_a, a_dir), (args.label_b, b_dir))}
    write_results(out, "episode_agreement", {"labels": [args.label_a, args.label_b], "sources": sources, **result, "provenance": provenance()},
                  render(result, args.label_a, args.label_b))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
