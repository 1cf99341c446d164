"""Runs that must not overlap, and workers that must not outlive their run.

- ``output_lock(path, what)``: an exclusive ``fcntl.flock`` on a small lock file next to a run's
  outputs (an evaluation's ``<out>/.lock``, a tokenizer's ``<models>/.<stem>.lock``, ...). A second
  run writing the same outputs fails at once with one line naming the first (pid, command, start
  time, which the holder writes into the lock file). The lock is released by the kernel when the
  holder exits, however it exits, so a killed run never leaves a stale lock behind.
- ``check_writable_dir(path, flag)``: an output folder is creatable and writable, checked before
  the first expensive step (not after an hour of training); ``check_folder_path`` checks the same
  without creating anything (a ``--plan``).
- ``exit_with_parent(parent_pid)``: called first thing in a worker process; the worker exits when
  its parent dies (``prctl(PR_SET_PDEATHSIG)`` on Linux, plus a watchdog thread everywhere), so a
  killed run never leaves ~1.5 GB simulator workers parented to PID 1.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

_PR_SET_PDEATHSIG = 1
_PARENT_POLL_S = 1.0


class RunLockedError(RuntimeError):
    """Another live run holds the lock on the same outputs."""


def check_folder_path(path: str | Path, flag: str) -> Path:
    """Check, creating nothing, that ``path`` is or could become a folder: no part of it is a file."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{flag} {path}: {parent} is a regular file, not a folder; choose another {flag}")
            break
    return path


def check_writable_dir(path: str | Path, flag: str) -> Path:
    """Create ``path`` if needed and check it is a writable folder; one error naming ``flag`` otherwise."""
    path = check_folder_path(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"{flag} {path}: cannot create the folder ({exc.strerror or exc}); choose another {flag}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {path}: folder is not writable; choose another {flag} or fix its permissions")
    return path


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "unknown run"
    if not info:
        return "unknown run"
    return f"pid {info.get('pid')}, started {info.get('started')}: {info.get('command')}"


@contextmanager
def output_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if missing) while the block runs.

    ``what`` says what is protected, for the error message ("evaluation results in results/x").
    Raises ``RunLockedError`` at once if another run holds it.
    """
    path = Path(path)
    check_writable_dir(path.parent, "output folder")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{what} is being written by another run ({_holder(path)}; lock {path}); wait for it to finish, "
                "stop it, or write to another folder"
            ) from None
        except OSError as exc:  # a filesystem without flock (some network volumes): say so, run unlocked
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"warning: {path}: this filesystem cannot lock files ({exc.strerror}); concurrent runs are not excluded", file=sys.stderr)
        record = {
            "pid": os.getpid(),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock; the file stays (deleting it would race with a waiting run)


# --- worker lifetime ---------------------------------------------------------------------------------
def _set_parent_death_signal(sig: int) -> bool:
    """Linux: the kernel sends ``sig`` to this process when its parent dies. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_POLL_S)
    os._exit(1)  # orphaned: the run that wanted our results is gone


def exit_with_parent(parent_pid: int) -> None:
    """In a worker process: exit when ``parent_pid`` (the run's process) dies, however it dies.

    Ctrl-C is left to the parent (workers ignore SIGINT; the parent stops them), so a terminal's
    Ctrl-C, which reaches the whole process group, interrupts the run once, in one place.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="exit-with-parent").start()
