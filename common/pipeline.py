"""The whole RSD pipeline on a CPU, stage by stage, idempotent (what ``make run`` runs).

demos (scripted expert) → Phase 1 naive + robust tokenizers + comparison → Phase 2 main + draft
models on robust and on naive tokens (state backbone) → Phase 3 comparison (naive, robust A,
robust B; speculative vs main-only on the same chunks) → ``report/``.

Every stage records a fingerprint (its settings + the content hashes of its inputs) in
``<root>/stamps/<stage>.json``; a rerun skips a stage whose fingerprint and outputs are unchanged
and redoes it (and, through the changed input hashes, everything after it) otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from common.provenance import REPO_ROOT, provenance, write_json


@dataclass(frozen=True)
class Profile:
    name: str
    suite: str
    tasks: str
    demos_per_task: int
    tokenizer_epochs: int
    policy_epochs: int
    policy_batch_size: int
    d_model: int
    num_blocks: int
    eval_trials: int
    eval_max_steps: int  # 0 = the suite's standard limit
    workers: int
    latent_dim: int = 16


PROFILES = {
    # target <= 30 min on 2 cores: all 10 libero_object tasks
    "default": Profile("default", "libero_object", "0-9", demos_per_task=20, tokenizer_epochs=30, policy_epochs=10,
                       policy_batch_size=128, d_model=128, num_blocks=2, eval_trials=3, eval_max_steps=0, workers=2),
    # target <= 10 min: 5 tasks, fewer demos/epochs/trials
    "quick": Profile("quick", "libero_object", "0-4", demos_per_task=8, tokenizer_epochs=15, policy_epochs=6,
                     policy_batch_size=128, d_model=128, num_blocks=2, eval_trials=2, eval_max_steps=0, workers=2),
    # test-suite smoke run: one task, a few demos/epochs, short episodes
    "tiny": Profile("tiny", "libero_object", "0", demos_per_task=3, tokenizer_epochs=2, policy_epochs=1,
                    policy_batch_size=64, d_model=32, num_blocks=1, eval_trials=1, eval_max_steps=24, workers=1),
}


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@contextmanager
def artifact_dirs(root: Path):
    """Point every pure function at this run's data / models / results folders."""
    keys = {"RSD_DATA_DIR": root / "data", "RSD_MODELS_DIR": root / "models", "RSD_RESULTS_DIR": root / "results"}
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(v) for k, v in keys.items()})
    try:
        yield {k: Path(v) for k, v in keys.items()}
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Stages:
    """Fingerprinted stages: ``run(name, fingerprint_inputs, outputs, fn)``."""

    def __init__(self, root: Path, log: Callable[[str], None]):
        self.stamps = root / "stamps"
        self.stamps.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.timings: dict[str, dict[str, Any]] = {}

    def run(self, name: str, inputs: dict, outputs: list[Path], fn: Callable[[], str]) -> None:
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        stamp = self.stamps / f"{name}.json"
        if stamp.exists() and json.loads(stamp.read_text())["fingerprint"] == fingerprint and all(p.exists() for p in outputs):
            self.log(f"[{name}] up to date (fingerprint {fingerprint}), skipped")
            self.timings[name] = {"seconds": 0.0, "skipped": True}
            return
        started = time.perf_counter()
        summary = fn()
        seconds = time.perf_counter() - started
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {name} finished but did not write {missing}")
        write_json(stamp, {"fingerprint": fingerprint, "inputs": inputs, "seconds": seconds})
        self.timings[name] = {"seconds": seconds, "skipped": False}
        self.log(f"[{name}] {summary} ({seconds:.0f} s)")


