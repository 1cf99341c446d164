"""What each RFSQ layer really does, measured on held-out chunks.

Per stage: the raw residual std entering it (before any conditioning), the reconstruction MSE after
the first k stages, how many of the levels it uses, the perplexity of its indices, and a *dead*
flag (one index more than 95% of the time: the stage carries almost no information).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.tokenizer.model import ActionRFSQAE, LoadedTokenizer

DEAD_THRESHOLD = 0.95


@torch.no_grad()
def tokenizer_diagnostics(model: ActionRFSQAE, chunks: torch.Tensor) -> dict[str, Any]:
    """``chunks``: normalized held-out actions ``[N, chunk, 7]``. The model is put in eval mode."""
    model.eval()
    _, residuals, codes = model.latent_and_residuals(chunks)
    layers = []
    for k in range(model.num_layers):
        idx = codes[..., k].reshape(-1)
        counts = torch.bincount(idx, minlength=model.num_levels).double()
        probs = counts / counts.sum()
        nz = probs[probs > 0]
        recon, _ = model(chunks, num_layers=k + 1)
        layers.append(
            {
                "layer": k,
                "residual_std": float(residuals[k].std(dim=0).mean()),
                "mse_after": float(F.mse_loss(recon, chunks)),
                "levels_used": int((counts > 0).sum()),
                "perplexity": float(torch.exp(-(nz * nz.log()).sum())),
                "top_index_fraction": float(probs.max()),
                "dead": bool(probs.max() > DEAD_THRESHOLD),
            }
        )
    mses = [layer["mse_after"] for layer in layers]
    ratios = [mses[i - 1] / max(mses[i], 1e-30) for i in range(1, len(mses))]
    return {
        "conditioning": model.conditioning,
        "layout": model.layout,
        "tokens_per_layer": model.tokens_per_layer,
        "num_chunks": int(chunks.shape[0]),
        "mse": mses[-1],
        "layers": layers,
        "mse_ratio_per_added_layer": ratios,
        "min_ratio_per_added_layer": min(ratios) if ratios else None,
        "dead_layers": [layer["layer"] for layer in layers if layer["dead"]],
    }


def diagnostics_table(results: dict[str, dict]) -> str:
    """Markdown table, one row per layer, two column groups per tokenizer."""
    names = list(results)
    head = "| layer | " + " | ".join(f"{n}: residual std | {n}: MSE after k | {n}: perplexity | {n}: dead" for n in names) + " |"
    sep = "|---|" + "---|---|---|---|" * len(names)
    rows = [head, sep]
    num_layers = max(len(r["layers"]) for r in results.values())
    for k in range(num_layers):
        cells = []
        for n in names:
            layer = results[n]["layers"][k]
            cells += [f"{layer['residual_std']:.3g}", f"{layer['mse_after']:.3e}", f"{layer['perplexity']:.2f}", "yes" if layer["dead"] else "no"]
        rows.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_diagnostics(results: dict[str, dict], path: str | Path, *, title: str = "") -> Path:
    """Residual std per layer and MSE vs number of layers, every tokenizer on the same axes."""
    import matplotlib.pyplot as plt

    fig, (ax_std, ax_mse) = plt.subplots(1, 2, figsize=(10, 4))
    for name, res in results.items():
        ks = np.arange(1, len(res["layers"]) + 1)
        ax_std.semilogy(ks, [max(l["residual_std"], 1e-12) for l in res["layers"]], marker="o", label=name)
        ax_mse.semilogy(ks, [max(l["mse_after"], 1e-14) for l in res["layers"]], marker="o", label=name)
    ax_std.set(xlabel="RFSQ layer", ylabel="raw residual std entering the layer", title="Residual entering each layer")
    ax_mse.set(xlabel="layers used (k)", ylabel="reconstruction MSE (normalized actions)", title="MSE after k layers")
    for ax in (ax_std, ax_mse):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- naive vs robust comparison (the seed's test_layernorm_improvement) ------------------------------
SEED_CRITERIA = {"robust_mse_below": 0.012, "improvement_above_pct": 30.0}
RSD_GOALS = {"robust_mse_at_most": 1e-4, "improvement_at_least_pct": 90.0, "min_ratio_per_added_layer": 1.5}


def heldout_raw_chunks(tokenizer: LoadedTokenizer, *, data: str | None = None) -> tuple[np.ndarray, dict]:
    """Raw held-out chunks for a trained tokenizer: the validation episodes of its own training run
    (same data source, episode count and split seed, read from the checkpoint)."""
    from common.data.episodes import load_episodes, make_chunks, split_episodes

    train_cfg = tokenizer.extra.get("train_config")
    if not train_cfg:
        raise ValueError(f"{tokenizer.path}: checkpoint records no train_config; cannot rebuild its held-out split")
    source = data or train_cfg["data"]
    episodes = load_episodes(source, num_episodes=train_cfg["num_episodes"], seed=train_cfg["seed"])
    _, val = split_episodes(episodes, val_fraction=train_cfg["val_fraction"], seed=train_cfg["seed"])
    raw = make_chunks(val, chunk_len=tokenizer.model.chunk_len, stride=1)
    return raw, {"data": source, "val_episodes": [e.name for e in val], "num_chunks": int(raw.shape[0])}


def heldout_chunks(tokenizer: LoadedTokenizer, *, data: str | None = None) -> tuple[torch.Tensor, dict]:
    """Normalized held-out chunks (see ``heldout_raw_chunks``)."""
    raw, info = heldout_raw_chunks(tokenizer, data=data)
    return torch.from_numpy(tokenizer.normalizer.normalize(raw)), info


def compare_tokenizers(naive: LoadedTokenizer, robust: LoadedTokenizer, *, data: str | None = None) -> dict[str, Any]:
    """Diagnostics of both on the robust run's held-out episodes, plus the seed's and our verdicts."""
    chunks_r, info = heldout_chunks(robust, data=data)
    chunks_n, info_n = heldout_chunks(naive, data=data)
    if info_n["val_episodes"] != info["val_episodes"]:
        raise ValueError(
            "naive and robust tokenizers were trained on different data/splits "
            f"({naive.path} vs {robust.path}); retrain both with the same --data/--num-episodes/--seed"
        )
    diag = {"naive": tokenizer_diagnostics(naive.model, chunks_n), "robust": tokenizer_diagnostics(robust.model, chunks_r)}
    mse_n, mse_r = diag["naive"]["mse"], diag["robust"]["mse"]
    improvement = 100.0 * (mse_n - mse_r) / mse_n
    ratio = diag["robust"]["min_ratio_per_added_layer"]
    return {
        "heldout": info,
        "naive_mse": mse_n,
        "robust_mse": mse_r,
        "improvement_pct": improvement,
        "seed_criteria": {
            "robust_mse_below_0.012": mse_r < SEED_CRITERIA["robust_mse_below"],
            "improvement_above_30pct": improvement > SEED_CRITERIA["improvement_above_pct"],
        },
        "rsd_goals": {
            "robust_mse_at_most_1e-4": mse_r <= RSD_GOALS["robust_mse_at_most"],
            "improvement_at_least_90pct": improvement >= RSD_GOALS["improvement_at_least_pct"],
            "every_added_layer_cuts_mse_1.5x": ratio is not None and ratio >= RSD_GOALS["min_ratio_per_added_layer"],
        },
        "checkpoints": {
            "naive": {"path": str(naive.path), "content_hash": naive.content_hash},
            "robust": {"path": str(robust.path), "content_hash": robust.content_hash},
        },
        "diagnostics": diag,
    }


# --- fine-motion segments -------------------------------------------------------------------------
FINE_MOTION_QUANTILE = 0.3


def fine_motion_mask(raw_chunks: np.ndarray, *, quantile: float = FINE_MOTION_QUANTILE) -> np.ndarray:
    """Chunks of slow, precise motion: the slowest ``quantile`` by mean translation command (the
    approach / grasp / release phases), plus every chunk in which the gripper toggles."""
    speed = np.abs(raw_chunks[..., :3]).mean(axis=(1, 2))
    slow = speed <= np.quantile(speed, quantile)
    toggles = (np.sign(raw_chunks[..., 6]) != np.sign(raw_chunks[:, :1, 6])).any(axis=1)
    return slow | toggles


@torch.no_grad()
def fine_motion_mse(tokenizer: LoadedTokenizer, raw_chunks: np.ndarray) -> dict[str, float]:
    """Reconstruction MSE (normalized units) of a tokenizer on all vs fine-motion chunks."""
    mask = fine_motion_mask(raw_chunks)
    x = torch.from_numpy(tokenizer.normalizer.normalize(raw_chunks))
    recon, _ = tokenizer.model.eval()(x)
    per_chunk = ((recon - x) ** 2).mean(dim=(1, 2)).numpy()
    return {
        "all_mse": float(per_chunk.mean()),
        "fine_motion_mse": float(per_chunk[mask].mean()),
        "fine_motion_chunks": int(mask.sum()),
        "chunks": int(mask.size),
    }
