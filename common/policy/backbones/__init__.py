"""Backbones: observations (+ task) -> features [B, D] for the draft and main models.

* ``state.StateBackbone`` (local, CPU): low-dimensional observations + task embedding.
* ``openvla.OpenVLAFeatureExtractor`` (cloud/GPU only): hidden states of a real OpenVLA-OFT checkpoint.
"""

from __future__ import annotations

from typing import Any

from common.policy.backbones.openvla import OpenVLAFeatureExtractor
from common.policy.backbones.state import StateBackbone


def build_backbone(kind: str, **kwargs: Any) -> StateBackbone | OpenVLAFeatureExtractor:
    """Factory: kind "state" -> StateBackbone(**kwargs); "openvla-oft" -> OpenVLAFeatureExtractor(**kwargs)."""
    if kind == "state":
        return StateBackbone(**kwargs)
    if kind == "openvla-oft":
        return OpenVLAFeatureExtractor(**kwargs)
    raise ValueError(f"backbone kind: expected 'state' or 'openvla-oft', found {kind!r}")
