"""Collect scripted-expert LIBERO demonstrations (official HDF5 layout; see common/demo_collection.py).

Local:
    python -m phase1_improved.collect_demos --suite libero_object --tasks 0-9 \
        --demos-per-task 50 --workers 2 --out libero_object_demos.hdf5
Modal (container: 8 CPUs; the file lands in the `rsd-data` volume):
    modal run phase1_improved/collect_demos.py --suite libero_object --tasks 0-9 \
        --demos-per-task 50 --workers 8 --out libero_object_demos.hdf5
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
import sys
from pathlib import Path

import modal

import rsd_entry
from common.libero_env import SUITES


@dataclasses.dataclass
class CollectConfig:
    """Scripted-expert demo collection."""

    suite: str = "libero_object"
    tasks: str = "0-9"  # 'all', '0-9' or '0,3,5'
    demos_per_task: int = 50
    workers: int = 2
    out: str = "libero_object_demos.hdf5"  # relative to the data dir
    seed: int = 0
    keep_failures: bool = False
    record_images: bool = False
    camera_size: int = 128
    action_noise: float = 0.0  # std of Gaussian noise on the expert's arm actions

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; valid suites: {', '.join(SUITES)}")
        if self.demos_per_task <= 0:
            raise ValueError(f"demos_per_task must be > 0, got {self.demos_per_task}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.camera_size < 16:
            raise ValueError(f"camera_size must be >= 16 pixels, got {self.camera_size}")
        if self.action_noise < 0:
            raise ValueError(f"action_noise must be >= 0, got {self.action_noise}")
        if not self.out.endswith((".hdf5", ".h5")):
            raise ValueError(f"out must be an .hdf5 file path, got {self.out!r}")
        if not str(self.tasks).strip():
            raise ValueError("tasks must be 'all', a range like '0-9' or a list like '0,3,5'")

    def out_path(self) -> Path:
        from common.paths import data_dir

        out = Path(self.out)
        return out if out.is_absolute() else data_dir() / out


def run_collection(config: CollectConfig) -> dict:
    """The one code path both front ends use."""
    from common.demo_collection import collect_demos
    from common.libero_env import get_suite, parse_task_spec
    from common.scripted_expert import ExpertConfig

    task_ids = parse_task_spec(config.tasks, get_suite(config.suite).get_num_tasks())
    return collect_demos(
        config.suite,
        task_ids,
        config.demos_per_task,
        config.out_path(),
        workers=config.workers,
        seed=config.seed,
        keep_failures=config.keep_failures,
        record_images=config.record_images,
        camera_size=config.camera_size,
        expert_config=ExpertConfig(action_noise=config.action_noise, seed=config.seed),
    )


# ---------------------------------------------------------------------------- Modal
app = modal.App("rsd-collect-demos")
data_volume = rsd_entry.data_volume()


@app.function(
    image=rsd_entry.cloud_image(with_sim=True),
    volumes={rsd_entry.DATA_MOUNT: data_volume},
    cpu=8.0,
    memory=32768,  # ~1.8 GB per simulator; two per worker with --record-images
    timeout=6 * 3600,
)
def collect_remote(config: dict) -> dict:
    cfg = CollectConfig(**config)
    if not modal.is_local():
        data_volume.reload()  # see demos of an earlier run, so resuming works
    try:
        return run_collection(cfg)
    finally:
        if not modal.is_local():
            data_volume.commit()  # keep partial progress even when collection raised


@app.function(image=rsd_entry.cloud_image(with_sim=True), volumes={rsd_entry.DATA_MOUNT: data_volume}, timeout=6 * 3600)
def download_official_remote(suites: list[str]) -> dict:
    from common.demo_collection import collect_official_libero_datasets
    from common.paths import data_dir

    try:
        return collect_official_libero_datasets(data_dir() / "libero_official", suites)
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
    summary = run_collection(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    cli(sys.argv[1:])
