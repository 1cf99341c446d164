"""Can the main model be taught to agree with its draft? Fine-tune the head toward the frozen draft's
tokens and measure acceptance, action error and the speedup.

    python -m benchmarks.decoding.draftable_main --models-dir DIR [--bundle CL.pt] --weights 0,3,10,30 --epochs 4 --lr 5e-5 --out DIR

Issue 13 leaves one lever beyond draft engineering: a main model whose coarse layers a cheap draft
predicts whole. This probes its direct form. Copies of a trained Phase 2 head (backbone frozen) are
fine-tuned with the head's own Phase 2 loss (the recipe stored in its checkpoint) plus w x the
cross-entropy of its verify pass toward the frozen draft's tokens: rows 0..K-1 given the draft's
proposed layers as the prefix, exactly what exact acceptance compares. One copy per weight w; w = 0
is the same fine-tuning without the term (the control). Per head: held-out action MSE at the decoded
depth with the head's decode rule (what Phase 2's decode choice measures), the draft's acceptance on
the held-out demo states, and with ``--bundle`` (closed-loop states of the original policy, recorded by
``decode_trained_graphs export --states``) the acceptance, c, v, formula and measured S and the lossless
count on those states (``common.decoding.measure.measure_speculation``). The states come from the original
policy's rollouts, not the fine-tuned one's, and no closed-loop success is measured: this is an offline
probe. Writes draftable_main.json / .md / .png.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import rsd_entry
from common.artifacts import policy_paths
from common.checkpoints import read_checkpoint
from common.data.episodes import split_episodes
from common.decoding.measure import load_bundle, measure_speculation
from common.decoding.timing import device_label
from common.policy.config import PolicyTrainConfig
from common.policy.decode_choice import action_errors_by_depth
from common.policy.head import RFSQHead
from common.policy.labels import batches, build_split, load_policy_episodes
from common.policy.losses import MainLoss
from common.policy.metrics import compute_features, draft_main_agreement
from common.policy.model import HEAD_KIND, load_policy
from common.provenance import REPO_ROOT, portable_path, provenance, write_results
from common.tokenizer.model import load_tokenizer

PROG = "python -m benchmarks.decoding.draftable_main"


@torch.no_grad()
def draft_rows(draft, features: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """The frozen draft's proposed layers for every state, as rows [N, K, T]."""
    return torch.cat([draft.propose_rows(features[sl]) for sl in batches(len(features), batch_size)])


def agreement_loss(head: RFSQHead, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the verify pass's rows 0..K-1 (each given the draft's coarser rows) toward the draft's tokens."""
    logits = head.verify_logits(features, rows)[:, : rows.shape[1]]  # [B, K, T, V]
    return F.cross_entropy(logits.reshape(-1, head.num_levels), rows.reshape(-1))


