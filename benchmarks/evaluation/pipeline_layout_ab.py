"""Two local-pipeline runs that differ only in the tokenizer layout, side by side: tokenizer error,
the policy's held-out token accuracy and closed-loop success (what decides the default layout).

    python -m rsd_pipeline run --profile default --layout dct   --root artifacts/pipeline/default_dct   --report-dir report/dct
    python -m rsd_pipeline run --profile default --layout chunk --root artifacts/pipeline/default_chunk --report-dir report/chunk
    python -m benchmarks.evaluation.pipeline_layout_ab --runs dct=PATH/pipeline_summary.json,chunk=PATH/pipeline_summary.json

Writes ``layout_ab.json`` / ``layout_ab.md`` to ``--out`` (default ``results/pipeline_layout_ab``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import rsd_entry
from common.provenance import REPO_ROOT, provenance, write_results

PROG = "python -m benchmarks.evaluation.pipeline_layout_ab"


def row(name: str, summary: dict) -> dict:
    p1, p3, p2 = summary["phase1"], summary["phase3"]["variants"], summary["phase2"]
    return {
        "layout": name,
        "tokens_per_layer": p1["diagnostics"]["robust"]["tokens_per_layer"],
        "robust_mse": p1["robust_mse"], "naive_mse": p1["naive_mse"],
        "robust_main_token_acc": p2["robust"]["main"]["val_mean_token_acc"],
        "robust_main_greedy_token_acc": p2["robust"]["main"].get("val_greedy_mean_token_acc"),
        "success": {v: p3[v]["success_rate"] for v in p3},
        "trials_per_task": summary["profile"]["eval_trials"], "tasks": summary["profile"]["tasks"],
        "wall_minutes": summary["wall_seconds"] / 60, "git_sha": summary["provenance"]["git_sha"],
    }


@dataclass
class LayoutABConfig:
    """Two local-pipeline runs that differ only in the tokenizer layout, side by side."""

    runs: str = ""  # NAME=pipeline_summary.json, comma-separated (required)
    out: str = ""  # output folder ("" = results/pipeline_layout_ab)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("--runs: expected NAME=pipeline_summary.json pairs, found none")


def main(argv: list[str]) -> dict:
    cfg = rsd_entry.parse_config(LayoutABConfig, argv, prog=PROG)
    rows = []
    for item in cfg.runs.split(","):
        name, _, path = item.partition("=")
        if not path or not Path(path).exists():
            raise SystemExit(f"error: --runs: expected NAME=PATH to a pipeline_summary.json; got {item!r}")
        rows.append(row(name.strip(), json.loads(Path(path).read_text())))
    variants = list(rows[0]["success"])
    lines = [
        f"Default profile (`libero_object` tasks {rows[0]['tasks']}, {rows[0]['trials_per_task']} trials per task), "
        "two runs that differ only in the tokenizer layout.",
        "",
        "| layout | tokens / layer | tokenizer MSE robust (naive) | policy token acc, robust (teacher-forced / greedy) | "
        + " | ".join(f"success {v}" for v in variants) + " |",
        "|---|---|---|---|" + "---|" * len(variants),
    ]
    for r in rows:
        greedy = r["robust_main_greedy_token_acc"]
        lines.append(
            f"| {r['layout']} | {r['tokens_per_layer']} | {r['robust_mse']:.2e} ({r['naive_mse']:.2e}) | "
            f"{100 * r['robust_main_token_acc']:.1f}% / {'—' if greedy is None else f'{100 * greedy:.1f}%'} | "
            + " | ".join(f"{100 * r['success'][v]:.1f}%" for v in variants) + " |"
        )
    result = {"rows": rows, "provenance": provenance(seed=0)}
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "pipeline_layout_ab"
    write_results(out, "layout_ab", result, "\n".join(lines))
    return result


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
