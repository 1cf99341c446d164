"""Finite scalar quantization (FSQ) of every element to ``num_levels`` evenly spaced values.

The input is expected in roughly [-1, 1]: it is scaled by the half width ``(num_levels - 1) / 2``,
clamped, and rounded to the nearest integer. Codes live in [-1, 1] (``integer / half_width``),
indices in ``[0, num_levels)``.

Why clamp and not the tanh bound of the FSQ paper: in a *residual* stack every stage must return a
value that the next stage can correct. A linear clamp keeps the quantization error of an in-range
value below half a step and makes the decision boundaries uniform, which is what the per-stage
conditionings in ``residual_fsq.py`` are designed around. The gradient is straight-through
(identity inside the range, zero where clamped), so scales placed around it receive the LSQ-style
"learned step size" gradient.
"""

from __future__ import annotations

import torch
from torch import nn


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through (identity) gradient.

    Written as ``round(x) + (x - x.detach())`` so the value is exactly ``round(x)`` (the added term is
    exactly zero): a forward pass and ``decode_indices`` then produce bit-identical codes.
    """
    return torch.round(x).detach() + (x - x.detach())


class FSQ(nn.Module):
    """Scalar quantizer with ``num_levels`` (odd) levels on [-1, 1]."""

    def __init__(self, *, num_levels: int = 7):
        super().__init__()
        if num_levels < 3 or num_levels % 2 == 0:
            raise ValueError(f"FSQ needs an odd num_levels >= 3 (a level at exactly 0); got {num_levels}")
        self.num_levels = num_levels
        self.half_width = (num_levels - 1) // 2

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize ``u``; returns ``(codes in [-1, 1] with straight-through gradient, indices)``."""
        scaled = torch.clamp(u * self.half_width, -self.half_width, self.half_width)
        rounded = round_ste(scaled)
        indices = torch.round(scaled).long() + self.half_width
        return rounded / self.half_width, indices

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Map indices in ``[0, num_levels)`` back to codes in [-1, 1]."""
        return (indices.to(torch.float32) - self.half_width) / self.half_width

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.round(codes * self.half_width).long() + self.half_width

    def extra_repr(self) -> str:
        return f"num_levels={self.num_levels}"
