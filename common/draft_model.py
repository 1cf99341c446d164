"""Draft model: cheap one-pass predictor of the K coarsest RFSQ layers.

features [B, feature_dim] --LayerNorm+Linear--> width --(hidden_layers residual MLP blocks)-->
Linear(width, K*T*V) --> logits [B, K, T, V].

The draft is deliberately non-autoregressive: all K coarse layers come out of ONE pass, so its
cost is a few small matmuls (see ``count_flops``), far below one pass of the main model.  Its
errors are caught by the main model's verification pass (``common/speculative.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


class _ResidualMLP(nn.Module):
    def __init__(self, *, width: int, dropout: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(F.gelu(self.fc(self.ln(x))))


class DraftWithProjection(nn.Module):
    """Projection from the backbone's feature size + small MLP predicting layers 0..K-1 at once."""

    def __init__(
        self,
        *,
        feature_dim: int,
        width: int = 128,
        coarse_layers: int = 3,
        tokens_per_layer: int,
        num_levels: int = 7,
        hidden_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, val in (("feature_dim", feature_dim), ("width", width), ("coarse_layers", coarse_layers),
                          ("tokens_per_layer", tokens_per_layer), ("num_levels", num_levels)):
            if int(val) < 1:
                raise ValueError(f"DraftWithProjection: expected {name} >= 1, found {val}")
        if int(hidden_layers) < 0:
            raise ValueError(f"DraftWithProjection: expected hidden_layers >= 0, found {hidden_layers}")
        self.feature_dim = int(feature_dim)
        self.width = int(width)
        self.coarse_layers = int(coarse_layers)
        self.tokens_per_layer = int(tokens_per_layer)
        self.num_levels = int(num_levels)
        self.hidden_layers = int(hidden_layers)
        self.dropout = float(dropout)

        # The projection is what lets one draft architecture sit on any backbone (4096-d OpenVLA or a
        # 256-d state MLP); LayerNorm first because VLA hidden states have large, uneven scales.
        self.projection = nn.Sequential(nn.LayerNorm(self.feature_dim), nn.Linear(self.feature_dim, self.width))
        self.blocks = nn.Sequential(
            *[_ResidualMLP(width=self.width, dropout=self.dropout) for _ in range(self.hidden_layers)]
        )
        self.ln_out = nn.LayerNorm(self.width)
        self.out = nn.Linear(self.width, self.coarse_layers * self.tokens_per_layer * self.num_levels)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "feature_dim": self.feature_dim,
            "width": self.width,
            "coarse_layers": self.coarse_layers,
            "tokens_per_layer": self.tokens_per_layer,
            "num_levels": self.num_levels,
            "hidden_layers": self.hidden_layers,
            "dropout": self.dropout,
        }

    def to_config(self) -> dict[str, Any]:
        return dict(self.config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DraftWithProjection":
        return cls(**config)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def count_flops(self, batch: int = 1) -> dict[str, int]:
        """Analytic FLOPs of one draft pass (1 multiply-add = 2 FLOPs; norms/GELU ignored)."""
        D, W, h = self.feature_dim, self.width, self.hidden_layers
        out = self.coarse_layers * self.tokens_per_layer * self.num_levels
        return {"draft_pass": batch * (2 * D * W + h * 2 * W * W + 2 * W * out)}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, feature_dim] -> logits [B, K, T, V] for layers 0..K-1 (one pass)."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features: expected [B, {self.feature_dim}], found {list(features.shape)}")
        h = self.out(self.ln_out(self.blocks(self.projection(features))))
        return h.view(features.shape[0], self.coarse_layers, self.tokens_per_layer, self.num_levels)

    def loss(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Token cross-entropy against the K coarsest layers of codes [B, T, >=K]."""
        target = codes[:, :, : self.coarse_layers].transpose(1, 2).long()  # [B, K, T]
        return F.cross_entropy(self(features).reshape(-1, self.num_levels), target.reshape(-1))

    @torch.no_grad()
    def propose(self, features: torch.Tensor) -> torch.Tensor:
        """Greedy proposal codes [B, T, K] (same layout as the tokenizer's codes[..., :K])."""
        return self(features).argmax(dim=-1).transpose(1, 2)
