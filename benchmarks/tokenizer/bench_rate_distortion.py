"""Rate-distortion study of action tokenizers: held-out MSE against bits and tokens per chunk.

    python -m benchmarks.tokenizer.bench_rate_distortion --epochs 15
        [--scripted data/tokenizer_v2/scripted_libero_object.hdf5] [--human data/tokenizer_v2/human_libero_object.hdf5]

Designs (all 8 layers x 7 levels; every point is "the first k layers", k = 1..8):
- ``timestep/16``: the seed's per-timestep autoencoder (16 numbers per step, 128 tokens per layer);
- ``chunk/16``, ``chunk/32``, ``chunk/56``: a chunk autoencoder with a latent of that size;
- ``dct/56``: the exactly invertible orthonormal DCT over time per action dim (no autoencoder floor);
  ``dct/28``: only the 4 lowest frequencies per dim (the rest is error);
- reach estimators on ``dct/56``: running absmax (default) vs the 0.99 quantile vs 3 std for
  stages >= 1, stage 0 always absmax (clipping-safe);
- naive (``conditioning="none"``) ``chunk/16`` and ``dct/56`` for the robust-vs-naive ratio;
- lucidrains' ``ResidualFSQ`` (``vector-quantize-pytorch``, per-scalar, same levels and layers) on
  ``chunk/16`` (trained) and on ``dct/56`` (nothing to train); full depth only. Skipped with a note
  when the package is missing (``pip install -r requirements-bench.txt``).

Data: scripted-expert demos, human-like demos (``--operator human``, ``common/sim/operator_model.py``)
and noise-free synthetic episodes; an episode-level split, the normalizer fitted on the training side.
Writes ``results/bench_rate_distortion.{json,md,png}``.
"""

from __future__ import annotations

import math
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import rsd_entry
from common.artifacts import results_dir_of
from common.provenance import provenance, write_results
from common.tokenizer.model import ActionRFSQAE
from common.tokenizer.train import TokenizerTrainConfig, prepare_chunks, train_tokenizer_model

PROG = "python -m benchmarks.tokenizer.bench_rate_distortion"


@dataclass
class RateDistortionConfig:
    """Rate-distortion study of action tokenizers: held-out MSE against bits and tokens per chunk."""

    scripted: str = "data/tokenizer_v2/scripted_libero_object.hdf5"  # scripted-expert demos (collect_demos --operator none)
    human: str = "data/tokenizer_v2/human_libero_object.hdf5"  # human-like demos (collect_demos --operator human)
    synthetic_episodes: int = 40  # noise-free synthetic episodes
    epochs: int = 15  # training epochs of the learned layouts
    batch_size: int = 64  # training batch (chunks)
    plain_loop_steps: int = 3000  # the user loop on the human-like set (0 = skip)
    seed: int = 0  # data split and training seed
    out: str = ""  # "" = $RSD_RESULTS_DIR
    tables_only: bool = False  # rebuild the markdown and the plot from the existing JSON, training nothing


# name -> constructor arguments (robust unless "naive" in the name)
DESIGNS: dict[str, dict] = {
    "timestep/16": dict(layout="timestep", hidden_dim=16),
    "chunk/16": dict(layout="chunk", latent_dim=16),
    "chunk/32": dict(layout="chunk", latent_dim=32),
    "chunk/56": dict(layout="chunk", latent_dim=56),
    "dct/56": dict(layout="dct"),
    "dct/28": dict(layout="dct", latent_dim=28),
    "dct/56 reach=quantile": dict(layout="dct", reach="quantile"),
    "dct/56 reach=std": dict(layout="dct", reach="std"),
    "naive chunk/16": dict(layout="chunk", latent_dim=16, conditioning="none"),
    "naive dct/56": dict(layout="dct", conditioning="none"),
}
LUCIDRAINS_ON = ("chunk/16", "dct/56")
DCT_DESIGN = "dct/56"  # the exact layout (ActionRFSQAE(layout="dct")); the default layout is chunk/16


@torch.no_grad()
def mse_per_layer(model: ActionRFSQAE, val: torch.Tensor) -> list[float]:
    model.eval()
    return [float(F.mse_loss(model(val, num_layers=k)[0], val)) for k in range(1, model.num_layers + 1)]


def lucidrains_model(base: dict):
    """The design ``base`` with lucidrains' ResidualFSQ in place of ours, or None when not installed."""
    try:
        from common.tokenizer.lucidrains import LucidrainsRFSQ

        model = ActionRFSQAE(**{**base, "conditioning": "none"})
        model.rfsq = LucidrainsRFSQ(dim=model.latent_dim, num_layers=model.num_layers, num_levels=model.num_levels)
        return model
    except ImportError:
        return None


