"""Phase 2: train the main model ("RFSQ head" + its backbone) and the draft model with projection
on RFSQ tokens of expert demonstrations (the pure function behind
``phase2_draft_retrain/modal_train_draft_with_projection.py``, locally and on Modal).

Data and labels: ``common/policy/labels.py`` (split by episode; ``--backbone state`` reads
``obs/low_dim`` + the task index, ``--backbone openvla-oft`` reads the feature cache of
``common/policy/feature_cache.py``, so the 7B model never runs during training).

Training (the shared loop of ``common/training_loop.py``)
  1. main: backbone + RFSQHead jointly, teacher-forced token cross-entropy over all layers
     (the backbone's observation normalizer is fitted on the training observations). Best
     checkpoint by held-out mean token accuracy (ties: lower CE).
  2. draft: DraftWithProjection on the FROZEN best backbone's features (its own input projection
     from the feature size). ``--draft-targets main`` (default) distills the main model's greedy
     coarse tokens, optionally on perturbed inputs too, and keeps the draft with the most accepted
     layers; ``--draft-targets labels`` learns the tokenizer's coarse tokens of the demos and keeps
     the best coarse-token accuracy.
  Each stage writes ``*_last.pt`` every epoch (``--resume`` continues) and one JSON line per epoch.

Held-out metrics: main per-layer token accuracy and "all T tokens of the layer right" rate
(teacher-forced), plus greedy (non-teacher-forced) per-layer accuracy; draft per-layer accuracy,
all-tokens rate and mean coarse accuracy; draft-main agreement per layer (one ``main.verify`` pass
per batch: layer l agrees when all its draft tokens equal the main's greedy tokens given the
draft's layers < l), the exact-acceptance distribution and implied main passes per chunk (L - a);
the draft vs one main pass cost (params, analytic FLOPs, measured batch-1 CPU time, 1 thread).

Outputs (models dir): ``best_rfsq_head{_tag}.pt`` (kind ``rfsq_head``: backbone + head in one
``PolicyModel``), ``best_draft_with_projection{_tag}.pt`` (kind ``draft_with_projection``), their
``*_last.pt`` / ``*_metrics.jsonl``; results: ``<results dir>/phase2/train_summary{_tag}.json|.md``
(file names: ``common/artifacts.py``). A summary in the results dir that belongs to another
models dir is never overwritten: such a run is refused up front (give each models dir its own
``--results-dir``, or pass ``--overwrite``).
``--tag ""`` derives the suffix from the tokenizer: "" for robust (the seed's names), "naive"
for the naive tokenizer, the conditioning name otherwise.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from common.artifacts import models_dir_of, policy_tag
from common.checkpoints import CheckpointError, load_state_strict, read_checkpoint, save_checkpoint
from common.data.episodes import split_episodes
from common.policy.config import PolicyTrainConfig
from common.data.rollouts import read_rollout_features
from common.policy.draft import DraftWithProjection
from common.policy.labels import LABEL_CONVENTION, build_split, load_policy_episodes
from common.policy.metrics import (
    candidate_acceptance, compute_features, draft_main_agreement, evaluate_draft, main_distributions, evaluate_main, greedy_codes, hidden_states, measure_costs,
)
from common.policy.model import DRAFT_KIND, HEAD_KIND, PolicyModel
from common.policy.summary import summary_markdown
from common.provenance import provenance, recorded_path, write_json
from common.tokenizer.model import LoadedTokenizer, load_tokenizer
from common.locks import check_writable_dir, output_lock
from common.policy.decode_choice import action_errors_by_depth, choose_decoding
from common.policy.distillation import perturbed_distillation_set
from common.policy.losses import MainLoss
from common.training_loop import fit_epochs, refuse_empty_resume, refuse_to_replace

MAIN_STATE_KIND = "phase2_main_training_state"
DRAFT_STATE_KIND = "phase2_draft_training_state"


# ==================================================================================== helpers
def _resolve_device(cfg: PolicyTrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device available")
    return torch.device(cfg.device)


def _tokenizer_info(tok: LoadedTokenizer) -> dict[str, Any]:
    m = tok.model
    return {
        "path": str(tok.path), "content_hash": tok.content_hash, "conditioning": m.conditioning,
        "num_layers": m.num_layers, "tokens_per_layer": m.tokens_per_layer, "num_levels": m.num_levels,
        "chunk_len": m.chunk_len,
    }


# ==================================================================================== stages
def _train_main(cfg, paths, tok, train, val, task_table, device, meta, on_checkpoint, decode_val=None) -> tuple[PolicyModel, dict, str]:
    """Train backbone + head; returns (best policy on device, best metrics, head checkpoint hash)."""
    m = tok.model
    obs_dim = int(train.inputs.shape[1])
    if cfg.backbone == "state":
        backbone_config = dict(obs_dim=obs_dim, num_tasks=len(task_table), feature_dim=cfg.d_model, hidden_dim=max(cfg.d_model, 64),
                               eef_relative=cfg.eef_relative)
        feature_dim = cfg.d_model
    else:
        backbone_config, feature_dim = None, obs_dim
    head_config = dict(
        feature_dim=feature_dim, num_layers=m.num_layers, tokens_per_layer=m.tokens_per_layer, num_levels=m.num_levels,
        d_model=cfg.d_model, num_heads=cfg.num_heads, num_blocks=cfg.num_blocks, dropout=0.0,
    )
    torch.manual_seed(cfg.seed)
    policy = PolicyModel(backbone_kind=cfg.backbone, backbone_config=backbone_config, head_config=head_config)
    if policy.backbone is not None:
        policy.backbone.fit_normalizer(train.inputs)
    policy.to(device)
    ckpt_config = {
        **policy.config, "task_table": task_table, "tokenizer": _tokenizer_info(tok), "label_convention": LABEL_CONVENTION,
    }
    extra_base = {
        "tokenizer_hash": tok.content_hash, "tokenizer_path": str(tok.path),
        "train_config": asdict(cfg), "provenance": provenance(seed=cfg.seed),
    }
    normalizer = tok.normalizer.to_dict()

    main_loss = MainLoss.for_training(policy.head, m, train.codes, own_prefix_prob=cfg.own_prefix_prob,
                                      expected_value_weight=cfg.expected_value_weight, seed=cfg.seed + 11, device=device)

    def batch_loss(idx):
        x, t, c = train.inputs[idx].to(device), train.task_ids[idx].to(device), train.codes[idx].to(device).long()
        return main_loss(policy.features(x, t), c)

    def evaluate():
        ev = evaluate_main(policy, val, device=device)
        return ev, (ev["val_mean_token_acc"], -ev["val_ce"])

    def save_best(ev, epoch):
        save_checkpoint(
            paths["head"], kind=HEAD_KIND, model=policy, config=ckpt_config, normalizer=normalizer,
            metrics={**ev, "epoch": epoch, **meta}, extra=extra_base,
        )

    fit_epochs(
        policy, cfg.loop_settings(stage="main", salt=1, num_train=len(train)), num_train=len(train),
        batch_loss=batch_loss, evaluate=evaluate, save_best=save_best,
        files=cfg.run_files(paths, "head", MAIN_STATE_KIND, {"tokenizer_hash": tok.content_hash}),
        record_prefix={"stage": "main"}, on_checkpoint=on_checkpoint,
    )

    # Reload the best weights, add greedy-decode metrics to the checkpoint's metrics.
    ckpt = read_checkpoint(paths["head"], kind=HEAD_KIND)
    policy = PolicyModel.from_config(ckpt["config"])
    load_state_strict(policy, ckpt, paths["head"])
    return _complete_head(policy.to(device).eval(), ckpt, paths, tok, val, decode_val, device, on_checkpoint)


def _complete_head(policy, ckpt, paths, tok, val, decode_val, device, on_checkpoint) -> tuple[PolicyModel, dict, str]:
    """Add the greedy-decode metrics and the decode choice to the best head's checkpoint when it lacks
    them: after the main stage's last epoch, or for a head whose run stopped before it (a time limit)."""
    metrics = dict(ckpt["metrics"])
    if "val_greedy_token_acc" in metrics and "decode_choice" in metrics:
        return policy, metrics, ckpt["content_hash"]
    metrics.update(evaluate_main(policy, val, device=device, greedy=True))
    chosen_on = decode_val if decode_val is not None else val
    errors = action_errors_by_depth(policy.head, compute_features(policy, chosen_on, device=device), chosen_on.codes, tok.model)
    metrics["decode_choice"] = {**choose_decoding(errors), "held_out_episodes": len(chosen_on.episodes),
                                "held_out": "clean demos" if decode_val is not None else "all"}
    ckpt_new = save_checkpoint(
        paths["head"], kind=HEAD_KIND, model=policy, config=ckpt["config"], normalizer=ckpt["normalizer"],
        metrics=metrics, extra=ckpt["extra"],
    )
    if on_checkpoint is not None:
        on_checkpoint()
    return policy, metrics, ckpt_new["content_hash"]


