"""What speculative decoding costs and saves, per main-model and draft size (batch 1, this CPU).

    python -m benchmarks.bench_decode_sweep [--out results/bench_decode_sweep] [--repeats 200] [--dtype float64]

For every (main size, draft size) pair it measures, on the same random features:
  t_pass    one main pass (main-only greedy decode time / L),
  c         one draft call, in main passes,
  v         the verify pass over K+1 positions minus one single-position pass, in main passes,
  S         main-only decode time / speculative decode time, at forced acceptance a = 0 .. K,
and puts the formula's prediction S = L / (L - a + c + v) next to the measurement. Acceptance is
forced with an oracle draft that runs the real draft (so its cost is real) and then proposes the
main model's own greedy tokens for the first a layers and wrong tokens after: this measures the
cost terms, not what a trained draft achieves (Phase 2 / Phase 3 report that). Random weights are
fine here: the time of a pass does not depend on the weights' values.
Writes ``bench_decode_sweep.json`` / ``.md`` / ``.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from common.decoding.speculative import main_only_decode, speculative_decode
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead
from common.provenance import REPO_ROOT, provenance, write_json

MAIN_SIZES = {  # name -> (d_model, num_blocks, num_heads)
    "main-64x1": (64, 1, 2),
    "main-128x2 (make run)": (128, 2, 4),
    "main-256x4 (seed default)": (256, 4, 4),
    "main-512x6": (512, 6, 8),
    "main-1024x8": (1024, 8, 16),
}
DRAFT_SIZES = {  # name -> (width, hidden_layers, mode)
    "draft-64 parallel": (64, 0, "parallel"),
    "draft-512x3 chained (Phase 3)": (512, 3, "chained"),
}
FEATURE_DIM, L, T, V, K = 128, 8, 16, 7, 3


class ForcedAcceptanceDraft(torch.nn.Module):
    """Runs the real draft (its cost is real), then proposes the main model's greedy layers < a and
    a wrong token in every slot of the layers >= a: exactly a layers are accepted."""

    def __init__(self, draft: DraftWithProjection, main_codes: torch.Tensor, accepted: int):
        super().__init__()
        self.draft, self.accepted = draft, accepted
        self.coarse_layers, self.tokens_per_layer, self.num_levels = draft.coarse_layers, draft.tokens_per_layer, draft.num_levels
        proposal = main_codes[..., :K].clone()
        proposal[..., accepted:] = (proposal[..., accepted:] + 1) % V
        self.proposal = proposal
        self.training = False

    def propose(self, features: torch.Tensor) -> torch.Tensor:
        self.draft.propose(features)
        return self.proposal


def _median_ms(fn, repeats: int) -> float:
    for _ in range(min(10, repeats)):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(repeats: int, dtype: torch.dtype) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(1, FEATURE_DIM, generator=gen).to(dtype)
    for main_name, (d, blocks, heads) in MAIN_SIZES.items():
        torch.manual_seed(0)
        main = RFSQHead(feature_dim=FEATURE_DIM, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=d,
                        num_heads=heads, num_blocks=blocks).to(dtype).eval()
        main_codes = main.greedy_decode(features)
        t_probe = _median_ms(lambda: main_only_decode(main, features), 5)
        reps = max(20, min(repeats, int(2000 / t_probe)))  # about 2 s per measurement for the big models
        t_greedy = _median_ms(lambda: main_only_decode(main, features), reps)
        t_pass = t_greedy / L
        with torch.inference_mode():
            t_verify = _median_ms(lambda: main.verify(features, main_codes[..., :K]), reps)
        for draft_name, (width, hidden, mode) in DRAFT_SIZES.items():
            torch.manual_seed(1)
            draft = DraftWithProjection(feature_dim=FEATURE_DIM, width=width, coarse_layers=K, tokens_per_layer=T,
                                        num_levels=V, hidden_layers=hidden, mode=mode).to(dtype).eval()
            t_draft = _median_ms(lambda: draft.propose(features), reps)
            c, v = t_draft / t_pass, (t_verify - t_pass) / t_pass
            for a in range(K + 1):
                oracle = ForcedAcceptanceDraft(draft, main_codes, a)
                codes, stats = speculative_decode(main, oracle, features)
                assert torch.equal(codes, main_codes) and stats.accepted_layers == [a], (main_name, draft_name, a)
                t_spec = _median_ms(lambda: speculative_decode(main, oracle, features), reps)
                rows.append({
                    "main": main_name, "d_model": d, "num_blocks": blocks, "main_params": main.num_parameters(),
                    "draft": draft_name, "draft_params": draft.num_parameters(), "accepted_layers": a,
                    "repeats": reps, "main_pass_ms": t_pass, "main_only_ms_per_chunk": t_greedy, "verify_ms": t_verify,
                    "draft_ms": t_draft, "speculative_ms_per_chunk": t_spec, "c": c, "v": v,
                    "speedup_measured": t_greedy / t_spec, "speedup_formula": L / (L - a + c + v),
                })
            print(f"{main_name:>28} | {draft_name:>30} | pass {t_pass:.3f} ms  c {c:.2f}  v {v:.2f}  "
                  f"S(a=K) {rows[-1]['speedup_measured']:.2f}x (formula {rows[-1]['speedup_formula']:.2f}x)", flush=True)
    return rows


def markdown(rows: list[dict], dtype: str) -> str:
    lines = [
        f"Batch 1, {dtype}, {torch.get_num_threads()} thread(s), L = {L} layers x {T} tokens, K = {K} drafted layers; "
        "S at forced acceptance a (oracle draft, real draft cost). Formula: S = L / (L - a + c + v).",
        "",
        "| main | params | draft | one main pass (ms) | main-only ms / chunk | c (draft, passes) | v (verify extra, passes) | "
        "S a=0 | S a=1 | S a=2 | S a=3 (formula) | spec ms / chunk at a=3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["main"], r["draft"]) for r in rows}, key=lambda k: (list(MAIN_SIZES).index(k[0]), list(DRAFT_SIZES).index(k[1])))
    for main_name, draft_name in keys:
        rs = sorted((r for r in rows if r["main"] == main_name and r["draft"] == draft_name), key=lambda r: r["accepted_layers"])
        r0 = rs[0]
        s = [f"{r['speedup_measured']:.2f}x" for r in rs]
        lines.append(
            f"| {main_name} | {r0['main_params']:,} | {draft_name} | {r0['main_pass_ms']:.3f} | {r0['main_only_ms_per_chunk']:.2f} | "
            f"{r0['c']:.2f} | {r0['v']:.2f} | {s[0]} | {s[1]} | {s[2]} | {s[3]} ({rs[-1]['speedup_formula']:.2f}x) | "
            f"{rs[-1]['speculative_ms_per_chunk']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for draft_name in DRAFT_SIZES:
        top = [r for r in rows if r["draft"] == draft_name and r["accepted_layers"] == K]
        x = [r["main_params"] for r in top]
        ax.plot(x, [r["speedup_measured"] for r in top], "o-", label=f"{draft_name}: measured")
        ax.plot(x, [r["speedup_formula"] for r in top], "x--", label=f"{draft_name}: formula")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="main model parameters", ylabel=f"token-decode speedup at a = {K} (all drafted layers accepted)",
           title="Speculative decoding vs main-only, batch 1 CPU")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_decode_sweep", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "results" / "bench_decode_sweep"))
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per measurement (median)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="precision of both models")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (batch 1: one is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import matplotlib

    matplotlib.use("Agg")
    rows = measure(args.repeats, getattr(torch, args.dtype))
    out = Path(args.out)
    result = {"rows": rows, "dtype": args.dtype, "repeats": args.repeats, "threads": args.threads,
              "L": L, "K": K, "tokens_per_layer": T, "provenance": provenance(seed=0)}
    write_json(out / "bench_decode_sweep.json", result)
    (out / "bench_decode_sweep.md").write_text(markdown(rows, args.dtype))
    plot(rows, out / "bench_decode_sweep.png")
    print(markdown(rows, args.dtype))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
