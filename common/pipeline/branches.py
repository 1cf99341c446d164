"""Independent chains of pipeline stages run side by side, one spawn process each.

The naive and the robust branch of the pipeline (tokenizer → main model → rollouts → draft) share
nothing until Phase 3, and every stage in them runs on one thread, so on a 2-core machine the two
branches run at the same time instead of one after the other.

``run_side_by_side(jobs, log_dir=..., log=...)``: ``jobs`` maps a branch name to a picklable
callable ``fn(log) -> dict`` (module-level function or ``functools.partial`` of one). Each runs in
its own process; its stage lines come back through ``log`` as they happen, while its full output
(tqdm bars included) goes to ``<log_dir>/branch_<name>.log``. The call returns ``{name: result}``.
When a branch fails, or on Ctrl-C, the other branches are stopped at once (their finished stages
are stamped and reused by the next run) and the error names the branch and its log file.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from common.locks import exit_with_parent

_POLL_S = 0.5


def _branch_main(name: str, fn: Callable, log_path: str, messages, parent_pid: int, torch_threads: int) -> None:
    """In the branch process: run ``fn`` with its output in the branch's log file, report back."""
    exit_with_parent(parent_pid)
    # the file descriptors, not just sys.stdout/err: the simulator workers a branch starts write there too
    with open(log_path, "a") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)
    import torch

    torch.set_num_threads(torch_threads)

    def log(line: str) -> None:
        print(line, flush=True)
        messages.put(("log", name, line))

    try:
        result = fn(log)
    except KeyboardInterrupt:
        messages.put(("interrupted", name, ""))
        return
    except BaseException as exc:  # reported to the parent, which raises it with the branch's name
        traceback.print_exc()
        messages.put(("error", name, f"{type(exc).__name__}: {exc}"))
        return
    messages.put(("done", name, result))


def _stop(processes: dict[str, Any]) -> None:
    for proc in processes.values():
        if proc.is_alive():
            proc.terminate()
    for proc in processes.values():
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_side_by_side(jobs: dict[str, Callable], *, log_dir: Path, log: Callable[[str], None] = print,
                     progress: bool = True, expected_lines: int = 0, torch_threads: int = 1) -> dict[str, Any]:
    """Run each job in its own process at the same time -> {name: what its ``fn`` returned}.

    expected_lines: how many log lines the branches print in all (the stage count), for the bar."""
    log_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")  # the branches build simulators: MuJoCo/EGL state must not be forked
    messages = ctx.Queue()
    log_paths = {name: log_dir / f"branch_{name}.log" for name in jobs}
    processes = {name: ctx.Process(target=_branch_main, name=f"branch-{name}",
                                   args=(name, fn, str(log_paths[name]), messages, os.getpid(), torch_threads))
                 for name, fn in jobs.items()}
    log(f"branches {', '.join(jobs)} side by side, one process each; full output: "
        + ", ".join(str(p) for p in log_paths.values()))
    bar = tqdm(total=expected_lines or None, desc="branch stages", disable=not progress)
    results: dict[str, Any] = {}
    try:
        for proc in processes.values():
            proc.start()
        while len(results) < len(jobs):
            try:
                kind, name, payload = messages.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [n for n, p in processes.items() if n not in results and not p.is_alive()]
                if dead:
                    # a branch that exits without reporting was killed (out of memory, signal)
                    raise RuntimeError(f"branch {dead[0]} exited with code {processes[dead[0]].exitcode} before it "
                                       f"finished; see {log_paths[dead[0]]}")
                continue
            if kind == "log":
                with tqdm.external_write_mode():  # the line above the bar, not inside it
                    log(payload)
                bar.update(1)
            elif kind == "done":
                results[name] = payload
            elif kind == "interrupted":
                raise KeyboardInterrupt
            else:
                raise RuntimeError(f"branch {name} failed: {payload} (traceback in {log_paths[name]})")
    except BaseException:
        _stop(processes)
        raise
    finally:
        bar.close()
    for proc in processes.values():
        proc.join()
    return results
