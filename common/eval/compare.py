"""Phase 3 comparison: naive vs robust (Strategy A) vs robust decoder with naive-token models
(Strategy B), each decoded speculatively AND main-only on the same chunks (the logic behind
``python -m phase3.compare``).

Every variant runs the same tasks and init states (trial i = init state i). Each chunk is decoded
both ways from the same features; the speculative tokens drive the robot and the fraction of
chunks whose tokens equal main-only decoding is reported (100% means main-only would have
executed exactly the same actions, hence reached the same success); both latencies are measured
on the same inputs in the same run. Writes ``comparison.json`` and ``comparison.md`` (every cell
from this run) to ``out`` (default ``<results dir>/phase3/compare_<suite>``), next to each
variant's own eval folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from common.artifacts import (
    NAIVE_TOKENIZER, ROBUST_TOKENIZER, expert_success_results, models_dir_of, phase3_comparison, results_dir_of,
)
from common.eval.closed_loop import evaluate
from common.eval.config import EpisodeSettings, EvalConfig
from common.eval.summary import decoding_label, identical_label, num, pct
from common.provenance import provenance, write_json

VARIANTS = {  # name -> (tokenizer, strategy)
    "naive": ("naive", "A"),
    "robust-A": ("robust", "A"),
    "robust-B": ("robust", "B"),
}


@dataclass
class ComparisonConfig(EpisodeSettings):
    """Flags of ``python -m phase3.compare``: the episode and decoding flags of ``EvalConfig``
    (``EpisodeSettings``, one definition each), applied to every variant, and these."""

    variants: str = "naive,robust-A,robust-B"  # comma-separated subset of naive, robust-A, robust-B
    # per-variant trial counts, e.g. "robust-B=10": a variant already conclusive at fewer trials
    # need not spend the full budget (the table states each variant's trials); "" = --num-trials for all
    variant_trials: str = ""
    out: str = ""  # "" = <results dir>/phase3/compare_<suite>
    expert_results: str = ""  # "" = <results dir>/expert_success.json when present
    # rebuild comparison.{json,md} from the variants' finished eval_info.json, running nothing
    tables_only: bool = False

    def __post_init__(self):
        super().__post_init__()
        unknown = [v for v in self.variant_list if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
        self.trials_for_variant  # validates --variant-trials

    @property
    def trials_for_variant(self) -> dict[str, int]:
        out = {v: self.num_trials for v in self.variant_list}
        for item in filter(None, (x.strip() for x in self.variant_trials.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in out or not value.strip().isdigit() or int(value) < 1:
                raise ValueError(
                    f"--variant-trials: expected comma-separated VARIANT=N with VARIANT in {self.variant_list} and N >= 1; got {item!r}"
                )
            out[name.strip()] = int(value)
        return out

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else phase3_comparison(results_dir_of(self.results_dir), self.task_suite)

    @property
    def variant_list(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]


def expert_rate(path: Path, suite: str, tasks: list[int]) -> float | None:
    """The scripted expert's success on the same tasks (from benchmarks/evaluation/expert_success.py)."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    rows = [r for r in data.get("rows", []) if r.get("suite") == suite and int(r["task_id"]) in tasks]
    if not rows:
        return None
    return sum(r["successes"] for r in rows) / sum(r["n"] for r in rows)


def fine_motion_rows(models_dir: str) -> dict:
    """Tokenizer reconstruction MSE on all vs fine-motion held-out chunks (slow approach / grasp /
    release segments and gripper toggles: ``common.tokenizer.diagnostics.fine_motion_mask``), naive and robust,
    each on the held-out episodes of the robust tokenizer's training run."""
    from common.tokenizer.diagnostics import fine_motion_mse, heldout_raw_chunks
    from common.tokenizer.model import load_tokenizer

    root = models_dir_of(models_dir)
    robust = load_tokenizer(root / ROBUST_TOKENIZER, require_conditioning="layernorm")
    naive = load_tokenizer(root / NAIVE_TOKENIZER, require_conditioning="none")
    raw, info = heldout_raw_chunks(robust)
    return {"heldout": {k: v for k, v in info.items() if k != "val_episodes"}, "naive": fine_motion_mse(naive, raw), "robust": fine_motion_mse(robust, raw)}


def _variant_infos(cfg: ComparisonConfig, out: Path) -> dict[str, dict]:
    infos = {}
    for name in cfg.variant_list:
        if cfg.tables_only:
            path = out / name / "eval_info.json"
            if not path.exists():
                raise FileNotFoundError(f"{path}: --tables-only needs the finished evaluation of variant {name!r}; run without --tables-only first")
            infos[name] = json.loads(path.read_text())
            if infos[name]["config"]["num_trials"] != cfg.trials_for_variant[name]:
                raise ValueError(
                    f"{path}: variant {name!r} was run with {infos[name]['config']['num_trials']} trials per task, "
                    f"expected {cfg.trials_for_variant[name]} (--num-trials / --variant-trials)"
                )
            continue
        tokenizer, strategy = VARIANTS[name]
        ecfg = EvalConfig(**{**cfg.episode_settings(), "num_trials": cfg.trials_for_variant[name]}, tokenizer=tokenizer, strategy=strategy,
                          use_speculative_decoding=True, compare_main_only=True, out=str(out / name))
        infos[name] = evaluate(ecfg)
    return infos


def draft_cost_in_main_passes(info: dict) -> float | None:
    """Mean draft time over the mean time of one main-only pass, from the same run's chunks.

    Speculative decoding saves time only when the mean accepted layers exceed this (plus the small
    cost of the acceptance check)."""
    lat = info["latency_ms"]
    if "draft_ms" not in lat or "ref_main_ms" not in lat or not info.get("main_only_passes_per_chunk"):
        return None
    return lat["draft_ms"]["mean"] / (lat["ref_main_ms"]["mean"] / info["main_only_passes_per_chunk"])


