"""Phase 3 throughput with 1 vs 2 worker processes on the same episodes.

    python -m benchmarks.evaluation.bench_eval_workers [--task-suite libero_object --tasks 0-1 --num-trials 4]

Runs the same evaluation (same tasks and init states, fresh output folders) with ``--workers 1``
and ``--workers 2`` and writes episodes per minute to ``results/bench_eval_workers.json`` / ``.md``.
Needs the Phase 2 checkpoints in the models dir.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import rsd_entry
from common.artifacts import results_dir_of
from common.eval.closed_loop import evaluate
from common.eval.config import EvalConfig
from common.provenance import provenance, write_results

PROG = "python -m benchmarks.evaluation.bench_eval_workers"


@dataclass
class BenchEvalConfig:
    """Phase 3 throughput with 1 vs 2 worker processes on the same episodes."""

    task_suite: str = "libero_object"  # LIBERO suite
    tasks: str = "0-1"  # task ids, e.g. "0-1" or "0,3"
    num_trials: int = 4  # trials per task (trial i = init state i)
    max_steps: int = 0  # step limit per episode (0 = the suite's)
    models_dir: str = ""  # "" = $RSD_MODELS_DIR or ./artifacts/models
    results_dir: str = ""  # "" = $RSD_RESULTS_DIR or ./results
    out: str = ""  # "" = <results dir>


def run(cfg: BenchEvalConfig) -> dict:
    rows = []
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            ecfg = EvalConfig(task_suite=cfg.task_suite, tasks=cfg.tasks, num_trials=cfg.num_trials, workers=workers,
                              max_steps=cfg.max_steps, models_dir=cfg.models_dir, out=str(Path(tmp) / "eval"))
            started = time.perf_counter()
            info = evaluate(ecfg, progress=False)
            wall = time.perf_counter() - started
        steps = sum(t["mean_steps"] * t["episodes"] for t in info["per_task"].values())
        rows.append({"workers": workers, "episodes": info["episodes"], "wall_seconds": wall,
                     "episodes_per_minute": info["episodes"] / wall * 60.0, "env_steps_per_second": steps / wall})
    result = {"config": cfg.__dict__, "rows": rows, "speedup_2_over_1": rows[1]["episodes_per_minute"] / rows[0]["episodes_per_minute"],
              "provenance": provenance()}
    out = Path(cfg.out) if cfg.out else results_dir_of(cfg.results_dir)
    md = ["| workers | episodes | wall s | episodes / min | env steps / s |", "|---|---|---|---|---|"]
    md += [f"| {r['workers']} | {r['episodes']} | {r['wall_seconds']:.1f} | {r['episodes_per_minute']:.1f} | {r['env_steps_per_second']:.1f} |" for r in rows]
    md.append(f"\n2 workers vs 1: {result['speedup_2_over_1']:.2f}x (same tasks and init states; wall time includes env and policy start-up).")
    write_results(out, "bench_eval_workers", result, "\n".join(md))
    return result


def main(argv: list[str]) -> dict:
    return run(rsd_entry.parse_config(BenchEvalConfig, argv, prog=PROG))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
