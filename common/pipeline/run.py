"""The whole RSD pipeline on a CPU, stage by stage, idempotent (what ``make run`` runs).

demos (scripted expert) → Phase 1 naive + robust tokenizers + comparison → Phase 2 main + draft
models on robust and on naive tokens (state backbone) → Phase 3 comparison (naive, robust A,
robust B; speculative vs main-only on the same chunks) → ``report/``.

Every stage records a fingerprint (its settings + the content hashes of its inputs) in
``<root>/stamps/<stage>.json`` (``stages.py``); a rerun skips a stage whose fingerprint and outputs
are unchanged and redoes it (and, through the changed input hashes, everything after it) otherwise.
Each run keeps its data, models and results in its own folders under ``root``, passed explicitly
to every stage. The naive and the robust branch (tokenizer → main → rollouts → draft) share nothing
until Phase 3: on a profile with 2 workers they run side by side, one process each (``branches.py``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

from common.artifacts import ArtifactDirs, expert_success_results, phase1_results, phase3_comparison, phase3_results
from common.eval.summary import pct
from common.pipeline.report import write_report
from common.locks import check_folder_path, check_writable_dir, output_lock
from common.pipeline.stages import Stages, read_stamp
from common.provenance import REPO_ROOT, provenance


@dataclass(frozen=True)
class Profile:
    name: str
    suite: str
    tasks: str
    demos_per_task: int
    tokenizer_epochs: int
    policy_epochs: int
    policy_batch_size: int
    d_model: int
    num_blocks: int
    eval_trials: int
    eval_max_steps: int  # 0 = the suite's standard limit
    workers: int
    layout: str = "chunk"  # tokenizer layout (the library default; "dct" = the exact DCT layout)
    latent_dim: int = 16  # chunk layout only
    # robust tokenizer: each stage spans its reach x reach_margin (stage 0: x first_stage_margin too);
    # a margin > 1 leaves the code room for a later stage to undo a policy's wrong coarse token
    reach_margin: float = 1.05
    first_stage_margin: float = 1.5
    # main-model loss options (common/policy/losses.py) and Phase 3 decoding (common/policy/decode_choice.py)
    own_prefix_prob: float = 0.5
    expected_value_weight: float = 5.0
    auto_decode: bool = True
    # the state backbone also reads object positions relative to the end effector (common/policy/backbones/state.py)
    eef_relative: bool = False
    # the draft (common/policy/draft.py) and speculative decoding (common/decoding/speculative.py):
    # K from the decode choice, distilled on the main model's distributions over demo and perturbed
    # states, N candidates for the first layer verified in one pass
    coarse_layers: int = 0
    draft_width: int = 256
    draft_hidden_layers: int = 2
    draft_trunk: str = "mlp"
    draft_activation: str = "gelu"
    draft_soft_targets: bool = True
    draft_augment_copies: int = 3
    draft_augment_noise: float = 0.3
    draft_candidates: int = 1
    # closed-loop states for the draft: main-only rollouts of each policy from init states
    # rollout_first_trial.. (inside the demos' layouts, apart from the evaluation's 0..eval_trials-1)
    rollout_trials: int = 2
    rollout_first_trial: int = 3
    # DART demos (issue 12's data lever): per task, on the same init states as the clean demos, the
    # expert's executed arm actions get Gaussian noise of std dart_noise and its intended actions are
    # the labels, so the policy sees how the expert recovers. The policies train on clean + DART demos;
    # the tokenizers on the clean demos only (their fingerprints stay what they were). 0 = none.
    dart_demos_per_task: int = 0
    dart_noise: float = 0.2
    # demos on layouts robosuite samples anew (none of the 50 fixed init states; collect_demos
    # --fresh-layouts), clean and DART (noise dart_noise): more layouts for the policies only
    fresh_demos_per_task: int = 0
    fresh_dart_demos_per_task: int = 0
    # per-variant trial counts that differ from eval_trials, e.g. "robust-B=1" (Phase 3's --variant-trials)
    variant_trials: str = ""


PROFILES = {
    # all 10 libero_object tasks; target <= 30 min on 2 cores from scratch (the report gives the stage times)
    # 5 trials per task (init states 0-4) for naive and robust-A; robust-B, which fails by construction
    # (results/phase3: 0-1% on both suites), 1 per task; the rollouts for the draft use init states 5-6
    # policy 60 epochs: at 30 the robust main model is undertrained (results/phase3_diagnostics/retrain_variance:
    # robust-A 355 -> 376 of 400 on seeds 0-3 going from 30 to 60 epochs)
    "default": Profile("default", "libero_object", "0-9", demos_per_task=20, tokenizer_epochs=30, policy_epochs=60,
                       policy_batch_size=128, d_model=128, num_blocks=2, eval_trials=5, eval_max_steps=0, workers=2,
                       reach_margin=2.0, first_stage_margin=1.0, draft_activation="relu", variant_trials="robust-B=1",
                       rollout_first_trial=5),
    # the default profile on libero_spatial's tasks the scripted expert solves (task 4 it does not:
    # results/expert_success.md), with issue 12's spatial recipe (results/phase3_diagnostics/data_rounds):
    # 20 DART demos per task on the clean demos' layouts, 20 clean and 20 DART demos per task on freshly
    # sampled layouts, observations relative to the end effector, 20 epochs over the 4x data (robust-A
    # 85.9% on 30 held-out init states per task in that lever run; the world-frame profile without
    # fresh layouts 69.3%); `rsd_pipeline run --profile spatial` writes report/spatial/
    "spatial": Profile("spatial", "libero_spatial", "0-3,5-9", demos_per_task=20, tokenizer_epochs=30, policy_epochs=20,
                       policy_batch_size=128, d_model=128, num_blocks=2, eval_trials=3, eval_max_steps=0, workers=2,
                       dart_demos_per_task=20, dart_noise=0.2, fresh_demos_per_task=20, fresh_dart_demos_per_task=20,
                       eef_relative=True),
    # target <= 10 min: 5 tasks, fewer demos/epochs/trials; the default profile's code and draft
    "quick": Profile("quick", "libero_object", "0-4", demos_per_task=8, tokenizer_epochs=15, policy_epochs=20,
                     policy_batch_size=128, d_model=128, num_blocks=2, eval_trials=3, eval_max_steps=0, workers=2, rollout_trials=1,
                     reach_margin=2.0, first_stage_margin=1.0, draft_activation="relu", variant_trials="robust-B=1"),
    # test-suite smoke run: one task, a few demos/epochs, short episodes
    "tiny": Profile("tiny", "libero_object", "0", demos_per_task=3, tokenizer_epochs=2, policy_epochs=1,
                    policy_batch_size=64, d_model=32, num_blocks=1, eval_trials=1, eval_max_steps=24, workers=1, rollout_trials=1,
                    dart_demos_per_task=1, fresh_dart_demos_per_task=1, eef_relative=True),
}


# Settings added after stages were fingerprinted, with the value that reproduces the earlier behaviour:
# at that value they stay out of the fingerprint, so adding a flag does not redo finished stages.
ADDED_SETTINGS = {"eef_relative": False, "reach_margin": 1.05, "draft_rollouts": "", "record_features": False, "draft_trunk": "residual", "draft_soft_targets": False, "draft_candidates": 1, "draft_activation": "gelu", "first_stage_margin": 1.5, "own_prefix_prob": 0.0, "expected_value_weight": 0.0,
                  "decode_rule": "argmax", "auto_decode": False, "first_trial": 0, "drafted_layers": 0}


# PolicyTrainConfig fields that only the draft stage reads
DRAFT_SETTINGS = ("coarse_layers", "draft_width", "draft_hidden_layers", "draft_trunk", "draft_activation", "draft_soft_targets", "draft_mode", "draft_targets", "draft_input",
                  "draft_augment_copies", "draft_augment_noise", "draft_rollouts", "timing_repeats", "train")


def settings(cfg, ignore: tuple[str, ...] = ()) -> dict:
    """A stage's settings for its fingerprint: what changes results, not how progress is shown
    (nor ``overwrite``: the pipeline always reruns a stage on purpose)."""
    return {k: v for k, v in asdict(cfg).items()
            if k not in ("progress", "overwrite", *ignore) and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}


# the two branches: naive tokens ("none") and robust tokens ("layernorm"); Phase 2 tags them "naive" and ""
CONDITIONS = ("none", "layernorm")
POLICY_TAGS = {"layernorm": "", "none": "naive"}


@dataclass(frozen=True)
class BranchInputs:
    """What a branch (tokenizer → main → rollouts → draft of one condition) needs from the run; picklable,
    so that a branch can run in its own process."""
    profile: Profile
    root: Path
    demos: Path  # the clean demos (the tokenizers train on these only)
    demo_hash: str
    policy_data: str  # comma-separated demo files the policies train on (clean + DART + fresh layouts)
    extra_demo_hashes: dict  # demo stage -> file hash of each file the policies add to the clean demos
    num_demos: int
    progress: bool
    plan: bool = False  # list the stages that would run, run none (``Stages(plan=True)``)


def tokenizer_config(inp: BranchInputs, cond: str):
    from common.tokenizer.train import TokenizerTrainConfig

    profile = inp.profile
    return TokenizerTrainConfig(use_layernorm=cond == "layernorm", data=str(inp.demos), num_episodes=inp.num_demos,
                                epochs=profile.tokenizer_epochs, layout=profile.layout, latent_dim=profile.latent_dim,
                                models_dir=str(ArtifactDirs.under(inp.root).models), progress=inp.progress, overwrite=True,
                                **({"reach_margin": profile.reach_margin, "first_stage_margin": profile.first_stage_margin}
                                   if cond == "layernorm" else {}))


def policy_config(inp: BranchInputs, cond: str):
    from common.policy.config import PolicyTrainConfig

    profile, dirs = inp.profile, ArtifactDirs.under(inp.root)
    return PolicyTrainConfig(
        data=inp.policy_data, num_episodes=0, epochs=profile.policy_epochs, batch_size=profile.policy_batch_size,
        lr=1e-3, d_model=profile.d_model, num_blocks=profile.num_blocks, models_dir=str(dirs.models),
        own_prefix_prob=profile.own_prefix_prob, expected_value_weight=profile.expected_value_weight, eef_relative=profile.eef_relative,
        coarse_layers=profile.coarse_layers, draft_width=profile.draft_width, draft_hidden_layers=profile.draft_hidden_layers,
        draft_trunk=profile.draft_trunk, draft_activation=profile.draft_activation,
        draft_soft_targets=profile.draft_soft_targets, draft_augment_copies=profile.draft_augment_copies,
        draft_augment_noise=profile.draft_augment_noise,
        results_dir=str(dirs.results), data_dir=str(dirs.data), progress=inp.progress,
        rfsq_checkpoint=str(tokenizer_config(inp, cond).output_paths()["best"]), timing_repeats=50,
        overwrite=True,  # a stage reruns on purpose (its fingerprint or outputs changed)
    )


def condition_branch(inp: BranchInputs, cond: str, log: Callable[[str], None]) -> dict:
    """One condition's stages in order: tokenizer → main model → main-only rollouts → draft.
    Returns the stages' timings. Runs in the caller's process or in a branch process of its own."""
    from common.eval.closed_loop import evaluate
    from common.eval.config import EvalConfig
    from common.policy.train import train_policy
    from common.tokenizer.train import train_tokenizer

    profile, dirs = inp.profile, ArtifactDirs.under(inp.root)
    stages = Stages(inp.root, log, plan=inp.plan)
    tok_cfg = tokenizer_config(inp, cond)
    best = tok_cfg.output_paths()["best"]
    stages.run(f"tokenizer_{cond}", {"cfg": settings(tok_cfg), "demos": inp.demo_hash}, [best],
               lambda: f"val MSE {train_tokenizer(tok_cfg)['best_val_mse']:.3e}")
    tok_hash = stages.hash(best)

    pcfg = policy_config(inp, cond)
    out_paths = pcfg.output_paths(POLICY_TAGS[cond])
    # Two stages, so that changing the draft retrains the draft only: the main model's
    # fingerprint leaves the draft's settings out, the draft's holds the main model's hash.
    rollouts = phase3_results(dirs.results, f"rollouts_{cond}")
    main_cfg, draft_cfg = replace(pcfg, train="main"), replace(pcfg, train="draft", draft_rollouts=str(rollouts) if profile.rollout_trials else "")

    main_inputs = {"cfg": settings(main_cfg, ignore=DRAFT_SETTINGS), "tokenizer": tok_hash}
    # (absent without extra demos: the other profiles' fingerprints stay what they were; "dart_demos"
    # keeps the key the DART stage always had)
    main_inputs.update({"dart_demos" if stage == "demos_dart" else stage: h for stage, h in inp.extra_demo_hashes.items()})
    stages.run(f"main_{cond}", main_inputs, [out_paths["head"]],
               lambda: f"main model trained in {train_policy(main_cfg)['main_seconds']:.0f} s")
    head_hash = stages.hash(out_paths["head"])
    rollout_hash = None
    if profile.rollout_trials:
        rcfg = EvalConfig(task_suite=profile.suite, tasks=profile.tasks, num_trials=profile.rollout_trials,
                          first_trial=profile.rollout_first_trial, use_speculative_decoding=False, compare_main_only=False,
                          # float64: the precision these rollouts ran in before Phase 3 switched to float32;
                          # they only supply states for the draft, where the precision does not matter
                          record_features=True, decode_dtype="float64",
                          tokenizer="robust" if cond == "layernorm" else "naive", strategy="A",
                          workers=profile.workers, max_steps=profile.eval_max_steps, auto_decode=profile.auto_decode,
                          models_dir=str(dirs.models), results_dir=str(dirs.results), out=str(rollouts))

        def do_rollouts():
            info = evaluate(rcfg, progress=inp.progress)
            return f"{info['chunks']} closed-loop states from {info['episodes']} main-only episodes (success {pct(info['success_rate'])})"

        stages.run(f"rollouts_{cond}", {"cfg": settings(rcfg, ignore=("models_dir", "results_dir", "out")), "head": head_hash},
                   [rollouts / "episodes.jsonl"], do_rollouts, stale=(rollouts,))
        rollout_hash = stages.hash(rollouts / "episodes.jsonl")
    stages.run(f"draft_{cond}", {"cfg": settings(draft_cfg), "tokenizer": tok_hash, "head": head_hash, "rollouts": rollout_hash},
               [out_paths["draft"], out_paths["summary_json"]],
               lambda: f"draft trained in {train_policy(draft_cfg)['draft_seconds']:.0f} s")
    return stages.timings


def run_pipeline(profile: Profile, *, root: Path, report_dir: Path, log: Callable[[str], None] = print, progress: bool = True,
                 branches: int | None = None, plan: bool = False) -> dict:
    """Run (or resume) every stage of ``profile`` under ``root``; write ``report_dir``.
    ``plan``: run and write nothing; log each stage that would run, with why, and return
    ``{"plan": {stage: {"planned": why, "seconds": its last recorded time or None}}}``
    (up-to-date stages: ``{"skipped": True}``). A second run on the same ``root`` is refused
    (``RunLockedError``) while this one runs."""
    started = time.perf_counter()
    # resolved: the stages' settings hold paths under it, and a relative spelling of the same root
    # must not look like new settings (and rerun every stage)
    root = Path(root).resolve()
    if plan:  # a plan writes nothing, not even the lock file
        check_folder_path(root, "--root")
        return _run_stages(profile, root, report_dir, log, progress, branches, plan, started)
    check_writable_dir(root, "--root")
    # one run per root, taken before any stamp is read or stale folder removed: a second run started
    # mid-run would otherwise skip the first's stamped stages and delete the folders it is writing
    with output_lock(root / ".pipeline.lock", f"the pipeline root {root}"):
        return _run_stages(profile, root, report_dir, log, progress, branches, plan, started)


def _run_stages(profile: Profile, root: Path, report_dir: Path, log: Callable[[str], None], progress: bool,
                branches: int | None, plan: bool, started: float) -> dict:
    from common.sim.demo_collection import collect_demos
    from common.sim.libero_env import get_suite, parse_task_spec

    stages = Stages(root, log, plan=plan)
    dirs = ArtifactDirs.under(root)
    data, models, results = dirs.data, dirs.models, dirs.results
    tasks = parse_task_spec(profile.tasks, get_suite(profile.suite).get_num_tasks())
    demos = data / f"{profile.suite}_demos.hdf5"

    def do_demos():
        s = collect_demos(profile.suite, tasks, profile.demos_per_task, demos, workers=profile.workers, seed=0, progress=progress)
        kept = sum(t["kept"] for t in s["tasks"].values())
        return f"{kept} demos in {demos.name} (given up: {s['given_up_tasks'] or 'none'})"

    stages.run("demos", {"suite": profile.suite, "tasks": tasks, "per_task": profile.demos_per_task}, [demos], do_demos)
    demo_hash = stages.hash(demos)
    num_demos = profile.demos_per_task * len(tasks)
    # the policies' extra demo files: (stage, per task, noise, fresh layouts, expert seed, file name)
    extras = [("demos_dart", profile.dart_demos_per_task, profile.dart_noise, False, 1, f"{profile.suite}_dart{profile.dart_noise:g}.hdf5"),
              ("demos_fresh", profile.fresh_demos_per_task, 0.0, True, 2, f"{profile.suite}_fresh.hdf5"),
              ("demos_fresh_dart", profile.fresh_dart_demos_per_task, profile.dart_noise, True, 3,
               f"{profile.suite}_fresh_dart{profile.dart_noise:g}.hdf5")]
    policy_files, extra_hashes = [str(demos)], {}
    for stage, per_task, noise, fresh, seed, name in extras:
        if not per_task:
            continue
        from common.sim.demo_collection import CollectConfig, run_collection

        path = data / name
        # what `collect_demos [--action-noise N] [--fresh-layouts]` writes, each set with its own expert seed
        cfg = CollectConfig(suite=profile.suite, tasks=profile.tasks, demos_per_task=per_task, workers=profile.workers,
                            out=str(path.resolve()), seed=seed, action_noise=noise, fresh_layouts=fresh)

        def collect(cfg=cfg, path=path, noise=noise, fresh=fresh):
            s = run_collection(cfg, progress=progress)
            kept = sum(t["kept"] for t in s["tasks"].values())
            kind = ("DART demos (noise %g)" % noise if noise else "demos") + (" on fresh layouts" if fresh else "")
            return f"{kept} {kind} in {path.name} (given up: {s['given_up_tasks'] or 'none'})"

        fingerprint = {"suite": profile.suite, "tasks": tasks, "per_task": per_task, "noise": noise}
        if fresh:  # (the DART stage's fingerprint stays what it was)
            fingerprint["fresh_layouts"] = True
        stages.run(stage, fingerprint, [path], collect)
        policy_files.append(str(path))
        extra_hashes[stage] = stages.hash(path)
    policy_data = ",".join(policy_files)

    inputs = BranchInputs(profile=profile, root=root, demos=demos, demo_hash=demo_hash, policy_data=policy_data,
                          extra_demo_hashes=extra_hashes, num_demos=num_demos, progress=progress, plan=plan)
    side_by_side = 1 if plan else min(2, profile.workers) if branches is None else branches
    if side_by_side > 1:
        from common.pipeline.branches import run_side_by_side

        # each branch logs one line per stage: tokenizer, main model, rollouts (optional), draft
        per_branch = 3 + bool(profile.rollout_trials)
        timings = run_side_by_side({cond: partial(condition_branch, inputs, cond) for cond in CONDITIONS},
                                   log_dir=root / "logs", log=log, progress=progress, expected_lines=per_branch * len(CONDITIONS))
        for cond in CONDITIONS:
            stages.adopt(timings[cond])
    else:
        for cond in CONDITIONS:
            stages.adopt(condition_branch(inputs, cond, log))
    tok_cfgs = {cond: tokenizer_config(inputs, cond) for cond in CONDITIONS}
    tok_hashes = {c: stages.hash(cfg.output_paths()["best"]) for c, cfg in tok_cfgs.items()}

    from common.tokenizer.compare import TokenizerComparisonConfig, compare_naive_and_robust

    p1 = phase1_results(results) / "comparison.json"
    p1_cfg = TokenizerComparisonConfig(out=str(p1.parent), models_dir=str(models), results_dir=str(results))
    stages.run("phase1_compare", {"tokenizers": tok_hashes}, [p1],
               lambda: "improvement {:.1f}%".format(compare_naive_and_robust(p1_cfg)["improvement_pct"]))

    from common.eval.compare import ComparisonConfig, run_comparison

    heads = set(models.glob("best_*.pt")) | {Path(p) for p in stages.pending if Path(p).parent == models and Path(p).name.startswith("best_")}
    policy_hashes = {p.name: stages.hash(p) for p in sorted(heads)}

    # the scripted expert's committed success rates (benchmarks/evaluation/expert_success.py), not this run's
    ccfg = ComparisonConfig(task_suite=profile.suite, tasks=profile.tasks, num_trials=profile.eval_trials,
                            workers=profile.workers, max_steps=profile.eval_max_steps, auto_decode=profile.auto_decode,
                            draft_candidates=profile.draft_candidates, variant_trials=profile.variant_trials,
                            expert_results=str(expert_success_results(REPO_ROOT / "results")),
                            models_dir=str(models), results_dir=str(results))
    p3 = phase3_comparison(results, profile.suite) / "comparison.json"
    fingerprint = {"cfg": settings(ccfg, ignore=("models_dir", "results_dir")),
                   "models": policy_hashes, "tokenizers": tok_hashes}
    # a rerun evaluates new models or settings: the earlier run's episodes must not be resumed
    stages.run("phase3_compare", fingerprint, [p3],
               lambda: "variants: " + ", ".join(f"{k} {pct(v['success_rate'])}" for k, v in run_comparison(ccfg)["variants"].items()),
               stale=(p3.parent,))
    if plan:
        return {"plan": stages.timings}

    summary = {
        "profile": asdict(profile),
        "wall_seconds": time.perf_counter() - started,
        # what each stage took when it last ran (a rerun skips finished stages); with the branches'
        # stages side by side, the time of this profile from scratch is the other stages' sum plus
        # the longest branch's (``report.from_scratch_seconds``)
        "stage_seconds": {stamp.stem: read_stamp(stamp).get("seconds") for stamp in sorted(stages.stamps.glob("*.json"))
                          if stamp.stem in stages.timings},
        # stages whose last run found their outputs already complete (their time is no from-scratch time)
        "stages_found_complete": sorted(stamp.stem for stamp in stages.stamps.glob("*.json")
                                        if stamp.stem in stages.timings and read_stamp(stamp).get("outputs_unchanged")),
        "side_by_side": side_by_side > 1,
        "branch_stages": {cond: sorted(k for k in stages.timings if k.endswith(f"_{cond}")) for cond in CONDITIONS},
        "stages": stages.timings,
        "phase1": json.loads(p1.read_text()),
        "phase2": {POLICY_TAGS[cond] or "robust": json.loads(policy_config(inputs, cond).output_paths(POLICY_TAGS[cond])["summary_json"].read_text())
                   for cond in ("layernorm", "none")},
        "phase3": json.loads(p3.read_text()),
        "provenance": provenance(seed=0),
    }
    write_report(summary, results, report_dir)
    return summary
