"""The policy Phase 3 runs: observation -> backbone features -> tokens (speculative or main-only, both
timed on the same features) -> decoded action chunk."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.eval.config import EvalConfig, LosslessViolation


class TokenPolicy:
    """Observation → features → tokens (speculative or main-only) → actions chunk."""

    def __init__(self, cfg: EvalConfig):
        from common.tokenizer.model import load_tokenizer
        from common.policy.model import load_policy

        paths = cfg.checkpoint_paths()
        self.cfg = cfg
        self.tokenizer = load_tokenizer(paths["tokenizer"], require_conditioning="layernorm" if cfg.tokenizer == "robust" else "none")
        # Strategy B deliberately pairs naive-token models with the robust decoder (explicit opt-in).
        self.policy = load_policy(paths["head"], paths["draft"], self.tokenizer, allow_tokenizer_mismatch=cfg.strategy == "B")
        if self.policy.backbone_kind != "state":
            # The OpenVLA-OFT closed loop needs camera images + the 7B extractor per chunk; not wired yet.
            raise NotImplementedError(
                f"{paths['head']}: closed-loop evaluation supports the 'state' backbone; found {self.policy.backbone_kind!r}"
            )
        # IMPORTANT: in float32 the one-pass verification (K+1 positions) and the one-position main
        # passes round differently (different GEMM shapes), so a near-tie in a flat fine-layer
        # distribution can flip an argmax: we saw one chunk in a few thousand differ. In float64 both
        # paths agree; speculative and main-only are timed in the same precision.
        self.dtype = torch.float64 if cfg.decode_dtype == "float64" else torch.float32
        self.draft_dtype = {"float64": torch.float64, "float32": torch.float32}.get(cfg.draft_dtype, self.dtype)
        self.policy.head.to(self.dtype)
        self.policy.draft.to(self.draft_dtype)
        self._plans = 0  # plan() calls so far (alternates the timing order of the two decodes)
        self.checkpoints = {
            "tokenizer": {"path": str(paths["tokenizer"]), "content_hash": self.tokenizer.content_hash},
            "head": {"path": str(paths["head"]), "content_hash": self.policy.head_hash},
            "draft": {"path": str(paths["draft"]), "content_hash": self.policy.draft_hash},
        }

    def task_index(self, suite: str, task_id: int, instruction: str) -> int:
        return self.policy.task_index(suite=suite, task_id=task_id, instruction=instruction)

    @torch.no_grad()
    def plan(self, low_dim: np.ndarray, task_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        from common.decoding.speculative import main_only_decode, speculative_decode
        from common.decoding.timing import StageTimer

        cfg, timer = self.cfg, StageTimer()
        obs = torch.as_tensor(low_dim, dtype=torch.float32)[None]
        with timer.stage("backbone"):
            features = self.policy.features(obs, torch.tensor([task_index])).to(self.dtype)
        info: dict[str, Any] = {}

        def decode():
            if cfg.use_speculative_decoding:
                codes, stats = speculative_decode(
                    self.policy.head, self.policy.draft, features, acceptance=cfg.acceptance, tolerance=cfg.tolerance, timer=timer
                )
                info.update(accepted_layers=stats.accepted_layers[0], coarse_layers=stats.coarse_layers, draft_s=stats.draft_time_s)
            else:
                codes, stats = main_only_decode(self.policy.head, features, timer=timer)
            info.update(main_passes=stats.main_passes, main_s=stats.main_time_s)
            return codes

        def reference():
            ref_codes, ref_stats = main_only_decode(self.policy.head, features, timer=StageTimer())
            info.update(ref_main_passes=ref_stats.main_passes, ref_main_s=ref_stats.main_time_s)
            return ref_codes

        if cfg.compare_main_only:
            # IMPORTANT: whichever decode runs first after an env step pays for cold CPU caches;
            # alternate the order chunk by chunk so neither side of the comparison always does.
            self._plans += 1
            if self._plans % 2:
                codes, ref_codes = decode(), reference()
            else:
                ref_codes, codes = reference(), decode()
            identical = bool(torch.equal(ref_codes, codes))
            info["identical_to_main_only"] = identical
            if cfg.assert_lossless and cfg.acceptance == "exact" and not identical:
                raise LosslessViolation("exact speculative decoding produced tokens that differ from main-only greedy decoding")
        else:
            codes = decode()
        with timer.stage("tokenizer_decode"):
            normalized = self.tokenizer.model.decode_from_indices(codes)[0].numpy()
        actions = self.tokenizer.normalizer.unnormalize(normalized)
        info.update(backbone_s=timer.last["backbone"], tokenizer_decode_s=timer.last["tokenizer_decode"])
        info["policy_s"] = info["backbone_s"] + info.get("draft_s", 0.0) + info["main_s"] + info["tokenizer_decode_s"]
        if cfg.compare_main_only:
            info["ref_policy_s"] = info["backbone_s"] + info["ref_main_s"] + info["tokenizer_decode_s"]
        return actions, info
