"""Speculative against main-only token decoding of a TRAINED head and draft (real acceptance, not an
oracle), op by op and replayed from captured CUDA graphs (``common/decoding/graphs.py``), on one device.

    # here, where the demos are: the held-out features + the head and draft, in one small file
    python -m benchmarks.decoding.decode_trained_graphs export --models-dir MODELS --bundle BUNDLE.pt [--states RUN_DIR]
    # anywhere torch runs (a bare GPU machine needs only this file and the repository)
    python -m benchmarks.decoding.decode_trained_graphs run --bundle BUNDLE.pt --device cuda [--dtype float32|bfloat16] [--replay graphs|compile] [--out DIR]

The bundle holds the backbone features of every held-out demo step (the head's ``val_episode_keys``;
what Phase 3's token models see, minus the simulator), the head and draft weights and the decode
depth and rule the head chose. ``run`` decodes ``--chunks`` of them at batch 1 at the chosen depth,
main-only and speculative (the draft proposes min(K, depth - 1) layers, or at most
``--drafted-layers N``), both eagerly and from graphs, the four timed back to back per repeat in a rotating order (``common.decoding.timing.Clock``): the
table gives the median ms per chunk, the median per-chunk speedup of each speculative path over the
main-only path of the same kind, the mean accepted layers a (the trained draft's, on held-out
states: closed-loop acceptance is lower, see Phase 3) and, over every exported chunk, how many
speculative decodes gave exactly main-only's tokens. Off CUDA the "graphs" rows run the same code
eagerly (a check of the path, labelled so); ``--replay compile`` runs those bodies compiled by
``torch.compile`` instead (any device; compiling takes a minute or two before the timing). ``--states RUN_DIR`` exports, instead of the held-out demo
steps, the states a Phase 3 run of the same head recorded (``--record-features``): the closed-loop
states where the draft is actually asked, with the acceptance it really gets there. Writes ``decode_trained_graphs.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import rsd_entry
from common.decoding.graphs import GraphedDecoder
from common.decoding.measure import export_bundle, load_bundle
from common.decoding.speculative import main_only_decode, speculative_decode
from common.decoding.timing import Clock, device_label, evict_caches, eviction_buffer, median_ratio
from common.provenance import REPO_ROOT, provenance, write_results


def run(bundle: Path, device: torch.device, dtype: torch.dtype, chunks: int, repeats: int, drafted_layers: int = 0,
        replay: str = "graphs", cold: bool = False) -> dict:
    """``drafted_layers``: draft at most this many layers (0 = all the draft proposes), as Phase 3's --drafted-layers.
    ``replay="compile"``: the second pair of rows runs the decoder's bodies compiled by torch.compile instead of graphs.
    ``cold``: the data caches are evicted before every timed decode (``common.decoding.timing.evict_caches``)."""
    head, draft, features, content = load_bundle(bundle, device, dtype)
    depth = int(content["decode_choice"]["layers"])
    if depth < 2:
        raise ValueError(f"{bundle}: the head decodes {depth} layer; speculation needs at least 2")
    graphs = "torch.compile" if replay == "compile" else "cuda graphs" if device.type == "cuda" else "eager (graph stand-in)"
    cap = drafted_layers or None
    decoder = GraphedDecoder(head, draft, num_layers=depth, coarse_layers=cap, replay=replay)
    step = max(1, len(features) // chunks)
    timed = features[::step][:chunks]
    clock = Clock(device, budget_s=1e9)
    evict = (lambda buffer=eviction_buffer(): evict_caches(buffer)) if cold else None
    names = ("main_only_eager", "speculative_eager", "main_only_graphs", "speculative_graphs")
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for f in tqdm(timed, desc="timed chunks", unit="chunk"):
            f = f[None]
            fns = [lambda: main_only_decode(head, f, num_layers=depth), lambda: speculative_decode(head, draft, f, num_layers=depth, coarse_layers=cap),
                   lambda: decoder.decode_main_only(f), lambda: decoder.decode(f)]
            for name, ms in zip(names, clock.interleaved_ms(fns, repeats, before=evict)):
                times[name].extend(ms)
        accepted, identical_eager, identical_graphs = [], 0, 0
        for f in tqdm(features, desc="lossless check", unit="chunk", leave=False):
            f = f[None]
            ref = main_only_decode(head, f, num_layers=depth)[0]
            codes, _ = speculative_decode(head, draft, f, num_layers=depth, coarse_layers=cap)
            identical_eager += int(torch.equal(codes, ref))
            codes_g, a, _ = decoder.decode(f)
            identical_graphs += int(torch.equal(codes_g, ref))
            accepted.append(a)
    K = decoder.coarse_layers
    a_mean = sum(accepted) / len(accepted)
    return {
        "bundle": str(bundle), "states": content["states"], "head": content["head"], "draft": content["draft"], "head_hash": content["head_hash"],
        "device": device.type, "device_name": device_label(device, torch.get_num_threads()), "dtype": str(dtype).removeprefix("torch."),
        "graphs": graphs, "replay": replay, "caches": "cold" if cold else "warm", "decode_choice": content["decode_choice"], "depth": depth, "drafted_layers": K,
        "chunks_timed": len(timed), "repeats": repeats, "chunks_checked": len(features),
        "median_ms": {n: statistics.median(v) for n, v in times.items()},
        "speedup_eager": median_ratio(times["main_only_eager"], times["speculative_eager"]),
        "speedup_graphs": median_ratio(times["main_only_graphs"], times["speculative_graphs"]),
        "graphs_main_only_vs_eager_main_only": median_ratio(times["main_only_eager"], times["main_only_graphs"]),
        "mean_accepted_layers": a_mean, "accepted_distribution": {str(k): accepted.count(k) for k in range(K + 1)},
        "identical_to_main_only": {"eager": identical_eager, "graphs": identical_graphs},
    }


def markdown(r: dict) -> str:
    m = r["median_ms"]
    dist = ", ".join(f"a={k}: {v}" for k, v in r["accepted_distribution"].items())
    n = r["chunks_checked"]
    return "\n".join([
        f"Device: {r['device_name']}; {r['dtype']}, batch 1; head `{Path(r['head']).name}` decoding {r['depth']} layers "
        f"({r['decode_choice'].get('rule', '?')} last), the trained draft proposing {r['drafted_layers']}; "
        f"{r['chunks_timed']} chunks ({r.get('states', 'held-out demo steps')}) x {r['repeats']} repeats, the four decodes of a repeat timed back to back "
        f"in a rotating order{', each after a 32 MiB cache sweep (cold caches)' if r.get('caches') == 'cold' else ''}; speedup = median per-repeat ratio of main-only to speculative time, each path against its own kind.",
        "",
        "| replay | main-only ms / chunk | speculative ms / chunk | speculative speedup | tokens identical to main-only |",
        "|---|---|---|---|---|",
        f"| eager | {m['main_only_eager']:.3f} | {m['speculative_eager']:.3f} | {r['speedup_eager']:.2f}x | {r['identical_to_main_only']['eager']} / {n} |",
        f"| {r['graphs']} | {m['main_only_graphs']:.3f} | {m['speculative_graphs']:.3f} | {r['speedup_graphs']:.2f}x | "
        f"{r['identical_to_main_only']['graphs']} / {n} |",
        "",
        f"Mean accepted layers a = {r['mean_accepted_layers']:.3f} of {r['drafted_layers']} over all {n} chunks ({dist}); "
        f"main-only from {r['graphs']} is {r['graphs_main_only_vs_eager_main_only']:.2f}x faster than main-only op by op.",
    ]) + "\n"


PROG = "python -m benchmarks.decoding.decode_trained_graphs"


@dataclass
class ExportConfig:
    """Write the bundle (held-out features, head, draft, decode choice)."""

    models_dir: str = ""  # Phase 2 models folder (head with decode_choice, draft, tokenizer; required)
    tag: str = ""  # "" (robust tokens) or "naive"
    bundle: str = ""  # the bundle file to write (required)
    # a Phase 3 run folder of this head made with --record-features: export its closed-loop states instead of the held-out demo steps
    states: str = ""

    def __post_init__(self) -> None:
        if not self.models_dir or not self.bundle:
            raise ValueError(f"export: expected --models-dir and --bundle, found {self.models_dir!r} and {self.bundle!r}")


@dataclass
class RunConfig:
    """Time the bundle's decodes on one device."""

    bundle: str = ""  # the bundle written by `export` (required)
    device: str = "cpu"  # cpu or cuda
    dtype: str = "float32"  # float32, float64 or bfloat16
    chunks: int = 200  # held-out chunks timed (all are checked for losslessness)
    repeats: int = 5  # timed repeats per chunk
    replay: str = "graphs"  # graphs: CUDA graphs (eager off CUDA); compile: torch.compile of the same decode bodies (any device)
    cold: bool = False  # evict the data caches (a 32 MiB sweep) before every timed decode, as a simulator step does between two chunks
    drafted_layers: int = 0  # draft at most N layers (0 = all the draft proposes)
    threads: int = 1  # torch CPU threads
    out: str = ""  # output folder ("" = results/phase3_diagnostics/decode_trained_graphs)

    def __post_init__(self) -> None:
        if not self.bundle:
            raise ValueError("run: expected --bundle, found none")
        for flag, value, allowed in (("--device", self.device, ("cpu", "cuda")), ("--dtype", self.dtype, ("float32", "float64", "bfloat16")),
                                     ("--replay", self.replay, ("graphs", "compile"))):
            if value not in allowed:
                raise ValueError(f"{flag}: expected one of {', '.join(allowed)}, found {value!r}")