def _load_trained_head(cfg, paths, tok, task_table, device, val, decode_val, on_checkpoint) -> tuple[PolicyModel, dict, str]:
    """``--train draft`` alone: the frozen backbone comes from the existing head checkpoint. A head whose
    main run stopped before its last epoch (no decode choice yet) is completed first, as that run would have."""
    path = paths["head"]
    ckpt = read_checkpoint(path, kind=HEAD_KIND)
    if ckpt["extra"].get("tokenizer_hash") != tok.content_hash:
        raise CheckpointError(
            f"{path}: head was trained against tokenizer {ckpt['extra'].get('tokenizer_hash')}, not {tok.content_hash} "
            f"({tok.path}); retrain it with --train main,draft"
        )
    cfg_ = ckpt["config"]
    if cfg_["backbone_kind"] != cfg.backbone:
        raise CheckpointError(f"{path}: head uses backbone {cfg_['backbone_kind']!r}, this run --backbone {cfg.backbone!r}")
    if [(r["file_stem"], r["task_id"]) for r in cfg_["task_table"]] != [(r["file_stem"], r["task_id"]) for r in task_table]:
        raise CheckpointError(f"{path}: head was trained on a different task set (--data); retrain it with --train main,draft")
    policy = PolicyModel.from_config(cfg_)
    load_state_strict(policy, ckpt, path)
    if "decode_choice" not in ckpt["metrics"]:
        if ckpt["metrics"].get("val_episode_keys") not in (None, val.episodes):
            raise CheckpointError(f"{path}: head has no decode choice yet, and was trained on another train/held-out split than this "
                                  "run's (--data, --seed or --val-fraction differ): complete it with the flags it was trained with")
        print(f"{path}: no decode choice recorded (its main run stopped before the last epoch); choosing it on the "
              "held-out demos as the main stage does after its last epoch, and adding it to the checkpoint", flush=True)
    return _complete_head(policy.to(device).eval(), ckpt, paths, tok, val, decode_val, device, on_checkpoint)


