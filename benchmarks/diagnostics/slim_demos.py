"""Copies of LIBERO-format demo files holding only what Phase 2 training reads, compressed: for sending
training data to a lent GPU machine, whose upload is capped (the device tool carries 64 MiB in all).

    python -m benchmarks.diagnostics.slim_demos --out DIR DEMOS.hdf5 [DEMOS.hdf5 ...] [--overwrite]

A copy keeps every attribute (file, ``data`` group, each demo) and, per demo, the datasets that
``common.data.episodes.load_hdf5_episodes`` reads (``actions``, ``expert_actions``, ``obs/low_dim``),
gzip-compressed; it drops the simulator states and the per-object observation keys (about 90% of a
file). After writing, every copy is read back and checked: the episodes it loads must equal the
original's array for array, so a model trained on the copy sees the same data.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import rsd_entry

PROG = "python -m benchmarks.diagnostics.slim_demos"
# What load_hdf5_episodes reads from a demo besides its attributes.
TRAINING_DATASETS = ("actions", "expert_actions", "obs/low_dim")


def _same_episodes(original: Path, copy: Path) -> None:
    from common.data.episodes import load_hdf5_episodes

    a, b = load_hdf5_episodes(original), load_hdf5_episodes(copy)
    if len(a) != len(b):
        raise RuntimeError(f"{copy}: {len(b)} episodes read back, expected {len(a)} as in {original}")
    for x, y in zip(a, b):
        arrays = [(x.actions, y.actions), (x.low_dim_obs, y.low_dim_obs), (x.executed_actions, y.executed_actions)]
        same = all((p is None and q is None) or (p is not None and q is not None and np.array_equal(p, q)) for p, q in arrays)
        if not same or (x.name, x.task_id, x.instruction, x.attrs) != (y.name, y.task_id, y.instruction, y.attrs):
            raise RuntimeError(f"{copy}: episode {y.name} differs from {original}'s {x.name}")


def slim_copy(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> dict:
    """Write the training-only copy of ``src`` to ``dst``; returns the two sizes in bytes."""
    import h5py

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such demo file")
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the copy would replace its own source")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass --overwrite to replace it)")
    tmp = dst.with_name(dst.name + ".partial")
    with h5py.File(src, "r") as f, h5py.File(tmp, "w") as g:
        if "data" not in f:
            raise ValueError(f"{src}: no 'data' group (expected the LIBERO layout data/demo_N/actions)")
        g.attrs.update(dict(f.attrs))
        data = g.create_group("data")
        data.attrs.update(dict(f["data"].attrs))
        for name, demo in f["data"].items():
            if not isinstance(demo, h5py.Group):
                continue
            out = data.create_group(name)
            out.attrs.update(dict(demo.attrs))
            for key in TRAINING_DATASETS:
                if key in demo:
                    out.create_dataset(key, data=demo[key][()], compression="gzip", compression_opts=4, shuffle=True)
    tmp.replace(dst)
    _same_episodes(src, dst)
    return {"source": str(src), "copy": str(dst), "source_bytes": src.stat().st_size, "copy_bytes": dst.stat().st_size}


@dataclass
class SlimDemosConfig:
    """Training-only, compressed copies of LIBERO-format demo files (what Phase 2 reads, nothing else)."""

    files: list[str] = field(default_factory=list)  # LIBERO-format HDF5 demo files (positional, at least one)
    out: str = ""  # folder for the copies (same file names; required)
    overwrite: bool = False  # replace copies that already exist

    def __post_init__(self) -> None:
        if not self.files or not self.out:
            raise ValueError(f"expected demo files and --out, found {len(self.files)} file(s) and --out {self.out!r}")
        names = [Path(f).name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError(f"two demo files share a name, so their copies would collide in {self.out}: {names}")


def build_parser() -> argparse.ArgumentParser:
    """The flags of ``SlimDemosConfig``. Built here, not by ``rsd_entry.build_parser``: the demo files are
    positional (``slim_demos --out DIR A.hdf5 B.hdf5``), and that builder makes --flags only."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    docs = rsd_entry.field_help(SlimDemosConfig)
    parser.add_argument("files", nargs="+", help=docs["files"])
    parser.add_argument("--out", required=True, help=docs["out"])
    parser.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False, help=f"{docs['overwrite']} (default: False)")
    rsd_entry.add_debug_flag(parser)
    return parser


def main(argv: list[str]) -> list[dict]:
    parser = build_parser()
    try:
        cfg = SlimDemosConfig(**{k: v for k, v in vars(parser.parse_args(argv)).items() if k != "debug"})
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in cfg.files:
        row = slim_copy(f, out / Path(f).name, overwrite=cfg.overwrite)
        print(f"{row['copy']}: {row['copy_bytes'] / 1e6:.1f} MB (from {row['source_bytes'] / 1e6:.1f} MB), episodes identical")
        rows.append(row)
    return rows


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