COMMANDS = {"export": ExportConfig, "run": RunConfig}


def parse(argv: list[str]) -> ExportConfig | RunConfig:
    """``export ...`` or ``run ...``: the subcommand picks the config whose flags follow it."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,run}")
    for name, cls in COMMANDS.items():  # listed for --help; each one's own parser reads its flags
        sub.add_parser(name, help=(cls.__doc__ or "").strip().rstrip("."), add_help=False)
    rsd_entry.add_debug_flag(parser)
    parser.parse_args(argv[:1])
    return rsd_entry.parse_config(COMMANDS[argv[0]], argv[1:], prog=f"{PROG} {argv[0]}")


def main(argv: list[str]) -> dict:
    cfg = parse(argv)
    if isinstance(cfg, ExportConfig):
        result = export_bundle(Path(cfg.models_dir), cfg.tag, Path(cfg.bundle), Path(cfg.states) if cfg.states else None)
        print(result)
        return result
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"decode_trained_graphs --device cuda: expected a CUDA GPU, found none (torch {torch.__version__})")
    torch.set_num_threads(cfg.threads)
    result = run(Path(cfg.bundle), torch.device(cfg.device), getattr(torch, cfg.dtype), cfg.chunks, cfg.repeats, cfg.drafted_layers, cfg.replay, cfg.cold)
    result["provenance"] = provenance(seed=0)
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "phase3_diagnostics" / "decode_trained_graphs"
    write_results(out, "decode_trained_graphs", result, markdown(result))
    return result


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
