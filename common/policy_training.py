"""Phase 2: train the main model ("RFSQ head" + its backbone) and the draft model with projection
on RFSQ tokens of expert demonstrations (the pure function behind
``phase2_draft_retrain/modal_train_draft_with_projection.py``, locally and on Modal).

Data and labels
  * ``--data`` is one HDF5 file or a comma-separated list (LIBERO layout ``data/demo_N/actions``,
    ``obs/low_dim``, per-demo attrs ``task_id`` / ``language_instruction``). Policy task indices are
    made unique per (file, task_id) and recorded in every checkpoint (``config["task_table"]``).
  * ``--num-episodes`` caps the TOTAL number of demos, taken round-robin over the (file, task) groups
    in demo order, so a cap keeps every task represented.
  * Label of step t = the tokenizer's codes of the action chunk that starts at t
    (``future_chunks``: actions t..t+chunk_len-1; near the episode end the window is padded by
    repeating the episode's last action, so every step has a label), normalized with the
    tokenizer checkpoint's own normalizer (never a refit).
  * Inputs: ``--backbone state`` = ``obs/low_dim`` + the policy task index (StateBackbone);
    ``--backbone openvla-oft`` = per-step OpenVLA-OFT features cached on the data volume by the
    Modal function ``cache_openvla_features`` (the 7B model is never run during training).
  * Split by episode (``split_episodes``); neighbouring frames never straddle the split.

Training
  1. main: backbone + RFSQHead jointly, teacher-forced token cross-entropy over all layers
     (the backbone's observation normalizer is fitted on the training observations). Best
     checkpoint by held-out mean token accuracy (ties: lower CE).
  2. draft: DraftWithProjection on the FROZEN best backbone's features (its own input projection
     from the feature size), labels = the tokenizer's coarse layers L0..L(K-1) (never the main
     model's predictions). Best checkpoint by held-out mean coarse-token accuracy.
  Each stage writes ``*_last.pt`` every epoch (``--resume`` continues) and one JSON line per epoch.

Held-out metrics: main per-layer token accuracy and "all T tokens of the layer right" rate
(teacher-forced), plus greedy (non-teacher-forced) per-layer accuracy; draft per-layer accuracy,
all-tokens rate and mean coarse accuracy; draft-main agreement per layer (one ``main.verify`` pass
per batch: layer l agrees when all its draft tokens equal the main's greedy tokens given the
draft's layers < l), the exact-acceptance distribution and implied main passes per chunk (L - a);
the draft vs one main pass cost (params, analytic FLOPs, measured batch-1 CPU time, 1 thread).

Outputs (models dir): ``best_rfsq_head{_tag}.pt`` (kind ``rfsq_head``: backbone + head in one
``PolicyModel``), ``best_draft_with_projection{_tag}.pt`` (kind ``draft_with_projection``), their
``*_last.pt`` / ``*_metrics.jsonl``; results: ``results_dir()/phase2/train_summary{_tag}.json|.md``.
``--tag ""`` derives the suffix from the tokenizer: "" for robust (the seed's names), "naive"
for the naive tokenizer, the conditioning name otherwise.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.action_data import future_chunks, load_hdf5_episodes, split_episodes
from common.action_tokenizer import LoadedTokenizer, load_tokenizer
from common.backbones import StateBackbone
from common.checkpoints import CheckpointError, atomic_torch_save, load_state_strict, read_checkpoint, save_checkpoint
from common.draft_model import DRAFT_MODES, DraftWithProjection
from common.normalization import ActionNormalizer
from common.paths import ROBUST_TOKENIZER, data_dir, results_dir
from common.paths import models_dir as default_models_dir
from common.provenance import provenance, write_json
from common.rfsq_head import RFSQHead

HEAD_KIND = "rfsq_head"
DRAFT_KIND = "draft_with_projection"
MAIN_STATE_KIND = "phase2_main_training_state"
DRAFT_STATE_KIND = "phase2_draft_training_state"
BACKBONES = ("state", "openvla-oft")
STAGES = ("main", "draft")
FEATURE_CACHE_SUFFIX = ".openvla_oft_features.h5"
CACHE_COMMAND = (
    "modal run phase2_draft_retrain/modal_train_draft_with_projection.py::cache_openvla_features --data {data}"
)
# Flags that may change between a run and its --resume.
_RESUMABLE_CHANGES = ("resume", "progress", "epochs", "torch_threads", "train", "timing_repeats", "device")


# ==================================================================================== config
@dataclass
class PolicyTrainConfig:
    """Flags of ``modal_train_draft_with_projection`` (same names on the local CLI and ``modal run``)."""

    num_episodes: int = 200  # total demos over all --data files (round-robin over tasks); 0 = all
    epochs: int = 50
    batch_size: int = 32
    lr: float = 3e-4
    seed: int = 0
    data: str = ""  # HDF5 path, or comma-separated paths (e.g. object + spatial demos)
    rfsq_checkpoint: str = ""  # "" = <models dir>/rfsq_robust_best.pt
    backbone: str = "state"  # state | openvla-oft
    coarse_layers: int = 3  # K: layers the draft predicts
    train: str = "main,draft"  # stages to run: main, draft or both
    tag: str = ""  # output suffix; "" = from the tokenizer ("" robust, "naive" naive)
    models_dir: str = ""  # "" = $RSD_MODELS_DIR or ./artifacts/models (Modal: /models)
    val_fraction: float = 0.2
    d_model: int = 256
    num_blocks: int = 4
    num_heads: int = 4
    draft_width: int = 128
    draft_hidden_layers: int = 2
    # parallel = all K layers from one linear head; chained = layer l conditioned on the draft's own
    # tokens of layers < l, as the main model is (still one draft call; see common/draft_model.py)
    draft_mode: str = "parallel"
    # What the draft learns: "main" = the main model's own greedy coarse tokens (distillation: what
    # speculative decoding accepts), "labels" = the tokenizer's tokens of the demo actions.
    draft_targets: str = "main"
    # Distillation targets are free to compute on ANY input, so the draft can also learn the main
    # model's choices on perturbed inputs: copy c adds Gaussian noise of (c+1)/copies * noise * (each
    # input dimension's std over the training steps). In closed loop the robot drifts off the demo
    # states, where a draft fit only to demo states agrees with the main model much less often.
    draft_augment_copies: int = 0
    draft_augment_noise: float = 0.1
    feature_cache: str = ""  # openvla-oft: cache file(s) parallel to --data; "" = <data dir>/features/<stem>.openvla_oft_features.h5
    weight_decay: float = 0.01
    timing_repeats: int = 200  # batch-1 calls per model for the measured cost ratio
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    resume: bool = False
    progress: bool = True
    torch_threads: int = 1  # tiny models: one thread is fastest on a shared CPU; 0 = torch default

    def __post_init__(self):
        if not self.data.strip():
            raise ValueError(
                "--data is required: pass a LIBERO-format HDF5 demo file (or a comma-separated list); "
                "generate demos with `python -m phase1_improved.collect_demos`"
            )
        if self.draft_mode not in DRAFT_MODES:
            raise ValueError(f"--draft-mode must be one of {DRAFT_MODES}; got {self.draft_mode!r}")
        if self.draft_targets not in ("main", "labels"):
            raise ValueError(f"--draft-targets must be main or labels; got {self.draft_targets!r}")
        if self.draft_augment_copies < 0 or self.draft_augment_noise < 0:
            raise ValueError(
                f"--draft-augment-copies and --draft-augment-noise must be >= 0; got {self.draft_augment_copies}, {self.draft_augment_noise}"
            )
        if self.draft_augment_copies and self.draft_targets != "main":
            raise ValueError("--draft-augment-copies needs --draft-targets main (perturbed inputs have no demo tokens)")
        if self.draft_augment_copies and self.draft_augment_noise == 0:
            raise ValueError("--draft-augment-copies > 0 needs --draft-augment-noise > 0")
        if self.backbone not in BACKBONES:
            raise ValueError(f"--backbone must be one of {BACKBONES}; got {self.backbone!r}")
        stages = self.stages
        if not stages or any(s not in STAGES for s in stages):
            raise ValueError(f"--train must be a comma-separated subset of {STAGES}; got {self.train!r}")
        if self.num_episodes < 0:
            raise ValueError(f"--num-episodes must be >= 0 (0 = all); got {self.num_episodes}")
        for name in ("epochs", "batch_size", "coarse_layers", "d_model", "num_blocks", "num_heads", "draft_width", "timing_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.draft_hidden_layers < 0:
            raise ValueError(f"--draft-hidden-layers must be >= 0; got {self.draft_hidden_layers}")
        if self.d_model % self.num_heads:
            raise ValueError(f"--d-model ({self.d_model}) must be divisible by --num-heads ({self.num_heads})")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0; got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight-decay must be >= 0; got {self.weight_decay}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1); got {self.val_fraction}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda; got {self.device!r}")
        if self.tag and not all(c.isalnum() or c in "-_." for c in self.tag):
            raise ValueError(f"--tag may only hold letters, digits, '-', '_' and '.'; got {self.tag!r}")
        if self.feature_cache and len(self.feature_cache_paths) != len(self.data_paths):
            raise ValueError(
                f"--feature-cache must name one file per --data file ({len(self.data_paths)}); got {self.feature_cache!r}"
            )

    @property
    def stages(self) -> list[str]:
        return [s.strip() for s in self.train.split(",") if s.strip()]

    @property
    def data_paths(self) -> list[str]:
        return [p.strip() for p in self.data.split(",") if p.strip()]

    @property
    def feature_cache_paths(self) -> list[Path]:
        if self.feature_cache:
            return [Path(p.strip()) for p in self.feature_cache.split(",") if p.strip()]
        return [default_feature_cache(p) for p in self.data_paths]

    def root(self) -> Path:
        return Path(self.models_dir) if self.models_dir else default_models_dir()

    def tokenizer_path(self) -> Path:
        return Path(self.rfsq_checkpoint) if self.rfsq_checkpoint else self.root() / ROBUST_TOKENIZER


def default_feature_cache(data_path: str | Path) -> Path:
    """Where ``cache_openvla_features`` writes (and training reads) the features of one demo file."""
    return data_dir() / "features" / (Path(data_path).stem + FEATURE_CACHE_SUFFIX)


def tag_for_tokenizer(conditioning: str) -> str:
    return {"layernorm": "", "none": "naive"}.get(conditioning, conditioning)


def output_paths(root: Path, tag: str) -> dict[str, Path]:
    sfx = f"_{tag}" if tag else ""
    return {
        "head": root / f"best_rfsq_head{sfx}.pt",
        "head_last": root / f"rfsq_head{sfx}_last.pt",
        "head_metrics": root / f"rfsq_head{sfx}_metrics.jsonl",
        "draft": root / f"best_draft_with_projection{sfx}.pt",
        "draft_last": root / f"draft_with_projection{sfx}_last.pt",
        "draft_metrics": root / f"draft_with_projection{sfx}_metrics.jsonl",
        "summary_json": results_dir() / "phase2" / f"train_summary{sfx}.json",
        "summary_md": results_dir() / "phase2" / f"train_summary{sfx}.md",
    }


# ==================================================================================== model
class PolicyModel(nn.Module):
    """The main model: (optional) trainable backbone + RFSQHead, rebuildable from ``config`` alone.

    ``backbone_kind="state"``: ``features(obs, task_ids)`` runs the StateBackbone.
    ``backbone_kind="openvla-oft"``: there is no trainable backbone; ``features(x)`` returns the
    precomputed OpenVLA features ``x`` unchanged.
    """

    def __init__(self, *, backbone_kind: str, backbone_config: dict | None, head_config: dict) -> None:
        super().__init__()
        if backbone_kind not in BACKBONES:
            raise ValueError(f"backbone_kind: expected one of {BACKBONES}, found {backbone_kind!r}")
        self.backbone_kind = backbone_kind
        self.backbone = StateBackbone(**backbone_config) if backbone_kind == "state" else None
        self.head = RFSQHead(**head_config)
        if self.backbone is not None and self.backbone.feature_dim != self.head.feature_dim:
            raise ValueError(f"backbone feature_dim {self.backbone.feature_dim} != head feature_dim {self.head.feature_dim}")

    @property
    def model_config(self) -> dict[str, Any]:
        return {
            "backbone_kind": self.backbone_kind,
            "backbone_config": None if self.backbone is None else self.backbone.to_config(),
            "head_config": self.head.to_config(),
        }

    @property
    def feature_dim(self) -> int:
        return self.head.feature_dim

    def features(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.backbone is None:
            return x.float()
        if task_ids is None:
            raise ValueError("state backbone: task_ids are required")
        return self.backbone(x, task_ids)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, task_ids), codes)


# ==================================================================================== data
@dataclass
class PolicyData:
    """Per-step tensors of one split (all on CPU)."""

    inputs: torch.Tensor  # [N, D] low-dim obs (state) or cached features (openvla-oft)
    task_ids: torch.Tensor  # [N] policy task index
    codes: torch.Tensor  # [N, T, L] uint8/int16 tokenizer codes of the chunk starting at each step
    episodes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.codes.shape[0])


def _file_suite(path: str) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        value = f["data"].attrs.get("suite", "") if "data" in f else ""
    return value.decode() if isinstance(value, bytes) else str(value)


def load_policy_episodes(data_paths: list[str], *, num_episodes: int = 0) -> tuple[list[dict], list[dict]]:
    """Read every file; returns (episodes, task_table).

    episode dict: ``episode`` (``Episode``), ``file_index``, ``file``, ``task_index``, ``key``
    (``<file stem>/<demo name>``). task_table rows: ``index, file, file_stem, suite, task_id,
    instruction`` (index = position in the table = the policy's task index).
    """
    groups: dict[tuple[int, int], list] = {}
    task_table: list[dict] = []
    stems = [Path(p).stem for p in data_paths]
    if len(set(stems)) != len(stems):
        raise ValueError(f"--data files must have distinct names (episodes are keyed by file stem); got {data_paths}")
    for fi, path in enumerate(data_paths):
        suite = _file_suite(path) if Path(path).exists() else ""
        eps = load_hdf5_episodes(path)
        for ep in eps:
            key = (fi, ep.task_id)
            if key not in groups:
                groups[key] = []
            groups[key].append(ep)
        for task_id in sorted({ep.task_id for ep in eps}):
            instr = next(ep.instruction for ep in eps if ep.task_id == task_id)
            task_table.append({
                "index": len(task_table), "file": str(path), "file_stem": stems[fi], "suite": suite,
                "task_id": int(task_id), "instruction": instr,
            })
    index_of = {(r["file_stem"], r["task_id"]): r["index"] for r in task_table}
    order = sorted(groups, key=lambda k: index_of[(stems[k[0]], k[1])])
    limit = num_episodes if num_episodes > 0 else sum(len(v) for v in groups.values())
    chosen: list[dict] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(groups[k]) for k in order):
        for k in order:
            if depth < len(groups[k]) and len(chosen) < limit:
                ep = groups[k][depth]
                chosen.append({
                    "episode": ep, "file_index": k[0], "file": data_paths[k[0]],
                    "task_index": index_of[(stems[k[0]], k[1])], "key": f"{stems[k[0]]}/{ep.name}",
                })
        depth += 1
    return chosen, task_table


@torch.no_grad()
def encode_labels(tokenizer: LoadedTokenizer, actions: np.ndarray, *, batch_size: int = 4096) -> torch.Tensor:
    """Codes ``[T, tokens_per_layer, num_layers]`` of the chunk starting at every step (see module doc)."""
    model = tokenizer.model
    chunks = future_chunks(actions, chunk_len=model.chunk_len)
    x = torch.from_numpy(tokenizer.normalizer.normalize(chunks))
    dtype = torch.uint8 if model.num_levels <= 256 else torch.int16
    out = [model.encode(x[s : s + batch_size]).to(dtype) for s in range(0, len(x), batch_size)]
    return torch.cat(out)


def read_cached_features(cache_path: Path, names: list[str], lengths: list[int], data_path: str) -> list[np.ndarray]:
    """Per-step OpenVLA features for the given demos of one file (``features/<demo name>`` [T, F])."""
    import h5py

    if not cache_path.exists():
        raise FileNotFoundError(
            f"{cache_path}: OpenVLA-OFT feature cache not found for {data_path}; compute it on Modal with "
            f"`{CACHE_COMMAND.format(data=data_path)}` (or pass --feature-cache, or use --backbone state)"
        )
    out = []
    with h5py.File(cache_path, "r") as f:
        if "features" not in f:
            raise ValueError(f"{cache_path}: no 'features' group (expected features/<demo name> [T, F])")
        grp = f["features"]
        for name, n in zip(names, lengths):
            if name not in grp:
                raise FileNotFoundError(
                    f"{cache_path}: no cached features for {name} of {data_path} (incomplete cache?); rerun "
                    f"`{CACHE_COMMAND.format(data=data_path)}` (it resumes)"
                )
            arr = grp[name][()].astype(np.float32)
            if arr.ndim != 2 or arr.shape[0] != n:
                raise ValueError(f"{cache_path}:features/{name}: expected [{n}, F] (one row per demo step), found {list(arr.shape)}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{cache_path}:features/{name}: contains NaN/inf")
            out.append(arr)
    return out


def build_split(cfg: PolicyTrainConfig, tokenizer: LoadedTokenizer, chosen: list[dict]) -> PolicyData:
    """Episodes -> per-step inputs, task ids and codes."""
    inputs: list[np.ndarray] = []
    if cfg.backbone == "state":
        for item in chosen:
            ep = item["episode"]
            if ep.low_dim_obs is None:
                raise ValueError(
                    f"{item['file']}: data/{ep.name} has no obs/low_dim; --backbone state needs the low-dimensional "
                    "observations our collector writes (`python -m phase1_improved.collect_demos`); for other "
                    "files use --backbone openvla-oft with a feature cache"
                )
            if ep.low_dim_obs.shape[0] != len(ep):
                raise ValueError(f"{item['file']}: data/{ep.name}: obs/low_dim has {ep.low_dim_obs.shape[0]} rows, actions {len(ep)}")
            inputs.append(ep.low_dim_obs)
        dims = {a.shape[1] for a in inputs}
        if len(dims) != 1:
            raise ValueError(f"obs/low_dim sizes differ between demos/files: {sorted(dims)}")
    else:
        caches = cfg.feature_cache_paths
        by_file: dict[int, list[dict]] = {}
        for item in chosen:
            by_file.setdefault(item["file_index"], []).append(item)
        feats: dict[str, np.ndarray] = {}
        for fi, items in by_file.items():
            arrays = read_cached_features(
                caches[fi], [i["episode"].name for i in items], [len(i["episode"]) for i in items], cfg.data_paths[fi]
            )
            feats.update({i["key"]: a for i, a in zip(items, arrays)})
        inputs = [feats[i["key"]] for i in chosen]
        dims = {a.shape[1] for a in inputs}
        if len(dims) != 1:
            raise ValueError(f"cached feature sizes differ between files: {sorted(dims)}")
    codes = [encode_labels(tokenizer, item["episode"].actions) for item in chosen]
    task_ids = [np.full(len(item["episode"]), item["task_index"], np.int64) for item in chosen]
    return PolicyData(
        inputs=torch.from_numpy(np.concatenate(inputs).astype(np.float32)),
        task_ids=torch.from_numpy(np.concatenate(task_ids)),
        codes=torch.cat(codes),
        episodes=[item["key"] for item in chosen],
    )


# ==================================================================================== metrics
def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield slice(s, min(s + batch_size, n))


@torch.no_grad()
def compute_features(policy: PolicyModel, data: PolicyData, *, device: torch.device, batch_size: int = 2048) -> torch.Tensor:
    """Frozen features of every step (CPU tensor [N, F])."""
    was = policy.training
    policy.eval()
    out = [
        policy.features(data.inputs[sl].to(device), data.task_ids[sl].to(device)).float().cpu()
        for sl in _batches(len(data), batch_size)
    ]
    policy.train(was)
    return torch.cat(out)


@torch.no_grad()
def evaluate_main(policy: PolicyModel, data: PolicyData, *, device: torch.device, batch_size: int = 1024, greedy: bool = False) -> dict[str, Any]:
    """Teacher-forced held-out metrics per layer (and greedy-decode accuracy when ``greedy``)."""
    was = policy.training
    policy.eval()
    head = policy.head
    L = head.num_layers
    correct = torch.zeros(L, dtype=torch.float64)
    all_ok = torch.zeros(L, dtype=torch.float64)
    g_correct = torch.zeros(L, dtype=torch.float64)
    g_all = torch.zeros(L, dtype=torch.float64)
    ce_sum = 0.0
    for sl in _batches(len(data), batch_size):
        codes = data.codes[sl].to(device).long()
        feats = policy.features(data.inputs[sl].to(device), data.task_ids[sl].to(device))
        logits = head(feats, codes)  # [B, L, T, V]
        target = codes.transpose(1, 2)  # [B, L, T]
        ce_sum += F.cross_entropy(logits.reshape(-1, head.num_levels), target.reshape(-1), reduction="sum").item()
        hit = logits.argmax(-1) == target  # [B, L, T]
        correct += hit.double().mean(dim=2).sum(dim=0).cpu()
        all_ok += hit.all(dim=2).double().sum(dim=0).cpu()
        if greedy:
            g_hit = head.greedy_decode(feats).transpose(1, 2) == target
            g_correct += g_hit.double().mean(dim=2).sum(dim=0).cpu()
            g_all += g_hit.all(dim=2).double().sum(dim=0).cpu()
    policy.train(was)
    n = len(data)
    token_acc = (correct / n).tolist()
    out = {
        "val_ce": ce_sum / (n * L * head.tokens_per_layer),
        "val_token_acc": token_acc,
        "val_layer_all_correct": (all_ok / n).tolist(),
        "val_mean_token_acc": float(np.mean(token_acc)),
    }
    if greedy:
        out["val_greedy_token_acc"] = (g_correct / n).tolist()
        out["val_greedy_layer_all_correct"] = (g_all / n).tolist()
        out["val_greedy_mean_token_acc"] = float(np.mean(out["val_greedy_token_acc"]))
    return out


@torch.no_grad()
def evaluate_draft(draft: DraftWithProjection, feats: torch.Tensor, codes: torch.Tensor, *, device: torch.device, batch_size: int = 2048) -> dict[str, Any]:
    was = draft.training
    draft.eval()
    K = draft.coarse_layers
    correct = torch.zeros(K, dtype=torch.float64)
    all_ok = torch.zeros(K, dtype=torch.float64)
    ce_sum = 0.0
    for sl in _batches(len(codes), batch_size):
        logits = draft(feats[sl].to(device))  # [B, K, T, V]
        target = codes[sl, :, :K].to(device).long().transpose(1, 2)  # [B, K, T]
        ce_sum += F.cross_entropy(logits.reshape(-1, draft.num_levels), target.reshape(-1), reduction="sum").item()
        hit = logits.argmax(-1) == target
        correct += hit.double().mean(dim=2).sum(dim=0).cpu()
        all_ok += hit.all(dim=2).double().sum(dim=0).cpu()
    draft.train(was)
    n = len(codes)
    token_acc = (correct / n).tolist()
    return {
        "val_ce": ce_sum / (n * K * draft.tokens_per_layer),
        "val_token_acc": token_acc,
        "val_layer_all_correct": (all_ok / n).tolist(),
        "val_coarse_acc": float(np.mean(token_acc)),
    }


@torch.no_grad()
def draft_main_agreement(head: RFSQHead, draft: DraftWithProjection, feats: torch.Tensor, *, device: torch.device, batch_size: int = 1024) -> dict[str, Any]:
    """What speculative decoding (exact acceptance) would do on these features.

    Per batch: ONE ``head.verify(features, proposed)`` pass. ``agreement[l]`` = fraction of chunks
    whose drafted layer l equals (all T tokens) the main model's greedy layer l given the DRAFT's
    layers < l. ``accepted`` = longest agreeing prefix (0..K); main passes per chunk = L - accepted.
    """
    was_h, was_d = head.training, draft.training
    head.eval()
    draft.eval()
    K, L = draft.coarse_layers, head.num_layers
    agree = torch.zeros(K, dtype=torch.float64)
    token_agree = torch.zeros(K, dtype=torch.float64)
    hist = torch.zeros(K + 1, dtype=torch.float64)
    for sl in _batches(len(feats), batch_size):
        f = feats[sl].to(device)
        proposed = draft.propose(f)  # [B, T, K]
        logits, _ = head.verify(f, proposed)  # [B, K+1, T, V]
        main_greedy = logits.argmax(-1).transpose(1, 2)[..., :K]  # [B, T, K]
        same = proposed.long() == main_greedy
        layer_ok = same.all(dim=1)  # [B, K]
        agree += layer_ok.double().sum(dim=0).cpu()
        token_agree += same.double().mean(dim=1).sum(dim=0).cpu()
        accepted = torch.cumprod(layer_ok.long(), dim=1).sum(dim=1)
        hist += torch.bincount(accepted.cpu(), minlength=K + 1).double()
    head.train(was_h)
    draft.train(was_d)
    n = len(feats)
    dist = (hist / n).tolist()
    mean_acc = float(sum(a * p for a, p in enumerate(dist)))
    return {
        "agreement_per_layer": (agree / n).tolist(),
        "token_agreement_per_layer": (token_agree / n).tolist(),
        "accepted_layers_distribution": dist,  # index a = P(exactly a layers accepted)
        "mean_accepted_layers": mean_acc,
        "mean_main_passes_per_chunk": float(L - mean_acc),
        "main_passes_without_draft": L,
    }


@torch.no_grad()
def measure_costs(head: RFSQHead, draft: DraftWithProjection, *, repeats: int = 200, seed: int = 0) -> dict[str, Any]:
    """Draft pass vs one main pass: params, analytic FLOPs, measured batch-1 CPU time (medians).

    One main pass = one cached sequential step of ``greedy_decode`` (its time / L); the backbone is
    shared by both and not counted. Runs on CPU copies with 1 thread (restored afterwards).
    """
    head = copy.deepcopy(head).cpu().eval()
    draft = copy.deepcopy(draft).cpu().eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # timing input only: the cost of a pass does not depend on the feature values
        f = torch.randn(1, head.feature_dim, generator=torch.Generator().manual_seed(seed))
        for _ in range(min(10, repeats)):  # warm-up
            draft(f)
            head.greedy_decode(f)
        d_times, m_times = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            draft.propose(f)
            d_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            head.greedy_decode(f)
            m_times.append((time.perf_counter() - t0) / head.num_layers)
    finally:
        torch.set_num_threads(threads)
    d_flops = int(draft.count_flops(1)["draft_pass"])
    m_flops = float(head.count_flops(1)["per_pass_mean"])
    d_med, m_med = statistics.median(d_times), statistics.median(m_times)
    return {
        "draft_params": draft.num_parameters(),
        "main_head_params": head.num_parameters(),
        "draft_flops_per_pass": d_flops,
        "main_flops_per_pass_mean": m_flops,
        "flops_ratio_draft_over_main_pass": d_flops / m_flops,
        "draft_time_s_median": d_med,
        "main_pass_time_s_median": m_med,
        "time_ratio_draft_over_main_pass": d_med / m_med,
        "timing": f"CPU, 1 thread, batch 1, median of {repeats} calls",
    }


# ==================================================================================== training helpers
def _resume_key(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in _RESUMABLE_CHANGES}


def _make_optimizer(model: nn.Module, cfg: PolicyTrainConfig, num_train: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.epochs * math.ceil(num_train / cfg.batch_size))
    warmup = min(100, max(1, total // 20))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def _epoch_order(n: int, cfg: PolicyTrainConfig, epoch: int, salt: int) -> torch.Tensor:
    # seeded per epoch, so a resumed run shuffles exactly as an uninterrupted one
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + salt * 7_919 + epoch))


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def _load_training_state(path: Path, kind: str, cfg: PolicyTrainConfig, extra_checks: dict) -> dict | None:
    if not (cfg.resume and path.exists()):
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("kind") != kind or _resume_key(state["config"]) != _resume_key(asdict(cfg)):
        raise CheckpointError(f"{path}: training state was written by a different configuration; rerun without --resume")
    for key, value in extra_checks.items():
        if state.get(key) != value:
            raise CheckpointError(f"{path}: training state has {key}={state.get(key)!r}, expected {value!r}; rerun without --resume")
    return state


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


def _fit_epochs(
    model: nn.Module, cfg: PolicyTrainConfig, *, stage: str, num_train: int, salt: int,
    batch_loss: Callable[[torch.Tensor], torch.Tensor], evaluate: Callable[[], tuple[dict, tuple]],
    save_best: Callable[[dict, int], None], state_path: Path, state_kind: str, state_checks: dict,
    metrics_path: Path, on_checkpoint: Callable[[], None] | None,
) -> None:
    """The epoch loop both stages share: resume, shuffled AdamW steps, held-out metrics, JSONL log,
    best checkpoint (``save_best(metrics, epoch)`` when ``evaluate``'s key improves), training state.

    ``state_checks`` (hashes of what the stage was trained against) are stored in the training
    state and must match on ``--resume``.
    """
    optimizer, scheduler = _make_optimizer(model, cfg, num_train)
    start_epoch, best_key = 0, None
    state = _load_training_state(state_path, state_kind, cfg, state_checks)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"])
        best_key = tuple(state["best_key"]) if state.get("best_key") is not None else None
    elif metrics_path.exists():
        metrics_path.unlink()  # a fresh run starts a fresh log
    epochs = tqdm(range(start_epoch, cfg.epochs), desc=stage, disable=not cfg.progress, initial=start_epoch, total=cfg.epochs)
    for epoch in epochs:
        t0 = time.perf_counter()
        model.train()
        order = _epoch_order(num_train, cfg, epoch, salt=salt)
        running, count = 0.0, 0
        for s in range(0, num_train, cfg.batch_size):
            idx = order[s : s + cfg.batch_size]
            loss = batch_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(idx)
            count += len(idx)
        ev, key = evaluate()
        record = {"stage": stage, "epoch": epoch + 1, "train_loss": running / max(count, 1), **ev,
                  "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0}
        record["best"] = best_key is None or key > best_key
        _append_jsonl(metrics_path, record)
        epochs.set_postfix(loss=f"{record['train_loss']:.3f}", score=f"{key[0]:.3f}")
        if record["best"]:
            best_key = key
            save_best(ev, epoch + 1)
        atomic_torch_save(
            {"kind": state_kind, "config": asdict(cfg), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_key": list(best_key), **state_checks},
            state_path,
        )
        if on_checkpoint is not None:
            on_checkpoint()


# ==================================================================================== stages
def _train_main(cfg, paths, tok, train, val, task_table, device, meta, on_checkpoint) -> tuple[PolicyModel, dict, str]:
    """Train backbone + head; returns (best policy on device, best metrics, head checkpoint hash)."""
    m = tok.model
    obs_dim = int(train.inputs.shape[1])
    if cfg.backbone == "state":
        backbone_config = dict(obs_dim=obs_dim, num_tasks=len(task_table), feature_dim=cfg.d_model, hidden_dim=max(cfg.d_model, 64))
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
        **policy.model_config, "task_table": task_table, "tokenizer": _tokenizer_info(tok),
        "label_convention": "codes of the chunk starting at each step; episode end padded by repeating the last action",
    }
    extra_base = {
        "tokenizer_hash": tok.content_hash, "tokenizer_path": str(tok.path),
        "train_config": asdict(cfg), "provenance": provenance(seed=cfg.seed),
    }
    normalizer = tok.normalizer.to_dict()

    def batch_loss(idx):
        x, t, c = train.inputs[idx].to(device), train.task_ids[idx].to(device), train.codes[idx].to(device).long()
        return policy.head.loss(policy.features(x, t), c)

    def evaluate():
        ev = evaluate_main(policy, val, device=device)
        return ev, (ev["val_mean_token_acc"], -ev["val_ce"])

    def save_best(ev, epoch):
        save_checkpoint(
            paths["head"], kind=HEAD_KIND, model=policy, config=ckpt_config, normalizer=normalizer,
            metrics={**ev, "epoch": epoch, **meta}, extra=extra_base,
        )

    _fit_epochs(
        policy, cfg, stage="main", num_train=len(train), salt=1, batch_loss=batch_loss, evaluate=evaluate, save_best=save_best,
        state_path=paths["head_last"], state_kind=MAIN_STATE_KIND, state_checks={"tokenizer_hash": tok.content_hash},
        metrics_path=paths["head_metrics"], on_checkpoint=on_checkpoint,
    )

    # Reload the best weights, add greedy-decode metrics to the checkpoint's metrics.
    ckpt = read_checkpoint(paths["head"], kind=HEAD_KIND)
    policy = PolicyModel(**{k: ckpt["config"][k] for k in ("backbone_kind", "backbone_config", "head_config")})
    load_state_strict(policy, ckpt, paths["head"])
    policy.to(device).eval()
    metrics = dict(ckpt["metrics"])
    if "val_greedy_token_acc" not in metrics:
        metrics.update(evaluate_main(policy, val, device=device, greedy=True))
        ckpt_new = save_checkpoint(
            paths["head"], kind=HEAD_KIND, model=policy, config=ckpt["config"], normalizer=ckpt["normalizer"],
            metrics=metrics, extra=ckpt["extra"],
        )
        if on_checkpoint is not None:
            on_checkpoint()
        return policy, metrics, ckpt_new["content_hash"]
    return policy, metrics, ckpt["content_hash"]


def _load_trained_head(cfg, paths, tok, task_table, device) -> tuple[PolicyModel, dict, str]:
    """``--train draft`` alone: the frozen backbone comes from the existing head checkpoint."""
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
    policy = PolicyModel(**{k: cfg_[k] for k in ("backbone_kind", "backbone_config", "head_config")})
    load_state_strict(policy, ckpt, path)
    return policy.to(device).eval(), dict(ckpt["metrics"]), ckpt["content_hash"]


@torch.no_grad()
def greedy_codes(head: RFSQHead, feats: torch.Tensor, *, device: torch.device, batch_size: int = 2048) -> torch.Tensor:
    """The main model's greedy (sequential) codes ``[N, T, L]`` for precomputed features."""
    head.eval()
    out = [head.greedy_decode(feats[s : s + batch_size].to(device)).cpu() for s in range(0, len(feats), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def perturbed_distillation_set(
    policy: PolicyModel, data: PolicyData, *, noise: float, copies: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``copies`` noisy versions of ``data.inputs`` and the main model's greedy codes on them.

    Copy c (0-based) adds N(0, ((c+1)/copies * noise * std_d)^2) to input dimension d, std over
    ``data``'s steps (task ids untouched). Returns CPU tensors [copies*N, F] and [copies*N, T, L].
    """
    was = policy.training
    policy.eval()
    std = data.inputs.std(dim=0)
    gen = torch.Generator().manual_seed(seed)
    feats, codes = [], []
    for c in range(copies):
        scale = (c + 1) / copies * noise
        for sl in _batches(len(data), 2048):
            x = data.inputs[sl] + scale * std * torch.randn(data.inputs[sl].shape, generator=gen)
            f = policy.features(x.to(device), data.task_ids[sl].to(device)).float()
            feats.append(f.cpu())
            codes.append(policy.head.greedy_decode(f).cpu())
    policy.train(was)
    return torch.cat(feats), torch.cat(codes)


def _train_draft(cfg, paths, tok, policy, head_hash, train_f, val_f, train_codes, val_codes, device, meta, on_checkpoint) -> dict:
    m = tok.model
    if not 1 <= cfg.coarse_layers <= m.num_layers - 1:
        raise ValueError(f"--coarse-layers must be in [1, {m.num_layers - 1}] for a {m.num_layers}-layer tokenizer; got {cfg.coarse_layers}")
    torch.manual_seed(cfg.seed + 1)
    draft = DraftWithProjection(
        feature_dim=policy.feature_dim, width=cfg.draft_width, coarse_layers=cfg.coarse_layers,
        tokens_per_layer=m.tokens_per_layer, num_levels=m.num_levels, hidden_layers=cfg.draft_hidden_layers, mode=cfg.draft_mode,
    ).to(device)
    costs = measure_costs(policy.head, draft, repeats=cfg.timing_repeats, seed=cfg.seed)
    ckpt_config = {
        **draft.to_config(), "backbone_kind": cfg.backbone, "tokenizer": _tokenizer_info(tok), "head_hash": head_hash,
    }
    extra = {
        "tokenizer_hash": tok.content_hash, "tokenizer_path": str(tok.path), "head_hash": head_hash,
        "head_path": str(paths["head"]), "train_config": asdict(cfg), "provenance": provenance(seed=cfg.seed),
    }

    def batch_loss(idx):
        return draft.loss(train_f[idx].to(device), train_codes[idx].to(device).long())

    def evaluate():
        ev = evaluate_draft(draft, val_f, val_codes, device=device)
        ev.update(draft_main_agreement(policy.head, draft, val_f, device=device))
        # best draft: most accepted layers when distilled (the speedup), else coarse accuracy
        key = (ev["mean_accepted_layers"], ev["val_coarse_acc"]) if cfg.draft_targets == "main" else (ev["val_coarse_acc"], -ev["val_ce"])
        return ev, key

    def save_best(ev, epoch):
        save_checkpoint(
            paths["draft"], kind=DRAFT_KIND, model=draft, config=ckpt_config, normalizer=tok.normalizer.to_dict(),
            metrics={**ev, "epoch": epoch, "costs": costs, **meta}, extra=extra,
        )

    _fit_epochs(
        draft, cfg, stage="draft", num_train=len(train_f), salt=2, batch_loss=batch_loss, evaluate=evaluate, save_best=save_best,
        state_path=paths["draft_last"], state_kind=DRAFT_STATE_KIND,
        state_checks={"tokenizer_hash": tok.content_hash, "head_hash": head_hash},
        metrics_path=paths["draft_metrics"], on_checkpoint=on_checkpoint,
    )
    ckpt = read_checkpoint(paths["draft"], kind=DRAFT_KIND)
    if ckpt["extra"].get("head_hash") != head_hash:
        raise CheckpointError(f"{paths['draft']}: best draft belongs to head {ckpt['extra'].get('head_hash')}, not {head_hash}")
    return {**ckpt["metrics"], "content_hash": ckpt["content_hash"]}


# ==================================================================================== entry
def train_policy(cfg: PolicyTrainConfig, *, on_checkpoint: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run the requested stages; returns a summary (paths, metrics, wall time) also written as JSON/markdown.

    ``on_checkpoint`` runs after every checkpoint write (Modal passes ``volume.commit``).
    """
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    device = _resolve_device(cfg)
    tok_path = cfg.tokenizer_path()
    if not tok_path.exists():
        raise FileNotFoundError(
            f"{tok_path}: tokenizer checkpoint not found; train Phase 1 first "
            "(`python -m phase1_improved.train_rfsq_robust --use-layernorm`) or pass --rfsq-checkpoint"
        )
    tok = load_tokenizer(tok_path)
    tag = cfg.tag or tag_for_tokenizer(tok.model.conditioning)
    paths = output_paths(cfg.root(), tag)
    paths["head"].parent.mkdir(parents=True, exist_ok=True)

    t_data = time.perf_counter()
    chosen, task_table = load_policy_episodes(cfg.data_paths, num_episodes=cfg.num_episodes)
    train_eps, val_eps = split_episodes(chosen, val_fraction=cfg.val_fraction, seed=cfg.seed)
    train, val = build_split(cfg, tok, train_eps), build_split(cfg, tok, val_eps)
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
        policy, main_metrics, head_hash = _train_main(cfg, paths, tok, train, val, task_table, device, meta, on_checkpoint)
    else:
        policy, main_metrics, head_hash = _load_trained_head(cfg, paths, tok, task_table, device)
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
        draft_metrics = _train_draft(cfg, paths, tok, policy, head_hash, train_f, val_f, train_targets, val.codes, device, meta, on_checkpoint)
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


def _pct(values) -> str:
    return " | ".join(f"{100 * v:.1f}" for v in values)


def summary_markdown(s: dict[str, Any]) -> str:
    """A small markdown report of one training run (per-layer held-out numbers in %)."""
    tok = s["tokenizer"]
    lines = [
        f"### Phase 2 training ({tok['conditioning']} tokens{', tag ' + s['tag'] if s['tag'] else ''})",
        "",
        f"Data: `{s['data']}` — {s['num_episodes']} demos ({s['train_episodes']} train / {s['val_episodes']} held-out episodes, "
        f"{s['train_steps']} / {s['val_steps']} steps), {s['num_tasks']} tasks, backbone `{s['backbone']}`, device {s['device']}. "
        f"Tokenizer `{tok['path']}` ({tok['content_hash']}): {tok['num_layers']} layers x {tok['tokens_per_layer']} tokens x {tok['num_levels']} levels. "
        f"Wall time {s['wall_seconds']:.1f} s (main {s.get('main_seconds', 0.0):.1f} s{', loaded from its checkpoint' if 'main' not in s.get('stages', ['main']) else ''}, "
        f"draft {s.get('draft_seconds', 0.0):.1f} s).",
        "",
    ]
    main = s.get("main", {})
    if "val_token_acc" in main:
        L = len(main["val_token_acc"])
        lines += [
            "| main (held-out, %) | " + " | ".join(f"L{i}" for i in range(L)) + " | mean |",
            "|---|" + "---|" * (L + 1),
            f"| token acc (teacher-forced) | {_pct(main['val_token_acc'])} | {100 * main['val_mean_token_acc']:.1f} |",
            f"| all tokens of layer right | {_pct(main['val_layer_all_correct'])} | |",
        ]
        if "val_greedy_token_acc" in main:
            lines.append(f"| token acc (greedy decode) | {_pct(main['val_greedy_token_acc'])} | {100 * main['val_greedy_mean_token_acc']:.1f} |")
        lines.append("")
    d = s.get("draft")
    if d:
        K = len(d["val_token_acc"])
        c = d["costs"]
        tc = s.get("train_config", {})
        copies = tc.get("draft_augment_copies", 0)
        lines += [
            f"Draft: mode `{tc.get('draft_mode', 'parallel')}`, width {tc.get('draft_width')}, {tc.get('draft_hidden_layers')} hidden layers, "
            f"{tc.get('epochs')} epochs" + (f", {copies} perturbed copies of the training inputs (noise {tc.get('draft_augment_noise')} x std)" if copies else "") + ".",
            f"Draft trained on {'the main model’s greedy tokens (distillation)' if s.get('train_config', {}).get('draft_targets', 'labels') == 'main' else 'the tokenizer’s tokens of the demos'}; accuracy below is against the demo tokens.",
            "",
            "| draft (held-out, %) | " + " | ".join(f"L{i}" for i in range(K)) + " | mean |",
            "|---|" + "---|" * (K + 1),
            f"| coarse token acc | {_pct(d['val_token_acc'])} | {100 * d['val_coarse_acc']:.1f} |",
            f"| all tokens of layer right | {_pct(d['val_layer_all_correct'])} | |",
            f"| draft-main agreement (layer) | {_pct(d['agreement_per_layer'])} | |",
            "",
            "Exact-acceptance distribution (accepted layers 0..K, %): " + _pct(d["accepted_layers_distribution"])
            + f"; mean accepted {d['mean_accepted_layers']:.2f}, main passes per chunk {d['mean_main_passes_per_chunk']:.2f} "
            f"of {d['main_passes_without_draft']}.",
            "",
            f"Cost, draft vs one main pass: params {c['draft_params']:,} vs {c['main_head_params']:,}; FLOPs "
            f"{c['draft_flops_per_pass']:,} vs {c['main_flops_per_pass_mean']:,.0f} (ratio {c['flops_ratio_draft_over_main_pass']:.3f}); "
            f"time {1e3 * c['draft_time_s_median']:.3f} ms vs {1e3 * c['main_pass_time_s_median']:.3f} ms "
            f"(ratio {c['time_ratio_draft_over_main_pass']:.3f}; {c['timing']}).",
            "",
        ]
    return "\n".join(lines) + "\n"


# ==================================================================================== loading
@dataclass
class LoadedPolicy:
    """Main model (backbone + head) and draft, in eval mode, with the task index mapping."""

    policy: PolicyModel
    draft: DraftWithProjection | None
    task_table: list[dict]
    normalizer: ActionNormalizer  # the action normalizer of the tokenizer the models were TRAINED against
    tokenizer_hash: str  # hash of that tokenizer
    tokenizer_mismatch: bool  # True when loaded next to a different tokenizer (Strategy B opt-in)
    head_hash: str
    draft_hash: str | None
    head_metrics: dict
    draft_metrics: dict | None
    head_path: Path
    draft_path: Path | None

    @property
    def backbone(self) -> StateBackbone | None:
        return self.policy.backbone

    @property
    def head(self) -> RFSQHead:
        return self.policy.head

    @property
    def backbone_kind(self) -> str:
        return self.policy.backbone_kind

    @torch.no_grad()
    def features(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self.policy.features(x, task_ids)

    def task_index(self, *, task_id: int | None = None, suite: str | None = None, instruction: str | None = None) -> int:
        """Policy task index of a task: by instruction (exact, case-insensitive) or (suite, task_id)."""
        rows = self.task_table
        if instruction is not None:
            hits = [r for r in rows if r["instruction"].strip().lower() == instruction.strip().lower()]
            if suite:
                hits = [r for r in hits if not r["suite"] or r["suite"] == suite]
        else:
            hits = [r for r in rows if r["task_id"] == task_id and (suite is None or r["suite"] == suite)]
        if len(hits) != 1:
            known = [(r["suite"], r["task_id"], r["instruction"]) for r in rows]
            raise KeyError(
                f"task (suite={suite!r}, task_id={task_id!r}, instruction={instruction!r}) matches {len(hits)} trained tasks; "
                f"trained on {known}"
            )
        return int(hits[0]["index"])


def _check_tokenizer(path: Path, what: str, trained_hash: str | None, trained_tok: dict, tokenizer: LoadedTokenizer, allow: bool) -> bool:
    if trained_hash == tokenizer.content_hash:
        return False
    if not allow:
        raise CheckpointError(
            f"{path}: {what} was trained against tokenizer {trained_hash} ({trained_tok.get('path')}), but the loaded tokenizer "
            f"is {tokenizer.content_hash} ({tokenizer.path}); retrain Phase 2 for this tokenizer or pass "
            "allow_tokenizer_mismatch=True (Strategy B)"
        )
    m = tokenizer.model
    for key, value in (("num_layers", m.num_layers), ("tokens_per_layer", m.tokens_per_layer), ("num_levels", m.num_levels)):
        if trained_tok.get(key) != value:
            raise CheckpointError(
                f"{path}: {what} token layout does not fit the tokenizer even with allow_tokenizer_mismatch: "
                f"{key} {trained_tok.get(key)} (trained) vs {value} ({tokenizer.path})"
            )
    return True


def load_policy(
    head_path: str | Path,
    draft_path: str | Path | None,
    tokenizer: LoadedTokenizer,
    *,
    allow_tokenizer_mismatch: bool = False,
) -> LoadedPolicy:
    """Rebuild the main model (+ draft) from their checkpoints; one-line ``CheckpointError`` on any mismatch.

    The head and draft must have been trained against ``tokenizer`` (same content hash) unless
    ``allow_tokenizer_mismatch=True`` (Phase 3 Strategy B: old models, new decoder), which still
    requires the same token layout. The draft must belong to this head (its recorded head hash).
    ``draft_path=None`` loads the main model only.
    """
    head_path = Path(head_path)
    ckpt = read_checkpoint(head_path, kind=HEAD_KIND)
    cfg = ckpt["config"]
    mismatch = _check_tokenizer(head_path, "head", ckpt["extra"].get("tokenizer_hash"), cfg.get("tokenizer", {}), tokenizer, allow_tokenizer_mismatch)
    try:
        policy = PolicyModel(**{k: cfg[k] for k in ("backbone_kind", "backbone_config", "head_config")})
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{head_path}: config does not rebuild a PolicyModel ({exc})") from exc
    load_state_strict(policy, ckpt, head_path)
    policy.eval()
    draft = None
    dckpt = None
    if draft_path is not None:
        draft_path = Path(draft_path)
        dckpt = read_checkpoint(draft_path, kind=DRAFT_KIND)
        if dckpt["extra"].get("head_hash") != ckpt["content_hash"]:
            raise CheckpointError(
                f"{draft_path}: draft was trained on the features of head {dckpt['extra'].get('head_hash')}, "
                f"not {ckpt['content_hash']} ({head_path}); retrain it with --train draft"
            )
        _check_tokenizer(draft_path, "draft", dckpt["extra"].get("tokenizer_hash"), dckpt["config"].get("tokenizer", {}), tokenizer, allow_tokenizer_mismatch)
        dcfg = {k: dckpt["config"][k] for k in ("feature_dim", "width", "coarse_layers", "tokens_per_layer", "num_levels", "hidden_layers", "dropout", "mode") if k in dckpt["config"]}
        draft = DraftWithProjection.from_config(dcfg)
        load_state_strict(draft, dckpt, draft_path)
        draft.eval()
    return LoadedPolicy(
        policy=policy, draft=draft, task_table=list(cfg["task_table"]),
        normalizer=ActionNormalizer.from_dict(ckpt["normalizer"]), tokenizer_hash=ckpt["extra"].get("tokenizer_hash"),
        tokenizer_mismatch=mismatch, head_hash=ckpt["content_hash"], draft_hash=None if dckpt is None else dckpt["content_hash"],
        head_metrics=dict(ckpt.get("metrics", {})), draft_metrics=None if dckpt is None else dict(dckpt.get("metrics", {})),
        head_path=head_path, draft_path=None if draft_path is None else Path(draft_path),
    )


# ==================================================================================== OpenVLA feature cache
def images_already_upright(data_path: str | Path) -> bool:
    """Whether a demo file's camera images are already rotated 180° (upright), as OpenVLA-OFT trained on.

    IMPORTANT: LIBERO renders upside down. The OFFICIAL LIBERO HDF5 files store the raw (upside-down)
    renders; openvla-oft rotated them by 180° when converting HDF5 -> RLDS for training (and flips
    the env's images with ``img[::-1, ::-1]`` at evaluation), so official files must be flipped.
    Our collector (``common/demo_collection.py``) already stores flipped (upright) images. An explicit
    ``data.attrs["images_flipped"]`` wins; otherwise our collector's files are recognised by their
    ``tasks`` attribute (the official files have none).
    """
    import h5py

    with h5py.File(data_path, "r") as f:
        attrs = f["data"].attrs
        if "images_flipped" in attrs:
            return bool(attrs["images_flipped"])
        return "tasks" in attrs


def cache_features_for_file(
    extract: Callable[..., torch.Tensor],
    data_path: str | Path,
    out_path: str | Path,
    *,
    flip: str = "auto",
    num_episodes: int = 0,
    use_wrist: bool = True,
    use_proprio: bool = True,
    attrs: dict | None = None,
    on_progress: Callable[[], None] | None = None,
    progress: bool = True,
    batch_steps: int = 16,
) -> dict[str, Any]:
    """Write ``features/<demo name>`` [T, F] float32 for every demo of ``data_path`` into ``out_path``.

    ``extract(images, instructions, wrist_images=..., proprio=...) -> [n, F]`` (an
    ``OpenVLAFeatureExtractor`` built with ``flip_images=False``: the flip is decided here per file,
    ``flip`` = auto | yes | no). Images come from ``obs/agentview_rgb`` (+ ``obs/eye_in_hand_rgb``);
    proprio = ``ee_pos`` (3) + ``ee_ori`` axis-angle (3) + ``gripper_states`` (2), OFT's 8-d state.
    Resumable: demos already in the cache are skipped; ``attrs`` (checkpoint, feature, ...) must
    match an existing cache. ``on_progress`` runs after each demo (Modal: volume commit).
    """
    import h5py

    data_path, out_path = Path(data_path), Path(out_path)
    if flip not in ("auto", "yes", "no"):
        raise ValueError(f"flip: expected auto, yes or no; got {flip!r}")
    do_flip = (not images_already_upright(data_path)) if flip == "auto" else flip == "yes"
    meta = {"source": str(data_path), "flip_applied": do_flip, "use_wrist": use_wrist, "use_proprio": use_proprio, **(attrs or {})}
    meta = {k: "" if v is None else v for k, v in meta.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with h5py.File(data_path, "r") as src, h5py.File(out_path, "a") as dst:
        for key, value in meta.items():
            if key in dst.attrs and str(dst.attrs[key]) != str(value):
                raise ValueError(f"{out_path}: existing cache has {key}={dst.attrs[key]!r}, this run {value!r}; use another output path")
            dst.attrs[key] = value
        grp = dst.require_group("features")
        data = src["data"]
        names = sorted((k for k in data.keys() if k.startswith("demo")), key=lambda n: int(n.split("_")[-1]) if n.split("_")[-1].isdigit() else 1 << 30)
        if num_episodes > 0:
            names = names[:num_episodes]
        for name in tqdm(names, desc=f"features[{data_path.stem}]", disable=not progress):
            if name in grp:
                skipped += 1
                continue
            demo = data[name]
            if "obs/agentview_rgb" not in demo:
                raise ValueError(f"{data_path}: data/{name} has no obs/agentview_rgb (collect demos with images)")
            instr = demo.attrs.get("language_instruction", data.attrs.get("language_instruction", ""))
            instr = instr.decode() if isinstance(instr, bytes) else str(instr)
            if not instr and "problem_info" in data.attrs:
                instr = json.loads(data.attrs["problem_info"]).get("language_instruction", "")
            images = demo["obs/agentview_rgb"][()]
            wrist = demo["obs/eye_in_hand_rgb"][()] if use_wrist else None
            if do_flip:
                images = images[:, ::-1, ::-1]
                wrist = None if wrist is None else wrist[:, ::-1, ::-1]
            proprio = None
            if use_proprio:
                proprio = np.concatenate([demo["obs/ee_pos"][()], demo["obs/ee_ori"][()], demo["obs/gripper_states"][()]], axis=1)
            T = int(demo["actions"].shape[0])
            if len(images) != T:
                raise ValueError(f"{data_path}: data/{name}: {len(images)} images for {T} actions")
            feats = []
            for s in range(0, T, batch_steps):
                sl = slice(s, min(s + batch_steps, T))
                kwargs: dict[str, Any] = {}
                if wrist is not None:
                    kwargs["wrist_images"] = [np.ascontiguousarray(w) for w in wrist[sl]]
                if proprio is not None:
                    kwargs["proprio"] = proprio[sl]
                f = extract([np.ascontiguousarray(im) for im in images[sl]], [instr] * (sl.stop - sl.start), **kwargs)
                feats.append(torch.as_tensor(f).float().cpu().numpy())
            arr = np.concatenate(feats)
            if arr.shape[0] != T or not np.isfinite(arr).all():
                raise RuntimeError(f"{data_path}: data/{name}: bad features {arr.shape} (finite={np.isfinite(arr).all()})")
            grp.create_dataset(name, data=arr.astype(np.float32))
            dst.attrs["feature_dim"] = int(arr.shape[1])
            dst.flush()
            written += 1
            if on_progress is not None:
                on_progress()
    return {"data": str(data_path), "cache": str(out_path), "flip_applied": do_flip, "written": written, "skipped": skipped}
