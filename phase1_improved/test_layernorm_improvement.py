"""The seed's verification script (a runnable script, not a pytest file).

    python -m phase1_improved.test_layernorm_improvement [--naive PATH] [--robust PATH] [--out DIR]

Loads the naive (``rfsq_best.pt``) and robust (``rfsq_robust_best.pt``) tokenizers from the models
dir, evaluates both on the robust run's held-out episodes, prints the MSE of each, the improvement,
the per-layer table and PASS/MISS against the seed's criteria (robust MSE < 0.012, improvement
> 30%) and our goals; writes ``comparison.json`` (with provenance), ``comparison.md`` and
``diagnostics.png`` to ``--out`` (default ``$RSD_RESULTS_DIR/phase1``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import rsd_entry
from common.action_tokenizer import load_tokenizer
from common.diagnostics import compare_tokenizers, diagnostics_table, plot_diagnostics
from common.paths import NAIVE_TOKENIZER, ROBUST_TOKENIZER, models_dir, results_dir
from common.provenance import provenance, write_json


@dataclass
class CompareConfig:
    naive: str = ""  # "" = <models dir>/rfsq_best.pt
    robust: str = ""  # "" = <models dir>/rfsq_robust_best.pt
    data: str = ""  # "" = the data the robust tokenizer was trained on
    out: str = ""  # "" = $RSD_RESULTS_DIR/phase1


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render_markdown(result: dict) -> str:
    lines = [
        f"Held-out: {result['heldout']['num_chunks']} chunks from {len(result['heldout']['val_episodes'])} episodes of `{result['heldout']['data']}`.",
        "",
        "| tokenizer | MSE (normalized actions) | dead layers | tokens/layer |",
        "|---|---|---|---|",
    ]
    for name in ("naive", "robust"):
        d = result["diagnostics"][name]
        lines.append(f"| {name} ({d['conditioning']}) | {d['mse']:.3e} | {d['dead_layers'] or 'none'} | {d['tokens_per_layer']} |")
    lines += ["", f"Improvement: **{result['improvement_pct']:.1f}%**", ""]
    lines += [f"- seed: {k}: {verdict(v)}" for k, v in result["seed_criteria"].items()]
    lines += [f"- RSD goal: {k}: {verdict(v)}" for k, v in result["rsd_goals"].items()]
    lines += ["", diagnostics_table(result["diagnostics"]), ""]
    return "\n".join(lines)


def run(cfg: CompareConfig) -> dict:
    naive = load_tokenizer(cfg.naive or models_dir() / NAIVE_TOKENIZER, require_conditioning="none")
    robust = load_tokenizer(cfg.robust or models_dir() / ROBUST_TOKENIZER, require_conditioning="layernorm")
    result = compare_tokenizers(naive, robust, data=cfg.data or None)
    result["provenance"] = provenance(seed=robust.extra.get("train_config", {}).get("seed"))
    out = Path(cfg.out) if cfg.out else results_dir() / "phase1"
    write_json(out / "comparison.json", result)
    plot_diagnostics(result["diagnostics"], out / "diagnostics.png", title="Naive vs robust RFSQ (held-out)")
    markdown = render_markdown(result)
    (out / "comparison.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / 'comparison.json'}, {out / 'comparison.md'}, {out / 'diagnostics.png'}")
    return result


if __name__ == "__main__":
    run(rsd_entry.parse_config(CompareConfig, sys.argv[1:], prog="python -m phase1_improved.test_layernorm_improvement"))
