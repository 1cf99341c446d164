"""Phase 3 — closed-loop LIBERO evaluation, with and without speculative decoding.

Local:  python -m phase3.modal_phase3_libero_eval --task-suite libero_object --tasks 0-9 --num-trials 50 --use-speculative-decoding
Modal:  modal run phase3/modal_phase3_libero_eval.py --task-suite libero_object --tasks 0-9 --num-trials 50 --use-speculative-decoding
Plan:   python -m phase3.modal_phase3_libero_eval --plan --backbone openvla-oft --gpu H100 ...   (no token, nothing runs)
Long:   modal run --detach phase3/modal_phase3_libero_eval.py --spawn ...   (survives closing the terminal)

Same flags on both (fields of ``common.eval.config.EvalConfig``). Locally, episodes run in a
process pool (``--workers``, default: the core count). On Modal the backbone (read from the head
checkpoint on the volume, or ``--backbone``) picks the function: ``run_shard`` (CPU, state backbone,
10 trials per container) or ``run_shard_gpu`` (``--gpu`` type, the OpenVLA-OFT image, 25 trials per
container: each container loads the 7B model once). Shards are (task, trial range) pairs launched with
``.starmap(..., order_outputs=False)``; trial ``i`` is always init state ``i``, so sharding never
changes which init states are evaluated.

Fault tolerance: every shard appends each finished episode to ``<out>/shards/task<T>_trials<a>-<b>.jsonl``
on the ``rsd-data`` volume and commits the volume, so a preempted shard (GPU functions have
``retries``) resumes after its last finished episode; before launching, ``prepare_run`` reads the
volume and only unfinished shards are launched, so a finished shard is never rerun. It also refuses
an ``<out>`` that holds episodes of another configuration or other checkpoints.

``--spawn`` (with ``modal run --detach``) starts one driver container with ``.spawn()`` and returns at
once: the driver launches the shards, merges them and writes ``eval_info.json``/``eval_table.md``/
``eval_plots.png`` to ``<out>`` on the volume (``modal volume get rsd-data results/phase3/<run>``).
Without ``--detach`` Modal stops the app, and the spawned driver with it, when the local command
exits. Without ``--spawn`` the local entrypoint waits and writes the merged results to
``results/phase3_modal/<run>``. Rerunning either resumes.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path

import modal

import rsd_entry
from common.eval.closed_loop import evaluate
from common.eval.config import EvalConfig
from common.eval.shards import (
    drive, finished_rows, head_backbone, plan_text, run_shard_trials, write_run,
)
from common.eval.summary import render_table, summarize

app = modal.App("rsd-phase3-libero-eval")
models_volume = rsd_entry.models_volume()
data_volume = rsd_entry.data_volume()
SHARD_TIMEOUT_S = 3 * 3600
VLA_SHARD_TIMEOUT_S = 8 * 3600
DRIVER_TIMEOUT_S = 24 * 3600  # Modal's maximum; a rerun resumes from the volume
# Preemptible GPUs: a retried shard resumes after its last committed episode.
SHARD_RETRIES = modal.Retries(max_retries=3, initial_delay=30.0, backoff_coefficient=2.0)
VOLUMES = {rsd_entry.MODELS_MOUNT: models_volume, rsd_entry.DATA_MOUNT: data_volume}


# --- shard functions (logic: common/eval/shards.py) ---------------------------------------------------
def _shard(config: dict, task_id: int, trials: list[int]) -> list[dict]:
    cfg = rsd_entry.resolve(EvalConfig(**config))  # the container's /models, /data/results
    rsd_entry.setup_process(cfg.torch_threads)
    if not modal.is_local():
        data_volume.reload()  # see the episodes a preempted attempt committed
    return run_shard_trials(cfg, task_id, trials, commit=None if modal.is_local() else data_volume.commit)


@app.function(image=rsd_entry.cloud_image(with_sim=True), volumes=VOLUMES, cpu=2.0, memory=8192,
              timeout=SHARD_TIMEOUT_S, retries=modal.Retries(max_retries=2, initial_delay=10.0))
def run_shard(config: dict, task_id: int, trials: list[int]) -> list[dict]:
    """One CPU container (state backbone): one task, a shard of trial indices (trial index = init state)."""
    return _shard(config, task_id, trials)


@app.function(image=rsd_entry.vla_image(), gpu="H100", volumes=VOLUMES, cpu=4.0, memory=32768,
              timeout=VLA_SHARD_TIMEOUT_S, retries=SHARD_RETRIES)
def run_shard_gpu(config: dict, task_id: int, trials: list[int]) -> list[dict]:
    """One GPU container (openvla-oft backbone; GPU type from --gpu via ``with_options``)."""
    return _shard(config, task_id, trials)


def shard_function(cfg: EvalConfig, backbone: str):
    return run_shard_gpu.with_options(gpu=cfg.gpu) if backbone == "openvla-oft" else run_shard


def describe_function(cfg: EvalConfig):
    def describe(backbone: str) -> str:
        if backbone == "openvla-oft":
            return f"run_shard_gpu on 1x {cfg.gpu} (4 CPU, 32 GiB), timeout {VLA_SHARD_TIMEOUT_S // 3600} h, {SHARD_RETRIES.max_retries} retries"
        return f"run_shard on CPU (2 cores, 8 GiB), timeout {SHARD_TIMEOUT_S // 3600} h, 2 retries"
    return describe


@app.function(image=rsd_entry.cloud_image(with_sim=True), volumes=VOLUMES, timeout=900)
def prepare_run(config: dict) -> dict:
    """Read the head's backbone and the finished episodes from the volumes (cheap CPU container)."""
    cfg = rsd_entry.resolve(EvalConfig(**config))
    if not modal.is_local():
        models_volume.reload()
        data_volume.reload()
    out = {"backbone": head_backbone(cfg), "rows": finished_rows(cfg)}
    if not modal.is_local():
        data_volume.commit()
    return out


