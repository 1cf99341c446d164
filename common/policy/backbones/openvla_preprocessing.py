"""What OpenVLA-OFT sees, without the model: its LIBERO checkpoints and their constants, the prompt,
the camera-image preprocessing (flip, resize, center crop, JPEG round trip) and the choice of the
feature among the last layer's hidden states.

Pure torch/numpy (PIL only for the JPEG round trip), so all of it is tested locally; the model
itself is loaded in ``openvla.py``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


# Public OpenVLA-OFT LIBERO checkpoints (Kim et al. 2025, "Fine-Tuning VLA Models"); each was
# trained on 2 images (third-person + wrist) + 8-d proprio with an L1-regression head, image_aug
# (=> center crop at eval), action chunks of 8 x 7.
OPENVLA_OFT_LIBERO_CHECKPOINTS = {
    "libero_spatial": "moojink/openvla-7b-oft-finetuned-libero-spatial",
    "libero_object": "moojink/openvla-7b-oft-finetuned-libero-object",
    "libero_goal": "moojink/openvla-7b-oft-finetuned-libero-goal",
    "libero_10": "moojink/openvla-7b-oft-finetuned-libero-10",
    "combined": "moojink/openvla-7b-oft-finetuned-libero-spatial-object-goal-10",
}
DEFAULT_OPENVLA_CHECKPOINT = OPENVLA_OFT_LIBERO_CHECKPOINTS["libero_spatial"]
# checkpoints' unnorm keys (dataset names used in training); proprio stats live under them
OPENVLA_OFT_UNNORM_KEYS = {
    "libero_spatial": "libero_spatial_no_noops",
    "libero_object": "libero_object_no_noops",
    "libero_goal": "libero_goal_no_noops",
    "libero_10": "libero_10_no_noops",
}

PROMPT_SUFFIX_TOKEN_ID = 29871  # Llama-2 empty token that follows "Out:" at training time
IGNORE_INDEX = -100
OFT_ACTION_TOKEN_BEGIN_IDX = 31743  # Llama-2 vocab 32000 - 256 bins - 1 (OFT constants)
OFT_STOP_INDEX = 2  # Llama-2 </s>
OFT_NUM_ACTION_TOKENS = 8 * 7  # LIBERO: NUM_ACTIONS_CHUNK x ACTION_DIM
OPENVLA_IMAGE_SIZE = 224


def build_openvla_prompt(task_description: str) -> str:
    """OpenVLA's training prompt for an instruction."""
    if not isinstance(task_description, str) or not task_description.strip():
        raise ValueError(f"task_description: expected a non-empty string, found {task_description!r}")
    return f"In: What action should the robot take to {task_description.lower()}?\nOut:"


def _resize_hwc(img: torch.Tensor, size: int) -> torch.Tensor:
    x = img.permute(2, 0, 1).unsqueeze(0)
    # OFT resizes with TF lanczos3+antialias; bicubic+antialias is the closest torch kernel.
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0)


def preprocess_image_for_openvla(
    image: np.ndarray | torch.Tensor,
    *,
    flip: bool,
    size: int = OPENVLA_IMAGE_SIZE,
    center_crop: bool = False,
    crop_scale: float = 0.9,
) -> np.ndarray:
    """HxWx3 uint8 camera image -> size x size x 3 uint8, as OpenVLA(-OFT) saw it in training.

    flip: rotate 180 deg (``img[::-1, ::-1]``); LIBERO renders upside down. Explicit because the env
      wrapper may already have flipped.
    center_crop: for checkpoints trained with image_aug (random crops of 90% area): crop the central
      region of area ``crop_scale`` (side sqrt(crop_scale)) and resize back to ``size``.
    Torch-only (no PIL/torchvision); the JPEG round trip of OFT's pipeline is done by the extractor.
    """
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image: expected [H, W, 3], found {list(arr.shape)}")
    if arr.dtype != np.uint8:
        raise TypeError(f"image: expected uint8, found {arr.dtype}")
    if not 0.0 < crop_scale <= 1.0:
        raise ValueError(f"crop_scale: expected in (0, 1], found {crop_scale}")
    if flip:
        arr = arr[::-1, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(arr)).float()
    x = _resize_hwc(x, size)
    if center_crop:
        side = math.sqrt(crop_scale)
        crop = int(round(size * side))
        off = (size - crop) // 2
        x = x[off : off + crop, off : off + crop]
        x = _resize_hwc(x, size)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def select_feature(
    hidden_states: torch.Tensor | Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    *,
    mode: str = "last_prompt_token",
    num_action_tokens: int = 0,
) -> torch.Tensor:
    """Pick the feature vector from the last layer's hidden states.

    hidden_states: [B, S, H] or the model's per-layer tuple (the last entry is used).
    attention_mask: [B, S_text] mask of the TEXT tokens passed to the model. The model inserts its
      S - S_text image-patch (and proprio) embeddings after <BOS>, so text token i (i >= 1) sits at
      position (S - S_text) + i. Right padding is handled via the mask's last 1.
    num_action_tokens: number of action placeholders appended after the prompt (followed by one
      stop token); 0 when none were appended.
    mode: "last_prompt_token" -> [B, H] state of the last prompt token;
          "action_tokens_mean" -> [B, H] mean over the action-placeholder positions.
    """
    hs = hidden_states[-1] if isinstance(hidden_states, (tuple, list)) else hidden_states
    if hs.dim() != 3:
        raise ValueError(f"hidden_states: expected [B, S, H], found {list(hs.shape)}")
    if attention_mask.dim() != 2 or attention_mask.shape[0] != hs.shape[0]:
        raise ValueError(f"attention_mask: expected [{hs.shape[0]}, S_text], found {list(attention_mask.shape)}")
    B, S, _ = hs.shape
    offset = S - attention_mask.shape[1]
    if offset < 0:
        raise ValueError(f"hidden_states length {S} is shorter than the text length {attention_mask.shape[1]}")
    idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=1).values  # [B]
    n_appended = num_action_tokens + 1 if num_action_tokens > 0 else 0
    if int(last.min()) < n_appended + 1:
        raise ValueError(f"attention_mask: too few text tokens for {num_action_tokens} appended action tokens")
    rows = torch.arange(B, device=hs.device)
    last = last.to(hs.device) + offset
    if mode == "last_prompt_token":
        return hs[rows, last - n_appended]
    if mode == "action_tokens_mean":
        if num_action_tokens < 1:
            raise ValueError("action_tokens_mean: expected num_action_tokens >= 1, found 0")
        steps = torch.arange(num_action_tokens, device=hs.device)
        pos = (last - num_action_tokens)[:, None] + steps[None, :]  # placeholders precede the stop token
        return hs[rows[:, None], pos].mean(dim=1)
    raise ValueError(f"mode: expected 'last_prompt_token' or 'action_tokens_mean', found {mode!r}")


def _jpeg_roundtrip(img: np.ndarray, quality: int = 95) -> np.ndarray:
    """OFT's eval (like its RLDS training data) JPEG-encodes images before resizing."""
    import io

    from PIL import Image  # available wherever transformers is

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.array(Image.open(buf).convert("RGB"))
