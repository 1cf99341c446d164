"""Phase 3: closed-loop LIBERO evaluation of a token policy, with and without speculative decoding.

Structure (lerobot / openvla-oft style): ``TokenPolicy.plan`` (one chunk) → ``run_episode`` (one
trial) → ``run_trials`` (one task, one env reused) → ``evaluate`` (process pool over tasks and
trials, JSONL rows as episodes finish, ``eval_info.json`` + table + plots at the end).

Protocol (``common.libero_env``): trial ``i`` uses init state ``i``; seed → reset →
set_init_state → 10 wait steps; per-suite max steps; success from ``check_success()``. An
exception inside an episode is recorded as an *error* with its message, counted apart from
failures. ``--num-trials`` is honoured exactly.

Replanning: the policy decodes an 8-step chunk and executes the first ``replan_steps`` (default 4)
open-loop, then replans from the new observation — half a chunk halves the open-loop drift of a
state-based policy at twice the decode calls (openvla-oft executes all 8; ``--replan-steps 8``).

Decoding: with ``compare_main_only`` (default), every chunk is decoded both speculatively and
main-only from the same features; the speculative tokens drive the robot, the fraction of chunks
with identical tokens is reported (``--assert-lossless`` stops at the first difference with
``LosslessViolation``), and both latencies are measured on the same inputs in the same run.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import multiprocessing as mp
import numpy as np
import torch
from tqdm.auto import tqdm

from common.provenance import provenance, write_json

STRATEGIES = ("A", "B")
TOKENIZERS = ("robust", "naive")

# Fine-grained tasks: where a few millimetres decide success — grasping a bowl by its thin rim
# (every libero_spatial task picks a black bowl and must leave it within 3 cm on the plate), or
# small / low objects whose top is only ~2-4 cm above the table and that must land inside the
# basket's region (libero_object's flat boxes: butter, cream cheese, chocolate pudding).
FINE_GRAINED_KEYWORDS = {
    "libero_spatial": ("bowl",),
    "libero_object": ("butter", "cream cheese", "chocolate pudding"),
}


class LosslessViolation(AssertionError):
    """Exact speculative decoding produced tokens different from main-only greedy decoding."""


def is_fine_grained(suite: str, instruction: str) -> bool:
    return any(k in instruction.lower() for k in FINE_GRAINED_KEYWORDS.get(suite, ()))


# --- config -----------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Flags of ``phase3/modal_phase3_libero_eval.py`` (same on the local CLI and ``modal run``)."""

    task_suite: str = "libero_object"
    tasks: str = "0-9"
    num_trials: int = 50
    use_speculative_decoding: bool = True
    tokenizer: str = "robust"  # robust | naive
    strategy: str = "A"  # A: models trained on this tokenizer's tokens; B: naive-token models + robust decoder
    acceptance: str = "exact"  # exact (lossless) | relaxed (lossy, reported separately)
    tolerance: int = 0
    replan_steps: int = 4
    workers: int = 0  # 0 = number of CPU cores
    max_steps: int = 0  # 0 = the suite's standard limit
    seed: int = 0
    save_videos: int = 0  # first N trials of each task rendered to GIF (slow: cameras on)
    compare_main_only: bool = True  # decode every chunk both ways: lossless check + same-run latency
    assert_lossless: bool = False  # stop with LosslessViolation on the first differing chunk (else count it)
    decode_dtype: str = "float64"  # float64 | float32: precision of the main/draft token models
    # The draft's precision does not touch losslessness (the main model verifies its integer tokens),
    # so it may run cheaper: "" = same as --decode-dtype.
    draft_dtype: str = ""
    models_dir: str = ""
    out: str = ""  # "" = $RSD_RESULTS_DIR/phase3/<run name>
    torch_threads: int = 1

    def __post_init__(self):
        from common.libero_env import SUITES

        if self.task_suite not in SUITES:
            raise ValueError(f"--task-suite must be one of {SUITES}; got {self.task_suite!r}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"--tokenizer must be one of {TOKENIZERS}; got {self.tokenizer!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}; got {self.strategy!r}")
        if self.strategy == "B" and self.tokenizer != "robust":
            raise ValueError("--strategy B means: robust decoder + naive-token models; use it with --tokenizer robust")
        if self.decode_dtype not in ("float64", "float32"):
            raise ValueError(f"--decode-dtype must be float64 or float32; got {self.decode_dtype!r}")
        if self.draft_dtype not in ("", "float64", "float32"):
            raise ValueError(f"--draft-dtype must be float64, float32 or empty (= --decode-dtype); got {self.draft_dtype!r}")
        if self.acceptance not in ("exact", "relaxed"):
            raise ValueError(f"--acceptance must be exact or relaxed; got {self.acceptance!r}")
        if self.acceptance == "exact" and self.tolerance != 0:
            raise ValueError("--tolerance needs --acceptance relaxed (exact acceptance is lossless, tolerance 0)")
        for name in ("num_trials", "replan_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        for name in ("workers", "max_steps", "save_videos", "tolerance"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")

    @property
    def run_name(self) -> str:
        dec = "spec" if self.use_speculative_decoding else "main_only"
        acc = "" if self.acceptance == "exact" else f"_relaxed{self.tolerance}"
        return f"{self.task_suite}_{self.tokenizer}_{self.strategy}_{dec}{acc}"

    def out_dir(self) -> Path:
        from common.paths import results_dir

        return Path(self.out) if self.out else results_dir() / "phase3" / self.run_name

    def resolved_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def checkpoint_paths(self) -> dict[str, Path]:
        """Which tokenizer / head / draft this configuration evaluates (seed's strategy names)."""
        from common.paths import NAIVE_TOKENIZER, ROBUST_TOKENIZER, models_dir

        root = Path(self.models_dir) if self.models_dir else models_dir()
        tokenizer = root / (ROBUST_TOKENIZER if self.tokenizer == "robust" else NAIVE_TOKENIZER)
        tag = "" if (self.tokenizer == "robust" and self.strategy == "A") else "_naive"
        return {
            "tokenizer": tokenizer,
            "head": root / f"best_rfsq_head{tag}.pt",
            "draft": root / f"best_draft_with_projection{tag}.pt",
        }

    def resume_key(self) -> dict:
        """Fields that must match for a rerun to reuse finished episodes."""
        d = asdict(self)
        for k in ("workers", "out", "save_videos", "torch_threads", "num_trials", "tasks", "assert_lossless"):
            d.pop(k)
        return d


# --- the policy ---------------------------------------------------------------------------------
class TokenPolicy:
    """Observation → features → tokens (speculative or main-only) → actions chunk."""

    def __init__(self, cfg: EvalConfig):
        from common.action_tokenizer import load_tokenizer
        from common.policy_training import load_policy

        paths = cfg.checkpoint_paths()
        self.cfg = cfg
        self.tokenizer = load_tokenizer(paths["tokenizer"], require_conditioning="layernorm" if cfg.tokenizer == "robust" else "none")
        # Strategy B deliberately pairs naive-token models with the robust decoder (explicit opt-in).
        self.policy = load_policy(paths["head"], paths["draft"], self.tokenizer, allow_tokenizer_mismatch=cfg.strategy == "B")
        if self.policy.backbone_kind != "state":
            # The OpenVLA-OFT closed loop needs camera images + the 7B extractor per chunk; not wired yet.
            raise NotImplementedError(
                f"{paths['head']}: closed-loop evaluation supports the 'state' backbone; found {self.policy.backbone_kind!r}"
            )
        # IMPORTANT: in float32 the one-pass verification (K+1 positions) and the one-position main
        # passes round differently (different GEMM shapes), so a near-tie in a flat fine-layer
        # distribution can flip an argmax: we saw one chunk in a few thousand differ. In float64 both
        # paths agree; speculative and main-only are timed in the same precision.
        self.dtype = torch.float64 if cfg.decode_dtype == "float64" else torch.float32
        self.draft_dtype = {"float64": torch.float64, "float32": torch.float32}.get(cfg.draft_dtype, self.dtype)
        self.policy.head.to(self.dtype)
        self.policy.draft.to(self.draft_dtype)
        self._plans = 0  # plan() calls so far (alternates the timing order of the two decodes)
        self.checkpoints = {
            "tokenizer": {"path": str(paths["tokenizer"]), "content_hash": self.tokenizer.content_hash},
            "head": {"path": str(paths["head"]), "content_hash": self.policy.head_hash},
            "draft": {"path": str(paths["draft"]), "content_hash": self.policy.draft_hash},
        }

    def task_index(self, suite: str, task_id: int, instruction: str) -> int:
        return self.policy.task_index(suite=suite, task_id=task_id, instruction=instruction)

    @torch.no_grad()
    def plan(self, low_dim: np.ndarray, task_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        from common.speculative import StageTimer, main_only_decode, speculative_decode

        cfg, timer = self.cfg, StageTimer()
        obs = torch.as_tensor(low_dim, dtype=torch.float32)[None]
        with timer.stage("backbone"):
            features = self.policy.features(obs, torch.tensor([task_index])).to(self.dtype)
        info: dict[str, Any] = {}

        def decode():
            if cfg.use_speculative_decoding:
                codes, stats = speculative_decode(
                    self.policy.head, self.policy.draft, features, acceptance=cfg.acceptance, tolerance=cfg.tolerance, timer=timer
                )
                info.update(accepted_layers=stats.accepted_layers[0], coarse_layers=stats.coarse_layers, draft_s=stats.draft_time_s)
            else:
                codes, stats = main_only_decode(self.policy.head, features, timer=timer)
            info.update(main_passes=stats.main_passes, main_s=stats.main_time_s)
            return codes

        def reference():
            ref_codes, ref_stats = main_only_decode(self.policy.head, features, timer=StageTimer())
            info.update(ref_main_passes=ref_stats.main_passes, ref_main_s=ref_stats.main_time_s)
            return ref_codes

        if cfg.compare_main_only:
            # IMPORTANT: whichever decode runs first after an env step pays for cold CPU caches;
            # alternate the order chunk by chunk so neither side of the comparison always does.
            self._plans += 1
            if self._plans % 2:
                codes, ref_codes = decode(), reference()
            else:
                ref_codes, codes = reference(), decode()
            identical = bool(torch.equal(ref_codes, codes))
            info["identical_to_main_only"] = identical
            if cfg.assert_lossless and cfg.acceptance == "exact" and not identical:
                raise LosslessViolation("exact speculative decoding produced tokens that differ from main-only greedy decoding")
        else:
            codes = decode()
        with timer.stage("tokenizer_decode"):
            normalized = self.tokenizer.model.decode_from_indices(codes)[0].numpy()
        actions = self.tokenizer.normalizer.unnormalize(normalized)
        info.update(backbone_s=timer.last["backbone"], tokenizer_decode_s=timer.last["tokenizer_decode"])
        info["policy_s"] = info["backbone_s"] + info.get("draft_s", 0.0) + info["main_s"] + info["tokenizer_decode_s"]
        if cfg.compare_main_only:
            info["ref_policy_s"] = info["backbone_s"] + info["ref_main_s"] + info["tokenizer_decode_s"]
        return actions, info


# --- episode / task -------------------------------------------------------------------------------
def run_episode(env, policy: TokenPolicy, trial: int, *, task_index: int, max_steps: int, replan_steps: int, frames: list | None = None) -> dict[str, Any]:
    """One trial; returns a row (success, steps, per-chunk decode records)."""
    obs = env.reset_to_trial(trial)
    chunks, steps, success = [], 0, False
    while steps < max_steps and not success:
        actions, info = policy.plan(env.low_dim_obs(obs), task_index)
        chunks.append(info)
        for action in actions[:replan_steps]:
            obs, _, done, _ = env.step(action)
            steps += 1
            if frames is not None:
                frames.append(obs["agentview_rgb"])
            if done or env.check_success():
                success = True
                break
            if steps >= max_steps:
                break
    return {"success": success, "steps": steps, "chunks": chunks}


def _episode_row(cfg: EvalConfig, task_id: int, trial: int, instruction: str, outcome: dict | None, error: str | None, seconds: float) -> dict:
    row = {"suite": cfg.task_suite, "task": task_id, "trial": trial, "instruction": instruction, "seconds": seconds}
    if error is not None:
        row.update(status="error", success=False, error=error, steps=0, chunks=[])
    else:
        row.update(status="success" if outcome["success"] else "failure", **outcome)
    return row


_WORKER: dict[str, Any] = {}


def _worker_state(cfg: EvalConfig, task_id: int, *, cameras: tuple[str, ...]) -> tuple[TokenPolicy, Any]:
    """Per-process policy (loaded once) and env (kept while the task stays the same)."""
    from common.libero_env import LiberoTaskEnv

    if _WORKER.get("cfg") != cfg:
        torch.set_num_threads(cfg.torch_threads)
        _WORKER.clear()
        _WORKER.update(cfg=cfg, policy=TokenPolicy(cfg))
    key = (cfg.task_suite, task_id, cameras)
    if _WORKER.get("env_key") != key:
        if _WORKER.get("env") is not None:
            _WORKER["env"].close()
        _WORKER["env"] = LiberoTaskEnv(suite=cfg.task_suite, task_id=task_id, cameras=cameras, seed=cfg.seed, max_steps=cfg.max_steps or None)
        _WORKER["env_key"] = key
    return _WORKER["policy"], _WORKER["env"]


def run_trial_job(cfg: EvalConfig, task_id: int, trial: int) -> dict:
    """One episode in a worker process. Setup errors propagate; episode errors become rows."""
    video = trial < cfg.save_videos
    policy, env = _worker_state(cfg, task_id, cameras=("agentview",) if video else ())
    task_index = policy.task_index(cfg.task_suite, task_id, env.instruction)
    frames: list | None = [] if video else None
    started = time.perf_counter()
    try:
        outcome = run_episode(env, policy, trial, task_index=task_index, max_steps=env.max_steps, replan_steps=cfg.replan_steps, frames=frames)
        error = None
    except LosslessViolation:
        raise
    except Exception as exc:  # recorded as an error row (counted apart from failures), never hidden
        outcome, error = None, f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=3).splitlines()[-3:]}"
    row = _episode_row(cfg, task_id, trial, env.instruction, outcome, error, time.perf_counter() - started)
    if video and frames:
        row["video"] = str(save_gif(frames, cfg.out_dir() / "videos" / f"task{task_id}_trial{trial}_{row['status']}.gif"))
    return row