def run_pipeline(profile: Profile, *, root: Path, report_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Run (or resume) every stage of ``profile`` under ``root``; write ``report_dir``."""
    from common.demo_collection import collect_demos
    from common.libero_env import get_suite, parse_task_spec

    started = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    stages = Stages(root, log)
    with artifact_dirs(root) as dirs:
        data, models, results = dirs["RSD_DATA_DIR"], dirs["RSD_MODELS_DIR"], dirs["RSD_RESULTS_DIR"]
        tasks = parse_task_spec(profile.tasks, get_suite(profile.suite).get_num_tasks())
        demos = data / f"{profile.suite}_demos.hdf5"

        def do_demos():
            s = collect_demos(profile.suite, tasks, profile.demos_per_task, demos, workers=profile.workers, seed=0)
            kept = sum(t["kept"] for t in s["tasks"].values())
            return f"{kept} demos in {demos.name} (given up: {s['given_up_tasks'] or 'none'})"

        stages.run("demos", {"suite": profile.suite, "tasks": tasks, "per_task": profile.demos_per_task}, [demos], do_demos)
        demo_hash = file_hash(demos)
        num_demos = profile.demos_per_task * len(tasks)

        from common.tokenizer_training import TokenizerTrainConfig, train_tokenizer

        tok_cfgs = {
            cond: TokenizerTrainConfig(use_layernorm=cond == "layernorm", data=str(demos), num_episodes=num_demos,
                                       epochs=profile.tokenizer_epochs, latent_dim=profile.latent_dim, models_dir=str(models))
            for cond in ("none", "layernorm")
        }
        for cond, cfg in tok_cfgs.items():
            best = cfg.output_paths()[0]
            stages.run(f"tokenizer_{cond}", {"cfg": asdict(cfg), "demos": demo_hash}, [best],
                       lambda cfg=cfg: f"val MSE {train_tokenizer(cfg)['best_val_mse']:.3e}")
        tok_hashes = {c: file_hash(cfg.output_paths()[0]) for c, cfg in tok_cfgs.items()}

        from phase1_improved.test_layernorm_improvement import CompareConfig as Phase1Compare
        from phase1_improved.test_layernorm_improvement import run as phase1_compare

        p1 = results / "phase1" / "comparison.json"
        stages.run("phase1_compare", {"tokenizers": tok_hashes}, [p1],
                   lambda: "improvement {:.1f}%".format(phase1_compare(Phase1Compare(out=str(p1.parent)))["improvement_pct"]))

        from common.policy_training import PolicyTrainConfig, train_policy

        for cond, tag in (("layernorm", ""), ("none", "naive")):
            pcfg = PolicyTrainConfig(
                data=str(demos), num_episodes=0, epochs=profile.policy_epochs, batch_size=profile.policy_batch_size,
                lr=1e-3, d_model=profile.d_model, num_blocks=profile.num_blocks, models_dir=str(models),
                rfsq_checkpoint=str(tok_cfgs[cond].output_paths()[0]), timing_repeats=50,
            )
            suffix = f"_{tag}" if tag else ""
            outs = [models / f"best_rfsq_head{suffix}.pt", models / f"best_draft_with_projection{suffix}.pt"]

            def do_policy(pcfg=pcfg):
                s = train_policy(pcfg)
                return f"main + draft trained in {s['wall_seconds']:.0f} s"

            stages.run(f"policy_{cond}", {"cfg": asdict(pcfg), "tokenizer": tok_hashes[cond]}, outs, do_policy)
        policy_hashes = {p.name: file_hash(p) for p in sorted(models.glob("best_*.pt"))}

        from phase3.compare import CompareConfig, run as phase3_compare

        ccfg = CompareConfig(task_suite=profile.suite, tasks=profile.tasks, num_trials=profile.eval_trials,
                             workers=profile.workers, max_steps=profile.eval_max_steps,
                             expert_results=str(REPO_ROOT / "results" / "expert_success.json"))
        p3 = results / "phase3" / f"compare_{profile.suite}" / "comparison.json"
        stages.run("phase3_compare", {"cfg": asdict(ccfg), "models": policy_hashes, "tokenizers": tok_hashes}, [p3],
                   lambda: "variants: " + ", ".join(f"{k} {v['success_rate']:.0%}" for k, v in phase3_compare(ccfg)["variants"].items()))

        summary = {
            "profile": asdict(profile),
            "wall_seconds": time.perf_counter() - started,
            "stages": stages.timings,
            "phase1": json.loads(p1.read_text()),
            "phase2": {tag or "robust": json.loads((results / "phase2" / f"train_summary{'_' + tag if tag else ''}.json").read_text())
                       for tag in ("", "naive")},
            "phase3": json.loads(p3.read_text()),
            "provenance": provenance(seed=0),
        }
        write_report(summary, results, report_dir)
    return summary


# --- report --------------------------------------------------------------------------------------
def _pct(v) -> str:
    return "—" if v is None or v != v else f"{100 * v:.1f}%"


def headline_markdown(summary: dict) -> str:
    p = summary["profile"]
    p1, p3 = summary["phase1"], summary["phase3"]
    lines = [
        f"Profile **{p['name']}**: `{p['suite']}` tasks {p['tasks']}, {p['demos_per_task']} scripted demos per task, "
        f"tokenizer {p['tokenizer_epochs']} epochs, policy {p['policy_epochs']} epochs, {p['eval_trials']} trials per task. "
        f"Wall time {summary['wall_seconds'] / 60:.1f} min.",
        "",
        "| | naive RFSQ | robust RFSQ |",
        "|---|---|---|",
        f"| tokenizer held-out MSE (8 layers) | {p1['naive_mse']:.3e} | {p1['robust_mse']:.3e} |",
        f"| MSE after 2 layers | {p1['diagnostics']['naive']['layers'][1]['mse_after']:.3e} | {p1['diagnostics']['robust']['layers'][1]['mse_after']:.3e} |",
        f"| dead layers | {p1['diagnostics']['naive']['dead_layers'] or 'none'} | {p1['diagnostics']['robust']['dead_layers'] or 'none'} |",
        "",
        f"Scripted expert on these tasks: {_pct(p3.get('expert_success_rate'))}.",
        "",
        "| variant | success | fine-grained | token-decode speedup | main passes / chunk (spec) | mean accepted layers | lossless identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in p3["variants"].items():
        sp = v.get("token_decode_speedup")
        lines.append(
            f"| {name} | {_pct(v['success_rate'])} | {_pct(v['fine_grained_success_rate'])} | "
            f"{'—' if sp is None else f'{sp:.2f}x'} | {v['main_passes_per_chunk']:.2f} of {v['main_only_passes_per_chunk']:.0f} | "
            f"{v['mean_accepted_layers']:.2f} | {_pct(v['lossless_identical_fraction'])} |"
        )
    return "\n".join(lines)


def write_report(summary: dict, results: Path, report_dir: Path) -> Path:
    """``report/REPORT.md`` + the PNGs + the JSON behind every number; also ``results/pipeline/``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    headline = headline_markdown(summary)
    write_json(results / "pipeline" / "pipeline_summary.json", summary)
    (results / "pipeline" / "pipeline_summary.md").write_text(headline + "\n")
    copied = []
    for src in sorted(results.rglob("*")):
        if src.suffix in (".json", ".png", ".md") and src.is_file() and "stamps" not in src.parts:
            dst = report_dir / "data" / src.relative_to(results)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
            copied.append(dst.relative_to(report_dir))
    pngs = [c for c in copied if c.suffix == ".png"]
    body = [
        "# RSD local pipeline report",
        "",
        headline,
        "",
        "## Phase 1 — tokenizers",
        "",
        (results / "phase1" / "comparison.md").read_text(),
        "## Phase 2 — main and draft models",
        "",
        (results / "phase2" / "train_summary.md").read_text(),
        "",
        (results / "phase2" / "train_summary_naive.md").read_text(),
        "",
        "## Phase 3 — closed-loop evaluation",
        "",
        (results / "phase3" / f"compare_{summary['profile']['suite']}" / "comparison.md").read_text(),
        "## Plots",
        "",
        *[f"![{p.stem}]({p.as_posix()})" for p in pngs],
        "",
        "## Stage timings",
        "",
        "| stage | seconds | skipped |",
        "|---|---|---|",
        *[f"| {k} | {v['seconds']:.0f} | {'yes' if v['skipped'] else 'no'} |" for k, v in summary["stages"].items()],
        "",
        f"Every number above is read from the JSON files under `data/` (git `{summary['provenance']['git_sha']}`, "
        f"{summary['provenance']['device']}).",
        "",
    ]
    path = report_dir / "REPORT.md"
    path.write_text("\n".join(body))
    return path