def plain_user_loop(kwargs: dict, train: torch.Tensor, val: torch.Tensor, *, steps: int, seed: int) -> dict:
    """The loop a user writes: ``recon, _ = model(x); F.mse_loss(recon, x)``, AdamW 1e-3, batch 64, then
    ``model.eval()`` (which calibrates the robust stages itself). A model with nothing to train runs the
    same forward passes without the optimizer. Returns the per-layer held-out MSE and an exactness check."""
    torch.manual_seed(seed)
    model = ActionRFSQAE(**kwargs)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = train[torch.randint(len(train), (64,), generator=gen)]
        recon, _ = model(x)
        loss = F.mse_loss(recon, x)
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        codes = model.encode(val)
        exact = all(torch.equal(model.decode_from_indices(codes[..., :k]), model(val, num_layers=k)[0])
                    for k in range(1, model.num_layers + 1))
    return {"mse_per_layer": mse_per_layer(model, val), "decode_equals_forward_every_prefix": exact,
            "trainable_parameters": sum(p.numel() for p in params)}


def fit(model: ActionRFSQAE, data: dict, tcfg: TokenizerTrainConfig, desc: str) -> ActionRFSQAE:
    if any(p.requires_grad for p in model.parameters()):
        return train_tokenizer_model(model, data["train"], data["val"], tcfg, desc=desc)
    model.calibrate(data["train"])
    return model.eval()


def run(cfg: RateDistortionConfig) -> dict:
    if cfg.tables_only:
        out = results_dir_of(cfg.out)
        path = out / "bench_rate_distortion.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: --tables-only needs an earlier full run's JSON; run without --tables-only first")
        result = json.loads(path.read_text())
        (out / "bench_rate_distortion.md").write_text(render(result) + "\n")
        plot(result, out / "bench_rate_distortion.png")
        return result
    torch.set_num_threads(1)
    datasets = {"scripted": cfg.scripted, "human-like": cfg.human, "synthetic": "synthetic"}
    results: dict[str, dict] = {}
    notes: list[str] = []
    for dname, source in datasets.items():
        if source != "synthetic" and not Path(source).exists():
            raise FileNotFoundError(
                f"--{'human' if dname == 'human-like' else 'scripted'} {source}: no such demo file; collect it with "
                f"python -m phase1_improved.collect_demos --suite libero_object --tasks 0-4 --demos-per-task 8 "
                f"--operator {'human' if dname == 'human-like' else 'none'} --out {Path(source).relative_to('data') if source.startswith('data/') else source}"
            )
        tcfg = TokenizerTrainConfig(data=source, num_episodes=cfg.synthetic_episodes if source == "synthetic" else 10**6,
                                    epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, progress=False)
        data = prepare_chunks(tcfg)
        rows = {}
        for name, kwargs in DESIGNS.items():
            torch.manual_seed(cfg.seed)
            started = time.perf_counter()
            model = fit(ActionRFSQAE(**kwargs), data, replace(tcfg, conditioning=kwargs.get("conditioning", "layernorm")), f"{dname}:{name}")
            rows[name] = _row(model, data["val"], time.perf_counter() - started)
            print(f"{dname:10s} {name:24s} mse@8 {rows[name]['mse_per_layer'][-1]:.3e}  ({rows[name]['fit_seconds']:.1f} s)")
        for name in LUCIDRAINS_ON:
            model = lucidrains_model(DESIGNS[name])
            if model is None:
                note = "lucidrains ResidualFSQ skipped: vector_quantize_pytorch is not installed (pip install -r requirements-bench.txt)"
                print(note)
                notes.append(note) if note not in notes else None
                continue
            torch.manual_seed(cfg.seed)
            started = time.perf_counter()
            model = fit(model, data, replace(tcfg, conditioning="none"), f"{dname}:lucidrains {name}")
            with torch.no_grad():
                mse = float(F.mse_loss(model(data["val"])[0], data["val"]))
            rows[f"lucidrains {name}"] = {**_row_shape(model), "mse_per_layer": [None] * (model.num_layers - 1) + [mse],
                                          "fit_seconds": time.perf_counter() - started}
        results[dname] = {"train_chunks": int(len(data["train"])), "val_chunks": int(len(data["val"])), "rows": rows}
    plain = {}
    if cfg.plain_loop_steps:
        tcfg = TokenizerTrainConfig(data=cfg.human, num_episodes=10**6, seed=cfg.seed, progress=False)
        data = prepare_chunks(tcfg)
        for name in ("chunk/16", "dct/56"):
            for conditioning in ("none", "layernorm"):
                key = f"{name} {conditioning}"
                plain[key] = plain_user_loop({**DESIGNS[name], "conditioning": conditioning}, data["train"], data["val"],
                                             steps=cfg.plain_loop_steps, seed=cfg.seed)
                print(f"plain loop {key}: mse@8 {plain[key]['mse_per_layer'][-1]:.3e}")
    result = {"config": asdict(cfg), "datasets": results, "plain_loop_human_like": plain, "notes": notes,
              "provenance": provenance(seed=cfg.seed, torch_threads=1)}
    out = results_dir_of(cfg.out)
    write_results(out, "bench_rate_distortion", result, render(result))
    plot(result, out / "bench_rate_distortion.png")
    return result


def _row_shape(model) -> dict:
    return {"tokens_per_layer": model.tokens_per_layer, "num_layers": model.num_layers,
            "bits_per_token": math.log2(model.num_levels)}


