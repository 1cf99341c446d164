"""Tokenizer benchmark: naive / layernorm / scale / fixed RFSQ, lucidrains' ResidualFSQ, and an
OpenVLA-style uniform 256-bin tokenizer — MSE, bits per chunk, encode+decode throughput.

    make bench        # installs requirements-bench.txt (vector-quantize-pytorch), then runs this
    python -m benchmarks.tokenizer.bench_tokenizers --epochs 100 --data synthetic

Every RFSQ variant (ours and lucidrains') sits in the same autoencoder, with the same levels, layers
and latent size, trained with the same recipe (``common.tokenizer.train``). lucidrains'
``ResidualFSQ`` quantizes each latent number as its own 1-d vector (``dim=1, levels=[L]``) so its
tokens per layer equal ours. The 256-bin tokenizer has no training: each action number is one of
256 uniform bins on [-1, 1] (OpenVLA's scheme), at its own bit rate. Writes
``results/bench_tokenizers.json`` and ``.md``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

import rsd_entry
from common.tokenizer.lucidrains import LucidrainsRFSQ
from common.tokenizer.model import ActionRFSQAE
from common.provenance import provenance, write_results
from common.artifacts import results_dir_of
from common.tokenizer.train import TokenizerTrainConfig, evaluate_mse, prepare_chunks, train_tokenizer_model

PROG = "python -m benchmarks.tokenizer.bench_tokenizers"


@dataclass
class BenchConfig:
    """Tokenizer benchmark: naive / robust RFSQ variants, lucidrains' ResidualFSQ and a uniform 256-bin tokenizer."""

    data: str = "synthetic"  # "synthetic" or demo HDF5 file(s), comma-separated
    num_episodes: int = 50  # episodes used (an episode-level train / held-out split)
    epochs: int = 100  # training epochs of every tokenizer
    batch_size: int = 64  # training batch (chunks)
    latent_dim: int = 16  # latent numbers per chunk of the chunk layout
    seed: int = 0  # data split and training seed
    out: str = ""  # "" = $RSD_RESULTS_DIR
    throughput_seconds: float = 2.0  # wall time of each encode + decode throughput loop
    layout_sweep: bool = True  # also train the robust tokenizer at the other layouts / latent sizes


# Robust tokenizer at other layouts / latent sizes: (layout, latent numbers per chunk or per step).
LAYOUT_SWEEP = (("chunk", 8), ("chunk", 16), ("chunk", 32), ("chunk", 56), ("timestep", 4), ("timestep", 16))


class Uniform256Tokenizer:
    """OpenVLA-style: every normalized action number -> one of 256 uniform bins on [-1, 1]."""

    bins = 256

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(((x + 1) / 2 * self.bins).floor(), 0, self.bins - 1).long()

    def decode(self, idx: torch.Tensor) -> torch.Tensor:
        return (idx.float() + 0.5) / self.bins * 2 - 1


def throughput(encode, decode, x: torch.Tensor, seconds: float) -> float:
    """Chunks per second of encode + decode at the batch size of ``x``."""
    with torch.no_grad():
        decode(encode(x))  # warm-up
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            decode(encode(x))
            n += 1
    return n * x.shape[0] / (time.perf_counter() - start)


