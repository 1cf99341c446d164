"""A trained head and draft measured off the simulator: the backbone features of held-out demo steps, the
decode bundle (those features + head + draft + decode choice in one file that a bare GPU machine can
time), and main-only against speculative decoding timed chunk by chunk with the formula's terms.

The bundle readers and ``measure_speculation`` need only torch and tqdm (no simulator, no h5py), so
``decode_trained_graphs run`` works on a machine that holds nothing but this repository.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from common.decoding.speculative import main_only_decode, speculative_decode
from common.decoding.timing import Clock, evict_caches, eviction_buffer
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead
from common.provenance import portable_path

BUNDLE_KIND = "rsd-decode-bundle-v1"


def load_held_out(models_dir: Path, tag: str) -> tuple[dict, dict, object, torch.Tensor]:
    """(checkpoint paths, decode choice, loaded policy, float32 backbone features [N, F] of every held-out
    demo step) of the Phase 2 models in ``models_dir`` (the head's ``val_episode_keys``)."""
    from common.artifacts import policy_paths
    from common.checkpoints import read_checkpoint
    from common.policy.labels import build_split, load_policy_episodes
    from common.policy.metrics import compute_features
    from common.policy.model import HEAD_KIND, load_policy
    from common.tokenizer.model import load_tokenizer

    paths = policy_paths(models_dir, models_dir, tag)
    ckpt = read_checkpoint(paths["head"], kind=HEAD_KIND)
    choice = ckpt["metrics"].get("decode_choice")
    if not choice:
        raise ValueError(f"{paths['head']}: no decode_choice in its metrics (retrain Phase 2 with this code)")
    tokenizer = load_tokenizer(ckpt["extra"]["tokenizer_path"])
    policy = load_policy(paths["head"], paths["draft"], tokenizer)
    data_paths = [p.strip() for p in ckpt["extra"]["train_config"]["data"].split(",") if p.strip()]
    episodes, _ = load_policy_episodes(data_paths)
    held_out = [e for e in episodes if e["key"] in set(ckpt["metrics"]["val_episode_keys"])]
    split = build_split(tokenizer, held_out, backbone="state", data_paths=data_paths, feature_cache_paths=[])
    return paths, choice, policy, compute_features(policy.policy, split, device=torch.device("cpu")).float()


# --- the decode bundle ----------------------------------------------------------------------------------
def export_bundle(models_dir: Path, tag: str, bundle: Path, states: Path | None = None) -> dict:
    """Held-out features (or, with ``states``, a Phase 3 run's recorded closed-loop features) + head +
    draft + decode choice of the Phase 2 models in ``models_dir`` -> ``bundle``."""
    from common.data.rollouts import read_rollout_features

    paths, choice, policy, features = load_held_out(models_dir, tag)
    if states is not None:
        features = read_rollout_features(states, head_hash=policy.head_hash)
    if policy.draft is None or policy.draft.input != "features":
        raise ValueError(f"{paths['draft']}: expected a features draft (the graphed decoder takes no main_hidden draft)")
    content = {
        "kind": BUNDLE_KIND, "features": features, "decode_choice": dict(choice),
        "head_config": policy.head.config, "head_state": policy.head.state_dict(),
        "draft_config": policy.draft.config, "draft_state": policy.draft.state_dict(),
        "head": str(paths["head"]), "draft": str(paths["draft"]), "head_hash": policy.head_hash, "draft_hash": policy.draft_hash,
        "states": "held-out demo steps" if states is None else f"closed-loop states recorded by {portable_path(states)}",
    }
    bundle.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, bundle)
    return {"bundle": str(bundle), "chunks": len(features), "states": content["states"], "decode_choice": dict(choice)}


def load_bundle(bundle: Path, device: torch.device, dtype: torch.dtype) -> tuple[RFSQHead, DraftWithProjection, torch.Tensor, dict]:
    """(head, draft, features [N, F], the bundle's content) on ``device`` in ``dtype``, models in eval mode."""
    if not bundle.exists():
        raise FileNotFoundError(f"{bundle}: no such bundle (make one with `python -m benchmarks.decoding.decode_trained_graphs export`)")
    content = torch.load(bundle, map_location="cpu", weights_only=True)
    if not isinstance(content, dict) or content.get("kind") != BUNDLE_KIND:
        raise ValueError(f"{bundle}: expected a {BUNDLE_KIND} file, found {content.get('kind') if isinstance(content, dict) else type(content).__name__}")
    head = RFSQHead.from_config(content["head_config"])
    head.load_state_dict(content["head_state"])
    draft = DraftWithProjection.from_config(content["draft_config"])
    draft.load_state_dict(content["draft_state"])
    head, draft = head.to(device, dtype).eval(), draft.to(device, dtype).eval()
    content.setdefault("states", "held-out demo steps")  # bundles from before --states
    return head, draft, content["features"].to(device, dtype), content


