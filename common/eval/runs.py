"""Finished Phase 3 runs side by side: which runs ("label=folder" lists), whether they ran the same trials,
and whether they ended the same way episode by episode (with a two-sided sign test)."""

from __future__ import annotations

import math
from pathlib import Path


def parse_runs(spec: str, flag: str = "--runs") -> list[tuple[str, Path]]:
    """``"label=folder,..."`` -> [(label, folder)]; labels may hold "=", folders do not.
    ``flag``: the option's name in the error message."""
    runs = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        label, sep, folder = item.rpartition("=")
        if not sep:
            raise ValueError(f"{flag}: expected label=folder, found {item!r}")
        runs.append((label.strip(), Path(folder.strip())))
    return runs


def trials_key(cfg: dict) -> tuple:
    """What runs compared side by side must share: suite, tasks, trials per task, first init state."""
    return (cfg["task_suite"], cfg["tasks"], cfg["num_trials"], cfg.get("first_trial", 0))


def same_trials(settings: set[tuple]) -> tuple:
    """The one ``trials_key`` all runs share, or a clear error naming the ones found."""
    if len(settings) != 1:
        raise ValueError(f"runs differ in (suite, tasks, trials per task, first init state): {sorted(settings)}; compare like with like")
    return next(iter(settings))


def sign_test_p(wins_a: int, wins_b: int) -> float:
    """Two-sided exact binomial test of wins_a vs wins_b under p = 1/2 (1.0 when there is nothing to test)."""
    n, k = wins_a + wins_b, min(wins_a, wins_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def agreement(a: dict[tuple[int, int], dict], b: dict[tuple[int, int], dict]) -> dict:
    """The per-episode comparison of two runs' episode rows keyed by (task, trial): shared finished episodes,
    successes of each, episodes with the same number of steps, those that ended the other way (and in whose
    favour) with the sign test on them. An episode that errored in either run is left out and counted."""
    shared = sorted(set(a) & set(b))
    errored = [k for k in shared if a[k].get("status") == "error" or b[k].get("status") == "error"]
    keys = [k for k in shared if k not in errored]
    if not keys:
        raise ValueError("the two runs share no finished episode (same suite, tasks and trials?)")
    only_a = [k for k in keys if a[k]["success"] and not b[k]["success"]]
    only_b = [k for k in keys if b[k]["success"] and not a[k]["success"]]
    per_task: dict[int, dict[str, int]] = {}
    for task, trial in keys:
        row = per_task.setdefault(task, {"episodes": 0, "success_a": 0, "success_b": 0, "same_steps": 0})
        row["episodes"] += 1
        row["success_a"] += bool(a[(task, trial)]["success"])
        row["success_b"] += bool(b[(task, trial)]["success"])
        row["same_steps"] += a[(task, trial)]["steps"] == b[(task, trial)]["steps"]
    return {
        "episodes": len(keys),
        "left_out": {"only_in_a": len(set(a) - set(b)), "only_in_b": len(set(b) - set(a)), "errored": len(errored)},
        "success_a": sum(r["success_a"] for r in per_task.values()),
        "success_b": sum(r["success_b"] for r in per_task.values()),
        "same_steps": sum(r["same_steps"] for r in per_task.values()),
        "outcome_differs": len(only_a) + len(only_b),
        "success_only_in_a": len(only_a),
        "success_only_in_b": len(only_b),
        "sign_test_p": sign_test_p(len(only_a), len(only_b)),
        "per_task": {str(t): r for t, r in sorted(per_task.items())},
        "differing_episodes": [{"task": t, "trial": i, "success_a": bool(a[(t, i)]["success"])} for t, i in sorted(only_a + only_b)],
    }
