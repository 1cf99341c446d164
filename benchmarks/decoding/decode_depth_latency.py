"""Absolute token-decode latency per chunk of trained models: all L layers main-only (what Phase 3 ran
before decoding depth was chosen) against the depth Phase 2 chose, main-only and speculative.

    python -m benchmarks.decoding.decode_depth_latency --models-dir MODELS [--tag ""|naive] [--chunks 200] [--candidates 1,4]

Features are the backbone's on held-out demo steps (the head's ``val_episode_keys``), batch 1, float32 by default
as Phase 3 runs them, one thread. The three decodes of a chunk are timed back to back in a rotating
order (``common.decoding.timing.Clock``), so a busy machine slows all alike; the table gives
medians over chunks and repeats, the median per-chunk ratios to the full-depth main-only decode and
to the chosen-depth main-only decode (the speculative speedup), each speculative row's mean
accepted layers (``--candidates``: proposals verified per chunk in one pass) and, over every
held-out chunk (not only the timed ones), how many speculative decodes gave exactly the main-only
tokens in this precision (``--dtype``; Phase 3 decodes in float32 by default).
Writes ``decode_depth_latency{_tag}.json`` / ``.md`` to ``--out``.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import rsd_entry
from common.decoding.measure import load_held_out
from common.decoding.speculative import main_only_decode, speculative_decode
from common.decoding.timing import Clock, median_ratio
from common.provenance import REPO_ROOT, provenance, write_results

PROG = "python -m benchmarks.decoding.decode_depth_latency"


def measure(models_dir: Path, tag: str, chunks: int, repeats: int, candidates: tuple[int, ...] = (1,), dtype: str = "float32") -> dict:
    paths, choice, policy, all_feats = load_held_out(models_dir, tag)
    to = getattr(torch, dtype)
    all_feats = all_feats.to(to)
    step = max(1, len(all_feats) // chunks)
    feats = all_feats[::step][:chunks]
    head, draft = policy.head.to(to), policy.draft.to(to)
    L, k = head.num_layers, int(choice["layers"])
    clock = Clock(torch.device("cpu"), budget_s=1e9)
    spec = {n: "chosen_spec" if n == 1 else f"chosen_spec_c{n}" for n in candidates}
    times = {"full": [], "chosen": [], **{name: [] for name in spec.values()}}
    accepted = {name: [] for name in spec.values()}
    for f in feats:
        f = f[None]
        fns = [lambda: main_only_decode(head, f), lambda: main_only_decode(head, f, num_layers=k)]
        fns += [lambda n=n: speculative_decode(head, draft, f, num_layers=k, candidates=n) for n in spec]
        t = clock.interleaved_ms(fns, repeats)
        for name, ms in zip(times, t):
            times[name].extend(ms)
        for n, name in spec.items():
            accepted[name].append(speculative_decode(head, draft, f, num_layers=k, candidates=n)[1].used_prefix)
    identical = {name: 0 for name in spec.values()}
    with torch.inference_mode():
        for f in tqdm(all_feats, desc="lossless check", leave=False):
            ref = main_only_decode(head, f[None], num_layers=k)[0]
            for n, name in spec.items():
                identical[name] += int(torch.equal(speculative_decode(head, draft, f[None], num_layers=k, candidates=n)[0], ref))
    return {
        "lossless_chunks": len(all_feats), "identical_to_main_only": identical,
        "head": str(paths["head"]), "draft": str(paths["draft"]), "layers": L, "chosen": {"layers": k, "rule": choice["rule"]},
        "drafted_layers": min(draft.coarse_layers, k - 1), "dtype": dtype, "chunks": len(feats), "repeats": repeats, "candidates": list(spec),
        "median_ms": {name: statistics.median(v) for name, v in times.items()},
        "ratio_to_full": {name: median_ratio(times["full"], v) for name, v in times.items() if name != "full"},
        "spec_speedup": {name: median_ratio(times["chosen"], times[name]) for name in spec.values()},
        "mean_accepted_layers": {name: sum(v) / len(v) for name, v in accepted.items()},
    }


def markdown(r: dict) -> str:
    m, x = r["median_ms"], r["ratio_to_full"]
    return "\n".join([
        f"Head `{Path(r['head']).name}`; {r['chunks']} held-out demo chunks x {r['repeats']} repeats, batch 1, {r.get('dtype', 'float64')}, one thread; "
        "the three decodes of a chunk timed back to back in a rotating order.",
        "",
        "| decode | layers | median ms / chunk | speedup vs all layers main-only (median per-chunk ratio) |",
        "|---|---|---|---|",
        f"| main-only, all layers | {r['layers']} | {m['full']:.3f} | 1.00x |",
        f"| main-only, chosen depth | {r['chosen']['layers']} | {m['chosen']:.3f} | {x['chosen']:.2f}x |",
        *[f"| speculative, chosen depth, {n} candidate{'s' if n > 1 else ''} | {r['chosen']['layers']} | {m[name]:.3f} | {x[name]:.2f}x |"
          for n, name in _spec_rows(r)],
        "",
        f"Speculative rows against main-only at the chosen depth (K = {r.get('drafted_layers', '?')} drafted layers; "
        "a = mean accepted layers on these chunks):",
        "",
        "| candidates per chunk | a | speedup vs main-only, chosen depth (median per-chunk ratio) | tokens identical to main-only |",
        "|---|---|---|---|",
        *[f"| {n} | {r['mean_accepted_layers'][name]:.3f} | {r['spec_speedup'][name]:.2f}x | {_identical(r, name)} |"
          for n, name in _spec_rows(r)],
    ]) + "\n"


def _identical(r: dict, name: str) -> str:
    if "identical_to_main_only" not in r:  # written before the check
        return "—"
    return f"{r['identical_to_main_only'][name]} / {r['lossless_chunks']} held-out chunks"


def _spec_rows(r: dict) -> list[tuple[int, str]]:
    return [(n, "chosen_spec" if n == 1 else f"chosen_spec_c{n}") for n in r.get("candidates", [1])]


@dataclass
class DecodeDepthConfig:
    """Absolute token-decode latency per chunk of trained models: all layers main-only against the chosen depth, main-only and speculative."""

    models_dir: str = ""  # Phase 2 models folder (head with decode_choice, draft, tokenizer; required)
    tag: str = ""  # "" (robust tokens) or "naive"
    chunks: int = 200  # held-out chunks timed
    repeats: int = 5  # timed repeats per chunk
    candidates: str = "1,2,4"  # comma-separated proposals per chunk (powers of two), one speculative row each
    dtype: str = "float32"  # precision of the token models, float32 or float64 (Phase 3 --decode-dtype; float32 writes *_float32.json/.md)
    out: str = ""  # output folder ("" = results/phase3_diagnostics)

    def __post_init__(self) -> None:
        if not self.models_dir:
            raise ValueError("--models-dir: expected the Phase 2 models folder, found none")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"--dtype: expected float32 or float64, found {self.dtype!r}")
        try:
            int_list = [int(c) for c in self.candidates.split(",") if c.strip()]
        except ValueError:
            int_list = []
        if not int_list:
            raise ValueError(f"--candidates: expected comma-separated integers, found {self.candidates!r}")


def main(argv: list[str]) -> None:
    cfg = rsd_entry.parse_config(DecodeDepthConfig, argv, prog=PROG)
    candidates = tuple(int(c) for c in cfg.candidates.split(",") if c.strip())
    rsd_entry.setup_process(torch_threads=1)
    result = measure(Path(cfg.models_dir), cfg.tag, cfg.chunks, cfg.repeats, candidates, cfg.dtype)
    result["provenance"] = provenance(seed=0)
    sfx = (f"_{cfg.tag}" if cfg.tag else "") + ("_float32" if cfg.dtype == "float32" else "")
    write_results(cfg.out or REPO_ROOT / "results" / "phase3_diagnostics", f"decode_depth_latency{sfx}", result, markdown(result))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