@app.function(image=rsd_entry.cloud_image(with_sim=True), volumes=VOLUMES, timeout=DRIVER_TIMEOUT_S)
def drive_remote(config: dict) -> dict:
    """The detached driver (``--spawn``): launches the shards and writes the merged results to the volume."""
    cfg = rsd_entry.resolve(EvalConfig(**config))
    rsd_entry.setup_process(0)
    info, rows = drive(cfg, prepare_run.local, shard_function)
    write_run(info, rows, cfg.out_dir())
    if not modal.is_local():
        data_volume.commit()
    print(render_table(info))
    return info


# --- entry points -------------------------------------------------------------------------------------
def _run_on_modal(cfg: EvalConfig) -> dict:
    if cfg.plan:
        print(plan_text(cfg, describe_function(cfg)))
        return {"plan": plan_text(cfg, describe_function(cfg))}
    if cfg.spawn:
        call = drive_remote.spawn(asdict(cfg))
        print(f"spawned driver {call.object_id}: results in <volume rsd-data>/results/phase3/{cfg.run_name}/ "
              f"(`modal volume get rsd-data results/phase3/{cfg.run_name}`); keep it alive with `modal run --detach`")
        return {"spawned": call.object_id}
    info, rows = drive(cfg, prepare_run.remote, shard_function)
    out = Path("results/phase3_modal") / cfg.run_name
    local_info = summarize(replace(cfg, out=str(out)), rows, wall_seconds=info["wall_seconds"],
                           episodes_run=info["episodes_run_this_call"], workers=info["workers"])
    write_run(local_info, rows, out)
    print(render_table(local_info))
    return local_info


main = app.local_entrypoint()(rsd_entry.modal_entrypoint(EvalConfig, _run_on_modal))


def cli(argv: list[str] | None = None) -> dict:
    cfg = rsd_entry.parse_config(EvalConfig, argv, prog="python -m phase3.modal_phase3_libero_eval")
    if cfg.plan:
        text = plan_text(cfg, describe_function(cfg))
        print(text)
        return {"plan": text}
    info = evaluate(cfg)
    print(render_table(info))
    print(f"wrote {cfg.out_dir()}")
    return info


if __name__ == "__main__":
    rsd_entry.main(cli, sys.argv[1:])
