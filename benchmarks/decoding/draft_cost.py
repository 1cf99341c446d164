"""What one draft call costs next to one main pass (the c of S = L / (L - a + c + v)), per draft
architecture, at batch 1 on this machine, with warm and with cold caches.

    python -m benchmarks.decoding.draft_cost [--dtype float32] [--repeats 400] [--out results/phase3_diagnostics/draft_cost]

The cost of a call does not depend on the weights' values, so the models are freshly initialised:
the main model is the ``make run`` size (d_model 128, 2 blocks, L = 3 decoded layers, 16 tokens x 7
levels per layer) and its pass is the one-position ``extend_`` step; each draft is a parallel MLP
draft over K = 2 layers (what Phase 3 uses), called through ``propose_rows`` as the decode loop calls
it. "cold" sweeps a 32 MiB buffer before every call, as a simulator step between two chunks does in
closed loop, so weights come from memory rather than cache; "warm" times a call right after an
untimed one. The calls are timed back to back in a rotating order, so a busy machine slows all alike; the tables give medians. Also the per-call cost
of each activation on one draft-sized row, which is why ``--draft-activation`` exists.
Writes ``draft_cost.json`` / ``.md`` to ``--out``.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import rsd_entry
from common.decoding.timing import evict_caches, eviction_buffer
from common.policy.draft import DRAFT_ACTIVATIONS, DraftWithProjection
from common.policy.head import RFSQHead
from common.provenance import REPO_ROOT, provenance, write_results

PROG = "python -m benchmarks.decoding.draft_cost"

FEATURE_DIM, T, V, K = 128, 16, 7, 2
DRAFTS = [(act, width, hidden) for act in DRAFT_ACTIVATIONS for width, hidden in ((256, 2), (128, 2), (128, 1))]


def measure(dtype: torch.dtype, repeats: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    head = RFSQHead(feature_dim=FEATURE_DIM, num_layers=3, tokens_per_layer=T, num_levels=V, d_model=128, num_blocks=2).to(dtype).eval()
    drafts = {f"{act} w{width} h{hidden}": DraftWithProjection(feature_dim=FEATURE_DIM, width=width, coarse_layers=K, tokens_per_layer=T,
                                                               num_levels=V, hidden_layers=hidden, trunk="mlp", activation=act).to(dtype).eval()
              for act, width, hidden in DRAFTS}
    features = torch.randn(1, FEATURE_DIM, dtype=dtype)
    flush = eviction_buffer()
    with torch.inference_mode():
        cache, logits = head.start(features)
        layer0 = logits.argmax(dim=-1)

        def main_pass():
            cache.length = 1
            head.extend_(cache, layer0)

        calls = {"main pass": main_pass, **{name: (lambda d=d: d.propose_rows(features)) for name, d in drafts.items()}}
        times = {mode: {name: [] for name in calls} for mode in ("warm", "cold")}
        names = list(calls)
        for r in tqdm(range(repeats), desc="draft cost", unit="round"):
            for name in names[r % len(names):] + names[: r % len(names)]:
                for mode in ("warm", "cold"):
                    if mode == "cold":
                        evict_caches(flush)
                    else:  # one untimed call first: the other calls of the round evicted this one's weights
                        calls[name]()
                    t0 = time.perf_counter()
                    calls[name]()
                    times[mode][name].append(time.perf_counter() - t0)
        row = torch.randn(1, 256, dtype=dtype)
        act_us = {}
        for act, make in DRAFT_ACTIVATIONS.items():
            module, samples = make(), []
            for _ in range(repeats):
                t0 = time.perf_counter()
                module.forward(row)
                samples.append(time.perf_counter() - t0)
            act_us[act] = statistics.median(samples) * 1e6
    rows = []
    for name, d in drafts.items():
        entry = {"draft": name, "parameters": d.num_parameters()}
        for mode in ("warm", "cold"):
            ms = statistics.median(times[mode][name]) * 1e3
            entry[f"{mode}_ms"] = ms
            entry[f"{mode}_c"] = ms / (statistics.median(times[mode]["main pass"]) * 1e3)
        rows.append(entry)
    return {
        "main_pass_ms": {mode: statistics.median(times[mode]["main pass"]) * 1e3 for mode in ("warm", "cold")},
        "drafts": rows,
        "activation_us_per_call_1x256": act_us,
        "dtype": str(dtype).removeprefix("torch."),
        "repeats": repeats,
        "threads": torch.get_num_threads(),
    }


def markdown(result: dict) -> str:
    m = result["main_pass_ms"]
    lines = [
        f"Draft cost c next to one main pass ({result['dtype']}, batch 1, {result['threads']} thread(s), {result['repeats']} rounds)",
        "",
        f"Main pass (make-run size, one position): {m['warm']:.3f} ms warm, {m['cold']:.3f} ms cold.",
        "",
        "| draft (activation, width, hidden layers) | parameters | ms warm | c warm | ms cold | c cold |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["drafts"]:
        lines.append(f"| {r['draft']} | {r['parameters']:,} | {r['warm_ms']:.3f} | {r['warm_c']:.2f} | {r['cold_ms']:.3f} | {r['cold_c']:.2f} |")
    lines += ["", "| activation | µs per call on [1, 256] |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in result["activation_us_per_call_1x256"].items()]
    return "\n".join(lines) + "\n"


@dataclass
class DraftCostConfig:
    """What one draft call costs next to one main pass, per draft architecture, warm and cold caches."""

    dtype: str = "float32"  # float32 or float64
    repeats: int = 400  # timed rounds (every call once per round, warm and cold; medians over rounds)
    threads: int = 1  # torch threads (Phase 3 decodes with 1)
    out: str = ""  # output folder ("" = results/phase3_diagnostics/draft_cost)

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype: expected float32 or float64, found {self.dtype!r}")
        if self.repeats < 10:
            raise ValueError(f"--repeats: expected >= 10, found {self.repeats}")


def main(argv: list[str]) -> dict:
    cfg = rsd_entry.parse_config(DraftCostConfig, argv, prog=PROG)
    torch.set_num_threads(cfg.threads)
    result = measure(getattr(torch, cfg.dtype), cfg.repeats)
    result["provenance"] = provenance(seed=0)
    write_results(cfg.out or REPO_ROOT / "results" / "phase3_diagnostics" / "draft_cost", "draft_cost", result, markdown(result))
    return result


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