# --- main-only against speculative, chunk by chunk --------------------------------------------------
def measure_speculation(head, drafts: list[tuple[str, torch.nn.Module]], features: torch.Tensor, L: int, *, repeats: int,
                        chunks: int = 0, cold: bool = False) -> dict:
    """Main-only and each draft's speculative decode of ``features`` (one chunk each, batch 1), timed back to
    back per chunk (``Clock.interleaved_ms``, ``repeats`` times, median per chunk) -> ``main_only_ms_per_chunk``,
    ``chunks_timed``, ``chunks_checked`` and per draft: the acceptance on every chunk, c and v in main passes as
    Phase 3 computes them (draft time, and the speculative path's main time minus its passes, over the mean
    main-only pass), the formula S = L / (L - a + c + v), the measured speedup (mean main-only time over mean
    speculative time, as Phase 3 reports it; the median per-chunk ratio beside it) and how many chunks decoded
    tokens identical to main-only. ``chunks``: time every n-th chunk so that this many are timed (0 = all); all
    are checked for losslessness. ``cold``: the data caches are evicted before every timed decode."""
    step = max(1, len(features) // chunks) if chunks else 1
    timed = features[::step][:chunks] if chunks else features
    clock = Clock(torch.device("cpu"), budget_s=1e9)
    evict = (lambda buffer=eviction_buffer(): evict_caches(buffer)) if cold else None
    main_ms: list[float] = []
    main_time_s: list[float] = []
    spec = {label: {"ms": [], "draft_s": [], "main_s": [], "passes": []} for label, _ in drafts}
    with torch.inference_mode():
        for f in tqdm(timed, desc="timed chunks", unit="chunk"):
            f = f[None]
            stats: list[list] = [[] for _ in range(1 + len(drafts))]
            fns = [lambda: stats[0].append(main_only_decode(head, f, num_layers=L)[1])]
            fns += [lambda i=i, d=d: stats[i].append(speculative_decode(head, d, f, num_layers=L)[1])
                    for i, (_, d) in enumerate(drafts, start=1)]
            ms = clock.interleaved_ms(fns, repeats, before=evict)
            main_ms.append(statistics.median(ms[0]))
            main_time_s.extend(s.main_time_s for s in stats[0])
            for i, (label, _) in enumerate(drafts, start=1):
                spec[label]["ms"].append(statistics.median(ms[i]))
                spec[label]["draft_s"].extend(s.draft_time_s for s in stats[i])
                spec[label]["main_s"].extend(s.main_time_s for s in stats[i])
                spec[label]["passes"].extend(s.main_passes for s in stats[i])
        rows = []
        pass_s = statistics.mean(main_time_s) / L  # one main-only pass, as Phase 3's c and v are counted
        for label, draft in drafts:
            accepted, identical = [], 0
            for f in tqdm(features, desc=f"{label}: lossless check", unit="chunk", leave=False):
                f = f[None]
                codes, s = speculative_decode(head, draft, f, num_layers=L)
                identical += int(torch.equal(codes, main_only_decode(head, f, num_layers=L)[0]))
                accepted.append(s.accepted_layers[0])
            K = min(draft.coarse_layers, L - 1)
            t = spec[label]
            a = sum(accepted) / len(accepted)
            c = statistics.mean(t["draft_s"]) / pass_s
            v = statistics.mean(t["main_s"]) / pass_s - statistics.mean(t["passes"])
            per_chunk = [m / s for m, s in zip(main_ms, t["ms"])]
            rows.append({
                "draft": label, "drafted_layers": K, "mean_accepted_layers": a,
                "accepted_distribution": [accepted.count(k) / len(accepted) for k in range(K + 1)],
                "c": c, "v": v, "speedup_formula": L / (L - a + c + v),
                "speedup_measured": statistics.mean(main_ms) / statistics.mean(t["ms"]), "speedup_median_per_chunk": statistics.median(per_chunk),
                "speculative_ms_per_chunk": statistics.mean(t["ms"]), "identical_to_main_only": identical,
            })
    return {"chunks_timed": len(timed), "chunks_checked": len(features), "main_only_ms_per_chunk": statistics.mean(main_ms), "drafts": rows}
