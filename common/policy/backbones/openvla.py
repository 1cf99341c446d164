"""OpenVLA-OFT feature extractor (cloud/GPU only): hidden states of a real OpenVLA-OFT checkpoint.

transformers is imported lazily, so this module imports without it.  If the model forward
fails, the extractor RAISES; it never substitutes random or zero features (the earlier
attempt's failure mode).

Which OpenVLA hidden state is the feature (``feature=`` argument):
  "action_tokens_mean" (default): last transformer layer, mean over the 56 (= 8 steps x 7 dims)
      action-placeholder positions that OpenVLA-OFT appends after the prompt; these are exactly the
      hidden states the OFT action head reads, so they carry the model's action information.
      4096-d for the 7B Llama-2 backbone.
  "last_prompt_token": last layer at the last prompt token (the empty token 29871 after "Out:").
      For vanilla (non-OFT) OpenVLA this is the state that predicts the first action token.

Forward recipe (mirrors OFT's ``predict_action``, whose plain ``forward`` raises without labels
because it derives the action-position mask from ``labels``): append token 29871 if the prompt
does not already end with it; for "action_tokens_mean" append 56 placeholder ids + the stop
token and extend the attention mask; build labels = IGNORE_INDEX over the prompt, an action-token
id over the placeholders, stop id last; pixel_values in bf16; ``output_hidden_states=True``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from common.policy.backbones.openvla_preprocessing import (
    DEFAULT_OPENVLA_CHECKPOINT,
    IGNORE_INDEX,
    OFT_ACTION_TOKEN_BEGIN_IDX,
    OFT_NUM_ACTION_TOKENS,
    OFT_STOP_INDEX,
    PROMPT_SUFFIX_TOKEN_ID,
    _jpeg_roundtrip,
    build_openvla_prompt,
    preprocess_image_for_openvla,
    select_feature,
)


class OpenVLAFeatureExtractor:
    """Frozen OpenVLA(-OFT) -> features [B, hidden_size] (4096 for the 7B model).

    Call: ``extractor(images, task_descriptions, wrist_images=None, proprio=None)`` with uint8
    [H, W, 3] camera images (as rendered, or already flipped: see ``flip_images``). Samples are run
    one at a time (the OFT forward supports batch 1 only) and stacked.

    model/processor may be injected (tests use a stub with the real call signature); otherwise
    they are loaded with ``AutoModelForVision2Seq``/``AutoProcessor`` (trust_remote_code; the OFT
    checkpoints' remote code imports the ``prismatic`` package from the openvla-oft repository, which
    must be installed in the cloud image).

    The LIBERO OFT checkpoints were trained with a wrist image (num_images_in_input=2) and an 8-d
    proprio token (OFT's ProprioProjector); pass ``wrist_images`` / ``proprio`` + ``proprio_projector``
    to reproduce their training inputs (``load_oft_proprio_projector``). Proprio is normalized with
    the checkpoint's q01/q99 statistics when ``unnorm_key`` is given.
    """

    def __init__(
        self,
        *,
        checkpoint: str = DEFAULT_OPENVLA_CHECKPOINT,
        device: str | torch.device = "cuda",
        flip_images: bool,
        center_crop: bool = True,
        jpeg_roundtrip: bool = True,
        num_images_in_input: int = 2,
        feature: str = "action_tokens_mean",
        num_action_tokens: int = OFT_NUM_ACTION_TOKENS,
        unnorm_key: str | None = None,
        proprio_projector: nn.Module | None = None,
        model: Any = None,
        processor: Any = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if feature not in ("action_tokens_mean", "last_prompt_token"):
            raise ValueError(f"feature: expected 'action_tokens_mean' or 'last_prompt_token', found {feature!r}")
        if num_images_in_input not in (1, 2):
            raise ValueError(f"num_images_in_input: expected 1 or 2, found {num_images_in_input}")
        self.checkpoint = checkpoint
        self.device = torch.device(device)
        self.flip_images = bool(flip_images)
        self.center_crop = bool(center_crop)
        self.jpeg_roundtrip = bool(jpeg_roundtrip)
        self.num_images_in_input = int(num_images_in_input)
        self.feature = feature
        self.num_action_tokens = int(num_action_tokens) if feature == "action_tokens_mean" else 0
        self.unnorm_key = unnorm_key
        self.proprio_projector = proprio_projector
        self.dtype = dtype
        if (model is None) != (processor is None):
            raise ValueError("model and processor: pass both (injected) or neither (load from checkpoint)")
        if model is None:
            model, processor = self._load(checkpoint)
        self.model, self.processor = model, processor
        if hasattr(self.model, "vision_backbone") and hasattr(self.model.vision_backbone, "set_num_images_in_input"):
            self.model.vision_backbone.set_num_images_in_input(self.num_images_in_input)
        elif self.num_images_in_input != 1:
            raise ValueError("num_images_in_input=2 needs a model whose vision_backbone has set_num_images_in_input")
        self.feature_dim = int(self._hidden_size(self.model))

    @staticmethod
    def _hidden_size(model: Any) -> int:
        cfg = getattr(model, "config", None)
        text_cfg = getattr(cfg, "text_config", None)
        size = getattr(text_cfg, "hidden_size", None) or getattr(model, "llm_dim", None)
        if size is None:
            raise ValueError("cannot determine the model's hidden size (config.text_config.hidden_size or llm_dim)")
        return int(size)

    def _load(self, checkpoint: str) -> tuple[Any, Any]:
        model, processor = load_openvla_model(checkpoint, device=self.device, dtype=self.dtype)
        if self.unnorm_key is not None:
            self._load_norm_stats(model, checkpoint)
        return model, processor

    @staticmethod
    def _load_norm_stats(model: Any, checkpoint: str) -> None:
        import json
        import os

        if os.path.isdir(checkpoint):
            path = os.path.join(checkpoint, "dataset_statistics.json")
        else:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(repo_id=checkpoint, filename="dataset_statistics.json")
        with open(path) as f:
            model.norm_stats = json.load(f)

    def _normalize_proprio(self, proprio: np.ndarray) -> np.ndarray:
        stats = getattr(self.model, "norm_stats", None)
        if stats is None or self.unnorm_key not in stats or "proprio" not in stats[self.unnorm_key]:
            raise KeyError(f"proprio statistics for unnorm_key={self.unnorm_key!r} not found in model.norm_stats")
        s = stats[self.unnorm_key]["proprio"]
        lo, hi = np.asarray(s["q01"], dtype=np.float64), np.asarray(s["q99"], dtype=np.float64)
        mask = np.asarray(s.get("mask", np.ones_like(lo, dtype=bool)), dtype=bool)
        norm = np.clip(2 * (proprio - lo) / (hi - lo + 1e-8) - 1, -1, 1)
        return np.where(mask, norm, proprio)

    def prepare_image(self, image: np.ndarray) -> np.ndarray:
        img = np.asarray(image)
        if self.flip_images:
            img = np.ascontiguousarray(img[::-1, ::-1])
        if self.jpeg_roundtrip:
            img = _jpeg_roundtrip(img)
        return preprocess_image_for_openvla(img, flip=False, center_crop=self.center_crop)

    @staticmethod
    def _to_processor_image(img: np.ndarray) -> Any:
        from PIL import Image  # the HF processor expects PIL images

        return Image.fromarray(img).convert("RGB")

    def _build_inputs(self, image: np.ndarray, task: str, wrist: np.ndarray | None) -> dict[str, torch.Tensor]:
        prompt = build_openvla_prompt(task)
        enc = self.processor(prompt, self._to_processor_image(self.prepare_image(image)))
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        pixel_values = enc["pixel_values"].to(self.device, dtype=self.dtype)
        if self.num_images_in_input == 2:
            if wrist is None:
                raise ValueError("num_images_in_input=2: expected a wrist image, found None")
            wenc = self.processor(prompt, self._to_processor_image(self.prepare_image(wrist)))
            pixel_values = torch.cat([pixel_values, wenc["pixel_values"].to(self.device, dtype=self.dtype)], dim=1)
        elif wrist is not None:
            raise ValueError("wrist image given but num_images_in_input=1")

        suffix = int(getattr(getattr(self.model, "config", None), "prompt_suffix_token_id", None) or PROMPT_SUFFIX_TOKEN_ID)
        if not bool((input_ids[:, -1] == suffix).all()):
            input_ids = torch.cat([input_ids, torch.full_like(input_ids[:, :1], suffix)], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        if self.num_action_tokens > 0:
            begin = int(self.model.get_action_token_begin_idx()) if hasattr(self.model, "get_action_token_begin_idx") else OFT_ACTION_TOKEN_BEGIN_IDX
            stop = int(self.model.get_stop_token_id()) if hasattr(self.model, "get_stop_token_id") else OFT_STOP_INDEX
            n = self.num_action_tokens
            extra_ids = torch.ones((input_ids.shape[0], n + 1), dtype=input_ids.dtype, device=self.device)
            extra_ids[:, -1] = stop
            extra_labels = torch.full_like(extra_ids, begin + 1)  # any id > begin marks an action slot
            extra_labels[:, -1] = stop
            input_ids = torch.cat([input_ids, extra_ids], dim=1)
            labels = torch.cat([labels, extra_labels], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(extra_ids, dtype=attention_mask.dtype)], dim=1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, "labels": labels}

    @torch.no_grad()
    def __call__(
        self,
        images: Sequence[np.ndarray],
        task_descriptions: Sequence[str],
        *,
        wrist_images: Sequence[np.ndarray] | None = None,
        proprio: np.ndarray | None = None,
        timer: Any = None,
    ) -> torch.Tensor:
        """Features [n, hidden]. ``timer`` (a ``common.decoding.timing.StageTimer``, optional) times
        the input preparation (JPEG, resize/crop, prompt, processor) as stage "preprocess" and the
        model forward as stage "backbone", accumulated over the samples."""
        def stage(name: str):
            return timer.stage(name) if timer is not None else contextlib.nullcontext()

        if len(images) != len(task_descriptions):
            raise ValueError(f"expected one task description per image: {len(images)} images, {len(task_descriptions)} tasks")
        if wrist_images is not None and len(wrist_images) != len(images):
            raise ValueError(f"wrist_images: expected {len(images)}, found {len(wrist_images)}")
        if (proprio is not None) != (self.proprio_projector is not None):
            raise ValueError("proprio and proprio_projector: pass both or neither")
        feats = []
        for i, (image, task) in enumerate(zip(images, task_descriptions)):
            with stage("preprocess"):
                inputs = self._build_inputs(image, task, None if wrist_images is None else wrist_images[i])
                extra: dict[str, Any] = {}
                if self.proprio_projector is not None:
                    p = np.asarray(proprio[i], dtype=np.float64)
                    if self.unnorm_key is not None:
                        p = self._normalize_proprio(p)
                    extra = {"proprio": torch.as_tensor(p, dtype=self.dtype, device=self.device)[None],
                             "proprio_projector": self.proprio_projector}
            try:
                with stage("backbone"):
                    out = self.model(**inputs, output_hidden_states=True, return_dict=True, **extra)
            except Exception as e:
                # never fall back to placeholder features: a broken backbone must stop the run
                raise RuntimeError(
                    f"OpenVLA forward failed for checkpoint {self.checkpoint!r} "
                    f"({type(e).__name__}: {e}); no features were produced"
                ) from e
            hidden = getattr(out, "hidden_states", None)
            if hidden is None:
                raise RuntimeError("OpenVLA forward returned no hidden_states (expected output_hidden_states=True support)")
            f = select_feature(hidden, inputs["attention_mask"], mode=self.feature, num_action_tokens=self.num_action_tokens)
            if f.shape[-1] != self.feature_dim:
                raise RuntimeError(f"feature size: expected {self.feature_dim}, found {f.shape[-1]}")
            if not torch.isfinite(f).all():
                raise RuntimeError("OpenVLA features contain NaN/inf")
            feats.append(f.float())
        return torch.cat(feats, dim=0)


def load_openvla_model(checkpoint: str, *, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[Any, Any]:
    """(model, processor) of an OpenVLA(-OFT) checkpoint (HF id or local dir), in eval mode on ``device``.

    Cloud only: needs ``transformers`` (and, for the OFT checkpoints' remote code, ``prismatic``).
    """
    try:
        from transformers import AutoModelForVision2Seq, AutoProcessor
    except ImportError as e:  # the local CPU env deliberately has no transformers
        raise ImportError("OpenVLAFeatureExtractor needs `transformers` (cloud image only)") from e
    processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
    model = AutoModelForVision2Seq.from_pretrained(
        checkpoint, torch_dtype=dtype, low_cpu_mem_usage=True, trust_remote_code=True
    ).to(device)
    model.eval()
    return model, processor


def load_oft_proprio_projector(
    checkpoint: str, *, llm_dim: int = 4096, proprio_dim: int = 8, device: str | torch.device = "cuda"
) -> nn.Module:
    """OFT's ProprioProjector with the checkpoint's weights (cloud only; needs the openvla-oft package)."""
    import os

    from prismatic.models.projectors import ProprioProjector  # openvla-oft repository

    if os.path.isdir(checkpoint):
        names = [n for n in os.listdir(checkpoint) if n.startswith("proprio_projector") and "checkpoint" in n]
        if len(names) != 1:
            raise FileNotFoundError(f"expected 1 proprio_projector checkpoint in {checkpoint}, found {names}")
        path = os.path.join(checkpoint, names[0])
    else:
        from huggingface_hub import hf_hub_download

        step = "300000" if checkpoint.endswith("spatial-object-goal-10") else "150000"
        path = hf_hub_download(repo_id=checkpoint, filename=f"proprio_projector--{step}_checkpoint.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    proj = ProprioProjector(llm_dim=llm_dim, proprio_dim=proprio_dim)
    proj.load_state_dict(state)
    return proj.to(device=device, dtype=torch.bfloat16).eval()
