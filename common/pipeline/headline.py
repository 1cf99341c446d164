"""The headline result: one small table and one plot, per suite, built from the committed suite-protocol
comparisons (``python -m phase3.compare`` outputs under ``results/``), for the README's first screen.

``python -m rsd_pipeline report`` rewrites ``results/headline/`` (only when a number changed, so reruns
leave the files alone) before it regenerates the docs; the test suite fails when the committed table
differs from what these comparisons give.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.eval.summary import identical_label, no_value, pct
from common.provenance import provenance, write_json

HEADLINE_DIR = "headline"


@dataclass(frozen=True)
class HeadlineRun:
    label: str  # the suite and the models, as the table's first column shows them
    comparison: str  # a phase3.compare output folder, relative to results/


# The suite protocol runs (50 trials per task, or all 30 layouts per task the demos never used).
HEADLINE_RUNS = (
    HeadlineRun("libero_object (default profile, 0.5M main)", "phase3/compare_libero_object"),
    HeadlineRun("libero_spatial (spatial profile, 0.5M main)", "phase3/compare_libero_spatial"),
    HeadlineRun("libero_spatial (256 x 4 main, 3.5M)", "phase3_diagnostics/model_size/compare_held_out"),
)


def headline_rows(results_root: Path) -> list[dict]:
    """One row per run: success of the scripted expert and of each variant, fine-grained success,
    robust-A's speculative token-decode speedup and its share of chunks identical to main-only decoding."""
    rows = []
    for run in HEADLINE_RUNS:
        path = results_root / run.comparison / "comparison.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: comparison not found (expected the output of python -m phase3.compare for {run.label})")
        data = json.loads(path.read_text())
        variants = data["variants"]
        missing = {"naive", "robust-A"} - set(variants)
        if missing:
            raise ValueError(f"{path}: expected variants naive and robust-A, found {sorted(variants)}")
        cfg = data["config"]
        first = cfg.get("first_trial", 0)
        trials = f"{cfg['num_trials']} / task" + (f", init states {first}-{first + cfg['num_trials'] - 1}" if first else "")
        if "robust-B" in variants and variants["robust-B"]["trials_per_task"] != cfg["num_trials"]:
            trials += f"; B: {variants['robust-B']['trials_per_task']} / task"
        rows.append({
            "label": run.label, "comparison": f"results/{run.comparison}", "suite": cfg["task_suite"], "trials": trials,
            "expert": data.get("expert_success_rate"),
            **{name: variants[name]["success_rate"] if name in variants else None for name in ("naive", "robust-A", "robust-B")},
            "fine_grained_naive": variants["naive"]["fine_grained_success_rate"],
            "fine_grained_robust_a": variants["robust-A"]["fine_grained_success_rate"],
            "speedup_robust_a": variants["robust-A"]["token_decode_speedup"],
            "lossless_robust_a": variants["robust-A"]["lossless_identical_fraction"],
            "chunks_robust_a": variants["robust-A"].get("chunks"),
            "source_git_sha": data.get("provenance", {}).get("git_sha"),
        })
    return rows


def headline_table(rows: list[dict]) -> str:
    lines = [
        "| suite (models) | trials | scripted expert | naive RFSQ | robust RFSQ (A) | robust decoder, naive models (B) "
        "| fine-grained: naive → robust-A | speculative decode speedup (robust-A) | identical to main-only |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['trials']} | {pct(r['expert'])} | {pct(r['naive'])} | **{pct(r['robust-A'])}** | {pct(r['robust-B'])} "
            f"| {pct(r['fine_grained_naive'])} → {pct(r['fine_grained_robust_a'])} | {r['speedup_robust_a']:.2f}x "
            f"| {identical_label(r['lossless_robust_a'], r['chunks_robust_a'])} |"
        )
    sources = ", ".join(f"`{r['comparison']}`" for r in rows)
    return "\n".join(lines) + f"\n\nFrom {sources} (one `python -m phase3.compare` run each).\n"


def plot_headline(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [("scripted expert", "expert", "#9e9e9e"), ("naive RFSQ", "naive", "#e08a3c"), ("robust RFSQ (A)", "robust-A", "#2f6db5")]
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    width = 0.26
    for i, (name, key, color) in enumerate(bars):
        xs = [j + (i - 1) * width for j in range(len(rows))]
        values = [100 * (0.0 if no_value(r[key]) else r[key]) for r in rows]
        ax.bar(xs, values, width, label=name, color=color)
        for x, v in zip(xs, values):
            ax.text(x, v + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [r["label"].replace(" (", "\n(") for r in rows], fontsize=8)
    ax.set_ylabel("closed-loop success (%)")
    ax.set_ylim(0, 122)
    ax.legend(ncol=3, fontsize=8, loc="upper center", frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_headline(results_root: Path) -> bool:
    """Rewrite ``results/headline/`` when its table would change; returns whether it did."""
    rows = headline_rows(results_root)
    table = headline_table(rows)
    out = results_root / HEADLINE_DIR
    md = out / "headline.md"
    if md.exists() and md.read_text() == table and (out / "headline.png").exists():
        return False
    write_json(out / "headline.json", {"rows": rows, "provenance": provenance()})
    md.write_text(table)
    plot_headline(rows, out / "headline.png")
    return True
