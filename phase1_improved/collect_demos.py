"""Collect scripted-expert LIBERO demonstrations (official HDF5 layout; see common/sim/demo_collection.py).

Local:
    python -m phase1_improved.collect_demos --suite libero_object --tasks 0-9 \
        --demos-per-task 50 --workers 2 --out libero_object_demos.hdf5
Modal (container: 8 CPUs; the file lands in the `rsd-data` volume):
    modal run phase1_improved/collect_demos.py --suite libero_object --tasks 0-9 \
        --demos-per-task 50 --workers 8 --out libero_object_demos.hdf5
Human-like demonstrations (the expert's commands through an operator model: band-limited noise,
pauses, overshoot and correction, late gripper changes; the file is marked ``operator=human``):
    python -m phase1_improved.collect_demos --suite libero_object --tasks 0-4 --demos-per-task 8 \
        --operator human --out libero_object_human.hdf5
Demonstrations on newly sampled object layouts (none of the suite's 50 fixed init states, which the
evaluation uses; more layouts than 50), optionally with DART action noise (the stored labels are the
expert's intended actions):
    python -m phase1_improved.collect_demos --suite libero_spatial --tasks 0-3,5-9 --demos-per-task 20 \
        --fresh-layouts --seed 2 --out libero_spatial_fresh.hdf5
DAgger (a trained policy drives, the expert labels every state it visits; every episode is kept):
    python -m phase1_improved.collect_demos --suite libero_spatial --tasks 0-3,5-9 --demos-per-task 20 \
        --dagger-models-dir artifacts/pipeline/spatial/models --seed 11 --out libero_spatial_dagger_r1.hdf5
Official LIBERO datasets into the volume (/data/libero_official/<suite>/):
    modal run phase1_improved/collect_demos.py::download_official --suites libero_spatial,libero_object

A relative --out is resolved against the data dir ($RSD_DATA_DIR: ./data locally, /data on Modal),
so the same flags write the same relative file in both places. Re-running with the same --out
resumes (fills each task up to --demos-per-task, never duplicates). Both front ends take the same
flags (kebab-case of `CollectConfig`'s fields; bools are --flag/--no-flag) and call one function.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import modal

import rsd_entry
from common.eval.policy import dagger_policy  # DAgger's driving policy: the Phase 3 one
from common.sim.demo_collection import CollectConfig, run_collection


# ---------------------------------------------------------------------------- Modal
app = modal.App("rsd-collect-demos")
data_volume = rsd_entry.data_volume()
models_volume = rsd_entry.models_volume()  # read by DAgger (--dagger-models-dir /models: the driving policy)


@app.function(
    image=rsd_entry.cloud_image(with_sim=True),
    volumes={rsd_entry.DATA_MOUNT: data_volume, rsd_entry.MODELS_MOUNT: models_volume},
    cpu=8.0,
    memory=32768,  # ~1.8 GB per simulator; two per worker with --record-images
    timeout=6 * 3600,
)
def collect_remote(config: dict) -> dict:
    cfg = rsd_entry.resolve(CollectConfig(**config))  # the container's /data
    rsd_entry.setup_process()
    if not modal.is_local():
        data_volume.reload()  # see demos of an earlier run, so resuming works
    try:
        return run_collection(cfg, driving_policy=dagger_policy)
    finally:
        if not modal.is_local():
            data_volume.commit()  # keep partial progress even when collection raised


@app.function(image=rsd_entry.cloud_image(with_sim=True), volumes={rsd_entry.DATA_MOUNT: data_volume}, timeout=6 * 3600)
def download_official_remote(suites: list[str]) -> dict:
    from common.artifacts import ArtifactDirs
    from common.sim.official_datasets import collect_official_libero_datasets

    try:
        return collect_official_libero_datasets(ArtifactDirs.from_env(os.environ).data / "libero_official", suites)
    finally:
        data_volume.commit()


def _run_on_modal(cfg: CollectConfig) -> dict:
    summary = collect_remote.remote(dataclasses.asdict(cfg))
    print(json.dumps(summary, indent=2, default=str))
    return summary


# Generated from CollectConfig: same names, types and defaults as the local CLI flags.
main = app.local_entrypoint()(rsd_entry.modal_entrypoint(CollectConfig, _run_on_modal))


@app.local_entrypoint()
def download_official(suites: str = "libero_spatial,libero_object,libero_goal,libero_10") -> None:
    names = [s.strip() for s in suites.split(",") if s.strip()]
    print(json.dumps(download_official_remote.remote(names), indent=2))


# ---------------------------------------------------------------------------- local CLI
def build_parser():
    return rsd_entry.build_parser(CollectConfig, prog="python -m phase1_improved.collect_demos", description=__doc__)


def cli(argv: list[str] | None = None) -> dict:
    cfg = rsd_entry.parse_config(CollectConfig, argv, prog="python -m phase1_improved.collect_demos")
    print(f"writing {cfg.out_path()}")
    summary = run_collection(cfg, driving_policy=dagger_policy)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    rsd_entry.main(cli, sys.argv[1:])