def draft_layers(cfg: PolicyTrainConfig, num_layers: int, main_metrics: dict) -> int:
    """K for the draft: ``--coarse-layers``, or (0) from the layers the main model's decode choice
    executes: min(3, decoded - 1) (a main_hidden draft: decoded - 2), at least 1."""
    if cfg.coarse_layers:
        return cfg.coarse_layers
    decoded = int(main_metrics.get("decode_choice", {}).get("layers", num_layers))
    return max(1, min(3, decoded - (2 if cfg.draft_input == "main_hidden" else 1)))


def _train_draft(cfg, paths, tok, policy, head_hash, train_f, val_f, train_codes, val_codes, device, meta, on_checkpoint,
                 *, K: int, soft_targets: torch.Tensor | None = None) -> dict:
    m = tok.model
    top = m.num_layers - (2 if cfg.draft_input == "main_hidden" else 1)
    if not 1 <= K <= top:
        raise ValueError(f"--coarse-layers must be in [1, {top}] for a {m.num_layers}-layer tokenizer and --draft-input {cfg.draft_input}; got {K}")
    torch.manual_seed(cfg.seed + 1)
    hidden = cfg.draft_input == "main_hidden"
    draft = DraftWithProjection(
        feature_dim=policy.head.d_model if hidden else policy.feature_dim, width=cfg.draft_width, coarse_layers=K,
        tokens_per_layer=m.tokens_per_layer, num_levels=m.num_levels, hidden_layers=cfg.draft_hidden_layers, mode=cfg.draft_mode,
        input=cfg.draft_input, trunk=cfg.draft_trunk, activation=cfg.draft_activation,
    ).to(device)
    # what the draft reads in training: the backbone features, or the main model's position-0 hidden
    # state for them (train_codes then carry the main model's layer 0 as the draft's prefix)
    train_in = hidden_states(policy.head, train_f, device=device) if hidden else train_f
    costs = measure_costs(policy.head, draft, repeats=cfg.timing_repeats, seed=cfg.seed)
    ckpt_config = {
        **draft.config, "backbone_kind": cfg.backbone, "tokenizer": _tokenizer_info(tok), "head_hash": head_hash,
    }
    extra = {
        "tokenizer_hash": tok.content_hash, "tokenizer_path": str(tok.path), "head_hash": head_hash,
        "head_path": str(paths["head"]), "train_config": asdict(cfg), "provenance": provenance(seed=cfg.seed),
    }

    def batch_loss(idx):
        soft = None if soft_targets is None else soft_targets[idx].to(device)
        return draft.loss(train_in[idx].to(device), train_codes[idx].to(device).long(), soft)

    def evaluate():
        ev = evaluate_draft(draft, val_f, val_codes, device=device, head=policy.head)
        ev.update(draft_main_agreement(policy.head, draft, val_f, device=device))
        # best draft: most accepted layers when distilled (the speedup), else coarse accuracy
        key = (ev["mean_accepted_layers"], ev["val_coarse_acc"]) if cfg.draft_targets == "main" else (ev["val_coarse_acc"], -ev["val_ce"])
        return ev, key

    def save_best(ev, epoch):
        save_checkpoint(
            paths["draft"], kind=DRAFT_KIND, model=draft, config=ckpt_config, normalizer=tok.normalizer.to_dict(),
            metrics={**ev, "epoch": epoch, "costs": costs, **meta}, extra=extra,
        )

    fit_epochs(
        draft, cfg.loop_settings(stage="draft", salt=2, num_train=len(train_f)), num_train=len(train_f),
        batch_loss=batch_loss, evaluate=evaluate, save_best=save_best,
        files=cfg.run_files(paths, "draft", DRAFT_STATE_KIND, {"tokenizer_hash": tok.content_hash, "head_hash": head_hash}),
        record_prefix={"stage": "draft"}, on_checkpoint=on_checkpoint,
    )
    ckpt = read_checkpoint(paths["draft"], kind=DRAFT_KIND)
    if ckpt["extra"].get("head_hash") != head_hash:
        raise CheckpointError(f"{paths['draft']}: best draft belongs to head {ckpt['extra'].get('head_hash')}, not {head_hash}")
    extra_metrics = {}
    if not hidden:  # what --draft-candidates N would accept on the held-out chunks, for the best draft
        load_state_strict(draft, ckpt, paths["draft"])
        extra_metrics["candidate_acceptance"] = candidate_acceptance(policy.head, draft.eval(), val_f, device=device)
    return {**ckpt["metrics"], **extra_metrics, "content_hash": ckpt["content_hash"]}


