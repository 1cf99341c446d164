"""Collection throughput: episodes/minute and sim steps/s with 1 and 2 workers (no cameras).

    .venv/bin/python -m benchmarks.evaluation.bench_collection --episodes 12

Collects `--episodes` demos of one libero_object task into a temporary file per worker count;
wall time includes worker start-up and env builds (what a user waits for). Steps counted are
the recorded control steps (policy steps, excluding the 10 settle steps per episode).
Writes results/bench_collection.json with versions, git sha and cpu count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py

import rsd_entry
from common.sim.demo_collection import collect_demos
from common.sim.libero_env import library_versions
from common.provenance import git_sha

PROG = "python -m benchmarks.evaluation.bench_collection"


@dataclass
class BenchCollectionConfig:
    """Collection throughput: episodes/minute and sim steps/s per worker count (no cameras)."""

    task: int = 0  # libero_object task collected
    episodes: int = 12  # demos collected per worker count
    workers: list[int] = field(default_factory=lambda: [1, 2])  # worker counts compared, several: --workers 1 2
    out: str = "results/bench_collection.json"  # the JSON written (the table goes beside it as .md)

    def __post_init__(self) -> None:
        if self.episodes < 1 or not self.workers or min(self.workers) < 1:
            raise ValueError(f"--episodes and --workers: expected >= 1, found {self.episodes} and {self.workers}")


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``BenchCollectionConfig``. Built here, not by ``rsd_entry.build_parser``: ``--workers`` takes
    several values (``--workers 1 2``), and that builder makes one-value flags only."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    docs, defaults = rsd_entry.field_help(BenchCollectionConfig), BenchCollectionConfig()
    parser.add_argument("--task", type=int, default=defaults.task, help=f"{docs['task']} (default: {defaults.task})")
    parser.add_argument("--episodes", type=int, default=defaults.episodes, help=f"{docs['episodes']} (default: {defaults.episodes})")
    parser.add_argument("--workers", type=int, nargs="+", default=defaults.workers, help=f"{docs['workers']} (default: {defaults.workers})")
    parser.add_argument("--out", default=defaults.out, help=f"{docs['out']} (default: {defaults.out!r})")
    rsd_entry.add_debug_flag(parser)
    return parser


def main(argv: list[str]) -> dict:
    parser = build_parser()
    try:
        cfg = BenchCollectionConfig(**{k: v for k, v in vars(parser.parse_args(argv)).items() if k != "debug"})
    except ValueError as exc:
        parser.error(str(exc))

    runs = []
    for workers in cfg.workers:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.hdf5"
            start = time.perf_counter()
            summary = collect_demos("libero_object", [cfg.task], cfg.episodes, path, workers=workers, progress=True)
            wall = time.perf_counter() - start
            with h5py.File(path, "r") as f:
                steps = int(sum(f["data"][d].attrs["num_samples"] for d in f["data"]))
        episodes = summary["episodes_run"]
        runs.append({
            "workers": workers,
            "episodes": episodes,
            "kept": summary["tasks"][cfg.task]["kept"],
            "wall_s": round(wall, 2),
            "episodes_per_min": round(60.0 * episodes / wall, 2),
            "sim_steps_per_s": round(steps / wall, 1),
        })
        print(runs[-1])

    result = {
        "suite": "libero_object",
        "task_id": cfg.task,
        "cameras": False,
        "runs": runs,
        "versions": library_versions(),
        "git_sha": git_sha(),
        "cpu_count": os.cpu_count(),
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(render_markdown(result))
    print(json.dumps(result, indent=2))
    return result


def render_markdown(result: dict) -> str:
    """Episodes per minute and sim steps/s per worker count (no cameras)."""
    lines = [
        f"Scripted-expert collection, `{result['suite']}` task {result['task_id']}, cameras {'on' if result['cameras'] else 'off'}, "
        f"{result['cpu_count']} CPU cores (start-up included):",
        "",
        "| workers | episodes | wall s | episodes / min | sim steps / s |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r['workers']} | {r['episodes']} | {r['wall_s']:.1f} | {r['episodes_per_min']:.1f} | {r['sim_steps_per_s']:.1f} |" for r in result["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
