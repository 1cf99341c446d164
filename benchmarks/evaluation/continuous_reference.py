"""Continuous-action reference policy: the ceiling of what the token policy's data and observation allow.

    MUJOCO_GL=egl python -m benchmarks.evaluation.continuous_reference --models-dir artifacts/pipeline/default_chunk/models \
        [--trials 3] [--first-trial 10] [--replan-steps 4] [--workers 1] [--out DIR] [--overwrite]

The baseline itself is library code: ``common/policy/continuous.py`` (the head's own train / held-out split,
``ChunkRegressor``: the head's ``StateBackbone`` feeding an MLP that regresses the normalized 8-step chunk
starting at each step, MSE, AdamW, cosine schedule; ``ContinuousPolicy``) and ``common/eval/continuous.py``
(closed loop). It reads the Phase 2 head ``best_rfsq_head{_tag}.pt`` of ``--models-dir`` only for what it
was trained on: its demo files, held-out episodes (``val_episode_keys``), task table and tokenizer (whose
action normalizer and chunk length define the targets). No tokens: whatever this policy cannot do in closed
loop, the tokenizer and token head cannot be blamed for.

Closed loop: the eval protocol (``common.sim.libero_env``: trial i = init state i, suite step limit),
``common.eval.closed_loop.run_episode`` with this policy, ``--replan-steps`` actions per chunk, tasks in the
evaluation's worker pool with ``--workers`` > 1. Writes ``continuous_reference.json`` / ``.md`` /
``_training.png`` to ``--out`` (default ``results/phase3_diagnostics/continuous_reference``); held-out MSE is
in normalized action units, the unit of ``benchmarks.diagnostics.policy_action_error``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import rsd_entry
from common.eval.continuous import check_trials, run_closed_loop, select_tasks, summarize
from common.policy.continuous import ChunkRegressor, ContinuousPolicy, load_reference_data, train_regressor
from common.provenance import REPO_ROOT, provenance, write_json

RESULT_NAME = "continuous_reference"
DEFAULT_OUT = REPO_ROOT / "results" / "phase3_diagnostics" / RESULT_NAME
PROG = "python -m benchmarks.evaluation.continuous_reference"


@dataclass
class ContinuousReferenceConfig:
    """Continuous-action reference policy: the ceiling of what the token policy's data and observation allow."""

    models_dir: str = ""  # Phase 2 models folder: best_rfsq_head{_tag}.pt and the tokenizer it names (required)
    tag: str = ""  # head suffix: "" (robust tokens) or "naive"; only its data split and tasks are used
    epochs: int = 30  # training epochs
    batch_size: int = 128  # training batch (steps)
    lr: float = 1e-3  # AdamW peak learning rate (cosine decay to 0)
    weight_decay: float = 0.01  # AdamW weight decay
    hidden: int = 512  # width of the MLP's hidden layers
    hidden_layers: int = 2  # number of hidden layers of the MLP
    seed: int = 0  # training seed (and env seed)
    suite: str = "libero_object"  # LIBERO suite evaluated (its tasks must be in the head's task table)
    tasks: str = ""  # task ids, e.g. "0-9" or "0,3" ("" = every task of --suite in the head's table)
    trials: int = 3  # episodes per task
    first_trial: int = 10  # init state of the first trial (trial i = init state i)
    replan_steps: int = 4  # actions executed per predicted chunk before replanning (1..chunk length)
    workers: int = 1  # processes for the closed loop (one task per job)
    eef_relative: bool = None  # state backbone with object positions relative to the end effector (None: as the head's backbone)
    out: str = ""  # output folder ("" = results/phase3_diagnostics/continuous_reference)
    overwrite: bool = False  # replace an existing result in --out
    progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if not self.models_dir:
            raise ValueError("--models-dir: expected the Phase 2 models folder, found none")
        for name in ("epochs", "batch_size", "trials", "replan_steps", "workers", "hidden", "hidden_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, found {getattr(self, name)}")


