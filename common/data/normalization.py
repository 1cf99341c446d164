"""The one action normalization shared by every phase.

Per dimension, the 1st and 99th percentiles (q01/q99) of the *training* actions map to [-1, 1]
(values outside are clipped, as OpenVLA's BOUNDS_Q99 normalization does); gripper dimensions are
kept at ±1 (LIBERO's gripper command is already -1 open / +1 close, and a quantile map would move
the two states off ±1). The normalizer is fitted once, stored in every checkpoint that depends on
it (as plain lists, so ``torch.load(weights_only=True)`` reads it), and Phase 2 and 3 use the stored
copy — never a refit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

ACTION_DIM = 7
GRIPPER_DIMS = (6,)


def check_actions(actions: np.ndarray, *, where: str) -> np.ndarray:
    """Validate a raw action array ``[..., 7]``: finite and 7-dimensional. Returns it as float32."""
    arr = np.asarray(actions)
    if arr.ndim < 2 or arr.shape[-1] != ACTION_DIM:
        raise ValueError(f"{where}: actions must have shape [..., {ACTION_DIM}]; got {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{where}: actions are empty")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=-1).sum())
        raise ValueError(f"{where}: actions contain NaN/inf in {bad} rows")
    return arr.astype(np.float32)


@dataclass(frozen=True)
class ActionNormalizer:
    low: tuple[float, ...]
    high: tuple[float, ...]
    gripper_dims: tuple[int, ...] = GRIPPER_DIMS

    @classmethod
    def fit(cls, actions: np.ndarray, *, gripper_dims: tuple[int, ...] = GRIPPER_DIMS) -> "ActionNormalizer":
        """Fit q01/q99 per dimension on raw training actions ``[N, 7]`` (or ``[..., 7]``)."""
        flat = check_actions(actions, where="ActionNormalizer.fit").reshape(-1, ACTION_DIM)
        low = np.quantile(flat, 0.01, axis=0)
        high = np.quantile(flat, 0.99, axis=0)
        # A constant dimension would divide by zero; give it a unit range around its value.
        flat_dims = high - low < 1e-8
        low = np.where(flat_dims, low - 1.0, low)
        high = np.where(flat_dims, high + 1.0, high)
        return cls(tuple(float(v) for v in low), tuple(float(v) for v in high), tuple(gripper_dims))

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        low, high = np.asarray(self.low, np.float32), np.asarray(self.high, np.float32)
        mask = np.zeros(ACTION_DIM, bool)
        mask[list(self.gripper_dims)] = True
        return low, high, mask

    def normalize(self, actions: np.ndarray) -> np.ndarray:
        """Raw ``[..., 7]`` -> normalized in [-1, 1]; gripper mapped to its sign (±1)."""
        arr = check_actions(actions, where="ActionNormalizer.normalize")
        low, high, grip = self._arrays()
        out = np.clip(2.0 * (arr - low) / (high - low) - 1.0, -1.0, 1.0)
        out[..., grip] = np.where(arr[..., grip] >= 0.0, 1.0, -1.0)
        return out.astype(np.float32)

    def unnormalize(self, normalized: np.ndarray) -> np.ndarray:
        """Normalized ``[..., 7]`` -> raw env actions; gripper snapped to ±1."""
        arr = np.asarray(normalized, np.float32)
        if arr.shape[-1] != ACTION_DIM:
            raise ValueError(f"ActionNormalizer.unnormalize: expected [..., {ACTION_DIM}], got {arr.shape}")
        low, high, grip = self._arrays()
        out = (np.clip(arr, -1.0, 1.0) + 1.0) / 2.0 * (high - low) + low
        out[..., grip] = np.where(arr[..., grip] >= 0.0, 1.0, -1.0)
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "q01_q99", "low": list(self.low), "high": list(self.high), "gripper_dims": list(self.gripper_dims)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ActionNormalizer":
        if d.get("kind") != "q01_q99" or len(d.get("low", ())) != ACTION_DIM:
            raise ValueError(f"not a q01/q99 action normalizer with {ACTION_DIM} dims: {d!r}")
        return cls(tuple(d["low"]), tuple(d["high"]), tuple(d.get("gripper_dims", GRIPPER_DIMS)))
