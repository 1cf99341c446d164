"""Collection throughput: episodes/minute and sim steps/s with 1 and 2 workers (no cameras).

    .venv/bin/python -m benchmarks.evaluation.bench_collection --episodes 12

Collects `--episodes` demos of one libero_object task into a temporary file per worker count;
wall time includes worker start-up and env builds (what a user waits for). Steps counted are
the recorded control steps (policy steps, excluding the 10 settle steps per episode).
Writes results/bench_collection.json with versions, git sha and cpu count.
"""

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import h5py

from common.sim.demo_collection import collect_demos
from common.sim.libero_env import library_versions
from common.provenance import git_sha


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--episodes", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default="results/bench_collection.json")
    args = parser.parse_args()

    runs = []
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.hdf5"
            start = time.perf_counter()
            summary = collect_demos("libero_object", [args.task], args.episodes, path, workers=workers, progress=True)
            wall = time.perf_counter() - start
            with h5py.File(path, "r") as f:
                steps = int(sum(f["data"][d].attrs["num_samples"] for d in f["data"]))
        episodes = summary["episodes_run"]
        runs.append({
            "workers": workers,
            "episodes": episodes,
            "kept": summary["tasks"][args.task]["kept"],
            "wall_s": round(wall, 2),
            "episodes_per_min": round(60.0 * episodes / wall, 2),
            "sim_steps_per_s": round(steps / wall, 1),
        })
        print(runs[-1])

        result = {
        "suite": "libero_object",
        "task_id": args.task,
        "cameras": False,
        "runs": runs,
        "versions": library_versions(),
        "git_sha": git_sha(),
        "cpu_count": os.cpu_count(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(render_markdown(result))
    print(json.dumps(result, indent=2))


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
    main()