def run(cfg: ContinuousReferenceConfig) -> dict:
    """Train the baseline on the head's split, run it in closed loop, write the result files."""
    out = Path(cfg.out) if cfg.out else DEFAULT_OUT
    result_path = out / f"{RESULT_NAME}.json"
    if result_path.exists() and not cfg.overwrite:
        raise ValueError(f"{result_path}: a result already exists; pass --overwrite to replace it or choose another --out")
    rsd_entry.setup_process(torch_threads=1)
    from common.locks import output_lock

    with output_lock(out / ".lock", f"continuous reference results in {out}"):
        started = time.perf_counter()
        data = load_reference_data(Path(cfg.models_dir), cfg.tag)
        if cfg.replan_steps > data["chunk_len"]:
            raise ValueError(f"--replan-steps {cfg.replan_steps}: expected 1..{data['chunk_len']} (the tokenizer's chunk length)")
        tasks = select_tasks(data["task_table"], cfg.suite, cfg.tasks)
        trials = check_trials(cfg.suite, tasks, cfg.first_trial, cfg.trials)
        if cfg.eef_relative is not None:
            data["backbone_config"] = {**data["backbone_config"], "eef_relative": cfg.eef_relative}
        torch.manual_seed(cfg.seed)
        model = ChunkRegressor(data["backbone_config"], chunk_len=data["chunk_len"], hidden=cfg.hidden, hidden_layers=cfg.hidden_layers)
        history = train_regressor(model, data["train"], data["held_out"], epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, seed=cfg.seed, progress=cfg.progress)
        train_seconds = time.perf_counter() - started
        policy = ContinuousPolicy(model, data["normalizer"], data["task_table"])
        rows = run_closed_loop(policy, cfg.suite, tasks, trials, replan_steps=cfg.replan_steps, workers=cfg.workers, progress=cfg.progress)
        best = min(history, key=lambda h: h["held_out_mse"])
        result = {
            "provenance": provenance(seed=cfg.seed), "config": asdict(cfg), "head": data["head"], "tokenizer": data["tokenizer"],
            "data": data["data"], "chunk_len": data["chunk_len"], "backbone_config": data["backbone_config"],
            "data_summary": {"train_episodes": data["train_episodes"], "held_out_episodes": data["held_out_episodes"],
                             "train_steps": len(data["train"]["targets"]), "held_out_steps": len(data["held_out"]["targets"])},
            "training": history, "best_epoch": best["epoch"], "best_held_out_mse": best["held_out_mse"],
            **summarize(rows, data["task_table"], cfg.suite), "episodes": rows,
            "wall_seconds": {"data_and_training": train_seconds, "closed_loop": time.perf_counter() - started - train_seconds,
                             "total": time.perf_counter() - started},
        }
        write_json(result_path, result)
        (out / f"{RESULT_NAME}.md").write_text(markdown(result))
        plot_training(history, out / f"{RESULT_NAME}_training.png")
    print(markdown(result))
    return result


# --- outputs -------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    best = min(result["training"], key=lambda h: h["held_out_mse"])
    cfg = result["config"]
    lines = [
        f"Continuous-action reference (StateBackbone{' with eef-relative objects' if result.get('backbone_config', {}).get('eef_relative') else ''} + MLP, {cfg['epochs']} epochs) on the split of `{Path(result['head']).name}`: "
        f"{result['data_summary']['train_steps']} train / {result['data_summary']['held_out_steps']} held-out steps "
        f"({result['data_summary']['train_episodes']} / {result['data_summary']['held_out_episodes']} episodes).",
        "",
        f"Held-out MSE (normalized action units): best {best['held_out_mse']:.3e} at epoch {best['epoch']} "
        f"(train {best['train_mse']:.3e}); last epoch {result['training'][-1]['held_out_mse']:.3e}.",
        "",
        f"Closed loop: `{cfg['suite']}`, init states {cfg['first_trial']}..{cfg['first_trial'] + cfg['trials'] - 1}, "
        f"replan every {cfg['replan_steps']} steps.",
        "",
        "| task | instruction | trials | successes | errors | rate |",
        "|---|---|---|---|---|---|",
    ]
    for t in result["per_task"]:
        lines.append(f"| {t['task']} | {t['instruction']} | {t['trials']} | {t['successes']} | {t['errors']} | {100 * t['success_rate']:.0f}% |")
    o = result["overall"]
    lines.append(f"| **all** | | {o['trials']} | {o['successes']} | {o['errors']} | **{100 * o['success_rate']:.1f}%** |")
    return "\n".join(lines) + "\n"


def plot_training(history: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    epochs = [h["epoch"] for h in history]
    ax.semilogy(epochs, [h["train_mse"] for h in history], label="train (running)")
    ax.semilogy(epochs, [h["held_out_mse"] for h in history], label="held-out")
    ax.set(xlabel="epoch", ylabel="chunk MSE (normalized)", title="continuous reference")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> dict:
    return run(rsd_entry.parse_config(ContinuousReferenceConfig, argv, prog=PROG))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