def finetune(head: RFSQHead, main_loss: MainLoss, features: torch.Tensor, codes: torch.Tensor, rows: torch.Tensor, *, weight: float,
             epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int, label: str = "") -> RFSQHead:
    """Fine-tune ``head`` in place: its Phase 2 loss + ``weight`` x ``agreement_loss``; returns it in eval mode."""
    if weight < 0:
        raise ValueError(f"weight: expected >= 0, found {weight}")
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(features) // batch_size)
    with tqdm(total=steps, desc=f"fine-tune {label}".strip(), unit="step", leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(features), generator=generator)
            for i in range(0, len(features), batch_size):
                idx = order[i : i + batch_size]
                loss = main_loss(features[idx], codes[idx].long())
                if weight:
                    loss = loss + weight * agreement_loss(head, features[idx], rows[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update()
    return head.eval()


def run(models_dir: Path, *, weights: list[float], epochs: int, lr: float, batch_size: int = 128, seed: int = 0,
        bundle: Path | None = None, repeats: int = 3, chunks: int = 200) -> dict:
    paths = policy_paths(models_dir, models_dir, "")
    head_ckpt = read_checkpoint(paths["head"], kind=HEAD_KIND)
    cfg = PolicyTrainConfig(**head_ckpt["extra"]["train_config"])
    tok = load_tokenizer(Path(head_ckpt["extra"]["tokenizer_path"]))
    loaded = load_policy(paths["head"], paths["draft"], tok)
    if loaded.draft is None:
        raise FileNotFoundError(f"{paths['draft']}: expected the draft distilled for {paths['head']}, found none")
    policy, draft = loaded.policy.float().eval(), loaded.draft.float().eval()
    choice = loaded.head_metrics.get("decode_choice", {})
    L, rule = int(choice.get("layers", policy.head.num_layers)), choice.get("rule", "argmax")
    states = None
    if bundle is not None:
        _, _, states, content = load_bundle(bundle, torch.device("cpu"), torch.float32)
        if content["head_hash"] != loaded.head_hash:
            raise ValueError(f"{bundle}: expected states recorded with head {loaded.head_hash} ({paths['head']}), found head {content['head_hash']}")

    # the held-out split exactly as Phase 2 drew it (same episodes, seed and fraction)
    episodes, _ = load_policy_episodes(cfg.data_paths, num_episodes=cfg.num_episodes)
    train_eps, val_eps = split_episodes(episodes, val_fraction=cfg.val_fraction, seed=cfg.seed)
    split = dict(backbone=cfg.backbone, data_paths=cfg.data_paths, feature_cache_paths=cfg.feature_cache_paths)
    train, val = build_split(tok, train_eps, **split), build_split(tok, val_eps, **split)
    recorded = head_ckpt["metrics"].get("val_episode_keys")
    if recorded is not None and sorted(val.episodes) != sorted(recorded):
        raise ValueError(f"{paths['head']}: its held-out episodes are not the ones this split draws from {cfg.data_paths} "
                         f"(expected {len(recorded)} recorded keys, found {len(val.episodes)} others); has the demo file changed?")
    cpu = torch.device("cpu")
    train_f, val_f = compute_features(policy, train, device=cpu), compute_features(policy, val, device=cpu)
    rows = draft_rows(draft, train_f)

    def measure(label: str, weight: float | None, head: RFSQHead) -> dict:
        errors = action_errors_by_depth(head, val_f, val.codes, tok.model)
        held = draft_main_agreement(head, draft, val_f, device=cpu)
        row = {"head": label, "weight": weight, "val_action_mse": errors[rule][L - 1],
               "held_out_mean_accepted": held["mean_accepted_layers"], "held_out_accepted_distribution": held["accepted_layers_distribution"],
               "held_out_agreement_per_layer": held["agreement_per_layer"]}
        if states is not None:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # decode timing as Phase 3 runs it: batch 1, one thread
            timed = measure_speculation(head, [(label, draft)], states, L, repeats=repeats, chunks=chunks)
            torch.set_num_threads(threads)
            row.update({k: v for k, v in timed["drafts"][0].items() if k != "draft"})
            row.update({k: timed[k] for k in ("main_only_ms_per_chunk", "chunks_timed", "chunks_checked")})
        return row

    results = [measure("trained (no fine-tuning)", None, policy.head)]
    for w in weights:
        head = copy.deepcopy(policy.head)
        loss = MainLoss.for_training(head, tok.model, train.codes, own_prefix_prob=cfg.own_prefix_prob,
                                     expected_value_weight=cfg.expected_value_weight, seed=seed + 11, device=cpu)
        finetune(head, loss, train_f, train.codes, rows, weight=w, epochs=epochs, lr=lr, weight_decay=cfg.weight_decay,
                 batch_size=batch_size, seed=seed, label=f"w={w:g}")
        results.append(measure(f"fine-tuned, w = {w:g}", w, head))
    base = results[0]["val_action_mse"]
    for r in results:
        r["val_action_mse_change"] = r["val_action_mse"] / base - 1
    return {
        "models_dir": str(models_dir), "head": str(paths["head"]), "head_hash": loaded.head_hash, "draft_hash": loaded.draft_hash,
        "decoded_layers": L, "decode_rule": rule, "drafted_layers": draft.coarse_layers, "bundle": None if bundle is None else str(bundle),
        "states": None if bundle is None else content["states"], "train_steps": len(train_f), "val_steps": len(val_f),
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "repeats": repeats, "chunks": chunks,
        "device_name": device_label(cpu, 1), "heads": results,
    }


def markdown(r: dict) -> str:
    closed = r["bundle"] is not None
    lines = [
        f"Head `{Path(r['head']).name}` ({portable_path(r['models_dir'])}) decoding L = {r['decoded_layers']} layers ({r['decode_rule']}), its draft proposing "
        f"K = {r['drafted_layers']}; each fine-tuned copy: {r['epochs']} epochs over {r['train_steps']} training steps, lr {r['lr']:g}, "
        f"the head's Phase 2 loss + w x cross-entropy of its verify rows toward the draft's tokens (backbone and draft frozen). "
        f"Held-out: {r['val_steps']} demo steps of the Phase 2 split."
        + (f" Closed loop: {r['states']} (the ORIGINAL policy's states), {r['heads'][0]['chunks_timed']} chunks timed x {r['repeats']} repeats on "
           f"{r['device_name']}, float32, batch 1; S measured = mean main-only / mean speculative time." if closed else ""),
        "",
    ]
    head = "| head | held-out action MSE (change) | held-out a | held-out accepted 0..K (%) |"
    rule = "|---|---|---|---|"
    if closed:
        head += " closed-loop a | c | v | S formula | S measured | ms / chunk (spec / main-only) | identical |"
        rule += "---|---|---|---|---|---|---|"
    lines += [head, rule]
    for h in r["heads"]:
        dist = " / ".join(f"{100 * p:.0f}" for p in h["held_out_accepted_distribution"])
        line = (f"| {h['head']} | {h['val_action_mse']:.5f} ({100 * h['val_action_mse_change']:+.0f}%) | "
                f"{h['held_out_mean_accepted']:.2f} of {r['drafted_layers']} | {dist} |")
        if closed:
            line += (f" {h['mean_accepted_layers']:.2f} | {h['c']:.2f} | {h['v']:.2f} | {h['speedup_formula']:.2f}x | {h['speedup_measured']:.2f}x | "
                     f"{h['speculative_ms_per_chunk']:.3f} / {h['main_only_ms_per_chunk']:.3f} | {h['identical_to_main_only']} / {h['chunks_checked']} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    """Accepted layers against held-out action MSE, one point per head (the trade-off the weight buys)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    mse = [100 * h["val_action_mse_change"] for h in r["heads"]]
    ax.plot(mse, [h["held_out_mean_accepted"] for h in r["heads"]], "o", label="held-out demo states")
    if r["bundle"] is not None:
        ax.plot(mse, [h["mean_accepted_layers"] for h in r["heads"]], "s", label="closed-loop states")
    for h, x in zip(r["heads"], mse):
        ax.annotate("trained" if h["weight"] is None else f"w={h['weight']:g}", (x, h["held_out_mean_accepted"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"held-out action MSE at depth {r['decoded_layers']}: change from the trained head (%)")
    ax.set_ylabel(f"mean accepted layers a (of {r['drafted_layers']})")
    ax.margins(x=0.12)
    ax.set_title("main fine-tuned toward its draft: acceptance vs action error", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class DraftableMainConfig:
    """Can the main model be taught to agree with its draft? Fine-tune the head toward the frozen draft's tokens."""

    models_dir: str = ""  # Phase 2 folder with best_rfsq_head.pt and the draft distilled for it (required)
    bundle: str = ""  # decode_trained_graphs export's bundle of closed-loop states for that head ("" = none)
    weights: str = "0,3,10,30"  # comma-separated weights w of the agreement term, one fine-tuned copy each
    epochs: int = 4  # fine-tuning epochs per copy
    lr: float = 5e-5  # AdamW learning rate of the fine-tuning
    batch_size: int = 128  # fine-tuning batch (steps)
    seed: int = 0  # fine-tuning seed
    repeats: int = 3  # timed repeats per closed-loop chunk
    chunks: int = 200  # closed-loop chunks timed, evenly spaced (0 = all); all are checked for losslessness
    threads: int = 2  # torch CPU threads for fine-tuning (decode timing always runs on one)
    out: str = ""  # output folder ("" = results/phase3_diagnostics/draftable_main)

    def __post_init__(self) -> None:
        if not self.models_dir:
            raise ValueError("--models-dir: expected the Phase 2 models folder, found none")
        try:
            weights = self.weight_list
        except ValueError:
            raise ValueError(f"--weights: expected comma-separated numbers, found {self.weights!r}") from None
        if not weights:
            raise ValueError("--weights: expected at least one weight")

    @property
    def weight_list(self) -> list[float]:
        """``--weights`` as numbers."""
        return [float(w) for w in self.weights.split(",") if w.strip()]


def main(argv: list[str]) -> dict:
    cfg = rsd_entry.parse_config(DraftableMainConfig, argv, prog=PROG)
    torch.set_num_threads(cfg.threads)
    result = run(Path(cfg.models_dir), weights=cfg.weight_list, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                 bundle=Path(cfg.bundle) if cfg.bundle else None, repeats=cfg.repeats, chunks=cfg.chunks)
    result["provenance"] = provenance(seed=cfg.seed)
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "phase3_diagnostics" / "draftable_main"
    write_results(out, "draftable_main", result, markdown(result))
    plot(result, out / "draftable_main.png")
    return result


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
