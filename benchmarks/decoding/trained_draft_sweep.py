"""Draft size against speed, with TRAINED drafts on the states the robot reaches: several drafts
distilled for one head, each decoding a bundle's chunks next to main-only on the same chunks.

    python -m benchmarks.decoding.trained_draft_sweep --bundle CL.pt --drafts "w128x2=DIR,w256x2=DIR,..." [--cold] --out DIR

The bundle is ``decode_trained_graphs export``'s (with ``--states``: the closed-loop states a Phase 3
run recorded); each DIR is a Phase 2 models folder whose ``best_draft_with_projection.pt`` was distilled
for the bundle's head (checked by the head's content hash). For every chunk, main-only and every
draft's speculative decode are timed back to back in a rotating order (``common.decoding.timing.Clock``), each
``--repeats`` times (median per chunk). Per draft: the held-out acceptance its training recorded,
the acceptance on the bundle's chunks, c and v in main passes as Phase 3 computes them (draft time,
and the speculative path's main time minus its passes, over the mean main-only pass), the formula
S = L / (L - a + c + v) next to the measured speedup (mean main-only time over mean speculative time,
as Phase 3 reports it and as the formula's mean terms predict; the median per-chunk ratio beside it,
which the many chunks with nothing accepted pull down), and how many chunks decoded tokens identical
to main-only. Writes trained_draft_sweep.json /
.md / .png.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import rsd_entry
from common.artifacts import policy_paths
from common.decoding.measure import load_bundle, measure_speculation
from common.decoding.timing import device_label
from common.eval.runs import parse_runs
from common.policy.model import load_draft_checkpoint
from common.provenance import REPO_ROOT, provenance, write_results

PROG = "python -m benchmarks.decoding.trained_draft_sweep"


def run(bundle: Path, drafts: list[tuple[str, Path]], *, repeats: int, chunks: int = 0, cold: bool = False) -> dict:
    """``chunks``: time every n-th chunk so that this many are timed (0 = all); all are checked for losslessness."""
    if not drafts:
        raise ValueError("--drafts: expected at least one label=models_dir")
    head, _, features, content = load_bundle(bundle, torch.device("cpu"), torch.float32)
    L = int(content["decode_choice"]["layers"])
    loaded = []
    for label, folder in drafts:
        draft, ckpt = load_draft_checkpoint(policy_paths(folder, folder, "")["draft"], head_hash=content["head_hash"], head_label=f"the bundle's head, {bundle}")
        loaded.append((label, folder, draft.float(), ckpt))
    measured = measure_speculation(head, [(label, draft) for label, _, draft, _ in loaded], features, L, repeats=repeats, chunks=chunks, cold=cold)
    for row, (_, folder, draft, ckpt) in zip(measured["drafts"], loaded):
        row.update({
            "models_dir": str(folder), "draft_hash": ckpt["content_hash"], "config": {k: v for k, v in ckpt["config"].items() if k != "tokenizer"},
            "parameters": draft.num_parameters(), "held_out_mean_accepted": ckpt.get("metrics", {}).get("mean_accepted_layers"),
        })
    return {
        "bundle": str(bundle), "states": content["states"], "head": content["head"], "head_hash": content["head_hash"],
        "device_name": device_label(torch.device("cpu"), torch.get_num_threads()), "dtype": "float32", "caches": "cold" if cold else "warm",
        "decoded_layers": L, "decode_choice": content["decode_choice"], "repeats": repeats, **measured,
    }


def markdown(r: dict) -> str:
    lines = [
        f"Device: {r['device_name']}; float32, batch 1; head `{Path(r['head']).name}` decoding L = {r['decoded_layers']} layers; "
        f"{r['chunks_timed']} chunks ({r['states']}) x {r['repeats']} repeats, main-only and every draft's speculative decode timed back "
        f"to back in a rotating order{', each after a 32 MiB cache sweep (cold caches)' if r['caches'] == 'cold' else ''}. "
        f"c and v in main-only passes ({r['main_only_ms_per_chunk'] / r['decoded_layers']:.3f} ms); "
        "S measured = mean main-only time / mean speculative time (as Phase 3 reports it); formula S = L / (L - a + c + v) from the mean "
        "terms; median = median over chunks of the per-chunk ratio.",
        "",
        "| draft | parameters | held-out a | a here | accepted 0..K (%) | c | v | S formula | S measured | median per chunk | ms / chunk (spec / main-only) | identical to main-only |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in r["drafts"]:
        held = "—" if d["held_out_mean_accepted"] is None else f"{d['held_out_mean_accepted']:.2f}"
        dist = " / ".join(f"{100 * p:.0f}" for p in d["accepted_distribution"])
        lines.append(f"| {d['draft']} | {d['parameters']:,} | {held} | {d['mean_accepted_layers']:.2f} of {d['drafted_layers']} | {dist} | "
                     f"{d['c']:.2f} | {d['v']:.2f} | {d['speedup_formula']:.2f}x | {d['speedup_measured']:.2f}x | {d['speedup_median_per_chunk']:.2f}x | "
                     f"{d['speculative_ms_per_chunk']:.3f} / {r['main_only_ms_per_chunk']:.3f} | {d['identical_to_main_only']} / {r['chunks_checked']} |")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Left: a (these states and held-out) and c against draft parameters; right: measured and formula S.
    One colour per trunk depth (drafts of one depth differ in width only)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    depths = sorted({d["config"].get("hidden_layers") for d in r["drafts"]}, key=str)
    for colour, depth in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], depths):
        rows = sorted((d for d in r["drafts"] if d["config"].get("hidden_layers") == depth), key=lambda d: d["parameters"])
        x = [d["parameters"] for d in rows]
        name = f"{depth} hidden" if depth is not None else "drafts"
        ax_a.plot(x, [d["mean_accepted_layers"] for d in rows], "o-", color=colour, label=f"a here ({name})")
        held = [(xi, d["held_out_mean_accepted"]) for xi, d in zip(x, rows) if d["held_out_mean_accepted"] is not None]
        if held:
            ax_a.plot(*zip(*held), "s--", color=colour, alpha=0.6, label=f"a held-out ({name})")
        ax_a.plot(x, [d["c"] for d in rows], "^:", color=colour, label=f"c ({name})")
        ax_s.plot(x, [d["speedup_measured"] for d in rows], "o-", color=colour, label=f"measured ({name})")
        ax_s.plot(x, [d["speedup_formula"] for d in rows], "s--", color=colour, alpha=0.6, label=f"formula ({name})")
        for xi, d in zip(x, rows):
            ax_s.annotate(d["draft"], (xi, d["speedup_measured"]), textcoords="offset points", xytext=(0, -12), fontsize=7, ha="center")
    ax_s.axhline(1.0, color="grey", lw=0.8)
    for ax, title in ((ax_a, "accepted layers a, draft cost c (main passes)"), (ax_s, "token-decode speedup over main-only")):
        ax.set_xscale("log")
        ax.set_xlabel("draft parameters")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(f"{r['states'][:60]}, L = {r['decoded_layers']}, {r['caches']} caches", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class TrainedDraftSweepConfig:
    """Draft size against speed with trained drafts: several drafts distilled for one head, each timed next to main-only."""

    bundle: str = ""  # decode_trained_graphs export's bundle (head, decode choice, features; required)
    drafts: str = ""  # "label=models_dir,...": Phase 2 folders with best_draft_with_projection.pt for the bundle's head (required)
    repeats: int = 5  # timed repeats per chunk (median per chunk)
    chunks: int = 0  # time this many chunks, evenly spaced (0 = all); all are checked for losslessness
    cold: bool = False  # evict the data caches (a 32 MiB sweep) before every timed decode
    threads: int = 1  # torch CPU threads
    out: str = ""  # output folder ("" = results/phase3_diagnostics/trained_draft_sweep)

    def __post_init__(self) -> None:
        if not self.bundle or not self.drafts:
            raise ValueError(f"expected --bundle and --drafts, found {self.bundle!r} and {self.drafts!r}")


def main(argv: list[str]) -> dict:
    cfg = rsd_entry.parse_config(TrainedDraftSweepConfig, argv, prog=PROG)
    torch.set_num_threads(cfg.threads)
    result = run(Path(cfg.bundle), parse_runs(cfg.drafts, "--drafts"), repeats=cfg.repeats, chunks=cfg.chunks, cold=cfg.cold)
    result["provenance"] = provenance(seed=0)
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "phase3_diagnostics" / "trained_draft_sweep"
    write_results(out, "trained_draft_sweep", result, markdown(result))
    plot(result, out / "trained_draft_sweep.png")
    return result


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