def run(cfg: BenchConfig) -> dict:
    torch.set_num_threads(1)
    base = TokenizerTrainConfig(
        data=cfg.data, num_episodes=cfg.num_episodes, epochs=cfg.epochs, batch_size=cfg.batch_size,
        latent_dim=cfg.latent_dim, seed=cfg.seed, progress=True,
    )
    data = prepare_chunks(base)
    val = data["val"]
    rows = []
    variants = ["none", "layernorm", "scale", "fixed", "lucidrains"]
    for name in variants:
        tcfg = replace(base, conditioning="none" if name == "lucidrains" else name, layout="chunk")
        model = ActionRFSQAE(chunk_len=tcfg.chunk_len, conditioning=tcfg.resolved_conditioning, layout="chunk", latent_dim=tcfg.latent_dim)
        if name == "lucidrains":
            model.rfsq = LucidrainsRFSQ(dim=model.latent_dim, num_layers=model.num_layers, num_levels=model.num_levels)
        started = time.perf_counter()
        model = train_tokenizer_model(model, data["train"], val, tcfg, desc=f"bench[{name}]")
        train_seconds = time.perf_counter() - started
        model.eval()
        mse = evaluate_mse(model, val)
        x1, x1024 = val[:1], val[:1024]
        rows.append(
            {
                "tokenizer": "lucidrains ResidualFSQ" if name == "lucidrains" else f"RFSQ {name}",
                "mse": mse,
                "tokens_per_chunk": model.tokens_per_layer * model.num_layers,  # all layers
                "bits_per_chunk": model.tokens_per_layer * model.num_layers * math.log2(model.num_levels),
                "chunks_per_s_batch1": throughput(model.encode, model.decode_from_indices, x1, cfg.throughput_seconds),
                "chunks_per_s_batch1024": throughput(model.encode, model.decode_from_indices, x1024, cfg.throughput_seconds),
                "train_seconds": train_seconds,
            }
        )
    uni = Uniform256Tokenizer()
    rows.append(
        {
            "tokenizer": "uniform 256-bin (OpenVLA)",
            "mse": float(((uni.decode(uni.encode(val)) - val) ** 2).mean()),
            "tokens_per_chunk": val.shape[1] * val.shape[2],
            "bits_per_chunk": val.shape[1] * val.shape[2] * 8.0,
            "chunks_per_s_batch1": throughput(uni.encode, uni.decode, val[:1], cfg.throughput_seconds),
            "chunks_per_s_batch1024": throughput(uni.encode, uni.decode, val[:1024], cfg.throughput_seconds),
            "train_seconds": 0.0,
        }
    )
    layout_rows = []
    for layout, latent in LAYOUT_SWEEP if cfg.layout_sweep else ():
        tcfg = replace(base, conditioning="layernorm", layout=layout, latent_dim=latent)
        model = ActionRFSQAE(chunk_len=tcfg.chunk_len, conditioning="layernorm", layout=layout, latent_dim=latent if layout == "chunk" else None, hidden_dim=latent)
        model = train_tokenizer_model(model, data["train"], val, tcfg, desc=f"layout[{layout}/{latent}]")
        layout_rows.append({"layout": layout, "latent": latent, "tokens_per_layer": model.tokens_per_layer, "mse": evaluate_mse(model, val)})
    lucid = next(r["mse"] for r in rows if r["tokenizer"].startswith("lucidrains"))
    robust = next(r["mse"] for r in rows if r["tokenizer"] == "RFSQ layernorm")
    result = {
        "config": asdict(cfg),
        "heldout_chunks": int(val.shape[0]),
        "rows": rows,
        "layout_sweep": layout_rows,
        "robust_over_lucidrains_mse": robust / lucid,
        "goal_robust_at_most_half_of_lucidrains": robust <= 0.5 * lucid,
        "provenance": provenance(seed=cfg.seed, torch_threads=1),
    }
    out = results_dir_of(cfg.out)
    write_results(out, "bench_tokenizers", result, render(result))
    return result


def render(result: dict) -> str:
    lines = [
        f"Held-out chunks: {result['heldout_chunks']} (data: {result['config']['data']}, epochs {result['config']['epochs']}, latent {result['config']['latent_dim']}); CPU, 1 thread.",
        "",
        "| tokenizer | MSE (normalized) | tokens/chunk | bits/chunk | enc+dec chunks/s (batch 1) | enc+dec chunks/s (batch 1024) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['tokenizer']} | {r['mse']:.3e} | {r['tokens_per_chunk']} | {r['bits_per_chunk']:.0f} | "
            f"{r['chunks_per_s_batch1']:.0f} | {r['chunks_per_s_batch1024']:.0f} |"
        )
    if result["layout_sweep"]:
        lines += ["", "Robust RFSQ by token layout (same data and recipe):", "",
                  "| layout | latent | tokens per layer per chunk | MSE |", "|---|---|---|---|"]
    for r in result["layout_sweep"]:
        lines.append(f"| {r['layout']} | {r['latent']}{' per step' if r['layout'] == 'timestep' else ''} | {r['tokens_per_layer']} | {r['mse']:.3e} |")
    lines.append("")
    lines.append(f"robust / lucidrains MSE = {result['robust_over_lucidrains_mse']:.3f} (goal <= 0.5: {'PASS' if result['goal_robust_at_most_half_of_lucidrains'] else 'MISS'})")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    return run(rsd_entry.parse_config(BenchConfig, argv, prog=PROG))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
