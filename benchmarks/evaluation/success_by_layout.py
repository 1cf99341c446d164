"""Success split by layout: the fixed init states the demos were recorded on vs those they never used.

A Phase 3 run over all 50 of LIBERO's fixed init states mixes layouts the policy's demos came from with
layouts it never saw; a policy that memorized object positions does well on the first and not the second.
This splits each variant's episodes by init state, gives a 95% Wilson interval for every rate, and
compares two variants on the episodes both ran (paired: the same task and init state) with the
two-sided sign test of ``common.eval.runs.agreement`` (as ``benchmarks.diagnostics.episode_agreement``).

    python -m benchmarks.evaluation.success_by_layout --compare results/phase3/compare_libero_object \
        --demo-layouts 0-19 [--pair robust-A,naive] --out DIR

``--compare`` is a ``phase3.compare`` folder (one sub-folder with ``episodes.jsonl`` per variant).
Episodes that ended in an error are left out of the rates and counted apart. Writes
``success_by_layout.json`` (with each source file's hash) and ``.md``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import rsd_entry
from common.eval.closed_loop import read_rows
from common.eval.runs import agreement
from common.sim.libero_env import parse_task_spec
from common.pipeline.stages import file_hash
from common.provenance import provenance, write_results

PROG = "python -m benchmarks.evaluation.success_by_layout"


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a success rate (sound at 0% and 100%, unlike the normal one)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _rate(rows: list[dict]) -> dict:
    k, n = sum(bool(r["success"]) for r in rows), len(rows)
    low, high = wilson_interval(k, n)
    return {"episodes": n, "successes": k, "success_rate": k / n if n else None, "ci95": [low, high]}


def split_by_layout(rows: list[dict], demo_layouts: set[int]) -> dict:
    """One variant's success on the demos' layouts, on the others, and on all, overall and per task."""
    finished = [r for r in rows if r.get("status") != "error"]
    groups = {"demo_layouts": [r for r in finished if r["trial"] in demo_layouts],
              "held_out_layouts": [r for r in finished if r["trial"] not in demo_layouts],
              "all": finished}
    per_task = {}
    for task in sorted({r["task"] for r in finished}):
        per_task[str(task)] = {name: _rate([r for r in group if r["task"] == task]) for name, group in groups.items()}
    return {**{name: _rate(group) for name, group in groups.items()}, "errors": len(rows) - len(finished), "per_task": per_task}


def _cell(rate: dict) -> str:
    if not rate["episodes"]:
        return "—"
    low, high = rate["ci95"]
    return f"{rate['successes']} / {rate['episodes']} ({100 * rate['success_rate']:.1f}%, {100 * low:.0f}–{100 * high:.0f})"


def render(result: dict) -> str:
    lines = [f"Init states {result['demo_layouts']} are the layouts the demos were recorded on; the others they never used. "
             "Successes / episodes (rate, 95% Wilson interval); errors left out.", "",
             "| variant | demo layouts | held-out layouts | all | errors |", "|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        lines.append(f"| {name} | {_cell(v['demo_layouts'])} | {_cell(v['held_out_layouts'])} | {_cell(v['all'])} | {v['errors']} |")
    tasks = sorted({t for v in result["variants"].values() for t in v["per_task"]}, key=int)
    names = list(result["variants"])
    lines += ["", "Per task, all layouts:", "", "| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        cells = []
        for name in names:
            r = result["variants"][name]["per_task"].get(t, {}).get("all")
            cells.append(f"{r['successes']} / {r['episodes']}" if r else "—")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    pair = result.get("paired")
    if pair:
        a, b = pair["labels"]
        lines += ["", f"Paired on the same {pair['episodes']} episodes (task, init state): {a} succeeds where {b} fails "
                  f"{pair['success_only_in_a']} times, the reverse {pair['success_only_in_b']} times "
                  f"(two-sided sign test p = {pair['sign_test_p']:.2g})."]
    return "\n".join(lines)


@dataclass
class SuccessByLayoutConfig:
    """Success split by layout: the fixed init states the demos were recorded on vs those they never used."""

    compare: str = ""  # phase3.compare folder (one sub-folder per variant; required)
    demo_layouts: str = ""  # init states the demos were recorded on, e.g. 0-19 (required)
    pair: str = "robust-A,naive"  # two variants to compare episode by episode ('' = none)
    out: str = ""  # folder for success_by_layout.json / .md (required)

    def __post_init__(self) -> None:
        missing = [flag for flag, value in (("--compare", self.compare), ("--demo-layouts", self.demo_layouts), ("--out", self.out)) if not value]
        if missing:
            raise ValueError(f"expected {', '.join(missing)}, found none")
        if self.pair and len(self.pair.split(",")) != 2:
            raise ValueError(f"--pair: expected two variants 'a,b' (or ''), found {self.pair!r}")


def main(argv: list[str]) -> None:
    cfg = rsd_entry.parse_config(SuccessByLayoutConfig, argv, prog=PROG)
    compare = Path(cfg.compare)
    folders = sorted(p for p in compare.iterdir() if (p / "episodes.jsonl").exists()) if compare.is_dir() else []
    if not folders:
        raise FileNotFoundError(f"{compare}: expected a phase3.compare folder with <variant>/episodes.jsonl; found none")
    demo_layouts = set(parse_task_spec(cfg.demo_layouts, 50))
    rows = {p.name: list(read_rows(p / "episodes.jsonl")) for p in folders}
    result = {"demo_layouts": cfg.demo_layouts,
              "sources": {p.name: {"folder": str(p), "episodes_sha": file_hash(p / "episodes.jsonl")} for p in folders},
              "variants": {name: split_by_layout(r, demo_layouts) for name, r in rows.items()}}
    if cfg.pair:
        a, b = cfg.pair.split(",")
        missing = [v for v in (a, b) if v not in rows]
        if missing:
            raise ValueError(f"--pair {cfg.pair}: no episodes for {', '.join(missing)} in {compare} (found {', '.join(rows)})")
        keyed = [{(r["task"], r["trial"]): r for r in rows[v]} for v in (a, b)]
        result["paired"] = {"labels": [a, b], **{k: v for k, v in agreement(*keyed).items() if k != "differing_episodes"}}
    result["provenance"] = provenance()
    write_results(cfg.out, "success_by_layout", result, render(result))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
