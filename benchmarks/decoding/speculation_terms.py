"""The terms of the speedup formula, per closed-loop run: where speculative decoding gains or loses time.

    python -m benchmarks.decoding.speculation_terms --runs "K = 3=DIR,K = 2=DIR,..." --out results/phase3_diagnostics/drafted_layers

Each DIR is one Phase 3 evaluation run with speculation and ``--compare-main-only`` (its
``eval_info.json``), so both decodes ran on the same chunks. Per run: success, the decoded layers L
(main-only passes), the drafted layers K, the mean accepted layers a with the per-layer acceptance,
the draft cost c and verify overhead v in main passes, the formula S = L / (L - a + c + v) next to
the measured token-decode speedup, and the milliseconds per chunk of both paths. Runs compared here
must share suite, tasks, trials and first init state (checked).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import rsd_entry
from common.eval.compare import draft_cost_in_main_passes, verify_overhead_in_main_passes
from common.eval.runs import parse_runs, same_trials, trials_key
from common.provenance import REPO_ROOT, provenance, write_results

PROG = "python -m benchmarks.decoding.speculation_terms"


def _row(label: str, folder: Path) -> tuple[dict, tuple]:
    path = folder / "eval_info.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder}: expected eval_info.json (one Phase 3 evaluation) for run {label!r}; not found")
    info = json.loads(path.read_text())
    cfg = info["config"]
    if not cfg.get("use_speculative_decoding") or not cfg.get("compare_main_only"):
        raise ValueError(f"{folder}: expected a run with --use-speculative-decoding and --compare-main-only "
                         f"(both paths on the same chunks); found use_speculative_decoding={cfg.get('use_speculative_decoding')}, "
                         f"compare_main_only={cfg.get('compare_main_only')}")
    L, a = info["main_only_passes_per_chunk"], info["mean_accepted_layers"]
    c, v = draft_cost_in_main_passes(info), verify_overhead_in_main_passes(info)
    lat = info["latency_ms"]
    try:
        rel = str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        rel = str(path)
    row = {
        "run": label, "success_rate": info["success_rate"], "episodes": info["episodes"],
        "decoded_layers": L, "drafted_layers": len(info.get("acceptance_per_layer") or []),
        "mean_accepted_layers": a, "acceptance_per_layer": info.get("acceptance_per_layer"),
        "main_passes_per_chunk": info["main_passes_per_chunk"], "draft_cost_c": c, "verify_overhead_v": v,
        "formula_speedup": L / (L - a + c + v) if c is not None and v is not None else None,
        "token_decode_speedup": info["token_decode_speedup"],
        "spec_ms_per_chunk": lat["draft_ms"]["mean"] + lat["main_ms"]["mean"], "main_only_ms_per_chunk": lat["ref_main_ms"]["mean"],
        "lossless_identical_fraction": info["lossless_identical_fraction"], "chunks": info["chunks"],
        "source": rel, "source_git_sha": info.get("provenance", {}).get("git_sha"),
    }
    return row, trials_key(cfg)


def build(runs: list[tuple[str, Path]]) -> dict:
    rows, settings = [], set()
    for label, folder in runs:
        row, key = _row(label, folder)
        rows.append(row)
        settings.add(key)
    suite, tasks, trials, first = same_trials(settings)
    return {"suite": suite, "tasks": tasks, "trials_per_task": trials, "first_trial": first, "rows": rows, "provenance": provenance()}


def _num(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def markdown(result: dict) -> str:
    lines = [
        f"`{result['suite']}` tasks {result['tasks']}, {result['trials_per_task']} trials per task from init state "
        f"{result['first_trial']}; speculative and main-only decoding of the same chunks, batch 1. "
        "S = L / (L - a + c + v): L decoded layers, a mean accepted layers, c draft cost and v verify overhead in main passes.",
        "",
        "| run | success | L | K | a | accepted per drafted layer | main passes (spec) | c | v | S formula | S measured | ms / chunk (spec / main-only) | lossless identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        per_layer = " / ".join(f"{x:.2f}" for x in (r["acceptance_per_layer"] or []))
        lines.append(
            f"| {r['run']} | {r['success_rate']:.1%} | {r['decoded_layers']:.0f} | {r['drafted_layers']} | {r['mean_accepted_layers']:.2f} | "
            f"{per_layer} | {r['main_passes_per_chunk']:.2f} | {_num(r['draft_cost_c'])} | {_num(r['verify_overhead_v'])} | "
            f"{_num(r['formula_speedup'], '{:.2f}x')} | {r['token_decode_speedup']:.2f}x | "
            f"{r['spec_ms_per_chunk']:.2f} / {r['main_only_ms_per_chunk']:.2f} | {r['lossless_identical_fraction']:.2%} of {r['chunks']} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class SpeculationTermsConfig:
    """The terms of the speedup formula, per closed-loop run: where speculative decoding gains or loses time."""

    runs: str = ""  # comma-separated "label=folder" pairs (Phase 3 evaluation folders; required)
    out: str = "results/phase3_diagnostics/speculation_terms"  # output folder

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError('--runs: expected "label=folder" pairs, found none')


def main(argv: list[str]) -> None:
    cfg = rsd_entry.parse_config(SpeculationTermsConfig, argv, prog=PROG)
    result = build(parse_runs(cfg.runs))
    out = Path(cfg.out)
    write_results(out, "speculation_terms", result, markdown(result))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
