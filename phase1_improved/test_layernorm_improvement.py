"""The seed's verification script (a runnable script, not a pytest file).

    python -m phase1_improved.test_layernorm_improvement [--naive PATH] [--robust PATH] [--out DIR]

Loads the naive (``rfsq_best.pt``) and robust (``rfsq_robust_best.pt``) tokenizers from the models
dir, evaluates both on the robust run's held-out episodes, prints the MSE of each, the improvement,
the per-layer table and PASS/MISS against the seed's criteria (robust MSE < 0.012, improvement
> 30%) and our goals; writes ``comparison.json`` (with provenance), ``comparison.md`` and
``diagnostics.png`` to ``--out`` (default ``<results dir>/phase1``). Logic: ``common/tokenizer/compare.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import rsd_entry
from common.artifacts import phase1_results, results_dir_of
from common.locks import check_writable_dir
from common.tokenizer.compare import TokenizerComparisonConfig, compare_naive_and_robust


def cli(argv: list[str] | None = None) -> dict:
    cfg = rsd_entry.parse_config(TokenizerComparisonConfig, argv, prog="python -m phase1_improved.test_layernorm_improvement")
    # the output folder first, as the other entry points do: not after both tokenizers were evaluated
    check_writable_dir(Path(cfg.out) if cfg.out else phase1_results(results_dir_of(cfg.results_dir)), "--out")
    result = compare_naive_and_robust(cfg)
    print(result["markdown"])
    print("wrote " + ", ".join(result["written"]))
    return result


if __name__ == "__main__":
    rsd_entry.main(cli, sys.argv[1:])