# ==================================================================================== entry
def train_policy(cfg: PolicyTrainConfig, *, on_checkpoint: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the requested stages; returns a summary (paths, metrics, wall time) also written as JSON/markdown.

    ``on_checkpoint`` runs after every checkpoint write (Modal passes ``volume.commit``).
    """
    device = _resolve_device(cfg)
    tok_path = cfg.tokenizer_path()
    if not tok_path.exists():
        raise FileNotFoundError(
            f"{tok_path}: tokenizer checkpoint not found; train Phase 1 first "
            "(`python -m phase1_improved.train_rfsq_robust --use-layernorm`) or pass --rfsq-checkpoint"
        )
    tok = load_tokenizer(tok_path)
    tag = cfg.tag or policy_tag(tok.model.conditioning)
    paths = cfg.output_paths(tag)
    refuse_empty_resume([paths["head_last" if stage == "main" else "draft_last"] for stage in cfg.stages], resume=cfg.resume)
    _check_before_training(cfg, tok, paths)
    with output_lock(paths["head"].parent / f".policy{'_' + tag if tag else ''}.lock", f"Phase 2 models {paths['head']} / {paths['draft']}"):
        refuse_to_replace(cfg.stage_outputs(paths), resume=cfg.resume, overwrite=cfg.overwrite)
        return _train_policy_locked(cfg, tok, tag, paths, device, on_checkpoint)


def _check_before_training(cfg: PolicyTrainConfig, tok: LoadedTokenizer, paths: dict) -> None:
    """What would otherwise fail after training: --coarse-layers vs the tokenizer, output folders
    writable, and a results summary that belongs to another models dir (it would be overwritten)."""
    layers = tok.model.num_layers
    if "draft" in cfg.stages and not 0 <= cfg.coarse_layers <= layers - 1:
        raise ValueError(f"--coarse-layers must be in [1, {layers - 1}] for the {layers}-layer tokenizer {tok.path}; got {cfg.coarse_layers}")
    check_writable_dir(paths["head"].parent, "--models-dir")
    check_writable_dir(paths["summary_json"].parent, "--results-dir")
    summary = paths["summary_json"]
    if summary.exists() and not cfg.overwrite:
        try:
            theirs = json.loads(summary.read_text()).get("train_config", {}).get("models_dir", "")
        except ValueError:
            theirs = None  # a damaged summary is simply rewritten
        # summaries record repo-relative paths (common.provenance.portable_path): compare where they point
        if theirs is not None and recorded_path(models_dir_of(theirs)).resolve() != cfg.root().resolve():
            raise FileExistsError(
                f"{summary}: holds the summary of the models in {recorded_path(models_dir_of(theirs))}, this run trains into {cfg.root()}; "
                "pass a --results-dir of its own (one per models dir) or --overwrite to replace that summary"
            )


def _train_policy_locked(cfg: PolicyTrainConfig, tok: LoadedTokenizer, tag: str, paths: dict, device: torch.device,
                         on_checkpoint: Callable[[], None] | None) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    t_data = time.perf_counter()
    chosen, task_table = load_policy_episodes(cfg.data_paths, num_episodes=cfg.num_episodes)
    train_eps, val_eps = split_episodes(chosen, val_fraction=cfg.val_fraction, seed=cfg.seed)
    split = dict(backbone=cfg.backbone, data_paths=cfg.data_paths, feature_cache_paths=cfg.feature_cache_paths)
    train, val = build_split(tok, train_eps, **split), build_split(tok, val_eps, **split)
    # The decode depth is chosen on the clean held-out demos when the held-out set also holds episodes
    # relabelled by the expert off its own path (DART, DAgger): there the policy's error floor is high
    # enough to hide what a finer layer adds, and the choice fell to one layer (issue 12's data rounds).
    clean_val_eps = [e for e in val_eps if e["episode"].executed_actions is None]
    decode_val = build_split(tok, clean_val_eps, **split) if clean_val_eps and len(clean_val_eps) < len(val_eps) else None
    meta = {
        "data": cfg.data, "backbone": cfg.backbone, "num_episodes": len(chosen), "train_episodes": len(train_eps),
        "val_episodes": len(val_eps), "train_steps": len(train), "val_steps": len(val), "val_episode_keys": val.episodes,
    }
    data_seconds = time.perf_counter() - t_data

    summary: dict[str, Any] = {
        "tag": tag, "tokenizer": _tokenizer_info(tok), "stages": cfg.stages, "device": str(device),
        **{k: v for k, v in meta.items() if k != "val_episode_keys"}, "num_tasks": len(task_table), "task_table": task_table,
        "data_seconds": data_seconds,
    }
    t_main = time.perf_counter()
    if "main" in cfg.stages:
        policy, main_metrics, head_hash = _train_main(cfg, paths, tok, train, val, task_table, device, meta, on_checkpoint, decode_val)
    else:
        policy, main_metrics, head_hash = _load_trained_head(cfg, paths, tok, task_table, device, val, decode_val, on_checkpoint)
    summary["main_seconds"] = time.perf_counter() - t_main if "main" in cfg.stages else 0.0
    summary["head_checkpoint"] = str(paths["head"])
    summary["head_hash"] = head_hash
    summary["main"] = {k: v for k, v in main_metrics.items() if k not in meta}

    if "draft" in cfg.stages:
        t_draft = time.perf_counter()
        train_f = compute_features(policy, train, device=device)
        val_f = compute_features(policy, val, device=device)
        train_targets = train.codes
        if cfg.draft_targets == "main":
            # Distillation: the draft learns to propose what the main model will accept.
            train_targets = greedy_codes(policy.head, train_f, device=device)
            if cfg.draft_augment_copies:
                extra_f, extra_codes = perturbed_distillation_set(
                    policy, train, noise=cfg.draft_augment_noise, copies=cfg.draft_augment_copies, seed=cfg.seed + 7, device=device
                )
                train_f = torch.cat([train_f, extra_f])
                train_targets = torch.cat([train_targets, extra_codes])
            for run in filter(None, (r.strip() for r in cfg.draft_rollouts.split(","))):
                rollout_f = read_rollout_features(run, head_hash=head_hash).to(train_f.dtype)
                if rollout_f.shape[1] != train_f.shape[1]:
                    raise ValueError(f"{run}: recorded features have {rollout_f.shape[1]} dims, this backbone {train_f.shape[1]}")
                summary.setdefault("draft_rollout_states", {})[run] = len(rollout_f)
                train_f = torch.cat([train_f, rollout_f])
                train_targets = torch.cat([train_targets, greedy_codes(policy.head, rollout_f, device=device)])
        K = draft_layers(cfg, tok.model.num_layers, main_metrics)
        soft = None
        if cfg.draft_targets == "main" and cfg.draft_soft_targets:
            first = 1 if cfg.draft_input == "main_hidden" else 0
            soft = main_distributions(policy.head, train_f, train_targets, layers=range(first, first + K), device=device)
        draft_metrics = _train_draft(cfg, paths, tok, policy, head_hash, train_f, val_f, train_targets, val.codes, device, meta,
                                     on_checkpoint, K=K, soft_targets=soft)
        summary["draft_seconds"] = time.perf_counter() - t_draft
        summary["draft_checkpoint"] = str(paths["draft"])
        summary["draft"] = {k: v for k, v in draft_metrics.items() if k not in meta}
    summary["wall_seconds"] = time.perf_counter() - started
    summary["metrics_jsonl"] = {"main": str(paths["head_metrics"]), "draft": str(paths["draft_metrics"])}
    summary["provenance"] = provenance(seed=cfg.seed)
    summary["train_config"] = asdict(cfg)
    write_json(paths["summary_json"], summary)
    paths["summary_md"].write_text(summary_markdown(summary))
    summary["summary_json"] = str(paths["summary_json"])
    summary["summary_md"] = str(paths["summary_md"])
    return summary