def verify_overhead_in_main_passes(info: dict) -> float | None:
    """v: the speculative path's main-model time in units of one main-only pass, minus its passes
    (the extra cost of the verify pass's positions and candidates). Same chunks as the draft cost."""
    lat = info["latency_ms"]
    if "main_ms" not in lat or "ref_main_ms" not in lat or not info.get("main_only_passes_per_chunk") or info.get("main_passes_per_chunk") is None:
        return None
    return lat["main_ms"]["mean"] / (lat["ref_main_ms"]["mean"] / info["main_only_passes_per_chunk"]) - info["main_passes_per_chunk"]


def run_comparison(cfg: ComparisonConfig) -> dict:
    """Evaluate every variant (or read them, ``tables_only``); write and return ``comparison.json`` / ``.md``."""
    results = results_dir_of(cfg.results_dir)
    out = cfg.out_dir()
    infos = _variant_infos(cfg, out)
    tasks = sorted(int(t) for t in next(iter(infos.values()))["per_task"])
    expert = expert_rate(Path(cfg.expert_results) if cfg.expert_results else expert_success_results(results), cfg.task_suite, tasks)
    lines = [
        f"Suite `{cfg.task_suite}`, tasks {cfg.tasks}, trial i = init state i (trials per task in the table"
        + (f", from init state {cfg.first_trial}" if cfg.first_trial else "") + f"), replan every {cfg.replan_steps} steps"
        + (f", first {cfg.decode_layers} layers decoded" if cfg.decode_layers else "")
        + (", last decoded layer by its expected value" if cfg.decode_rule == "expected" else "")
        + (", each variant decoding the depth and rule its head chose on held-out data (decoded column)." if cfg.auto_decode else "."),
        f"Scripted expert on the same tasks: {pct(expert)}.",
        "",
        "| variant | trials / task | success | fine-grained | decoded | policy ms / env step (spec) | (main-only) | token decode ms / chunk (spec) | (main-only) | token-decode speedup | main passes / chunk (spec / main-only) | mean accepted layers | draft cost c (main passes) | verify overhead v (main passes) | lossless identical | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, info in infos.items():
        lat, step = info["latency_ms"], info["step_latency"] or {}
        spec_tok = lat.get("main_ms", {}).get("mean", float("nan")) + lat.get("draft_ms", {}).get("mean", 0.0)
        lines.append(
            f"| {name} | {cfg.trials_for_variant[name]} | {pct(info['success_rate'])} | {pct(info['fine_grained_success_rate'])} | "
            f"{decoding_label(info)} | {num(step.get('policy_ms_per_env_step'))} | {num(step.get('main_only_policy_ms_per_env_step'))} | "
            f"{num(spec_tok)} | {num(lat.get('ref_main_ms', {}).get('mean'))} | {num(info['token_decode_speedup'])}x | "
            f"{num(info['main_passes_per_chunk'])} / {num(info['main_only_passes_per_chunk'])} | {num(info['mean_accepted_layers'])} | "
            f"{num(draft_cost_in_main_passes(info))} | {num(verify_overhead_in_main_passes(info))} | "
            f"{identical_label(info['lossless_identical_fraction'], info.get('chunks'))} | {info['errors']} |"
        )
    fine = fine_motion_rows(cfg.models_dir)
    lines += [
        "",
        "Draft cost c = mean draft time / mean time of one main-only pass; verify overhead v = the speculative "
        "path's main time in those units minus its passes; same chunks. Speedup = L / (L - a + c + v): "
        "speculation pays only when the mean accepted layers a exceed c + v."
        + (f" The draft offers {cfg.draft_candidates} candidates per chunk, verified in one pass." if cfg.draft_candidates > 1 else "")
        + (f" At most {cfg.drafted_layers} drafted layers per chunk." if cfg.drafted_layers else ""),
        "",
        f"Tokenizer reconstruction MSE on held-out demo chunks ({fine['heldout']['num_chunks']} chunks; fine-motion = "
        f"{fine['robust']['fine_motion_chunks']} slow / gripper-toggle chunks):",
        "",
        "| tokenizer | all chunks | fine-motion chunks |",
        "|---|---|---|",
        *[f"| {n} | {fine[n]['all_mse']:.3e} | {fine[n]['fine_motion_mse']:.3e} |" for n in ("naive", "robust")],
    ]
    result = {
        "config": asdict(cfg),
        "tokenizer_fine_motion": fine,
        "expert_success_rate": expert,
        "variants": {name: {k: info[k] for k in (
            "success_rate", "fine_grained_success_rate", "success_episodes", "errors", "latency_ms", "step_latency",
            "acceptance_per_layer", "mean_accepted_layers", "main_passes_per_chunk", "main_only_passes_per_chunk",
            "main_pass_ratio", "token_decode_speedup", "lossless_identical_fraction", "per_task", "wall_seconds",
            "episodes_per_minute")} | {"decoding": info.get("decoding", []), "chunks": info.get("chunks"),
                                         "action_max_abs_vs_main_only_identical_tokens": info.get("action_max_abs_vs_main_only_identical_tokens"), "action_mse_vs_main_only": info.get("action_mse_vs_main_only"),
                                         "trials_per_task": cfg.trials_for_variant[name],
                                         "draft_cost_in_main_passes": draft_cost_in_main_passes(info),
                                         "verify_overhead_in_main_passes": verify_overhead_in_main_passes(info)} for name, info in infos.items()},
        "provenance": provenance(seed=cfg.seed),
    }
    write_json(out / "comparison.json", result)
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    return result
