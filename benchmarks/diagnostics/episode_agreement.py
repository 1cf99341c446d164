"""Do two Phase 3 runs of the same trials end the same way? Episode by episode, for runs that should
agree (one model decoded two ways, a rerun, a refactor): how many episodes took the same number of
steps, how many ended the other way and in whose favour, with a two-sided sign test on those.

    python -m benchmarks.diagnostics.episode_agreement --a DIR --b DIR [--label-a main-only --label-b speculative] --out DIR

Each DIR is a Phase 3 evaluation folder (its ``episodes.jsonl``; a ``phase3.compare`` variant folder is
one). Only episodes present in both count; an episode that errored in either run is left out and
counted. Writes ``episode_agreement.json`` (with the source files' hashes) and ``.md``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import rsd_entry
from common.eval.closed_loop import read_rows
from common.eval.runs import agreement
from common.pipeline.stages import file_hash
from common.provenance import provenance, write_results

PROG = "python -m benchmarks.diagnostics.episode_agreement"


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


@dataclass
class EpisodeAgreementConfig:
    """Do two Phase 3 runs of the same trials end the same way? Episode by episode, with a two-sided sign test."""

    a: str = ""  # Phase 3 evaluation folder (episodes.jsonl; required)
    b: str = ""  # the other run's folder (required)
    label_a: str = "a"  # name of run a in the table
    label_b: str = "b"  # name of run b in the table
    out: str = ""  # folder for episode_agreement.json / .md (required)

    def __post_init__(self) -> None:
        missing = [flag for flag, value in (("--a", self.a), ("--b", self.b), ("--out", self.out)) if not value]
        if missing:
            raise ValueError(f"expected {', '.join(missing)}, found none")


def main(argv: list[str]) -> None:
    cfg = rsd_entry.parse_config(EpisodeAgreementConfig, argv, prog=PROG)
    a_dir, b_dir, out = Path(cfg.a), Path(cfg.b), Path(cfg.out)
    result = agreement(_episodes(a_dir), _episodes(b_dir))
    sources = {label: {"folder": str(d), "episodes_sha": file_hash(d / "episodes.jsonl")} for label, d in ((cfg.label_a, a_dir), (cfg.label_b, b_dir))}
    write_results(out, "episode_agreement", {"labels": [cfg.label_a, cfg.label_b], "sources": sources, **result, "provenance": provenance()},
                  render(result, cfg.label_a, cfg.label_b))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
