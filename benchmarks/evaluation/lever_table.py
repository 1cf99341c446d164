"""One table of what each policy lever did in closed loop: finished Phase 3 comparisons side by side.

    python -m benchmarks.evaluation.lever_table --runs "plain, argmax 8 layers=DIR,..." [--out results/phase3_diagnostics/levers]

Each DIR is a ``phase3.compare`` output folder (its ``comparison.json``) or the folder of one Phase 3
evaluation (``phase3.modal_phase3_libero_eval``'s ``eval_info.json``, e.g. a main-only run of one
variant); the table lists per run and
variant the success, the trials, the decoding executed, the main passes per chunk and, when the
folder's parent holds the ``policy_action_error.json`` of the same models (``benchmarks.diagnostics.policy_action_error
--out <parent>``), the policy's lowest held-out action MSE. Runs compared here must share suite,
tasks, trials and first init state (checked), so the rows differ only in what the label says.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import rsd_entry
from common.eval.runs import parse_runs, same_trials, trials_key
from common.eval.summary import decoding_label
from common.provenance import REPO_ROOT, provenance, write_results

PROG = "python -m benchmarks.evaluation.lever_table"


def _held_out_mse(folder: Path) -> float | None:
    path = folder.parent / "policy_action_error.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["rows"]
    return min(min(r["policy_mse"], r.get("policy_mse_expected_last", r["policy_mse"])) for r in rows)


def _load_run(folder: Path, label: str) -> tuple[Path, dict, dict]:
    """(source file, config, {variant: results}) of a phase3.compare folder or of one evaluation's folder."""
    path = folder / "comparison.json"
    if path.exists():
        comparison = json.loads(path.read_text())
        return path, comparison, comparison["variants"]
    path = folder / "eval_info.json"
    if not path.exists():
        raise FileNotFoundError(f"{folder}: expected comparison.json (phase3.compare) or eval_info.json (one Phase 3 evaluation) "
                                f"for run {label!r}; found neither")
    info = json.loads(path.read_text())
    cfg = info["config"]
    variant = "naive" if cfg["tokenizer"] == "naive" else f"robust-{cfg['strategy']}"
    passes = info["main_passes_per_chunk"]
    v = {**info, "trials_per_task": cfg["num_trials"], "main_only_passes_per_chunk": info.get("main_only_passes_per_chunk") or passes}
    return path, info, {variant: v}


def build(runs: list[tuple[str, Path]], variants: tuple[str, ...] = ()) -> dict:
    """``variants``: keep only these (e.g. leave out a variant a baseline ran at fewer trials)."""
    rows, settings, keep = [], set(), set(variants)
    for label, folder in runs:
        path, comparison, found = _load_run(folder, label)
        cfg = comparison["config"]
        settings.add(trials_key(cfg))
        for variant, v in found.items():
            if keep and variant not in keep:
                continue
            decoding = v.get("decoding") or [  # runs written before the field: main-only decodes exactly the decoded layers
                {"layers": round(v["main_only_passes_per_chunk"]), "rule": cfg.get("decode_rule", "argmax")}]
            rows.append({"run": label, "variant": variant, "success_rate": v["success_rate"], "episodes": v["success_episodes"],
                         "trials_per_task": v["trials_per_task"], "decoding": decoding,
                         "main_passes_per_chunk": v["main_passes_per_chunk"], "main_only_passes_per_chunk": v["main_only_passes_per_chunk"],
                         "held_out_action_mse": _held_out_mse(folder), "source": str(path),
                         "source_git_sha": comparison.get("provenance", {}).get("git_sha")})
    suite, tasks, trials, first = same_trials(settings)
    return {"suite": suite, "tasks": tasks, "trials_per_task": trials, "first_trial": first, "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"`{result['suite']}` tasks {result['tasks']}, {result['trials_per_task']} trials per task from init state "
        f"{result.get('first_trial', 0)} (trial i = init state i); "
        "held-out action MSE = the policy's lowest over decoded depths and rules (normalized action units).",
        "",
        "| run | variant | success | decoded | main passes / chunk (main-only) | held-out action MSE |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        mse = "—" if r["held_out_action_mse"] is None else f"{r['held_out_action_mse']:.2e}"
        lines.append(f"| {r['run']} | {r['variant']} | {100 * r['success_rate']:.1f}% | {decoding_label(r)} | "
                     f"{r['main_passes_per_chunk']:.2f} ({r['main_only_passes_per_chunk']:.0f}) | {mse} |")
    return "\n".join(lines) + "\n"


@dataclass
class LeverTableConfig:
    """One table of what each policy lever did in closed loop: finished Phase 3 comparisons side by side."""

    runs: str = ""  # comma-separated "label=folder" pairs (phase3.compare outputs or one evaluation's folder; required)
    variants: str = ""  # comma-separated variants to keep, e.g. "naive,robust-A" ("" = all)
    out: str = ""  # output folder ("" = results/phase3_diagnostics/levers)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError('--runs: expected "label=folder" pairs, found none')


def main(argv: list[str]) -> None:
    cfg = rsd_entry.parse_config(LeverTableConfig, argv, prog=PROG)
    result = build(parse_runs(cfg.runs), tuple(v.strip() for v in cfg.variants.split(",") if v.strip()))
    result["provenance"] = provenance(seed=0)
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "phase3_diagnostics" / "levers"
    write_results(out, "levers", result, markdown(result))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
