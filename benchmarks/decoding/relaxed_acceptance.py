"""Relaxed speculative acceptance, measured apart from the lossless results (Spec-VLA style: a drafted
token is accepted when it lies within r levels of the main model's argmax; the DRAFT's tokens are then
executed, so the chunk may differ from main-only decoding).

    python -m benchmarks.decoding.relaxed_acceptance --models-dir MODELS [--tolerances 0,1,2] [--relaxed-layers 0,1] [--num-trials 5]

Runs the same Phase 3 evaluation (robust tokens, Strategy A, same trials) once per tolerance r
(r = 0 is exact, lossless acceptance) and tabulates success, the token-decode speedup against
main-only decoding on the same chunks, main passes, accepted layers, the fraction of chunks identical
to main-only and the action MSE between the speculative and the main-only token sets, both decoded by
argmax (normalized action units, mean over all chunks; identical chunks count 0). Decoding depth and rule: as Phase 2 chose them (``--auto-decode``) unless
``--full-depth``. ``--relaxed-layers 0,1`` runs every r > 0 twice: the tolerance on every drafted
layer (0) and on the coarsest drafted layer only (1; the finer ones exact, so the main model's later
layers can absorb a coarse error). Writes ``relaxed_acceptance.json`` / ``.md`` to ``--out``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import rsd_entry
from common.eval.closed_loop import evaluate
from common.eval.config import EvalConfig
from common.eval.summary import decoding_label
from common.provenance import REPO_ROOT, provenance, write_results

PROG = "python -m benchmarks.decoding.relaxed_acceptance"


def run(models_dir: str, *, suite: str, tasks: str, num_trials: int, tolerances: list[int], workers: int,
        auto_decode: bool, out: Path, max_steps: int = 0, relaxed_layers: tuple[int, ...] = (0,)) -> dict:
    rows = []
    settings = [(r, n) for r in tolerances for n in ((0,) if r == 0 else relaxed_layers)]
    for r, n in settings:
        cfg = EvalConfig(
            task_suite=suite, tasks=tasks, num_trials=num_trials, tokenizer="robust", strategy="A",
            acceptance="exact" if r == 0 else "relaxed", tolerance=r, relaxed_layers=n, auto_decode=auto_decode, workers=workers,
            max_steps=max_steps, compare_main_only=True, models_dir=models_dir, out=str(out / (f"tolerance_{r}" + (f"_layers{n}" if n else ""))),
        )
        info = evaluate(cfg)
        rows.append({"tolerance": r, "relaxed_layers": n, "success_rate": info["success_rate"], "token_decode_speedup": info["token_decode_speedup"],
                     "main_passes_per_chunk": info["main_passes_per_chunk"], "main_only_passes_per_chunk": info["main_only_passes_per_chunk"],
                     "mean_accepted_layers": info["mean_accepted_layers"], "identical_fraction": info["lossless_identical_fraction"],
                     "action_mse_vs_main_only": info["action_mse_vs_main_only"], "decoded": decoding_label(info),
                     "episodes": info["episodes"], "errors": info["errors"]})
    lines = [
        f"Robust-A on `{suite}` tasks {tasks}, {num_trials} trials per task (trial i = init state i), models `{models_dir}`. "
        "r = 0 is exact (lossless) acceptance; r > 0 accepts draft tokens within r levels of the main argmax and executes them.",
        "",
        "| tolerance r | relaxed drafted layers | success | decoded | token-decode speedup | main passes / chunk (main-only) | mean accepted layers | chunks identical to main-only | action MSE vs main-only | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tolerance']} | {_relaxed_label(row)} | {100 * row['success_rate']:.1f}% | {row['decoded']} | {row['token_decode_speedup']:.2f}x | "
            f"{row['main_passes_per_chunk']:.2f} ({row['main_only_passes_per_chunk']:.0f}) | {row['mean_accepted_layers']:.2f} | "
            f"{100 * row['identical_fraction']:.1f}% | {row['action_mse_vs_main_only']:.2e} | {row['errors']} |"
        )
    result = {"models_dir": models_dir, "suite": suite, "tasks": tasks, "num_trials": num_trials, "auto_decode": auto_decode,
              "rows": rows, "provenance": provenance(seed=0)}
    write_results(out, "relaxed_acceptance", result, "\n".join(lines))
    return result


def _relaxed_label(row: dict) -> str:
    if row["tolerance"] == 0:
        return "none (exact)"
    n = row.get("relaxed_layers", 0)  # files from before the option: every drafted layer
    return "all" if not n else f"the coarsest {n}"


def _int_list(text: str, flag: str, low: int) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < low for v in values):
        raise ValueError(f"{flag}: expected comma-separated integers >= {low}, found {text!r}")
    return values


@dataclass
class RelaxedAcceptanceConfig:
    """Relaxed speculative acceptance, measured apart from the lossless results: one Phase 3 evaluation per tolerance r."""

    models_dir: str = ""  # Phase 2 models folder (robust head + draft + tokenizer; required)
    suite: str = "libero_object"  # LIBERO suite
    tasks: str = "0-9"  # task ids, e.g. "0-9" or "0,3"
    num_trials: int = 5  # trials per task (trial i = init state i)
    tolerances: str = "0,1,2"  # comma-separated r values; 0 = exact
    relaxed_layers: str = "0"  # comma-separated n: the tolerance on the n coarsest drafted layers (0 = all); every r > 0 runs once per n
    workers: int = 2  # evaluation worker processes
    full_depth: bool = False  # decode all layers by argmax instead of Phase 2's choice
    out: str = ""  # output folder ("" = results/phase3_diagnostics/relaxed_acceptance)

    def __post_init__(self) -> None:
        if not self.models_dir:
            raise ValueError("--models-dir: expected the Phase 2 models folder, found none")
        _int_list(self.tolerances, "--tolerances", 0)
        _int_list(self.relaxed_layers, "--relaxed-layers", 0)


def main(argv: list[str]) -> None:
    cfg = rsd_entry.parse_config(RelaxedAcceptanceConfig, argv, prog=PROG)
    tolerances = _int_list(cfg.tolerances, "--tolerances", 0)
    relaxed_layers = tuple(_int_list(cfg.relaxed_layers, "--relaxed-layers", 0))
    rsd_entry.setup_process(torch_threads=1)
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "phase3_diagnostics" / "relaxed_acceptance"
    run(cfg.models_dir, suite=cfg.suite, tasks=cfg.tasks, num_trials=cfg.num_trials, tolerances=tolerances,
        workers=cfg.workers, auto_decode=not cfg.full_depth, out=out, relaxed_layers=relaxed_layers)


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
