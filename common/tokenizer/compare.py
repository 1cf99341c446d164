"""Phase 1 comparison: the naive and the robust tokenizer on the same held-out chunks (MSE, what each
layer does, the seed's criteria and ours), written as ``comparison.json`` / ``.md`` / ``diagnostics.png``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.artifacts import NAIVE_TOKENIZER, ROBUST_TOKENIZER, models_dir_of, phase1_results, results_dir_of
from common.provenance import portable_path, provenance, write_json
from common.tokenizer.diagnostics import compare_tokenizers, diagnostics_table, plot_diagnostics
from common.tokenizer.model import load_tokenizer


@dataclass
class TokenizerComparisonConfig:
    """Flags of ``python -m phase1_improved.test_layernorm_improvement``."""

    naive: str = ""  # "" = <models dir>/rfsq_best.pt
    robust: str = ""  # "" = <models dir>/rfsq_robust_best.pt
    data: str = ""  # "" = the data the robust tokenizer was trained on
    out: str = ""  # "" = <results dir>/phase1
    models_dir: str = ""  # "" = $RSD_MODELS_DIR or ./artifacts/models
    results_dir: str = ""  # "" = $RSD_RESULTS_DIR or ./results


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render_markdown(result: dict) -> str:
    lines = [
        f"Held-out: {result['heldout']['num_chunks']} chunks from {len(result['heldout']['val_episodes'])} episodes of `{portable_path(result['heldout']['data'])}`.",
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


def compare_naive_and_robust(cfg: TokenizerComparisonConfig) -> dict:
    """Load both tokenizers, evaluate them on the robust run's held-out episodes, write the results."""
    models = models_dir_of(cfg.models_dir)
    naive = load_tokenizer(cfg.naive or models / NAIVE_TOKENIZER, require_conditioning="none")
    robust = load_tokenizer(cfg.robust or models / ROBUST_TOKENIZER, require_conditioning="layernorm")
    result = compare_tokenizers(naive, robust, data=cfg.data or None)
    result["provenance"] = provenance(seed=robust.extra.get("train_config", {}).get("seed"))
    out = Path(cfg.out) if cfg.out else phase1_results(results_dir_of(cfg.results_dir))
    write_json(out / "comparison.json", result)
    plot_diagnostics(result["diagnostics"], out / "diagnostics.png", title="Naive vs robust RFSQ (held-out)")
    markdown = render_markdown(result)
    (out / "comparison.md").write_text(markdown)
    result_paths = [out / "comparison.json", out / "comparison.md", out / "diagnostics.png"]
    return {**result, "markdown": markdown, "written": [str(p) for p in result_paths]}
