"""The local pipeline's report: ``REPORT.md`` with the headline tables, the plots, and the JSON behind
every number copied next to it."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.eval.summary import decoding_label, identical_label, no_value, num, pct
from common.provenance import write_json


def from_scratch_seconds(summary: dict) -> float:
    """What the profile takes when no stage is reused, from the stages' own recorded times: their sum,
    or, when the naive and robust branches ran side by side, the other stages' sum plus the longer
    branch (each branch's times were recorded while the other ran beside it)."""
    seconds = {k: v for k, v in summary.get("stage_seconds", {}).items() if v is not None}
    if not summary.get("side_by_side"):
        return sum(seconds.values())
    branches = summary["branch_stages"]
    in_branch = {k for names in branches.values() for k in names}
    return (sum(v for k, v in seconds.items() if k not in in_branch)
            + max(sum(seconds.get(k, 0.0) for k in names) for names in branches.values()))


def _from_scratch(summary: dict) -> str:
    if not summary.get("stage_seconds") or all(not t["skipped"] for t in summary["stages"].values()):
        return ""
    how = "the stages' recorded times, the two branches side by side," if summary.get("side_by_side") else "the stages' recorded times"
    # a stage that found its outputs complete (collect_demos resumes a full file) recorded none of its work;
    # summaries from before the stamps said so: a demo stage recorded under 1 s
    if "stages_found_complete" in summary:
        resumed, how_known = list(summary["stages_found_complete"]), "outputs unchanged"
    else:
        resumed = [k for k, v in summary["stage_seconds"].items() if k.startswith("demos") and v is not None and v < 1.0]
        how_known = "recorded under 1 s"
    unknown = (f"; {', '.join(resumed)} found {'its file' if len(resumed) == 1 else 'their files'} complete ({how_known}), "
               "so their work is not in that sum") if resumed else ""
    return f" (this call, reusing finished stages; from scratch {how} sum to {from_scratch_seconds(summary) / 60:.1f} min{unknown})"


def headline_markdown(summary: dict) -> str:
    p = summary["profile"]
    p1, p3 = summary["phase1"], summary["phase3"]
    lines = [
        f"Profile **{p['name']}**: `{p['suite']}` tasks {p['tasks']}, {p['demos_per_task']} scripted demos per task"
        + (f" + {p['dart_demos_per_task']} DART demos per task (action noise {p['dart_noise']:g}; tokenizers on the clean demos)"
           if p.get("dart_demos_per_task") else "")
        + (f" + {p['fresh_demos_per_task']} clean and {p.get('fresh_dart_demos_per_task', 0)} DART demos per task on fresh layouts"
           if p.get("fresh_demos_per_task") or p.get("fresh_dart_demos_per_task") else "")
        + (", observations relative to the end effector" if p.get("eef_relative") else "") + ", "
        f"tokenizer {p['tokenizer_epochs']} epochs, policy {p['policy_epochs']} epochs, {p['eval_trials']} trials per task"
        + (f" ({p['variant_trials']})" if p.get("variant_trials") else "") + ". "
        f"Wall time {summary['wall_seconds'] / 60:.1f} min" + _from_scratch(summary) + ".",
        "",
        "| | naive RFSQ | robust RFSQ |",
        "|---|---|---|",
        f"| tokenizer held-out MSE (8 layers) | {p1['naive_mse']:.3e} | {p1['robust_mse']:.3e} |",
        f"| MSE after 2 layers | {p1['diagnostics']['naive']['layers'][1]['mse_after']:.3e} | {p1['diagnostics']['robust']['layers'][1]['mse_after']:.3e} |",
        f"| dead layers | {p1['diagnostics']['naive']['dead_layers'] or 'none'} | {p1['diagnostics']['robust']['dead_layers'] or 'none'} |",
        "",
        f"Scripted expert on these tasks: {pct(p3.get('expert_success_rate'))}.",
        "",
        "| variant | success | fine-grained | decoded | token decode ms / chunk (spec / main-only) | token-decode speedup | "
        "main passes / chunk (spec) | mean accepted layers a | draft cost c (main passes) | verify overhead v (main passes) | lossless identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in p3["variants"].items():
        sp, lat = v.get("token_decode_speedup"), v.get("latency_ms", {})
        main_ms, ref_ms = lat.get("main_ms", {}).get("mean"), lat.get("ref_main_ms", {}).get("mean")
        spec_ms = None if no_value(main_ms) else main_ms + (lat.get("draft_ms", {}).get("mean") or 0.0)
        cost, over = v.get("draft_cost_in_main_passes"), v.get("verify_overhead_in_main_passes")
        lines.append(
            f"| {name} | {pct(v['success_rate'])} | {pct(v['fine_grained_success_rate'])} | {decoding_label(v)} | "
            f"{num(spec_ms)} / {num(ref_ms)} | {num(sp, '{:.2f}x')} | "
            f"{num(v['main_passes_per_chunk'])} of {num(v['main_only_passes_per_chunk'], '{:.0f}')} | "
            f"{num(v['mean_accepted_layers'])} | {num(cost)} | {num(over)} | {identical_label(v['lossless_identical_fraction'], v.get('chunks'))} |"
        )
    return "\n".join(lines)


def write_report(summary: dict, results: Path, report_dir: Path) -> Path:
    """``report/REPORT.md`` + the PNGs + the JSON behind every number; also ``results/pipeline/``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    headline = headline_markdown(summary)
    write_json(results / "pipeline" / "pipeline_summary.json", summary)
    (results / "pipeline" / "pipeline_summary.md").write_text(headline + "\n")
    copied = []
    for src in sorted(results.rglob("*")):
        if src.suffix in (".json", ".png", ".md") and src.is_file() and "stamps" not in src.parts:
            dst = report_dir / "data" / src.relative_to(results)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied.append(dst.relative_to(report_dir))
    pngs = [c for c in copied if c.suffix == ".png"]
    body = [
        "# RSD local pipeline report",
        "",
        headline,
        "",
        "## Phase 1 — tokenizers",
        "",
        (results / "phase1" / "comparison.md").read_text(),
        "## Phase 2 — main and draft models",
        "",
        (results / "phase2" / "train_summary.md").read_text(),
        "",
        (results / "phase2" / "train_summary_naive.md").read_text(),
        "",
        "## Phase 3 — closed-loop evaluation",
        "",
        (results / "phase3" / f"compare_{summary['profile']['suite']}" / "comparison.md").read_text(),
        "## Plots",
        "",
        *[f"![{p.stem}]({p.as_posix()})" for p in pngs],
        "",
        "## Stage timings",
        "",
        "| stage | seconds | skipped |",
        "|---|---|---|",
        *[f"| {k} | {v['seconds']:.0f} | {'yes' if v['skipped'] else 'no'} |" for k, v in summary["stages"].items()],
        "",
        f"Every number above is read from the JSON files under `data/` (git `{summary['provenance']['git_sha']}`, "
        f"{summary['provenance']['device']}).",
        "",
    ]
    path = report_dir / "REPORT.md"
    path.write_text("\n".join(body))
    return path
