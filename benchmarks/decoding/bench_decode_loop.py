"""The decode loop against an earlier version of itself: main-only greedy decoding of one chunk, the
current ``RFSQHead`` vs the one at a git revision, same weights, same features, timed alternately in
one process (so a busy machine slows both alike).

    python -m benchmarks.decoding.bench_decode_loop [--baseline-ref b3a8934] [--baseline-path common/rfsq_head.py]

Also checks that both produce identical tokens. Optional ``--compile`` adds ``torch.compile`` of
the current model's single-position step, measured separately. Writes ``bench_decode_loop.json`` /
``.md`` to ``--out`` (default ``results/bench_decode_loop``).
"""

from __future__ import annotations

import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import rsd_entry
from common.policy.head import RFSQHead
from common.provenance import REPO_ROOT, provenance, write_results

PROG = "python -m benchmarks.decoding.bench_decode_loop"

SIZES = {"main-128x2 (make run)": (128, 2, 4), "main-256x4 (seed default)": (256, 4, 4)}
FEATURE_DIM, L, T, V = 128, 8, 16, 7


def load_baseline(ref: str, path: str):
    source = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=REPO_ROOT, capture_output=True, text=True)
    if source.returncode:
        raise ValueError(f"git show {ref}:{path} failed: {source.stderr.strip()}")
    file = Path(tempfile.mkdtemp()) / "baseline_head.py"
    file.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("baseline_head", file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_head"] = module
    spec.loader.exec_module(module)
    return module.RFSQHead


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for _ in range(20):
        for fn in fns.values():
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


DTYPES = ("float64", "float32")


@dataclass
class DecodeLoopConfig:
    """The decode loop against an earlier version of itself: main-only greedy decoding of one chunk, timed alternately."""

    baseline_ref: str = "b3a8934"  # git revision of the baseline head
    baseline_path: str = "common/rfsq_head.py"  # the head's file at that revision
    repeats: int = 300  # timed decodes per variant (median)
    dtype: str = "float64"  # precision of both heads: float64 or float32
    compile: bool = False  # also time torch.compile of the current model
    out: str = ""  # output folder ("" = results/bench_decode_loop)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, found {self.dtype!r}")
        if self.repeats < 1:
            raise ValueError(f"--repeats: expected >= 1, found {self.repeats}")


def main(argv: list[str]) -> dict:
    cfg = rsd_entry.parse_config(DecodeLoopConfig, argv, prog=PROG)
    torch.set_num_threads(1)
    dtype = getattr(torch, cfg.dtype)
    Baseline = load_baseline(cfg.baseline_ref, cfg.baseline_path)
    rows = []
    for name, (d, blocks, heads) in SIZES.items():
        head_cfg = dict(feature_dim=FEATURE_DIM, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=d, num_heads=heads, num_blocks=blocks)
        torch.manual_seed(0)
        current = RFSQHead(**head_cfg).to(dtype).eval()
        baseline = Baseline(**head_cfg).to(dtype).eval()
        baseline.load_state_dict(current.state_dict())
        features = torch.randn(1, FEATURE_DIM, generator=torch.Generator().manual_seed(1)).to(dtype)
        identical = all(torch.equal(current.greedy_decode(f), baseline.greedy_decode(f))
                        for f in torch.randn(64, 1, FEATURE_DIM, generator=torch.Generator().manual_seed(2)).to(dtype))
        fns = {"baseline": lambda: baseline.greedy_decode(features), "current": lambda: current.greedy_decode(features)}
        if cfg.compile:  # the unwrapped loop, out of inference mode (torch.compile cannot trace it in there)
            compiled = torch.compile(current.greedy_decode_, dynamic=False)

            def run_compiled(compiled=compiled, features=features):
                with torch.no_grad():
                    return compiled(features, L)
            fns["current + torch.compile"] = run_compiled
        ms = alternate(fns, cfg.repeats)
        rows.append({"model": name, "params": current.num_parameters(), "identical_tokens_64_chunks": identical,
                     "ms_per_chunk": ms, "ms_per_pass": {k: v / L for k, v in ms.items()},
                     "speedup_current_over_baseline": ms["baseline"] / ms["current"]})
        print(f"{name}: baseline {ms['baseline']:.3f} ms, current {ms['current']:.3f} ms per chunk "
              f"({ms['baseline'] / ms['current']:.2f}x), identical tokens: {identical}", flush=True)
    lines = [f"Main-only greedy decode of one chunk (L = {L} layers x {T} tokens), batch 1, {cfg.dtype}, 1 thread, median of "
             f"{cfg.repeats} alternating calls; baseline = `RFSQHead` at `{cfg.baseline_ref}`.", "",
             "| model | params | baseline ms / chunk | current ms / chunk | speedup | identical tokens (64 chunks) |"
             + (" current + torch.compile ms / chunk |" if cfg.compile else ""), "|---|---|---|---|---|---|" + ("---|" if cfg.compile else "")]
    for r in rows:
        compiled_ms = f" {r['ms_per_chunk']['current + torch.compile']:.3f} |" if cfg.compile else ""
        lines.append(f"| {r['model']} | {r['params']:,} | {r['ms_per_chunk']['baseline']:.3f} | {r['ms_per_chunk']['current']:.3f} | "
                     f"{r['speedup_current_over_baseline']:.2f}x | {r['identical_tokens_64_chunks']} |{compiled_ms}")
    result = {"rows": rows, "baseline_ref": cfg.baseline_ref, "dtype": cfg.dtype, "repeats": cfg.repeats, "provenance": provenance(seed=0)}
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "bench_decode_loop"
    write_results(out, "bench_decode_loop", result, "\n".join(lines))
    return result


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
