"""Phase 3 — closed-loop LIBERO evaluation, with and without speculative decoding.

Local:  python -m phase3.modal_phase3_libero_eval --task-suite libero_object --tasks 0-9 --num-trials 50 --use-speculative-decoding
Modal:  modal run phase3/modal_phase3_libero_eval.py --task-suite libero_object --tasks 0-9 --num-trials 50 --use-speculative-decoding

Same flags on both (fields of ``common.eval.config.EvalConfig``). Locally, episodes run in a
process pool (``--workers``, default: the core count); on Modal, one container per (task, trial
shard) via ``.starmap(..., order_outputs=False)``, each writing its rows to the results volume;
the local entrypoint merges them. Trial ``i`` is always init state ``i``: sharding never changes
which init states are evaluated. Outputs in ``--out``: ``episodes.jsonl`` (one row per episode,
resumable), ``eval_info.json``, ``eval_table.md``, ``eval_plots.png``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

import modal

import rsd_entry
from common.eval.closed_loop import evaluate, planned_jobs, run_trials
from common.eval.config import EvalConfig
from common.eval.summary import render_table, summarize, write_outputs

app = modal.App("rsd-phase3-libero-eval")
models_volume = rsd_entry.models_volume()
data_volume = rsd_entry.data_volume()
TRIALS_PER_SHARD = 10


@app.function(
    image=rsd_entry.cloud_image(with_sim=True),
    volumes={rsd_entry.MODELS_MOUNT: models_volume, rsd_entry.DATA_MOUNT: data_volume},
    cpu=2.0,
    memory=8192,
    timeout=3 * 3600,
)
def run_shard(config: dict, task_id: int, trials: list[int]) -> list[dict]:
    """One container: one task, a shard of trial indices (each trial index = its init state)."""
    cfg = rsd_entry.resolve(EvalConfig(**config))  # the container's /models, /data/results
    rsd_entry.setup_process(cfg.torch_threads)
    rows = run_trials(cfg, task_id, trials)
    if not modal.is_local():
        shard = cfg.out_dir() / "shards" / f"task{task_id}_trials{trials[0]}-{trials[-1]}.jsonl"
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data_volume.commit()
    return rows


def shard_jobs(cfg: EvalConfig) -> list[tuple[int, list[int]]]:
    """(task, trials) shards covering exactly the planned (task, trial) pairs."""
    by_task: dict[int, list[int]] = {}
    for task, trial in planned_jobs(cfg):
        by_task.setdefault(task, []).append(trial)
    return [(task, trials[i : i + TRIALS_PER_SHARD]) for task, trials in by_task.items() for i in range(0, len(trials), TRIALS_PER_SHARD)]


def _run_on_modal(cfg: EvalConfig) -> dict:
    import time

    started = time.perf_counter()
    rows = []
    for shard_rows in run_shard.starmap([(asdict(cfg), t, trials) for t, trials in shard_jobs(cfg)], order_outputs=False):
        rows.extend(shard_rows)
    out = Path("results/phase3_modal") / cfg.run_name
    local_cfg = replace(cfg, out=str(out))
    info = summarize(local_cfg, rows, wall_seconds=time.perf_counter() - started, episodes_run=len(rows), workers=len(shard_jobs(cfg)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_outputs(info, out)
    print(render_table(info))
    return info


main = app.local_entrypoint()(rsd_entry.modal_entrypoint(EvalConfig, _run_on_modal))


def cli(argv: list[str] | None = None) -> dict:
    cfg = rsd_entry.parse_config(EvalConfig, argv, prog="python -m phase3.modal_phase3_libero_eval")
    info = evaluate(cfg)
    print(render_table(info))
    print(f"wrote {cfg.out_dir()}")
    return info


if __name__ == "__main__":
    rsd_entry.main(cli, sys.argv[1:])