def run_trials(cfg: EvalConfig, task_id: int, trials: list[int]) -> list[dict]:
    """All given trials of one task in this process (the Modal shard body)."""
    return [run_trial_job(cfg, task_id, t) for t in trials]


def save_gif(frames: list[np.ndarray], path: Path, *, every: int = 2) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f) for f in frames[::every]]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    return path


# --- the whole evaluation --------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def planned_jobs(cfg: EvalConfig) -> list[tuple[int, int]]:
    """(task, trial) pairs in task-major order; trial i is init state i for every task."""
    from common.libero_env import get_suite, parse_task_spec

    num_tasks = get_suite(cfg.task_suite).get_num_tasks()
    return [(task, trial) for task in parse_task_spec(cfg.tasks, num_tasks) for trial in range(cfg.num_trials)]


def checkpoint_hashes(cfg: EvalConfig) -> dict[str, str]:
    """Content hashes of the tokenizer/head/draft files this run loads (missing files are left out:
    the policy loader reports them with the full message)."""
    out = {}
    for name, path in cfg.checkpoint_paths().items():
        if path.exists():
            out[name] = str(torch.load(path, map_location="cpu", weights_only=True).get("content_hash"))
    return out


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Run (or resume) the evaluation; returns the eval_info dict (also written to ``out``)."""
    out = cfg.out_dir()
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "episodes.jsonl"
    key_path = out / "eval_config.json"
    checkpoints = checkpoint_hashes(cfg)
    if key_path.exists():
        saved = json.loads(key_path.read_text())
        if saved["resume_key"] != cfg.resume_key():
            raise ValueError(f"{out}: holds results of a different configuration ({key_path}); choose another --out")
        # finished episodes are only reusable when they were run with the very same models
        changed = sorted(k for k, h in saved.get("checkpoints", checkpoints).items() if checkpoints.get(k) != h)
        if changed:
            raise ValueError(
                f"{out}: finished episodes were run with other {', '.join(changed)} checkpoints than "
                f"{', '.join(str(cfg.checkpoint_paths()[k]) for k in changed)} now hold; choose another --out or delete {out}"
            )
    write_json(key_path, {"resume_key": cfg.resume_key(), "config": asdict(cfg), "checkpoints": checkpoints})

    jobs = planned_jobs(cfg)
    done = {(r["task"], r["trial"]) for r in read_rows(rows_path)}
    todo = [j for j in jobs if j not in done]
    started = time.perf_counter()
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"eval {cfg.run_name}", disable=not progress)
    workers = min(cfg.resolved_workers(), max(1, len(todo)))
    with open(rows_path, "a") as sink:
        def record(row: dict) -> None:
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            bar.update(1)
            bar.set_postfix(success=row["status"])

        if workers == 1:
            for task, trial in todo:
                record(run_trial_job(cfg, task, trial))
        elif todo:
            # spawn: MuJoCo/EGL state must not be forked; each worker keeps one env and one policy
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(run_trial_job, cfg, task, trial) for task, trial in todo]
                for fut in as_completed(futures):
                    record(fut.result())
    bar.close()
    wall = time.perf_counter() - started
    planned = set(jobs)
    rows = [r for r in read_rows(rows_path) if (r["task"], r["trial"]) in planned]
    info = summarize(cfg, rows, wall_seconds=wall, episodes_run=len(todo), workers=workers)
    write_outputs(info, out)
    return info


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan"), "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "n": int(arr.size)}


def summarize(cfg: EvalConfig, rows: list[dict], *, wall_seconds: float, episodes_run: int, workers: int) -> dict:
    """Per-task / overall success, fine-grained success, latency breakdown, acceptance, speedup."""
    from common.libero_env import library_versions

    per_task: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: (r["task"], r["trial"])):
        t = per_task.setdefault(r["task"], {"instruction": r["instruction"], "success": 0, "failure": 0, "error": 0, "steps": []})
        t[r["status"]] += 1
        t["steps"].append(r["steps"])
    for task, t in per_task.items():
        n_valid = t["success"] + t["failure"]
        t["episodes"] = n_valid + t["error"]
        t["success_rate"] = t["success"] / n_valid if n_valid else float("nan")
        t["fine_grained"] = is_fine_grained(cfg.task_suite, t["instruction"])
        t["mean_steps"] = float(np.mean(t.pop("steps"))) if t["episodes"] else float("nan")

    def rate(tasks):
        s = sum(per_task[t]["success"] for t in tasks)
        n = sum(per_task[t]["success"] + per_task[t]["failure"] for t in tasks)
        return (s / n if n else float("nan")), n

    overall, n_overall = rate(list(per_task))
    fine, n_fine = rate([t for t in per_task if per_task[t]["fine_grained"]])
    chunks = [c for r in rows for c in r.get("chunks", [])]
    acceptance_per_layer = None
    if cfg.use_speculative_decoding and chunks:
        # fraction of chunks whose draft layer k was accepted (layers are accepted as a prefix)
        accepted = np.array([c["accepted_layers"] for c in chunks])
        acceptance_per_layer = [float((accepted > k).mean()) for k in range(chunks[0]["coarse_layers"])]
    passes = [c["main_passes"] for c in chunks]
    ref_passes = [c["ref_main_passes"] for c in chunks if "ref_main_passes" in c]
    latency = {
        name: _stats([c[name] * 1000.0 for c in chunks if name in c])
        for name in ("backbone_s", "draft_s", "main_s", "tokenizer_decode_s", "policy_s", "ref_main_s", "ref_policy_s")
    }
    latency = {k.replace("_s", "_ms"): v for k, v in latency.items() if v["n"]}
    token_speedup = None
    if "ref_main_ms" in latency and cfg.use_speculative_decoding:
        spec_tok = latency["main_ms"]["mean"] + latency.get("draft_ms", {"mean": 0.0})["mean"]
        token_speedup = latency["ref_main_ms"]["mean"] / spec_tok
    step_latency = None
    if "policy_ms" in latency:
        steps = sum(r["steps"] for r in rows)
        step_latency = {
            "policy_ms_per_env_step": sum(c["policy_s"] for c in chunks) * 1000.0 / max(steps, 1),
            "main_only_policy_ms_per_env_step": (sum(c["ref_policy_s"] for c in chunks) * 1000.0 / max(steps, 1)) if ref_passes else None,
        }
    errors = [{"task": r["task"], "trial": r["trial"], "error": r["error"]} for r in rows if r["status"] == "error"]
    identical = [c["identical_to_main_only"] for c in chunks if "identical_to_main_only" in c]
    return {
        "run_name": cfg.run_name,
        "config": asdict(cfg),
        "episodes": len(rows),
        "episodes_run_this_call": episodes_run,
        "errors": len(errors),
        "error_list": errors[:20],
        "success_rate": overall,
        "success_episodes": n_overall,
        "fine_grained_success_rate": fine,
        "fine_grained_episodes": n_fine,
        "per_task": {str(k): v for k, v in sorted(per_task.items())},
        "chunks": len(chunks),
        "latency_ms": latency,
        "step_latency": step_latency,
        "acceptance_per_layer": acceptance_per_layer,
        "mean_accepted_layers": float(np.mean([c["accepted_layers"] for c in chunks])) if cfg.use_speculative_decoding and chunks else None,
        "main_passes_per_chunk": float(np.mean(passes)) if passes else None,
        "main_only_passes_per_chunk": float(np.mean(ref_passes)) if ref_passes else None,
        "main_pass_ratio": (float(np.mean(passes)) / float(np.mean(ref_passes))) if ref_passes else None,
        "token_decode_speedup": token_speedup,
        "lossless_identical_fraction": (float(np.mean(identical)) if identical else None),
        "wall_seconds": wall_seconds,
        "workers": workers,
        "episodes_per_minute": (episodes_run / wall_seconds * 60.0) if episodes_run and wall_seconds > 0 else None,
        "libraries": library_versions(),
        "provenance": provenance(seed=cfg.seed),
    }


# --- outputs -------------------------------------------------------------------------------------
def _fmt(v, pct=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{100 * v:.1f}%" if pct else f"{v:.3g}"


def render_table(info: dict) -> str:
    lat = info["latency_ms"]
    lines = [
        f"### {info['run_name']}",
        "",
        f"Success {_fmt(info['success_rate'], True)} over {info['success_episodes']} episodes "
        f"({info['errors']} errors, counted apart); fine-grained {_fmt(info['fine_grained_success_rate'], True)} "
        f"over {info['fine_grained_episodes']}.",
        "",
        "| task | instruction | fine-grained | success | episodes | errors | mean steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for task, t in info["per_task"].items():
        lines.append(
            f"| {task} | {t['instruction']} | {'yes' if t['fine_grained'] else 'no'} | {_fmt(t['success_rate'], True)} | "
            f"{t['episodes']} | {t['error']} | {t['mean_steps']:.0f} |"
        )
    lines += ["", "| latency per chunk (ms) | mean | p50 | p95 |", "|---|---|---|---|"]
    for name, s in lat.items():
        lines.append(f"| {name} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} |")
    lines += [
        "",
        f"Main passes per chunk: {_fmt(info['main_passes_per_chunk'])} (main-only {_fmt(info['main_only_passes_per_chunk'])}); "
        f"mean accepted layers {_fmt(info['mean_accepted_layers'])}; acceptance per layer "
        f"{[round(a, 3) for a in info['acceptance_per_layer']] if info['acceptance_per_layer'] else '—'}; "
        f"token-decode speedup {_fmt(info['token_decode_speedup'])}x; lossless identical {_fmt(info['lossless_identical_fraction'], True)}.",
    ]
    return "\n".join(lines)


def write_outputs(info: dict, out: Path) -> None:
    write_json(out / "eval_info.json", info)
    (out / "eval_table.md").write_text(render_table(info) + "\n")
    plot_eval(info, out / "eval_plots.png")


def plot_eval(info: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tasks = list(info["per_task"])
    rates = [info["per_task"][t]["success_rate"] for t in tasks]
    colors = ["tab:orange" if info["per_task"][t]["fine_grained"] else "tab:blue" for t in tasks]
    axes[0].bar(tasks, [0 if math.isnan(r) else r for r in rates], color=colors)
    axes[0].set(title="Success per task (orange: fine-grained)", xlabel="task", ylabel="success rate", ylim=(0, 1))
    lat = info["latency_ms"]
    names = [n for n in ("backbone_ms", "draft_ms", "main_ms", "tokenizer_decode_ms") if n in lat]
    axes[1].bar(names, [lat[n]["mean"] for n in names], color="tab:green", label="speculative" if "draft_ms" in lat else "main-only")
    if "ref_main_ms" in lat:
        axes[1].bar(["main-only main_ms"], [lat["ref_main_ms"]["mean"]], color="tab:red")
    axes[1].set(title="Latency per chunk (mean ms)", ylabel="ms")
    axes[1].tick_params(axis="x", rotation=30)
    acc = info["acceptance_per_layer"] or []
    axes[2].bar([f"L{k}" for k in range(len(acc))], acc, color="tab:purple")
    axes[2].set(title="Draft layer accepted (fraction of chunks)", ylim=(0, 1))
    fig.suptitle(info["run_name"])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
