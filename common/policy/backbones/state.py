"""``StateBackbone`` (local, CPU): MLP over the normalized low-dimensional observation vector plus a
learned per-task embedding -> features [B, D] for the draft and main models.

``eef_relative=True`` appends, for every object slot of the observation (``common.sim.libero_env``
layout), the object's position minus the end effector's (zero for an empty slot) and, for the first
two slots (the goal's object and its target), their difference. These are the quantities a reach
or a place depends on, whatever the layout; world positions alone make a policy trained on a few
layouts learn the subtraction from those few."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from common.sim.libero_env import MAX_OBJECTS, OBJECT_SLOT_DIM, ROBOT_OBS_DIM

# eef - object offsets (3 per slot) and goal object - goal target (3)
EEF_RELATIVE_DIM = 3 * MAX_OBJECTS + 3


def eef_relative_features(obs: torch.Tensor) -> torch.Tensor:
    """[B, 96] low-dim observations -> [B, EEF_RELATIVE_DIM]: each slot's position minus the end
    effector's, masked by the slot's present flag, then slot 0's position minus slot 1's (masked by both)."""
    slots = obs[:, ROBOT_OBS_DIM:].reshape(obs.shape[0], MAX_OBJECTS, OBJECT_SLOT_DIM)
    pos, present = slots[..., :3], slots[..., 7:8]
    to_objects = (pos - obs[:, None, :3]) * present
    between = (pos[:, 0] - pos[:, 1]) * present[:, 0] * present[:, 1]
    return torch.cat([to_objects.flatten(1), between], dim=1)


class StateBackbone(nn.Module):
    """MLP over low-dimensional observations + learned task embedding -> [B, feature_dim]."""

    def __init__(
        self,
        *,
        obs_dim: int,
        num_tasks: int,
        task_embed_dim: int = 32,
        hidden_dim: int = 256,
        feature_dim: int = 256,
        eef_relative: bool = False,
    ) -> None:
        super().__init__()
        for name, val in (("obs_dim", obs_dim), ("num_tasks", num_tasks), ("task_embed_dim", task_embed_dim),
                          ("hidden_dim", hidden_dim), ("feature_dim", feature_dim)):
            if int(val) < 1:
                raise ValueError(f"StateBackbone: expected {name} >= 1, found {val}")
        self.obs_dim = int(obs_dim)
        self.num_tasks = int(num_tasks)
        self.task_embed_dim = int(task_embed_dim)
        self.hidden_dim = int(hidden_dim)
        self.feature_dim = int(feature_dim)
        self.eef_relative = bool(eef_relative)
        if self.eef_relative and self.obs_dim != ROBOT_OBS_DIM + MAX_OBJECTS * OBJECT_SLOT_DIM:
            raise ValueError(f"StateBackbone: eef_relative needs the {ROBOT_OBS_DIM + MAX_OBJECTS * OBJECT_SLOT_DIM}-float "
                             f"low-dim observation (common.sim.libero_env), found obs_dim={self.obs_dim}")
        self.input_dim = self.obs_dim + (EEF_RELATIVE_DIM if self.eef_relative else 0)
        # Normalizer statistics are model state (saved in the state dict), fitted once on training data.
        self.register_buffer("obs_mean", torch.zeros(self.input_dim))
        self.register_buffer("obs_std", torch.ones(self.input_dim))
        self.register_buffer("normalizer_fitted", torch.tensor(False))
        self.task_embed = nn.Embedding(self.num_tasks, self.task_embed_dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.input_dim + self.task_embed_dim, self.hidden_dim),
            nn.GELU(),
            nn.Linear(self.hidden_dim, self.hidden_dim),
            nn.GELU(),
            nn.Linear(self.hidden_dim, self.feature_dim),
            nn.LayerNorm(self.feature_dim),
        )

    @property
    def config(self) -> dict[str, Any]:
        return {
            "obs_dim": self.obs_dim,
            "num_tasks": self.num_tasks,
            "task_embed_dim": self.task_embed_dim,
            "hidden_dim": self.hidden_dim,
            "feature_dim": self.feature_dim,
            "eef_relative": self.eef_relative,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "StateBackbone":
        return cls(**config)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def fit_normalizer(self, obs: torch.Tensor, *, min_std: float = 1e-6) -> None:
        """Set mean/std from training observations [N, obs_dim]; constant dims get std 1 (not 0)."""
        obs = torch.as_tensor(obs, dtype=torch.float32)
        if obs.dim() != 2 or obs.shape[1] != self.obs_dim or obs.shape[0] < 2:
            raise ValueError(f"fit_normalizer: expected [N>=2, {self.obs_dim}], found {list(obs.shape)}")
        if not torch.isfinite(obs).all():
            raise ValueError("fit_normalizer: observations contain NaN/inf")
        obs = self.inputs(obs)
        std = obs.std(dim=0)
        std = torch.where(std < min_std, torch.ones_like(std), std)
        self.obs_mean.copy_(obs.mean(dim=0))
        self.obs_std.copy_(std)
        self.normalizer_fitted.fill_(True)

    def inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """The raw observation, plus the eef-relative offsets when ``eef_relative``."""
        return torch.cat([obs, eef_relative_features(obs)], dim=1) if self.eef_relative else obs

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        return (self.inputs(obs) - self.obs_mean) / self.obs_std

    def forward(self, obs: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        if not bool(self.normalizer_fitted):
            # an unfitted normalizer silently feeds raw-scale inputs; make the caller fit or load it
            raise RuntimeError("StateBackbone: normalizer not fitted; call fit_normalizer(train_obs) or load a state dict")
        if obs.dim() != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"obs: expected [B, {self.obs_dim}], found {list(obs.shape)}")
        if task_ids.shape != (obs.shape[0],):
            raise ValueError(f"task_ids: expected [{obs.shape[0]}], found {list(task_ids.shape)}")
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.num_tasks):
            raise ValueError(
                f"task_ids: expected values in [0, {self.num_tasks}), found [{int(task_ids.min())}, {int(task_ids.max())}]"
            )
        x = torch.cat([self.normalize(obs.float()), self.task_embed(task_ids.long())], dim=1)
        return self.mlp(x)
