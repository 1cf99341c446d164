"""The policy's action-space error on held-out demo chunks, per decoded prefix depth, next to its token
accuracy and the tokenizer's own error at the same depth (token accuracy alone misleads: a wrong
fine-layer token can cost nothing, a wrong coarse one a lot).

    python -m benchmarks.diagnostics.policy_action_error --models-dir MODELS [--tag ""|naive] [--out DIR]

Reads the head checkpoint ``best_rfsq_head{_tag}.pt`` and its tokenizer, the held-out episodes the
head recorded (``val_episode_keys``) from the demo files it was trained on, decodes every held-out
step's chunk main-only greedy, and reports per depth k (layers decoded):
  policy MSE     decoded actions (first k greedy layers) vs the demo chunk, normalized action units;
  tokenizer MSE  the demo chunk encoded and decoded from its own first k layers (the floor at k);
  token accuracy of the greedy layer k-1 against the demo's tokens.
Writes ``policy_action_error{_tag}.json`` / ``.md`` to ``--out`` (default ``results/phase3_diagnostics``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import rsd_entry
from common.artifacts import policy_paths
from common.checkpoints import read_checkpoint
from common.data.episodes import future_chunks
from common.policy.labels import build_split, load_policy_episodes
from common.policy.metrics import compute_features, greedy_codes
from common.policy.model import HEAD_KIND, load_policy
from common.provenance import REPO_ROOT, provenance, write_results
from common.tokenizer.model import load_tokenizer
from common.tokenizer.token_code import TokenCode

PROG = "python -m benchmarks.diagnostics.policy_action_error"


@torch.no_grad()
def measure(models_dir: Path, tag: str) -> dict:
    head_path = policy_paths(models_dir, models_dir, tag)["head"]
    ckpt = read_checkpoint(head_path, kind=HEAD_KIND)
    train_cfg, keys = ckpt["extra"]["train_config"], ckpt["metrics"].get("val_episode_keys")
    if not keys:
        raise ValueError(f"{head_path}: no val_episode_keys in its metrics (retrain Phase 2 with this code)")
    tokenizer = load_tokenizer(ckpt["extra"]["tokenizer_path"])
    policy = load_policy(head_path, None, tokenizer)
    data_paths = [p.strip() for p in train_cfg["data"].split(",") if p.strip()]
    chosen, _ = load_policy_episodes(data_paths)
    held_out = [c for c in chosen if c["key"] in set(keys)]
    if train_cfg.get("backbone", "state") != "state":
        raise ValueError(f"{head_path}: this diagnostic runs the state backbone; found {train_cfg.get('backbone')!r}")
    split = build_split(tokenizer, held_out, backbone="state", data_paths=data_paths, feature_cache_paths=[])
    cpu = torch.device("cpu")
    feats = compute_features(policy.policy, split, device=cpu)
    greedy = greedy_codes(policy.head, feats, device=cpu).long()  # [N, T, L]
    truth = split.codes.long()  # the demo chunks' tokens
    model = tokenizer.model
    # the demo chunks themselves (normalized), in the order of the labels: the chunk starting at every step
    demo = torch.from_numpy(np.concatenate([tokenizer.normalizer.normalize(future_chunks(c["episode"].actions, chunk_len=model.chunk_len))
                                            for c in held_out]))
    # logits of every layer given the greedy prefix before it = the logits greedy decoding read (one pass)
    greedy_logits = torch.cat([policy.head(feats[s : s + 2048], greedy[s : s + 2048]) for s in range(0, len(feats), 2048)])
    code = TokenCode(model)
    rows = []
    for k in range(1, model.num_layers + 1):
        policy_actions = model.decode_from_indices(greedy[..., :k])
        expected_actions = code.decode_expected(greedy[..., : k - 1], torch.softmax(greedy_logits[:, k - 1].double(), -1))
        tokenizer_actions = model.decode_from_indices(truth[..., :k])
        rows.append({
            "depth": k,
            "policy_mse": float(((policy_actions - demo) ** 2).mean()),
            "policy_mse_expected_last": float(((expected_actions - demo) ** 2).mean()),
            "tokenizer_mse": float(((tokenizer_actions - demo) ** 2).mean()),
            "greedy_token_acc_of_layer": float((greedy[..., k - 1] == truth[..., k - 1]).double().mean()),
        })
    return {"head": str(head_path), "tokenizer": str(tokenizer.path), "conditioning": model.conditioning,
            "held_out_episodes": len(held_out), "held_out_chunks": int(len(demo)),
            "rows": rows}


def markdown(result: dict) -> str:
    lines = [
        f"Held-out: {result['held_out_chunks']} chunks of {result['held_out_episodes']} episodes; head `{Path(result['head']).name}` "
        f"({result['conditioning']} tokens). MSE in normalized action units; main-only greedy decoding.",
        "",
        "| layers decoded k | policy MSE (argmax) | policy MSE (layer k by its expected value) | tokenizer MSE at k | policy / tokenizer | greedy token accuracy of layer k-1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['depth']} | {r['policy_mse']:.3e} | {r['policy_mse_expected_last']:.3e} | {r['tokenizer_mse']:.3e} | "
                     f"{r['policy_mse'] / r['tokenizer_mse']:.1f}x | {100 * r['greedy_token_acc_of_layer']:.1f}% |")
    best = min(result["rows"], key=lambda r: r["policy_mse"])
    best_ev = min(result["rows"], key=lambda r: r["policy_mse_expected_last"])
    lines += ["", f"Lowest policy MSE: argmax at k = {best['depth']} ({best['policy_mse']:.3e}); "
                  f"expected-value last layer at k = {best_ev['depth']} ({best_ev['policy_mse_expected_last']:.3e})."]
    return "\n".join(lines) + "\n"


@dataclass
class PolicyActionErrorConfig:
    """The policy's action-space error on held-out demo chunks, per decoded prefix depth, next to its token accuracy."""

    models_dir: str = ""  # folder with the Phase 2 head and its tokenizer (required)
    tag: str = ""  # head suffix: "" (robust tokens) or "naive"
    out: str = ""  # output folder ("" = results/phase3_diagnostics)
    print_only: bool = False  # print the table, write nothing

    def __post_init__(self) -> None:
        if not self.models_dir:
            raise ValueError("--models-dir: expected the Phase 2 models folder, found none")


def main(argv: list[str]) -> None:
    cfg = rsd_entry.parse_config(PolicyActionErrorConfig, argv, prog=PROG)
    rsd_entry.setup_process(torch_threads=1)
    result = measure(Path(cfg.models_dir), cfg.tag)
    result["provenance"] = provenance(seed=0)
    sfx = f"_{cfg.tag}" if cfg.tag else ""
    out = Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "phase3_diagnostics"
    if cfg.print_only:
        print(markdown(result))
        return
    write_results(out, f"policy_action_error{sfx}", result, markdown(result))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
