"""Tokenizer fidelity in closed loop: recorded demo actions replayed open-loop from their init states,
raw vs encoded–decoded by the naive and the robust tokenizer at prefix depth k, and naive codes read by the
robust decoder (Strategy B).

    python -m benchmarks.diagnostics.replay_fidelity --data DEMOS.hdf5 --models-dir MODELS [--demos-per-task 1] [--depths 1,2,3,8]

The simulator is deterministic, so a raw replay reproduces the demo (a check of the protocol); a
replay after encoding and decoding each 8-step chunk shows what the tokens alone carry, with no
policy involved. Chunks are consecutive and non-overlapping (the last one padded by repeating the
final action), normalized with each tokenizer's own normalizer, and decoded from their first k
layers. Writes ``replay_fidelity.json`` / ``.md`` to ``--out`` (default
``results/phase3_diagnostics/replay_fidelity``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import rsd_entry
from common.artifacts import NAIVE_TOKENIZER, ROBUST_TOKENIZER
from common.data.episodes import future_chunks, load_hdf5_episodes
from common.provenance import REPO_ROOT, provenance, write_results
from common.sim.libero_env import LiberoTaskEnv, library_versions
from common.tokenizer.model import LoadedTokenizer, load_tokenizer

PROG = "python -m benchmarks.diagnostics.replay_fidelity"


def chunked_roundtrip(tokenizer: LoadedTokenizer, actions: np.ndarray, depth: int, decoder: LoadedTokenizer | None = None) -> np.ndarray:
    """actions [T, 7] -> the same actions after encode -> first ``depth`` layers -> decode.

    ``decoder``: decode the codes with another tokenizer (Strategy B: naive codes, robust decoder)."""
    model = tokenizer.model
    decoder = decoder or tokenizer
    n = model.chunk_len
    starts = np.arange(0, len(actions), n)
    chunks = future_chunks(actions, chunk_len=n)[starts]  # [C, n, 7], last padded with the final action
    with torch.no_grad():
        x = torch.from_numpy(tokenizer.normalizer.normalize(chunks))
        codes = model.encode(x)
        decoded = decoder.model.decode_from_indices(codes[..., :depth]).numpy()
    return decoder.normalizer.unnormalize(decoded).reshape(-1, actions.shape[1])[: len(actions)]


def replay(env: LiberoTaskEnv, attrs, actions: np.ndarray) -> dict:
    """Execute ``actions`` open loop from the demo's start: its fixed init state, or (init state
    index -1) the fresh layout its seed sampled."""
    init_state_index = int(attrs["init_state_index"])
    if init_state_index < 0:
        env.reset_to_fresh_layout(int(attrs["seed"]))
    else:
        env.reset_to_trial(init_state_index)
    for step, action in enumerate(actions):
        _, _, done, _ = env.step(np.clip(action, -1.0, 1.0))
        if done or env.check_success():
            return {"success": True, "steps": step + 1}
    return {"success": bool(env.check_success()), "steps": len(actions)}


def run(data: str, models_dir: str, *, suite: str, demos_per_task: int, depths: list[int], out: Path) -> dict:
    tokenizers = {
        "naive": load_tokenizer(Path(models_dir) / NAIVE_TOKENIZER, require_conditioning="none"),
        "robust": load_tokenizer(Path(models_dir) / ROBUST_TOKENIZER, require_conditioning="layernorm"),
    }
    episodes = load_hdf5_episodes(data)
    by_task: dict[int, list] = {}
    for ep in episodes:
        if "init_state_index" not in ep.attrs:
            raise ValueError(f"{data}: data/{ep.name} has no init_state_index attribute (collect demos with phase1_improved.collect_demos)")
        by_task.setdefault(ep.task_id, []).append(ep)
    # Strategy B: the naive code decoded by the robust decoder, at full depth (what Phase 3's robust-B executes)
    variants = ["raw"] + [f"{name} k={k}" for name in tokenizers for k in depths] + [f"naive codes, robust decoder k={max(depths)}"]
    rows = []
    jobs = [(task, ep) for task in sorted(by_task) for ep in by_task[task][:demos_per_task]]
    bar = tqdm(total=len(jobs) * len(variants), desc="replays")
    env, env_task = None, None
    for task, ep in jobs:
        if env_task != task:
            if env is not None:
                env.close()
            env, env_task = LiberoTaskEnv(suite=suite, task_id=task), task
        for variant in variants:
            if variant == "raw":
                actions = ep.actions
            elif variant.startswith("naive codes, robust decoder"):
                actions = chunked_roundtrip(tokenizers["naive"], ep.actions, max(depths), decoder=tokenizers["robust"])
            else:
                name, k = variant.split(" k=")
                actions = chunked_roundtrip(tokenizers[name], ep.actions, int(k))
            result = replay(env, ep.attrs, actions)
            mse = float(np.mean((actions - ep.actions) ** 2))
            rows.append({"task": task, "demo": ep.name, "variant": variant, "action_mse": mse, **result})
            bar.update(1)
    bar.close()
    if env is not None:
        env.close()
    table = {v: sum(r["success"] for r in rows if r["variant"] == v) for v in variants}
    n = len(jobs)
    lines = [
        f"Recorded demo actions of `{Path(data).name}` ({n} demos, {len(by_task)} tasks of `{suite}`) replayed open-loop from "
        f"their init states; tokenizers from `{models_dir}`.",
        "",
        "| actions | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
        "| successes | " + " | ".join(f"{table[v]}/{n}" for v in variants) + " |",
        "| action MSE vs recorded | " + " | ".join(
            f"{np.mean([r['action_mse'] for r in rows if r['variant'] == v]):.2e}" for v in variants) + " |",
    ]
    result = {"data": data, "models_dir": models_dir, "suite": suite, "depths": depths, "rows": rows,
              "successes": table, "demos": n, "libraries": library_versions(), "provenance": provenance(seed=0)}
    write_results(out, "replay_fidelity", result, "\n".join(lines))
    return result


@dataclass
class ReplayFidelityConfig:
    """Tokenizer fidelity in closed loop: recorded demo actions replayed open-loop, raw vs encoded-decoded at prefix depth k."""

    data: str = ""  # demo HDF5 written by phase1_improved.collect_demos (required)
    models_dir: str = ""  # folder holding rfsq_best.pt (naive) and rfsq_robust_best.pt (robust; required)
    suite: str = "libero_object"  # the demos' LIBERO suite
    demos_per_task: int = 1  # demos replayed per task (the first ones in the file)
    depths: str = "1,2,3,8"  # prefix depths k (layers decoded), comma-separated
    out: str = ""  # output folder ("" = results/phase3_diagnostics/replay_fidelity)

    def __post_init__(self) -> None:
        missing = [flag for flag, value in (("--data", self.data), ("--models-dir", self.models_dir)) if not value]
        if missing:
            raise ValueError(f"expected {', '.join(missing)}, found none")
        try:
            depths = [int(k) for k in self.depths.split(",")]
        except ValueError:
            depths = []
        if not depths or min(depths) < 1:
            raise ValueError(f"--depths: expected comma-separated depths >= 1, found {self.depths!r}")


def main(argv: list[str]) -> None:
    cfg = rsd_entry.parse_config(ReplayFidelityConfig, argv, prog=PROG)
    rsd_entry.setup_process(torch_threads=1)
    run(cfg.data, cfg.models_dir, suite=cfg.suite, demos_per_task=cfg.demos_per_task,
        depths=[int(k) for k in cfg.depths.split(",")],
        out=Path(cfg.out) if cfg.out else REPO_ROOT / "results" / "phase3_diagnostics" / "replay_fidelity")


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
