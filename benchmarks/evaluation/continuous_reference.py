"""Continuous-action reference policy: the ceiling of what the token policy's data and observation allow.

    MUJOCO_GL=egl python -m benchmarks.evaluation.continuous_reference --models-dir artifacts/pipeline/default_chunk/models \
        [--trials 3] [--first-trial 10] [--replan-steps 4] [--workers 1] [--out DIR] [--overwrite]

Reads the Phase 2 head ``best_rfsq_head{_tag}.pt`` of ``--models-dir`` only for what it was trained on:
its demo files, held-out episodes (``val_episode_keys``), task table and tokenizer (whose action
normalizer and chunk length define the targets). On exactly that train / held-out split it trains the
same ``StateBackbone`` (the head's backbone config, normalizer fitted on the train inputs) feeding an MLP
that regresses the normalized 8-step chunk starting at each step (MSE, AdamW, cosine schedule). No
tokens: whatever this policy cannot do in closed loop, the tokenizer and token head cannot be blamed for.

Closed loop: the eval protocol (``common.sim.libero_env``: trial i = init state i, suite step limit),
``common.eval.closed_loop.run_episode`` with this policy, ``--replan-steps`` actions per chunk.
Writes ``continuous_reference.json`` / ``.md`` / ``_training.png`` to ``--out`` (default
``results/phase3_diagnostics/continuous_reference``); held-out MSE is in normalized action units, the
unit of ``benchmarks.diagnostics.policy_action_error``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import multiprocessing as mp
import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

import rsd_entry
from common.artifacts import policy_paths
from common.checkpoints import read_checkpoint
from common.data.episodes import future_chunks
from common.data.normalization import ACTION_DIM, ActionNormalizer
from common.policy.backbones.state import StateBackbone
from common.policy.labels import load_policy_episodes
from common.policy.model import HEAD_KIND
from common.provenance import REPO_ROOT, provenance, write_json

RESULT_NAME = "continuous_reference"
DEFAULT_OUT = REPO_ROOT / "results" / "phase3_diagnostics" / RESULT_NAME


# --- data: the head's own split --------------------------------------------------------------------
def _existing(path: str, head_path: Path, what: str) -> Path:
    """A path recorded in a checkpoint (relative to where training ran: the repo root, usually)."""
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{head_path}: its {what} {path} is not found (relative to {Path.cwd()} or {REPO_ROOT})")


def step_arrays(chosen: list[dict], normalizer: ActionNormalizer, chunk_len: int) -> dict[str, torch.Tensor]:
    """Episodes -> per-step ``inputs`` [N, D] (obs/low_dim), ``task_ids`` [N], ``targets`` [N, chunk_len, 7]
    (the normalized future chunk of ``Episode.actions`` starting at each step)."""
    inputs, task_ids, targets = [], [], []
    for item in chosen:
        ep = item["episode"]
        if ep.low_dim_obs is None or ep.low_dim_obs.shape[0] != len(ep):
            found = "none" if ep.low_dim_obs is None else f"{ep.low_dim_obs.shape[0]} rows"
            raise ValueError(f"{item['file']}: data/{ep.name}: expected obs/low_dim with {len(ep)} rows (one per action), found {found}")
        inputs.append(ep.low_dim_obs.astype(np.float32))
        task_ids.append(np.full(len(ep), item["task_index"], np.int64))
        targets.append(normalizer.normalize(future_chunks(ep.actions, chunk_len=chunk_len)))
    return {"inputs": torch.from_numpy(np.concatenate(inputs)), "task_ids": torch.from_numpy(np.concatenate(task_ids)),
            "targets": torch.from_numpy(np.concatenate(targets))}


def load_reference_data(models_dir: Path, tag: str = "") -> dict[str, Any]:
    """Everything the head was trained on: train / held-out step arrays, task table, normalizer, backbone config."""
    from common.tokenizer.model import load_tokenizer

    head_path = policy_paths(models_dir, models_dir, tag)["head"]
    ckpt = read_checkpoint(head_path, kind=HEAD_KIND)
    train_cfg, metrics, config = ckpt["extra"]["train_config"], ckpt["metrics"], ckpt["config"]
    if config.get("backbone_kind") != "state":
        raise ValueError(f"{head_path}: expected a head trained on the state backbone, found {config.get('backbone_kind')!r}")
    held_out_keys = set(metrics.get("val_episode_keys") or [])
    if not held_out_keys:
        raise ValueError(f"{head_path}: expected val_episode_keys in its metrics, found none (retrain Phase 2 with this code)")
    recorded = ckpt["extra"]["tokenizer_path"]
    tok_path = models_dir / Path(recorded).name if (models_dir / Path(recorded).name).exists() else _existing(recorded, head_path, "tokenizer")
    tokenizer = load_tokenizer(tok_path)
    if tokenizer.content_hash != ckpt["extra"]["tokenizer_hash"]:
        raise ValueError(f"{head_path}: trained against tokenizer {ckpt['extra']['tokenizer_hash']}, but {tok_path} is {tokenizer.content_hash}")
    data_paths = [str(_existing(p.strip(), head_path, "demo file")) for p in train_cfg["data"].split(",") if p.strip()]
    chosen, task_table = load_policy_episodes(data_paths, num_episodes=int(train_cfg.get("num_episodes", 0)))
    # Episode keys are "<file stem>/<demo>", independent of where the file lies now.
    train = [c for c in chosen if c["key"] not in held_out_keys]
    held_out = [c for c in chosen if c["key"] in held_out_keys]
    expected = (metrics.get("train_episodes", len(train)), len(held_out_keys))
    if (len(train), len(held_out)) != expected:
        raise ValueError(f"{head_path}: expected {expected[0]} train / {expected[1]} held-out episodes, found {len(train)} / {len(held_out)} in {data_paths}")
    if [(r["suite"], r["task_id"]) for r in task_table] != [(r["suite"], r["task_id"]) for r in config["task_table"]]:
        raise ValueError(f"{head_path}: expected its task table {config['task_table']}, the demo files give {task_table}")
    chunk_len = int(tokenizer.model.chunk_len)
    return {
        "head": str(head_path), "tokenizer": str(tok_path), "data": data_paths, "task_table": config["task_table"],
        "normalizer": tokenizer.normalizer, "chunk_len": chunk_len, "backbone_config": config["backbone_config"],
        "train": step_arrays(train, tokenizer.normalizer, chunk_len), "held_out": step_arrays(held_out, tokenizer.normalizer, chunk_len),
        "train_episodes": len(train), "held_out_episodes": len(held_out),
    }


# --- model and training ------------------------------------------------------------------------------
class ChunkRegressor(nn.Module):
    """StateBackbone features -> MLP -> the normalized action chunk [B, chunk_len, 7]."""

    def __init__(self, backbone_config: dict, *, chunk_len: int, hidden: int = 512, hidden_layers: int = 2) -> None:
        super().__init__()
        self.backbone = StateBackbone(**backbone_config)
        self.chunk_len = int(chunk_len)
        layers, width = [], self.backbone.feature_dim
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        self.mlp = nn.Sequential(*layers, nn.Linear(width, self.chunk_len * ACTION_DIM))

    def forward(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.backbone(obs, task_ids)).view(-1, self.chunk_len, ACTION_DIM)


@torch.no_grad()
def chunk_mse(model: ChunkRegressor, split: dict[str, torch.Tensor], batch_size: int = 4096) -> float:
    """Mean squared error over every step, chunk position and action dim (normalized units)."""
    model.eval()
    total = 0.0
    for s in range(0, len(split["targets"]), batch_size):
        pred = model(split["inputs"][s : s + batch_size], split["task_ids"][s : s + batch_size])
        total += float(((pred - split["targets"][s : s + batch_size]) ** 2).sum())
    return total / split["targets"].numel()


def train_regressor(model: ChunkRegressor, train: dict, held_out: dict, *, epochs: int, batch_size: int = 128, lr: float = 1e-3,
                    weight_decay: float = 0.01, seed: int = 0, progress: bool = True) -> list[dict]:
    """AdamW + cosine schedule; per epoch the running train MSE and the held-out MSE. Leaves the model
    holding the weights of the epoch with the lowest held-out MSE (as Phase 2 keeps its best checkpoint)."""
    torch.manual_seed(seed)
    model.backbone.fit_normalizer(train["inputs"])
    n = len(train["targets"])
    steps_per_epoch = (n + batch_size - 1) // batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    gen = torch.Generator().manual_seed(seed)
    history, best = [], (float("inf"), None)
    bar = tqdm(range(1, epochs + 1), desc="train continuous reference", disable=not progress)
    for epoch in bar:
        model.train()
        order, seen, loss_sum = torch.randperm(n, generator=gen), 0, 0.0
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            loss = nn.functional.mse_loss(model(train["inputs"][idx], train["task_ids"][idx]), train["targets"][idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum, seen = loss_sum + loss.item() * len(idx), seen + len(idx)
        held = chunk_mse(model, held_out)
        history.append({"epoch": epoch, "train_mse": loss_sum / seen, "held_out_mse": held})
        if held < best[0]:
            best = (held, {k: v.detach().clone() for k, v in model.state_dict().items()})
        bar.set_postfix(train=f"{loss_sum / seen:.2e}", held_out=f"{held:.2e}")
    model.load_state_dict(best[1])
    model.eval()
    return history


# --- the policy the closed loop runs (TokenPolicy's interface) ------------------------------------
class ContinuousPolicy:
    """``plan(low-dim obs, task index)`` -> (raw actions [chunk_len, 7], info), like ``TokenPolicy``."""

    cameras: tuple[str, ...] = ()
    camera_size = 128

    def __init__(self, model: ChunkRegressor, normalizer: ActionNormalizer, task_table: list[dict]) -> None:
        self.model, self.normalizer, self.task_table = model.eval(), normalizer, task_table

    def policy_input(self, env, obs: dict[str, np.ndarray]) -> np.ndarray:
        return env.low_dim_obs(obs)

    def task_index(self, suite: str, task_id: int, instruction: str) -> int:
        hits = [r for r in self.task_table if r["instruction"].strip().lower() == instruction.strip().lower() and r["suite"] in ("", suite)]
        if len(hits) != 1:
            raise KeyError(f"task ({suite}, {task_id}, {instruction!r}): expected one match in the trained task table, found {len(hits)}")
        return int(hits[0]["index"])

    @torch.no_grad()
    def plan(self, observation: np.ndarray, task_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        started = time.perf_counter()
        obs = torch.as_tensor(np.asarray(observation, np.float32))[None]
        normalized = self.model(obs, torch.tensor([int(task_index)]))[0].numpy()
        return self.normalizer.unnormalize(normalized), {"policy_s": time.perf_counter() - started}


# --- closed loop -------------------------------------------------------------------------------------
def run_task(policy: ContinuousPolicy, suite: str, task_id: int, trials: list[int], replan_steps: int, seed: int = 0) -> list[dict]:
    """All trials of one task with one env; an exception inside an episode becomes an error row."""
    from common.eval.closed_loop import run_episode
    from common.sim.libero_env import LiberoTaskEnv

    rows = []
    env = LiberoTaskEnv(suite=suite, task_id=task_id, seed=seed)
    try:
        task_index = policy.task_index(suite, task_id, env.instruction)
        for trial in trials:
            started = time.perf_counter()
            row = {"task": task_id, "trial": trial, "instruction": env.instruction}
            try:
                out = run_episode(env, policy, trial, task_index=task_index, max_steps=env.max_steps, replan_steps=replan_steps)
                row.update(status="success" if out["success"] else "failure", steps=out["steps"], chunks=len(out["chunks"]))
            except Exception as exc:  # recorded as an error row (counted apart from failures), never hidden
                row.update(status="error", steps=0, error=f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3).splitlines()[-3:]}")
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
    finally:
        env.close()
    return rows


def _init_worker(parent_pid: int) -> None:
    from common.locks import exit_with_parent

    exit_with_parent(parent_pid)
    torch.set_num_threads(1)


def run_closed_loop(policy: ContinuousPolicy, suite: str, tasks: list[int], trials: list[int], *, replan_steps: int, workers: int,
                    progress: bool = True) -> list[dict]:
    """Every (task, trial): sequentially, or one task per job in a spawn pool (MuJoCo must not be forked)."""
    rows: list[dict] = []
    bar = tqdm(total=len(tasks) * len(trials), desc="closed loop", disable=not progress)

    def record(task_rows: list[dict]) -> None:
        rows.extend(task_rows)
        bar.update(len(task_rows))
        bar.set_postfix(success=sum(r["status"] == "success" for r in rows))

    try:
        if workers <= 1:
            for task in tasks:
                record(run_task(policy, suite, task, trials, replan_steps))
        else:
            pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(os.getpid(),))
            try:
                for fut in as_completed([pool.submit(run_task, policy, suite, t, trials, replan_steps) for t in tasks]):
                    record(fut.result())
            except BaseException:
                processes = list((pool._processes or {}).values())  # the executor cannot stop running calls itself
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in processes:
                    proc.terminate()
                raise
            pool.shutdown(wait=True)
    finally:
        bar.close()
    return sorted(rows, key=lambda r: (r["task"], r["trial"]))


def check_trials(suite: str, tasks: list[int], first_trial: int, trials: int) -> list[int]:
    """Init states ``first_trial .. first_trial + trials - 1`` must exist for every task (checked before training)."""
    from common.sim.libero_env import get_suite

    bench = get_suite(suite)
    for task in tasks:
        available = len(bench.get_task_init_states(task))
        if first_trial + trials > available:
            raise ValueError(f"--first-trial {first_trial} --trials {trials}: {suite} task {task} has {available} init states (0..{available - 1})")
    return list(range(first_trial, first_trial + trials))


def select_tasks(task_table: list[dict], suite: str, spec: str) -> list[int]:
    from common.sim.libero_env import get_suite, parse_task_spec

    trained = sorted(int(r["task_id"]) for r in task_table if r["suite"] == suite)
    if not trained:
        raise ValueError(f"--suite {suite}: expected tasks of it in the head's task table, found suites {sorted({r['suite'] for r in task_table})}")
    tasks = trained if not spec else parse_task_spec(spec, get_suite(suite).get_num_tasks())
    missing = sorted(set(tasks) - set(trained))
    if missing:
        raise ValueError(f"--tasks {spec}: tasks {missing} of {suite} are not in the head's task table (trained: {trained})")
    return tasks


# --- outputs -------------------------------------------------------------------------------------
def summarize(rows: list[dict], task_table: list[dict], suite: str) -> dict[str, Any]:
    instruction = {int(r["task_id"]): r["instruction"] for r in task_table if r["suite"] == suite}
    per_task = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        ok = sum(r["status"] == "success" for r in mine)
        per_task.append({"task": task, "instruction": instruction.get(task, ""), "trials": len(mine), "successes": ok,
                         "errors": sum(r["status"] == "error" for r in mine), "success_rate": ok / len(mine)})
    ok = sum(r["status"] == "success" for r in rows)
    return {"per_task": per_task, "overall": {"trials": len(rows), "successes": ok, "errors": sum(r["status"] == "error" for r in rows),
                                              "success_rate": ok / len(rows) if rows else 0.0}}


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


# --- CLI --------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.evaluation.continuous_reference", description=__doc__.split("\n")[0])
    p.add_argument("--models-dir", required=True, help="Phase 2 models folder: best_rfsq_head{_tag}.pt and the tokenizer it names")
    p.add_argument("--tag", default="", help='head suffix: "" (robust tokens) or "naive"; only its data split and tasks are used')
    p.add_argument("--epochs", type=int, default=30, help="training epochs")
    p.add_argument("--batch-size", type=int, default=128, help="training batch (steps)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--hidden", type=int, default=512, help="width of the MLP's hidden layers")
    p.add_argument("--hidden-layers", type=int, default=2, help="number of hidden layers of the MLP")
    p.add_argument("--seed", type=int, default=0, help="training seed (and env seed)")
    p.add_argument("--suite", default="libero_object", help="LIBERO suite evaluated (its tasks must be in the head's task table)")
    p.add_argument("--tasks", default="", help='task ids, e.g. "0-9" or "0,3" ("" = every task of --suite in the head\'s table)')
    p.add_argument("--trials", type=int, default=3, help="episodes per task")
    p.add_argument("--first-trial", type=int, default=10, help="init state of the first trial (trial i = init state i)")
    p.add_argument("--replan-steps", type=int, default=4, help="actions executed per predicted chunk before replanning (1..chunk length)")
    p.add_argument("--workers", type=int, default=1, help="processes for the closed loop (one task per job)")
    p.add_argument("--eef-relative", action=argparse.BooleanOptionalAction, default=None,
                   help="state backbone with object positions relative to the end effector (default: as the head's backbone)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result in --out")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p


def main(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("epochs", "batch_size", "trials", "replan_steps", "workers", "hidden", "hidden_layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected >= 1, found {getattr(args, name)}")
    out = Path(args.out)
    result_path = out / f"{RESULT_NAME}.json"
    if result_path.exists() and not args.overwrite:
        raise ValueError(f"{result_path}: a result already exists; pass --overwrite to replace it or choose another --out")
    rsd_entry.setup_process(torch_threads=1)
    from common.locks import output_lock

    with output_lock(out / ".lock", f"continuous reference results in {out}"):
        started = time.perf_counter()
        data = load_reference_data(Path(args.models_dir), args.tag)
        if args.replan_steps > data["chunk_len"]:
            raise ValueError(f"--replan-steps {args.replan_steps}: expected 1..{data['chunk_len']} (the tokenizer's chunk length)")
        tasks = select_tasks(data["task_table"], args.suite, args.tasks)
        trials = check_trials(args.suite, tasks, args.first_trial, args.trials)
        if args.eef_relative is not None:
            data["backbone_config"] = {**data["backbone_config"], "eef_relative": args.eef_relative}
        torch.manual_seed(args.seed)
        model = ChunkRegressor(data["backbone_config"], chunk_len=data["chunk_len"], hidden=args.hidden, hidden_layers=args.hidden_layers)
        history = train_regressor(model, data["train"], data["held_out"], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  weight_decay=args.weight_decay, seed=args.seed, progress=args.progress)
        train_seconds = time.perf_counter() - started
        policy = ContinuousPolicy(model, data["normalizer"], data["task_table"])
        rows = run_closed_loop(policy, args.suite, tasks, trials, replan_steps=args.replan_steps, workers=args.workers, progress=args.progress)
        best = min(history, key=lambda h: h["held_out_mse"])
        result = {
            "provenance": provenance(seed=args.seed), "config": vars(args), "head": data["head"], "tokenizer": data["tokenizer"],
            "data": data["data"], "chunk_len": data["chunk_len"], "backbone_config": data["backbone_config"],
            "data_summary": {"train_episodes": data["train_episodes"], "held_out_episodes": data["held_out_episodes"],
                             "train_steps": len(data["train"]["targets"]), "held_out_steps": len(data["held_out"]["targets"])},
            "training": history, "best_epoch": best["epoch"], "best_held_out_mse": best["held_out_mse"],
            **summarize(rows, data["task_table"], args.suite), "episodes": rows,
            "wall_seconds": {"data_and_training": train_seconds, "closed_loop": time.perf_counter() - started - train_seconds,
                             "total": time.perf_counter() - started},
        }
        write_json(result_path, result)
        (out / f"{RESULT_NAME}.md").write_text(markdown(result))
        plot_training(history, out / f"{RESULT_NAME}_training.png")
    print(markdown(result))
    return result


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
