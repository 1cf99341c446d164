"""One comparison command for Phase 3: naive vs robust (Strategy A) vs robust decoder with
naive-token models (Strategy B), each decoded speculatively AND main-only on the same chunks.

    python -m phase3.compare --task-suite libero_object --tasks 0-9 --num-trials 10

Flags: ``common.eval.compare.ComparisonConfig``; what it writes: ``common/eval/compare.py``.
"""

from __future__ import annotations

import sys

import rsd_entry
from common.eval.compare import ComparisonConfig, run_comparison


def cli(argv: list[str] | None = None) -> dict:
    cfg = rsd_entry.parse_config(ComparisonConfig, argv, prog="python -m phase3.compare")
    result = run_comparison(cfg)
    print((cfg.out_dir() / "comparison.md").read_text())
    return result


if __name__ == "__main__":
    rsd_entry.main(cli, sys.argv[1:])