def _row(model: ActionRFSQAE, val: torch.Tensor, seconds: float) -> dict:
    mses = mse_per_layer(model, val)
    return {**_row_shape(model), "mse_per_layer": mses, "fit_seconds": seconds,
            "min_ratio_per_added_layer": min(mses[i - 1] / max(mses[i], 1e-30) for i in range(1, len(mses)))}


def render(result: dict) -> str:
    lines = [
        f"Held-out MSE (normalized actions) after k of 8 layers, 7 levels ({math.log2(7):.2f} bits per token); "
        f"learned layouts trained {result['config']['epochs']} epochs, batch {result['config']['batch_size']}. "
        "`ratio` = smallest MSE drop factor of an added layer; `robust/naive` = 8-layer MSE over that of the naive design of the same layout.",
        "",
    ]
    for dname, d in result["datasets"].items():
        lines += [f"**{dname}** ({d['train_chunks']} train / {d['val_chunks']} held-out chunks)", "",
                  "| design | tokens/layer | tokens/chunk (8 layers) | bits/chunk | MSE k=1 | k=2 | k=3 | k=4 | k=8 | ratio | robust/naive |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in d["rows"].items():
            m = r["mse_per_layer"]
            tokens = r["tokens_per_layer"] * r["num_layers"]
            cells = [f"{v:.2e}" if v is not None else "—" for v in (m[0], m[1], m[2], m[3], m[-1])]
            ratio = f"{r['min_ratio_per_added_layer']:.1f}x" if "min_ratio_per_added_layer" in r else "—"
            naive_name = ("naive " + name.split(" ")[0]) if not name.startswith(("naive", "lucidrains")) else None
            naive = d["rows"].get(naive_name) if naive_name else None
            vs = f"{m[-1] / naive['mse_per_layer'][-1]:.1e}" if naive else "—"
            lines.append(f"| {name} | {r['tokens_per_layer']} | {tokens} | {tokens * r['bits_per_token']:.0f} | " + " | ".join(cells) + f" | {ratio} | {vs} |")
        lines.append("")
    lines += [f"The exact DCT tokenizer (`{DCT_DESIGN}`): held-out MSE after k layers, and the factor each added layer cuts it by", "",
              "| data | " + " | ".join(f"k={k}" for k in range(1, 9)) + " |", "|---|" + "---|" * 8]
    for dname, d in result["datasets"].items():
        m = d["rows"][DCT_DESIGN]["mse_per_layer"]
        cells = [f"{m[0]:.2e}"] + [f"{m[k]:.2e} ({m[k - 1] / max(m[k], 1e-30):.0f}x)" for k in range(1, len(m))]
        lines.append(f"| {dname} | " + " | ".join(cells) + " |")
    lines.append("")
    plain = result.get("plain_loop_human_like") or {}
    if plain:
        lines += [f"A user's plain loop on the human-like set ({result['config']['plain_loop_steps']} steps of "
                  "`recon, _ = model(x); F.mse_loss(recon, x)`, AdamW 1e-3, batch 64, then `model.eval()`; "
                  "the DCT layout has no parameters, so its loop is the forward passes only):", "",
                  "| tokenizer | MSE k=1 | k=2 | k=3 | k=8 | robust/naive (k=8) | decode == forward, every prefix |", "|---|---|---|---|---|---|---|"]
        for key, r in plain.items():
            m = r["mse_per_layer"]
            naive = plain.get(key.replace("layernorm", "none")) if key.endswith("layernorm") else None
            ratio = f"{m[-1] / naive['mse_per_layer'][-1]:.1e}" if naive else "—"
            lines.append(f"| {key} | {m[0]:.2e} | {m[1]:.2e} | {m[2]:.2e} | {m[-1]:.2e} | {ratio} | {'yes' if r['decode_equals_forward_every_prefix'] else 'NO'} |")
        lines.append("")
    lines += [f"Note: {n}" for n in result["notes"]]
    return "\n".join(lines).rstrip()


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    names = list(next(iter(result["datasets"].values()))["rows"])
    fig, axes = plt.subplots(2, len(result["datasets"]), figsize=(5 * len(result["datasets"]), 8), squeeze=False)
    for col, (dname, d) in enumerate(result["datasets"].items()):
        for row, unit in enumerate(("bits", "tokens")):
            ax = axes[row][col]
            for i, name in enumerate(names):
                r = d["rows"][name]
                ks = [k for k, v in enumerate(r["mse_per_layer"], 1) if v is not None]
                per = r["tokens_per_layer"] * (r["bits_per_token"] if unit == "bits" else 1)
                xs = [k * per for k in ks]
                ys = [max(r["mse_per_layer"][k - 1], 1e-16) for k in ks]
                ax.plot(xs, ys, marker="o" if len(xs) > 1 else "*", ms=4 if len(xs) > 1 else 10,
                        ls="--" if name.startswith(("naive", "lucidrains")) else "-", label=name, color=f"C{i % 10}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"{unit} per chunk")
            ax.set_ylabel("held-out MSE")
            ax.set_title(f"{dname}: MSE vs {unit} per chunk")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str]) -> dict:
    return run(rsd_entry.parse_config(RateDistortionConfig, argv, prog=PROG))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
