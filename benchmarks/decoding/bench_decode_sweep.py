"""What speculative decoding costs and saves, per main-model and draft size (batch 1, CPU or one GPU).

    python -m benchmarks.decoding.bench_decode_sweep [--device cpu|cuda] [--dtype float64|float32] [--sizes 64x1,128x2]
                                            [--repeats 200] [--out DIR]
    python -m benchmarks.decoding.bench_decode_sweep --sizes 64x1 --repeats 20 --out artifacts/sweep   # quick CPU check
    bash benchmarks/decoding/device_sweep.sh                                                       # the GPU sweep

For every (main size, draft size) pair it measures, on the same random features:
  t_pass    one main pass = main-only greedy decode time / L (the mean of its L single-position passes,
            the unit the formula counts in),
  c         one draft call, in main passes,
  v         the verify pass over K+1 positions minus one main pass, in main passes,
  S         main-only decode time / speculative decode time, at forced acceptance a = 0 .. K,
and puts the formula's prediction S = L / (L - a + c + v) next to each measured S. Acceptance is
forced with an oracle draft that runs the real draft (so its cost is real) and then proposes the
main model's own greedy tokens for the first a layers and wrong tokens after: this measures the
cost terms, not what a trained draft achieves (Phase 2 / Phase 3 report that). Random weights are
fine here: the time of a pass does not depend on the weights' values.

Paired, interleaved timing: the speed of a GPU machine or a shared CPU drifts over seconds, so a
ratio of two medians taken in separate loops mixes the drift into S (it once gave S > 1 at a = 0,
where speculative decoding does strictly more work). Every ratio here is therefore taken within one
repeat of one loop, and the reported value is the MEDIAN OF THE PER-REPEAT RATIOS:
  S(a)  one loop per (main, draft, a): each repeat times a main-only decode and a speculative decode
        back to back, alternating which goes first; S = median_i(main_i / spec_i);
  c, v  one loop per main size: each repeat times a main-only decode, the verify pass and every
        draft's call back to back, the order rotated by one every repeat;
        c = median_i(L * draft_i / main_i), v = median_i(L * verify_i / main_i) - 1.
The medians of each call's own times are kept in the JSON too (main_only_ms_per_chunk,
speculative_ms_per_chunk, verify_ms, draft_ms), with the quartiles of the per-repeat S.

Defaults: CPU runs float64 on one thread and writes to results/bench_decode_sweep/; ``--device cuda``
runs float32 (full-precision matmuls, no TF32) and writes to results/bench_decode_sweep_gpu/, so
the CPU results are never overwritten. On CUDA every timed call is bracketed by
torch.cuda.synchronize() and every loop starts with warm-up repeats; speculative_decode's own stage timer also
synchronises between the draft and main stages, as it does in the closed-loop evaluation.
Writes ``bench_decode_sweep.json`` / ``.md`` / ``.png`` to the output folder; the JSON is also
rewritten after every main size, so a run cut short keeps what it measured ("complete": false).
Needs only torch, matplotlib and tqdm besides the standard library (no simulator, no h5py), so
``PYTHONPATH=. python3 -m benchmarks.decoding.bench_decode_sweep`` runs on a bare GPU machine.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

import rsd_entry
from common.decoding.graphs import GraphedDecoder, Replay
from common.decoding.speculative import main_only_decode, speculative_decode
from common.decoding.timing import Clock, device_label, median_ratio
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead
from common.provenance import REPO_ROOT, provenance, write_json

PROG = "python -m benchmarks.decoding.bench_decode_sweep"

MAIN_SIZES = {  # name -> (d_model, num_blocks, num_heads)
    "main-64x1": (64, 1, 2),
    "main-128x2 (make run)": (128, 2, 4),
    "main-256x4 (seed default)": (256, 4, 4),
    "main-512x6": (512, 6, 8),
    "main-1024x8": (1024, 8, 16),
}
DRAFT_SIZES = {  # name -> DraftWithProjection settings
    "draft-64 parallel": dict(width=64, hidden_layers=0, mode="parallel"),
    "draft-256x2 ReLU MLP (Phase 3)": dict(width=256, hidden_layers=2, mode="parallel", trunk="mlp", activation="relu"),
    "draft-512x3 chained (old Phase 3)": dict(width=512, hidden_layers=3, mode="chained"),
}
REPLAYS = ("eager", "cuda graphs")  # how both paths run: op by op, or replayed from captured graphs (--graphs)
FEATURE_DIM, L, T, V, K = 128, 8, 16, 7, 3
DEFAULT_OUT = {"cpu": REPO_ROOT / "results" / "bench_decode_sweep", "cuda": REPO_ROOT / "results" / "bench_decode_sweep_gpu"}
DEFAULT_DTYPE = {"cpu": "float64", "cuda": "float32"}
DEFAULT_BUDGET_S = {"cpu": 2.0, "cuda": 1.0}  # wall time aimed at per interleaved loop (the repeat count adapts)
WARMUP_REPEATS = 5  # discarded repeats at the start of a main size's first loop (CUDA kernels, allocator, caches)
PAIR_WARMUP_REPEATS = 2  # the S loops reuse modules the first loop has already warmed
TIMING = "paired, interleaved"  # see the module docstring


def size_key(main_name: str) -> str:
    """'main-128x2 (make run)' -> '128x2', the name ``--sizes`` uses."""
    return main_name.split()[0].removeprefix("main-")


def select_sizes(spec: str | None) -> dict[str, tuple[int, int, int]]:
    if not spec:
        return dict(MAIN_SIZES)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    known = {size_key(name): name for name in MAIN_SIZES}
    unknown = [s for s in wanted if s not in known]
    if unknown or not wanted:
        raise SystemExit(f"bench_decode_sweep --sizes: expected a comma list of {', '.join(known)}, found {spec!r}")
    return {known[s]: MAIN_SIZES[known[s]] for s in known if s in wanted}  # keep the sweep's order


class ForcedAcceptanceDraft(torch.nn.Module):
    """Runs the real draft (its cost is real), then proposes the main model's greedy layers < a and
    a wrong token in every slot of the layers >= a: exactly a layers are accepted. The proposal is
    one buffer rewritten in place by ``set_accepted``, so a captured graph that reads it follows."""

    def __init__(self, draft: DraftWithProjection, main_codes: torch.Tensor, accepted: int):
        super().__init__()
        self.draft = draft
        self.coarse_layers, self.tokens_per_layer, self.num_levels = draft.coarse_layers, draft.tokens_per_layer, draft.num_levels
        self.greedy_rows = main_codes[..., :K].transpose(1, 2).contiguous()  # [B, K, T]
        self.proposal_rows = self.greedy_rows.clone()
        self.set_accepted(accepted)
        self.training = False

    def set_accepted(self, accepted: int) -> None:
        self.accepted = accepted
        self.proposal_rows.copy_(self.greedy_rows)
        self.proposal_rows[:, accepted:] = (self.greedy_rows[:, accepted:] + 1) % V

    def propose_rows(self, features: torch.Tensor) -> torch.Tensor:
        self.draft.propose_rows(features)
        return self.proposal_rows

    def propose(self, features: torch.Tensor) -> torch.Tensor:
        return self.propose_rows(features).transpose(1, 2)


def _row(main_name: str, main: RFSQHead, draft_name: str, draft: DraftWithProjection, replay: str, a: int, observed: int,
         lossless: bool, terms: dict, t_main_pair: list[float], t_spec: list[float]) -> dict:
    s_per_repeat = sorted(m / s for m, s in zip(t_main_pair, t_spec))
    q1, _, q3 = statistics.quantiles(s_per_repeat, n=4) if len(s_per_repeat) > 1 else s_per_repeat * 3
    c, v = terms["c"][draft_name], terms["v"]
    return {
        "main": main_name, "d_model": main.d_model, "num_blocks": main.num_blocks, "main_params": main.num_parameters(),
        "draft": draft_name, "draft_params": draft.num_parameters(), "replay": replay, "accepted_layers": a,
        "accepted_layers_observed": observed, "codes_equal_main_only": lossless, "timing": TIMING,
        "repeats": len(t_spec), "terms_repeats": terms["repeats"], "main_pass_ms": terms["t_greedy"] / L,
        "main_only_ms_terms_loop": terms["t_greedy"], "verify_ms": terms["t_verify"],
        "draft_ms": terms["t_draft"][draft_name], "c": c, "v": v,
        "main_only_ms_per_chunk": statistics.median(t_main_pair), "speculative_ms_per_chunk": statistics.median(t_spec),
        "speedup_measured": statistics.median(s_per_repeat), "speedup_measured_q1": q1, "speedup_measured_q3": q3,
        "speedup_ratio_of_medians": statistics.median(t_main_pair) / statistics.median(t_spec),
        "speedup_formula": L / (L - observed + c + v),
    }


def _terms(t_main: list[float], t_verify: list[float], t_drafts: list[list[float]], names: Sequence[str]) -> dict:
    """c and v from one interleaved loop (medians of per-repeat ratios to one main pass)."""
    return {
        "repeats": len(t_main), "t_greedy": statistics.median(t_main), "t_verify": statistics.median(t_verify),
        "v": median_ratio(t_verify, t_main, scale=L) - 1.0,
        "c": {n: median_ratio(t, t_main, scale=L) for n, t in zip(names, t_drafts)},
        "t_draft": {n: statistics.median(t) for n, t in zip(names, t_drafts)},
    }


def _report(main_name: str, draft_name: str, replay: str, terms: dict, top: dict) -> None:
    tqdm.write(f"{main_name:>28} | {draft_name:>34} | {replay:>11} | pass {terms['t_greedy'] / L:.3f} ms  "
               f"c {terms['c'][draft_name]:.2f}  v {terms['v']:.2f}  S(a=K) {top['speedup_measured']:.2f}x "
               f"(formula {top['speedup_formula']:.2f}x)")


def measure_main(main_name: str, shape: tuple[int, int, int], features: torch.Tensor, clock: Clock, repeats: int,
                 device: torch.device, dtype: torch.dtype, graphs: bool = False) -> list[dict]:
    d, blocks, heads = shape
    torch.manual_seed(0)
    main = RFSQHead(feature_dim=FEATURE_DIM, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=d,
                    num_heads=heads, num_blocks=blocks).to(device=device, dtype=dtype).eval()
    drafts = {}
    for draft_name, settings in DRAFT_SIZES.items():
        torch.manual_seed(1)
        drafts[draft_name] = DraftWithProjection(feature_dim=FEATURE_DIM, coarse_layers=K, tokens_per_layer=T, num_levels=V,
                                                 **settings).to(device=device, dtype=dtype).eval()
    loops = tqdm(total=(1 + len(drafts) * (K + 1)) * (2 if graphs else 1), desc=f"{size_key(main_name)} loops", unit="loop", leave=False)
    rows = []
    with torch.inference_mode():
        main_codes = main.greedy_decode(features)
        # eager: one interleaved loop of main-only decode, verify pass and every draft's call -> c, v
        rows_K = main_codes[..., :K].transpose(1, 2).contiguous()
        fns = [lambda: main_only_decode(main, features), lambda: main.verify_rows_(features, rows_K)]
        fns += [lambda draft=draft: draft.propose_rows(features) for draft in drafts.values()]
        t_main, t_verify, *t_drafts = clock.measure(fns, repeats, warmup=WARMUP_REPEATS)
        terms = _terms(t_main, t_verify, t_drafts, list(drafts))
        loops.update()
    for draft_name, draft in drafts.items():
        for a in range(K + 1):
            oracle = ForcedAcceptanceDraft(draft, main_codes, a)
            codes, stats = speculative_decode(main, oracle, features)
            # float32 on a GPU may in principle flip an argmax tie between the K+1-position verify pass and the
            # single-position passes; record it (and time the acceptance that happened) rather than lose the run
            observed, lossless = stats.accepted_layers[0], bool(torch.equal(codes, main_codes))
            if observed != a or not lossless:
                tqdm.write(f"WARNING {main_name} / {draft_name} (eager): forced a={a}, observed a={observed}, "
                           f"codes equal main-only: {lossless}")
            pair = [lambda: main_only_decode(main, features), lambda oracle=oracle: speculative_decode(main, oracle, features)]
            with torch.inference_mode():
                t_main_pair, t_spec = clock.measure(pair, repeats, warmup=PAIR_WARMUP_REPEATS)
            loops.update()
            rows.append(_row(main_name, main, draft_name, draft, "eager", a, observed, lossless, terms, t_main_pair, t_spec))
        _report(main_name, draft_name, "eager", terms, rows[-1])
    if graphs:
        rows += _measure_graphed(main_name, main, drafts, main_codes, features, clock, repeats, loops)
    loops.close()
    return rows


def _measure_graphed(main_name: str, main: RFSQHead, drafts: dict, main_codes: torch.Tensor, features: torch.Tensor,
                     clock: Clock, repeats: int, loops: tqdm) -> list[dict]:
    """Both paths replayed from captured CUDA graphs (``common/decoding/graphs.py``); off CUDA the same
    code runs eagerly (a check of the code path, not a measurement of graphs)."""
    device = features.device
    replay = "cuda graphs" if device.type == "cuda" else "eager (graph stand-in)"
    rows_K = main_codes[..., :K].transpose(1, 2).contiguous()
    oracles = {n: ForcedAcceptanceDraft(dr, main_codes, K) for n, dr in drafts.items()}
    decoders = {n: GraphedDecoder(main, oracle, num_layers=L) for n, oracle in oracles.items()}
    main_only = next(iter(decoders.values()))
    # the terms, each captured on its own: main-only decode, the verify pass, each draft's call
    verify = Replay(lambda: main.verify_rows_(main_only.features, rows_K), device)
    draft_calls = [Replay(lambda dr=dr: dr.propose_rows(main_only.features), device) for dr in drafts.values()]
    with torch.inference_mode():
        main_only.features.copy_(features)
        t_main, t_verify, *t_drafts = clock.measure([main_only.main_only, verify, *draft_calls], repeats, warmup=WARMUP_REPEATS)
    terms = _terms(t_main, t_verify, t_drafts, list(drafts))
    loops.update()
    rows = []
    for draft_name, decoder in decoders.items():
        for a in range(K + 1):
            oracles[draft_name].set_accepted(a)
            codes, observed, _ = decoder.decode(features)
            lossless = bool(torch.equal(codes, main_codes))
            if observed != a or not lossless:
                tqdm.write(f"WARNING {main_name} / {draft_name} ({replay}): forced a={a}, observed a={observed}, "
                           f"codes equal main-only: {lossless}")
            pair = [lambda decoder=decoder: decoder.decode_main_only(features), lambda decoder=decoder: decoder.decode(features)]
            t_main_pair, t_spec = clock.measure(pair, repeats, warmup=PAIR_WARMUP_REPEATS)
            loops.update()
            rows.append(_row(main_name, main, draft_name, drafts[draft_name], replay, a, observed, lossless, terms, t_main_pair, t_spec))
        _report(main_name, draft_name, replay, terms, rows[-1])
    return rows


def _replay_order(replay: str) -> int:
    return 0 if replay == "eager" else 1


def markdown(rows: list[dict], dtype: str, label: str) -> str:
    lines = [
        f"Device: {label}; batch 1, {dtype}, torch {torch.__version__}; L = {L} layers x {T} tokens, K = {K} drafted layers; "
        "paired, interleaved timing: S = median over repeats of (main-only time / speculative time), each repeat timing "
        "the two back to back (alternating which goes first), at forced acceptance a (oracle draft, real draft cost), "
        "with the formula S = L / (L - a + c + v) in brackets; c and v = medians of per-repeat ratios to one main pass "
        "(main-only decode / L) from one loop per main size that times main-only decode, verify pass and draft calls "
        "back to back in a rotating order. Replay: both paths op by op (eager), or both replayed from captured CUDA "
        "graphs (one graph for main-only; draft + verify + acceptance, then the remaining passes for the accepted a, "
        "for speculative: one host sync).",
        "",
        "| main | params | draft | replay | one main pass (ms) | main-only ms / chunk (c, v loop) | c (draft, passes) | v (verify extra, passes) | "
        "S a=0 (formula) | S a=1 (formula) | S a=2 (formula) | S a=3 (formula) | main-only / spec ms per chunk at a=3 (same loop) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["main"], r["draft"], r.get("replay", "eager")) for r in rows},
                  key=lambda k: (list(MAIN_SIZES).index(k[0]), _replay_order(k[2]), list(DRAFT_SIZES).index(k[1])))
    for main_name, draft_name, replay in keys:
        rs = sorted((r for r in rows if (r["main"], r["draft"], r.get("replay", "eager")) == (main_name, draft_name, replay)),
                    key=lambda r: r["accepted_layers"])
        r0 = rs[0]
        s = " | ".join(f"{r['speedup_measured']:.2f}x ({r['speedup_formula']:.2f}x)" for r in rs)
        lines.append(
            f"| {main_name} | {r0['main_params']:,} | {draft_name} | {replay} | {r0['main_pass_ms']:.3f} | {r0['main_only_ms_terms_loop']:.2f} | "
            f"{r0['c']:.2f} | {r0['v']:.2f} | {s} | {rs[-1]['main_only_ms_per_chunk']:.2f} / {rs[-1]['speculative_ms_per_chunk']:.2f} |"
        )
    off = [r for r in rows if r["accepted_layers_observed"] != r["accepted_layers"] or not r["codes_equal_main_only"]]
    if off:
        lines += ["", f"Warning: {len(off)} row(s) did not reach the forced acceptance or differed from main-only "
                      "(argmax ties at this precision); their formula uses the observed a. See the JSON."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, label: str) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    replays = sorted({r.get("replay", "eager") for r in rows}, key=_replay_order)
    for replay in replays:
        for draft_name in DRAFT_SIZES:
            top = [r for r in rows if r["draft"] == draft_name and r.get("replay", "eager") == replay and r["accepted_layers"] == K]
            if not top:
                continue
            x = [r["main_params"] for r in top]
            s = [r["speedup_measured"] for r in top]
            quartiles = [[m - r["speedup_measured_q1"] for m, r in zip(s, top)], [r["speedup_measured_q3"] - m for m, r in zip(s, top)]]
            style = "o-" if replay == "eager" else "s-"
            bars = ax.errorbar(x, s, yerr=quartiles, fmt=style, capsize=3, label=f"{draft_name}, {replay}: measured")
            ax.plot(x, [r["speedup_formula"] for r in top], "x--", color=bars.lines[0].get_color(), alpha=0.6)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="main model parameters", ylabel=f"token-decode speedup at a = {K} (all drafted layers accepted)",
           title=f"Speculative vs main-only, batch 1, paired timing (x: formula; bars: quartiles)\n{label}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_decode_sweep --device cuda: expected a CUDA GPU, found none (torch {torch.__version__})")
    return torch.device(name)


@dataclass
class DecodeSweepConfig:
    """What speculative decoding costs and saves, per main-model and draft size (batch 1, CPU or one GPU)."""

    device: str = "cpu"  # cpu or cuda
    out: str = ""  # output folder ("" = results/bench_decode_sweep, _gpu on cuda)
    repeats: int = 200  # most timed repeats per interleaved loop (medians over repeats)
    budget_s: float = None  # wall time aimed at per interleaved loop; fewer repeats for slow models (None: 2 on cpu, 1 on cuda)
    dtype: str = ""  # precision of both models: float64, float32 or bfloat16 ("" = float64 on cpu, float32 on cuda)
    sizes: str = ""  # comma list of main sizes ("" = all: 64x1,128x2,256x4,512x6,1024x8)
    threads: int = 1  # torch CPU threads (batch 1: one is fastest)
    # also time both paths replayed from captured CUDA graphs (common/decoding/graphs.py);
    # on a CPU the same code runs eagerly, a check of the path, not a measurement
    graphs: bool = False

    def __post_init__(self) -> None:
        if self.device not in DEFAULT_DTYPE:
            raise ValueError(f"--device: expected cpu or cuda, found {self.device!r}")
        if self.dtype not in ("", "float64", "float32", "bfloat16"):
            raise ValueError(f"--dtype: expected float64, float32 or bfloat16, found {self.dtype!r}")
        if self.repeats < 1:
            raise ValueError(f"--repeats: expected >= 1, found {self.repeats}")


def main(argv: list[str]) -> dict:
    cfg = rsd_entry.parse_config(DecodeSweepConfig, argv, prog=PROG)
    sizes = select_sizes(cfg.sizes)
    device = resolve_device(cfg.device)
    dtype_name = cfg.dtype or DEFAULT_DTYPE[device.type]
    dtype = getattr(torch, dtype_name)
    out = Path(cfg.out) if cfg.out else DEFAULT_OUT[device.type]
    torch.set_num_threads(cfg.threads)
    import matplotlib

    matplotlib.use("Agg")
    clock = Clock(device, cfg.budget_s if cfg.budget_s is not None else DEFAULT_BUDGET_S[device.type])
    label = device_label(device, cfg.threads)
    features = torch.randn(1, FEATURE_DIM, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
    result = {
        "rows": [], "complete": False, "timing": TIMING, "device": device.type, "device_name": label, "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda, "dtype": dtype_name, "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "repeats": cfg.repeats, "budget_s": clock.budget_ms / 1e3, "threads": cfg.threads, "sizes": [size_key(n) for n in sizes],
        "L": L, "K": K, "tokens_per_layer": T, "graphs": cfg.graphs, "provenance": provenance(seed=0),
    }
    print(f"bench_decode_sweep: {label}, {dtype_name}, torch {torch.__version__} -> {out}", flush=True)
    for main_name, shape in tqdm(sizes.items(), desc="main sizes", unit="size"):
        result["rows"] += measure_main(main_name, shape, features, clock, cfg.repeats, device, dtype, graphs=cfg.graphs)
        write_json(out / "bench_decode_sweep.json", result)  # a run cut short keeps what it measured
    result["complete"] = True
    write_json(out / "bench_decode_sweep.json", result)
    table = markdown(result["rows"], dtype_name, label)
    (out / "bench_decode_sweep.md").write_text(table)
    plot(result["rows"], out / "bench_decode_sweep.png", label)
    print(table)
    return result


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
