"""Phase 3 results: per-task and overall success (errors counted apart), the latency breakdown,
draft acceptance and speedup of one evaluation run, as ``eval_info.json``, a markdown table and a plot.

A rate over no episodes (fine-grained success of a run without fine-grained tasks) is NaN in memory
and ``null`` in ``eval_info.json`` (strict JSON); the table and plot read both, and older files' NaN."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import numpy as np

from common.eval.config import EvalConfig, is_fine_grained
from common.provenance import provenance, write_json
from common.sim.libero_env import library_versions


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p95": float("nan"), "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)), "n": int(arr.size)}


def summarize(cfg: EvalConfig, rows: list[dict], *, wall_seconds: float, episodes_run: int, workers: int) -> dict:
    """Per-task / overall success, fine-grained success, latency breakdown, acceptance, speedup."""
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
        for name in ("backbone_s", "draft_s", "main_s", "tokenizer_decode_s", "policy_s", "ref_main_s", "ref_policy_s", "preprocess_s", "env_step_s")
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
    decoded = sorted({(c["decoded_layers"], c["decode_rule"]) for c in chunks if "decoded_layers" in c})
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
        # what was executed: decoded layers and the last layer's rule (one pair unless the run mixes models)
        "decoding": [{"layers": k, "rule": r} for k, r in decoded],
        "main_passes_per_chunk": float(np.mean(passes)) if passes else None,
        "main_only_passes_per_chunk": float(np.mean(ref_passes)) if ref_passes else None,
        "main_pass_ratio": (float(np.mean(passes)) / float(np.mean(ref_passes))) if ref_passes else None,
        "token_decode_speedup": token_speedup,
        "lossless_identical_fraction": (float(np.mean(identical)) if identical else None),
        # identical tokens, expected-value last layer: the largest gap between the executed and the
        # main-only action (normalized units), from the two paths' float-level different distributions
        "action_max_abs_vs_main_only_identical_tokens": max((c["action_max_abs_vs_main_only"] for c in chunks
                                                             if "action_max_abs_vs_main_only" in c), default=None),
        # mean over ALL compared chunks (identical ones count 0): the action cost of relaxed acceptance
        "action_mse_vs_main_only": (float(np.sum([c.get("action_mse_vs_main_only", 0.0) for c in chunks]) / len(identical))
                                    if identical else None),
        "latency_breakdown": latency_breakdown(chunks, sum(r["steps"] for r in rows)),
        "wall_seconds": wall_seconds,
        "workers": workers,
        "episodes_per_minute": (episodes_run / wall_seconds * 60.0) if episodes_run and wall_seconds > 0 else None,
        "libraries": library_versions(),
        "provenance": provenance(seed=cfg.seed),
    }


BREAKDOWN_STAGES = ("env_step", "preprocess", "backbone", "draft", "main", "tokenizer_decode")


def latency_breakdown(chunks: list[dict], env_steps: int) -> dict | None:
    """Where the time goes, per chunk and per env step: env step (physics + camera rendering when the
    cameras are on), preprocessing, backbone forward, draft, main passes, tokenizer decode; the
    backbone's share of the policy time next to what speculation saves (and could save at most:
    the whole main-only token decode) on the same chunks."""
    if not chunks or env_steps <= 0:
        return None
    present = [s for s in BREAKDOWN_STAGES if any(f"{s}_s" in c for c in chunks)]
    total = {s: sum(c.get(f"{s}_s", 0.0) for c in chunks) * 1000.0 for s in present}
    per_chunk = {s: v / len(chunks) for s, v in total.items()}
    policy_ms = float(np.mean([c["policy_s"] for c in chunks])) * 1000.0
    features_ms = per_chunk.get("preprocess", 0.0) + per_chunk.get("backbone", 0.0)
    out = {
        "per_chunk_ms": per_chunk,
        "per_env_step_ms": {s: v / env_steps for s, v in total.items()},
        "env_steps_per_chunk": env_steps / len(chunks),
        "policy_ms_per_chunk": policy_ms,
        "backbone_share_of_policy": features_ms / policy_ms if policy_ms > 0 else None,
        "speculation_saving_ms_per_chunk": None,
        "speculation_saving_share_of_main_only_policy": None,
        "max_speculation_saving_share_of_main_only_policy": None,
    }
    ref = [c for c in chunks if "ref_main_s" in c]
    if ref:
        ref_main = float(np.mean([c["ref_main_s"] for c in ref])) * 1000.0
        ref_policy = float(np.mean([c["ref_policy_s"] for c in ref])) * 1000.0
        spec_tokens = float(np.mean([c["main_s"] + c.get("draft_s", 0.0) for c in ref])) * 1000.0
        out["speculation_saving_ms_per_chunk"] = ref_main - spec_tokens
        out["speculation_saving_share_of_main_only_policy"] = (ref_main - spec_tokens) / ref_policy if ref_policy > 0 else None
        out["max_speculation_saving_share_of_main_only_policy"] = ref_main / ref_policy if ref_policy > 0 else None
    return out


def render_latency_breakdown(info: dict) -> list[str]:
    """Markdown lines of ``latency_breakdown`` (empty when there is none)."""
    b = info.get("latency_breakdown")
    if not b:
        return []
    lines = ["", "| stage | ms / chunk | ms / env step |", "|---|---|---|"]
    for stage, ms in b["per_chunk_ms"].items():
        label = "env step (physics + rendering)" if stage == "env_step" else stage
        lines.append(f"| {label} | {ms:.2f} | {b['per_env_step_ms'][stage]:.3f} |")
    lines += [
        "",
        f"Backbone (preprocess + forward) share of the policy time: {_fmt(b['backbone_share_of_policy'], True)}; "
        f"speculation saves {_fmt(b['speculation_saving_ms_per_chunk'])} ms / chunk = "
        f"{_fmt(b['speculation_saving_share_of_main_only_policy'], True)} of the main-only policy time "
        f"(at most {_fmt(b['max_speculation_saving_share_of_main_only_policy'], True)}: the whole main-only token decode).",
    ]
    return lines


# --- outputs -------------------------------------------------------------------------------------
def identical_label(fraction: float | None, chunks: int | None = None) -> str:
    """The lossless column: 100.0% only when every compared chunk matched; otherwise the chunks that
    differ, which a rounded 100.0% would hide (one in 10,000 reads 100.0% at one decimal)."""
    if fraction is None or fraction != fraction:
        return "—"
    if fraction == 1.0:
        return "100.0%"
    differ = f"{round((1 - fraction) * chunks)} of {chunks} chunks differ" if chunks else "not every chunk identical"
    return f"{100 * fraction:.2f}% ({differ})"


def no_value(v) -> bool:
    """No value: ``None`` (how results now store a rate without episodes) or NaN (older files)."""
    return v is None or (isinstance(v, float) and math.isnan(v))


def pct(v) -> str:
    """A rate for a table: one decimal percent, or a dash where there is no value."""
    return "—" if no_value(v) else f"{100 * v:.1f}%"


def num(v, fmt: str = "{:.2f}") -> str:
    return "—" if no_value(v) else fmt.format(v)


def _fmt(v, as_pct=False):
    return pct(v) if as_pct else num(v, "{:.3g}")


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
            f"{t['episodes']} | {t['error']} | {num(t['mean_steps'], '{:.0f}')} |"
        )
    lines += ["", "| latency per chunk (ms) | mean | p50 | p95 |", "|---|---|---|---|"]
    for name, s in lat.items():
        lines.append(f"| {name} | {s['mean']:.2f} | {s['p50']:.2f} | {s['p95']:.2f} |")
    dev = info.get("action_mse_vs_main_only")
    deviation = f" (action MSE vs main-only {dev:.2e})" if dev else ""
    ev_gap = info.get("action_max_abs_vs_main_only_identical_tokens")
    if ev_gap is not None:
        deviation += (f"; with identical tokens the executed actions (last layer by expected value) differ from main-only's "
                      f"by at most {ev_gap:.1e} (normalized units)")
    lines += [
        "",
        f"Decoded: {decoding_label(info)}. "
        f"Main passes per chunk: {_fmt(info['main_passes_per_chunk'])} (main-only {_fmt(info['main_only_passes_per_chunk'])}); "
        f"mean accepted layers {_fmt(info['mean_accepted_layers'])}; acceptance per layer "
        f"{[round(a, 3) for a in info['acceptance_per_layer']] if info['acceptance_per_layer'] else '—'}; "
        f"token-decode speedup {_fmt(info['token_decode_speedup'])}x; lossless identical {identical_label(info['lossless_identical_fraction'], info.get('chunks'))}{deviation}.",
    ]
    lines += render_latency_breakdown(info)
    return "\n".join(lines)


def decoding_label(info: dict) -> str:
    """E.g. "2 layers, last by expected value" (runs written before the field existed: "—")."""
    parts = [f"{d['layers']} layer{'s' if d['layers'] != 1 else ''}"
             + ((", last by expected value" if d["layers"] > 1 else ", by its expected value") if d["rule"] == "expected" else "")
             for d in info.get("decoding", [])]
    return "; ".join(parts) or "—"


def write_outputs(info: dict, out: Path) -> None:
    write_json(out / "eval_info.json", info)
    (out / "eval_table.md").write_text(render_table(info) + "\n")
    plot_eval(info, out / "eval_plots.png")


def plot_eval(info: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tasks = list(info["per_task"])
    rates = [info["per_task"][t]["success_rate"] for t in tasks]
    colors = ["tab:orange" if info["per_task"][t]["fine_grained"] else "tab:blue" for t in tasks]
    axes[0].bar(tasks, [0 if no_value(r) else r for r in rates], color=colors)
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
