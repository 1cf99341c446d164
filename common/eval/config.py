"""Phase 3 settings: ``EvalConfig`` (the flags of ``phase3/modal_phase3_libero_eval.py``, the same on
the local CLI and ``modal run``), which checkpoints a variant evaluates, and the fine-grained task set."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from common.artifacts import eval_checkpoints, models_dir_of, phase3_results, results_dir_of
from common.sim.libero_env import SUITES

STRATEGIES = ("A", "B")
TOKENIZERS = ("robust", "naive")
DECODE_RULES = ("argmax", "expected")

# Fine-grained tasks: where a few millimetres decide success — grasping a bowl by its thin rim
# (every libero_spatial task picks a black bowl and must leave it within 3 cm on the plate), or
# small / low objects whose top is only ~2-4 cm above the table and that must land inside the
# basket's region (libero_object's flat boxes: butter, cream cheese, chocolate pudding).
FINE_GRAINED_KEYWORDS = {
    "libero_spatial": ("bowl",),
    "libero_object": ("butter", "cream cheese", "chocolate pudding"),
}


class LosslessViolation(AssertionError):
    """Exact speculative decoding produced tokens different from main-only greedy decoding."""


def is_fine_grained(suite: str, instruction: str) -> bool:
    return any(k in instruction.lower() for k in FINE_GRAINED_KEYWORDS.get(suite, ()))


# --- config -----------------------------------------------------------------------------------------
@dataclass
class EpisodeSettings:
    """What every Phase 3 run shares: which episodes, how the policy decodes, where the files are. One
    definition per flag: ``EvalConfig`` (one variant) and ``ComparisonConfig`` (naive / robust-A /
    robust-B) both extend it."""

    task_suite: str = "libero_object"  # libero_spatial | libero_object | libero_goal | libero_10 | libero_90
    tasks: str = "0-9"  # task ids of the suite: 'all', a range '0-9' or a list '0,3,5'
    num_trials: int = 50  # episodes per task; trial i starts from init state i (at most 50 per task)
    # first trial (init state) of each task: e.g. 20 skips the layouts the make-run demos were
    # recorded from (init states 0-19), so success is measured on object placements never trained on
    first_trial: int = 0
    replan_steps: int = 4  # actions executed per decoded chunk before replanning (1..chunk length, env steps)
    workers: int = 0  # parallel episode processes; 0 = number of CPU cores
    max_steps: int = 0  # env steps per episode (20 Hz control); 0 = the suite's standard limit
    seed: int = 0  # env seed (the init state fixes the scene; the seed only affects robosuite's own sampling)
    # float32 | float64: precision of the main/draft token models. At batch 1 on a CPU a one-position
    # pass costs the same in both (per-op overhead), the multi-position verify pass less in float32, so
    # speculation gains. Its verify pass (K+1 positions) and one-position passes run different kernel
    # shapes, so a near-tie could round apart: losslessness is then defined against the float32
    # main-only decode (the path run) and counted on every chunk (lossless column); float64 makes such
    # a tie ~1e9x rarer
    decode_dtype: str = "float32"
    # prefix-depth decoding: decode (and execute) only the first N RFSQ layers; the robust code decodes
    # exactly from any coarse prefix, and the main model then runs N passes instead of L (0 = all layers)
    decode_layers: int = 0
    # how the last decoded layer becomes an action: "argmax" (its greedy tokens) or "expected" (the mean
    # of its level values under the main model's distribution; the layers before it stay argmax, so
    # speculative verification of them stays exact)
    decode_rule: str = "argmax"
    # decode the depth and rule Phase 2 chose on held-out data by action error (the head checkpoint's
    # ``decode_choice``, common/policy/decode_choice.py) instead of --decode-layers / --decode-rule
    auto_decode: bool = False
    # proposals the draft offers per chunk (a power of two), all verified in the same ONE main pass:
    # 2^m variants of the first drafted layer's m least confident tokens (common/decoding/speculative.py)
    draft_candidates: int = 1
    # draft at most N layers (0 = all the draft proposes, at most the decoded depth - 1): a drafted layer
    # the main model rarely accepts still widens every verify pass; the tokens are the same either way
    drafted_layers: int = 0
    models_dir: str = ""  # "" = $RSD_MODELS_DIR or ./artifacts/models (Modal: /models)
    results_dir: str = ""  # "" = $RSD_RESULTS_DIR or ./results (Modal: /data/results)

    def __post_init__(self):
        if self.task_suite not in SUITES:
            raise ValueError(f"--task-suite must be one of {SUITES}; got {self.task_suite!r}")
        if self.decode_dtype not in ("float64", "float32"):
            raise ValueError(f"--decode-dtype must be float64 or float32; got {self.decode_dtype!r}")
        if self.decode_rule not in DECODE_RULES:
            raise ValueError(f"--decode-rule must be one of {DECODE_RULES}; got {self.decode_rule!r}")
        if self.auto_decode and (self.decode_layers or self.decode_rule != "argmax"):
            raise ValueError("--auto-decode takes the depth and rule from the head checkpoint: drop --decode-layers / --decode-rule")
        if self.draft_candidates < 1 or self.draft_candidates & (self.draft_candidates - 1):
            raise ValueError(f"--draft-candidates must be a power of two (1, 2, 4, ...); got {self.draft_candidates}")
        for name in ("num_trials", "replan_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        for name in ("workers", "max_steps", "decode_layers", "first_trial", "drafted_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")

    def episode_settings(self) -> dict:
        """These shared fields, as keyword arguments for another config built from this one."""
        return {f.name: getattr(self, f.name) for f in fields(EpisodeSettings)}


@dataclass
class EvalConfig(EpisodeSettings):
    """Flags of ``phase3/modal_phase3_libero_eval.py`` (same on the local CLI and ``modal run``)."""

    use_speculative_decoding: bool = True  # draft proposes coarse tokens, main verifies (else main-only decoding)
    tokenizer: str = "robust"  # robust | naive
    strategy: str = "A"  # A: models trained on this tokenizer's tokens; B: naive-token models + robust decoder
    acceptance: str = "exact"  # exact (lossless) | relaxed (lossy, reported separately)
    tolerance: int = 0  # relaxed acceptance: largest accepted |draft - main| token difference (levels)
    # relaxed acceptance: apply the tolerance to the N coarsest drafted layers only, accept the finer
    # ones exactly (the main model predicts them given the draft's coarse tokens); 0 = every drafted layer
    relaxed_layers: int = 0
    save_videos: int = 0  # first N trials of each task rendered to GIF (slow: cameras on)
    compare_main_only: bool = True  # decode every chunk both ways: lossless check + same-run latency
    assert_lossless: bool = False  # stop with LosslessViolation on the first differing chunk (else count it)
    # The draft's precision does not touch losslessness (the main model verifies its integer tokens),
    # so it may run cheaper: "" = same as --decode-dtype.
    draft_dtype: str = ""
    out: str = ""  # "" = <results dir>/phase3/<run name>
    torch_threads: int = 1  # torch threads per worker process (0 = torch default)
    # "" = the backbone the head checkpoint was trained with; state | openvla-oft must match it (checked
    # on load). Modal --plan uses it to pick the function (CPU or GPU) when the checkpoint is only on the volume.
    backbone: str = ""
    gpu: str = "H100"  # Modal GPU type of the openvla-oft shards (H100, A100-80GB, L40S, ...); unused by state / locally
    plan: bool = False  # print the shards, function, GPU type and episodes per container, then exit (no token, no remote call)
    spawn: bool = False  # Modal: .spawn() one detached driver (with `modal run --detach`) instead of waiting for the shards
    # store the backbone features of every decoded chunk in episodes.jsonl: the states the policy
    # visits in closed loop, on which Phase 2 can distil the draft (--draft-rollouts)
    record_features: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"--tokenizer must be one of {TOKENIZERS}; got {self.tokenizer!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"--strategy must be one of {STRATEGIES}; got {self.strategy!r}")
        if self.strategy == "B" and self.tokenizer != "robust":
            raise ValueError("--strategy B means: robust decoder + naive-token models; use it with --tokenizer robust")
        if self.draft_dtype not in ("", "float64", "float32"):
            raise ValueError(f"--draft-dtype must be float64, float32 or empty (= --decode-dtype); got {self.draft_dtype!r}")
        if self.backbone not in ("", "state", "openvla-oft"):
            raise ValueError(f"--backbone must be state, openvla-oft or empty (= from the head checkpoint); got {self.backbone!r}")
        if self.acceptance not in ("exact", "relaxed"):
            raise ValueError(f"--acceptance must be exact or relaxed; got {self.acceptance!r}")
        if self.acceptance == "exact" and self.tolerance != 0:
            raise ValueError("--tolerance needs --acceptance relaxed (exact acceptance is lossless, tolerance 0)")
        if self.acceptance == "exact" and self.relaxed_layers:
            raise ValueError("--relaxed-layers needs --acceptance relaxed (exact acceptance has no tolerance to apply)")
        for name in ("save_videos", "tolerance", "relaxed_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0; got {getattr(self, name)}")

    @property
    def run_name(self) -> str:
        dec = "spec" if self.use_speculative_decoding else "main_only"
        acc = "" if self.acceptance == "exact" else f"_relaxed{self.tolerance}"
        acc += f"_rl{self.relaxed_layers}" if self.relaxed_layers else ""
        acc += f"_k{self.decode_layers}" if self.decode_layers else ""
        acc += "_ev" if self.decode_rule == "expected" else ""
        acc += "_auto" if self.auto_decode else ""
        acc += f"_c{self.draft_candidates}" if self.draft_candidates > 1 else ""
        acc += f"_d{self.drafted_layers}" if self.drafted_layers else ""
        return f"{self.task_suite}_{self.tokenizer}_{self.strategy}_{dec}{acc}"

    def out_dir(self) -> Path:
        return Path(self.out) if self.out else phase3_results(results_dir_of(self.results_dir), self.run_name)

    def resolved_workers(self) -> int:
        return self.workers or os.cpu_count() or 1

    def checkpoint_paths(self) -> dict[str, Path]:
        """Which tokenizer / head / draft this configuration evaluates (seed's strategy names); main-only
        decoding needs no draft (it may not be trained yet, e.g. for the rollouts it is distilled on)."""
        paths = eval_checkpoints(models_dir_of(self.models_dir), tokenizer=self.tokenizer, strategy=self.strategy)
        if not self.use_speculative_decoding:
            del paths["draft"]
        return paths

    def resume_key(self) -> dict:
        """Fields that must match for a rerun to reuse finished episodes."""
        d = asdict(self)
        # where and how it runs (and Modal scheduling), not what it evaluates
        for k in ("workers", "out", "results_dir", "save_videos", "torch_threads", "num_trials", "first_trial", "tasks", "assert_lossless",
                  "gpu", "plan", "spawn", "backbone"):
            d.pop(k)
        for key, default in (("decode_rule", "argmax"), ("auto_decode", False), ("drafted_layers", 0)):
            if d[key] == default:  # runs written before the flag existed still resume
                d.pop(key)
        return d
