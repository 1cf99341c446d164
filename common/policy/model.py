"""The main model as evaluation and training both see it: ``PolicyModel`` (backbone + RFSQ head)
and ``load_policy`` (head + draft checkpoints -> ``LoadedPolicy``), with no training code.

A policy checkpoint stores ``config`` = ``PolicyModel.config`` plus the task table and the tokenizer
it was trained against; ``PolicyModel.from_config(config)`` rebuilds it (nanoGPT's ``model_args``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from common.checkpoints import CheckpointError, load_state_strict, read_checkpoint
from common.data.normalization import ActionNormalizer
from common.policy.backbones.state import StateBackbone
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead
from common.tokenizer.model import LoadedTokenizer

HEAD_KIND = "rfsq_head"
DRAFT_KIND = "draft_with_projection"
BACKBONES = ("state", "openvla-oft")


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
    def config(self) -> dict[str, Any]:
        return {
            "backbone_kind": self.backbone_kind,
            "backbone_config": None if self.backbone is None else self.backbone.config,
            "head_config": self.head.config,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PolicyModel":
        """Rebuild from ``config`` (a checkpoint's config may hold more keys: task table, tokenizer)."""
        return cls(backbone_kind=config["backbone_kind"], backbone_config=config["backbone_config"], head_config=config["head_config"])

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
        return task_index_in(self.task_table, task_id=task_id, suite=suite, instruction=instruction)


def task_index_in(rows: list[dict], *, task_id: int | None = None, suite: str | None = None, instruction: str | None = None) -> int:
    """``LoadedPolicy.task_index`` on a checkpoint's ``task_table`` (an evaluation checks its tasks before loading the models)."""
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
            f"is {tokenizer.content_hash} ({tokenizer.path}); retrain Phase 2 for this tokenizer, or pass "
            "--strategy B to decode these models' tokens with it anyway (Phase 3)"
        )
    m = tokenizer.model
    for key, value in (("num_layers", m.num_layers), ("tokens_per_layer", m.tokens_per_layer), ("num_levels", m.num_levels)):
        if trained_tok.get(key) != value:
            raise CheckpointError(
                f"{path}: {what} token layout does not fit the tokenizer even with --strategy B: "
                f"{key} {trained_tok.get(key)} (trained) vs {value} ({tokenizer.path})"
            )
    return True


def load_draft_checkpoint(draft_path: str | Path, *, head_hash: str, head_label: str) -> tuple[DraftWithProjection, dict]:
    """A draft checkpoint, rebuilt in eval mode, checked to be distilled for the head with content hash
    ``head_hash`` (``head_label``: how the error names that head) -> (draft, checkpoint dict)."""
    dckpt = read_checkpoint(draft_path, kind=DRAFT_KIND)
    if dckpt["extra"].get("head_hash") != head_hash:
        raise CheckpointError(
            f"{draft_path}: draft was trained on the features of head {dckpt['extra'].get('head_hash')}, "
            f"not {head_hash} ({head_label}); retrain it with --train draft"
        )
    draft = DraftWithProjection.from_config(dckpt["config"])
    load_state_strict(draft, dckpt, draft_path)
    return draft.eval(), dckpt


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
        policy = PolicyModel.from_config(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{head_path}: config does not rebuild a PolicyModel ({exc})") from exc
    load_state_strict(policy, ckpt, head_path)
    policy.eval()
    draft = None
    dckpt = None
    if draft_path is not None:
        draft_path = Path(draft_path)
        draft, dckpt = load_draft_checkpoint(draft_path, head_hash=ckpt["content_hash"], head_label=str(head_path))
        _check_tokenizer(draft_path, "draft", dckpt["extra"].get("tokenizer_hash"), dckpt["config"].get("tokenizer", {}), tokenizer, allow_tokenizer_mismatch)
    return LoadedPolicy(
        policy=policy, draft=draft, task_table=list(cfg["task_table"]),
        normalizer=ActionNormalizer.from_dict(ckpt["normalizer"]), tokenizer_hash=ckpt["extra"].get("tokenizer_hash"),
        tokenizer_mismatch=mismatch, head_hash=ckpt["content_hash"], draft_hash=None if dckpt is None else dckpt["content_hash"],
        head_metrics=dict(ckpt.get("metrics", {})), draft_metrics=None if dckpt is None else dict(dckpt.get("metrics", {})),
        head_path=head_path, draft_path=None if draft_path is None else Path(draft_path),
    )

