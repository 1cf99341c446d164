"""The policy Phase 3 runs: observation -> backbone features -> tokens (speculative or main-only, both
timed on the same features) -> decoded action chunk.

The backbone kind is read from the head checkpoint. "state": the low-dimensional observation goes
through the head's own StateBackbone. "openvla-oft": the env renders the cameras the features were
cached from (``cameras``, ``camera_size``), ``vla_inputs.env_observation_inputs`` prepares them with
the very function the feature cache used, and the frozen OpenVLA-OFT extractor named in the cache
runs once per chunk (``vla_inputs.build_extractor``; GPU when available).

Per chunk ``plan`` reports seconds per stage: ``preprocess_s`` (VLA: JPEG/resize/crop/prompt/
processor), ``backbone_s`` (the backbone forward), ``draft_s``, ``main_s``, ``tokenizer_decode_s``
and their sum ``policy_s`` (+ the main-only reference ``ref_*`` with ``compare_main_only``).
"""

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
        self.policy = load_policy(paths["head"], paths.get("draft"), self.tokenizer, allow_tokenizer_mismatch=cfg.strategy == "B")
        self.decode_layers, self.decode_rule = cfg.decode_layers, cfg.decode_rule
        if cfg.auto_decode:
            choice = self.policy.head_metrics.get("decode_choice")
            if not choice:
                raise ValueError(f"--auto-decode: {paths['head']} records no decode_choice (retrain Phase 2 with this code, "
                                 "or pass --decode-layers / --decode-rule)")
            self.decode_layers, self.decode_rule = int(choice["layers"]), str(choice["rule"])
        if cfg.decode_layers > self.policy.head.num_layers:
            raise ValueError(f"--decode-layers {cfg.decode_layers}: {paths['head']} decodes {self.policy.head.num_layers} layers; use 1..{self.policy.head.num_layers} (0 = all)")
        if cfg.backbone and cfg.backbone != self.policy.backbone_kind:
            raise ValueError(f"--backbone {cfg.backbone}: but {paths['head']} was trained with the {self.policy.backbone_kind!r} backbone")
        self.vla_spec = None
        self.extractor = None
        if self.policy.backbone_kind == "openvla-oft":
            self._load_vla(paths["head"])
        # IMPORTANT: in float32 the one-pass verification (K+1 positions) and the one-position main
        # passes round differently (different GEMM shapes), so a near-tie in a flat fine-layer
        # distribution can flip an argmax: we saw one chunk in a few thousand differ. In float64 both
        # paths agree; speculative and main-only are timed in the same precision.
        self.dtype = torch.float64 if cfg.decode_dtype == "float64" else torch.float32
        self.draft_dtype = {"float64": torch.float64, "float32": torch.float32}.get(cfg.draft_dtype, self.dtype)
        self.policy.head.to(self.dtype)
        if self.policy.draft is not None:
            self.policy.draft.to(self.draft_dtype)
        self.token_code = None
        if self.decode_rule == "expected":
            from common.tokenizer.token_code import TokenCode

            self.token_code = TokenCode(self.tokenizer.model)
        self._plans = 0  # plan() calls so far (alternates the timing order of the two decodes)
        self.checkpoints = {
            "tokenizer": {"path": str(paths["tokenizer"]), "content_hash": self.tokenizer.content_hash},
            "head": {"path": str(paths["head"]), "content_hash": self.policy.head_hash},
            "draft": {"path": str(paths["draft"]) if "draft" in paths else None, "content_hash": self.policy.draft_hash},
        }

    def _load_vla(self, head_path) -> None:
        from common.checkpoints import read_checkpoint
        from common.policy.backbones.vla_inputs import build_extractor
        from common.policy.feature_cache import spec_for_head
        from common.policy.model import HEAD_KIND

        ckpt = read_checkpoint(head_path, kind=HEAD_KIND)
        self.vla_spec = spec_for_head(ckpt["config"], ckpt["extra"], head_path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.extractor = build_extractor(self.vla_spec, suite=self.cfg.task_suite, device=device)
        if self.extractor.feature_dim != self.policy.head.feature_dim:
            raise ValueError(
                f"{head_path}: head expects {self.policy.head.feature_dim}-d features, extractor {self.vla_spec.checkpoint!r} "
                f"gives {self.extractor.feature_dim}"
            )
        self.instructions = {int(r["index"]): r["instruction"] for r in self.policy.task_table}

    @property
    def cameras(self) -> tuple[str, ...]:
        """Cameras the env must render for this policy (none for the state backbone)."""
        return self.vla_spec.cameras if self.vla_spec is not None else ()

    @property
    def camera_size(self) -> int:
        """Rendered frame side: the size of the frames the features were cached from."""
        return self.vla_spec.image_size if self.vla_spec is not None else 128

    def policy_input(self, env, obs: dict[str, np.ndarray]) -> Any:
        """What ``plan`` takes from an env observation: the low-dim vector (state) or the observation
        itself with its camera frames (openvla-oft)."""
        return obs if self.vla_spec is not None else env.low_dim_obs(obs)

    def task_index(self, suite: str, task_id: int, instruction: str) -> int:
        return self.policy.task_index(suite=suite, task_id=task_id, instruction=instruction)

    def _features(self, observation: Any, task_index: int, timer) -> torch.Tensor:
        if self.vla_spec is None:
            obs = torch.as_tensor(observation, dtype=torch.float32)[None]
            with timer.stage("backbone"):
                return self.policy.features(obs, torch.tensor([task_index]))
        from common.policy.backbones.vla_inputs import env_observation_inputs, run_extractor

        if not isinstance(observation, dict):
            raise TypeError(f"openvla-oft policy: expected the env observation dict (policy_input), found {type(observation).__name__}")
        with timer.stage("preprocess"):
            batch = env_observation_inputs(observation, self.instructions[int(task_index)], spec=self.vla_spec)
        return run_extractor(self.extractor, batch, timer=timer)

    @torch.no_grad()
    def plan(self, observation: Any, task_index: int) -> tuple[np.ndarray, dict[str, Any]]:
        """One action chunk from ``policy_input(env, obs)``; returns (actions [8, 7], per-chunk info)."""
        from common.decoding.speculative import main_only_decode, speculative_decode
        from common.decoding.timing import StageTimer

        cfg, timer = self.cfg, StageTimer()
        features = self._features(observation, task_index, timer).to(self.dtype)
        info: dict[str, Any] = {}
        if cfg.record_features:
            info["features"] = features[0].float().tolist()
        decoded: dict[str, torch.Tensor] = {}  # the driving decode's last-layer logits
        depth = self.decode_layers or None  # None: all layers

        def decode():
            if cfg.use_speculative_decoding:
                codes, stats = speculative_decode(
                    self.policy.head, self.policy.draft, features, acceptance=cfg.acceptance, tolerance=cfg.tolerance, timer=timer,
                    num_layers=depth, candidates=cfg.draft_candidates, coarse_layers=cfg.drafted_layers or None,
                    relaxed_layers=cfg.relaxed_layers or None,
                )
                info.update(accepted_layers=stats.accepted_layers[0], coarse_layers=stats.coarse_layers, draft_s=stats.draft_time_s)
            else:
                codes, stats = main_only_decode(self.policy.head, features, timer=timer, num_layers=depth)
            info.update(main_passes=stats.main_passes, main_s=stats.main_time_s)
            decoded["last_logits"] = stats.last_logits
            return codes

        def reference():
            ref_codes, ref_stats = main_only_decode(self.policy.head, features, timer=StageTimer(), num_layers=depth)
            info.update(ref_main_passes=ref_stats.main_passes, ref_main_s=ref_stats.main_time_s)
            decoded["ref_last_logits"] = ref_stats.last_logits
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
            if not identical:  # relaxed acceptance: how far the executed chunk is from main-only's (normalized units)
                m = self.tokenizer.model
                info["action_mse_vs_main_only"] = float(((m.decode_from_indices(codes) - m.decode_from_indices(ref_codes)) ** 2).mean())
            if cfg.assert_lossless and cfg.acceptance == "exact" and not identical:
                raise LosslessViolation("exact speculative decoding produced tokens that differ from main-only greedy decoding")
        else:
            codes = decode()
        with timer.stage("tokenizer_decode"):
            if self.token_code is None:
                normalized = self.tokenizer.model.decode_from_indices(codes)[0].numpy()
            else:  # the last decoded layer as the mean of its level values (the layers before it: argmax)
                probs = torch.softmax(decoded["last_logits"].double(), dim=-1)
                normalized = self.token_code.decode_expected(codes[..., :-1], probs)[0].numpy()
        if self.token_code is not None and info.get("identical_to_main_only"):
            # identical tokens, yet the expected value reads the last layer's distribution, which the
            # verify pass and a one-position pass compute with other kernel shapes: how far apart the
            # executed actions are (normalized units; outside the timed stage)
            ref_probs = torch.softmax(decoded["ref_last_logits"].double(), dim=-1)
            ref_normalized = self.token_code.decode_expected(codes[..., :-1], ref_probs)[0].numpy()
            info["action_max_abs_vs_main_only"] = float(np.abs(normalized - ref_normalized).max())
        actions = self.tokenizer.normalizer.unnormalize(normalized)
        # totals: preprocess/backbone accumulate over the extractor's samples (one per chunk here)
        info.update(backbone_s=timer.totals["backbone"], tokenizer_decode_s=timer.last["tokenizer_decode"],
                    decoded_layers=int(codes.shape[2]), decode_rule=self.decode_rule)
        if "preprocess" in timer.totals:
            info["preprocess_s"] = timer.totals["preprocess"]
        features_s = info["backbone_s"] + info.get("preprocess_s", 0.0)
        info["policy_s"] = features_s + info.get("draft_s", 0.0) + info["main_s"] + info["tokenizer_decode_s"]
        if cfg.compare_main_only:
            info["ref_policy_s"] = features_s + info["ref_main_s"] + info["tokenizer_decode_s"]
        return actions, info


def dagger_policy(config, suite: str) -> TokenPolicy:
    """The policy that drives DAgger collection (``common.sim.dagger.DaggerConfig``): the Phase 3 policy
    under ``config.models_dir`` (Strategy A, the decode depth and rule its head chose, main-only
    decoding: speculation never changes the tokens). Pass it as ``driving_policy`` to the collector."""
    cfg = EvalConfig(task_suite=suite, models_dir=config.models_dir, tokenizer=config.tokenizer, strategy="A", auto_decode=True,
                     use_speculative_decoding=False, compare_main_only=False, replan_steps=config.replan_steps)
    return TokenPolicy(cfg)
