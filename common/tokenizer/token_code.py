"""A tokenizer's residual code seen token by token: what each level of each token is worth in latent
space, stage by stage. Two things need that view and nothing else of the tokenizer:

* **expected-value decoding** (Phase 3 ``--decode-rule expected``): the last decoded layer is decoded as
  the mean of its level values under the policy's distribution instead of its argmax level. Over a
  flat distribution the argmax picks one arbitrary level; the mean is the least-squares estimate.
* **prefix relabelling** (Phase 2 ``--own-prefix-prob``): given the chunk's true latent and ANY coarse
  prefix (e.g. the policy's own mistaken layer 0), the code of the next stage is the quantization of
  what that prefix left over — the target that brings the decode closest to the true chunk.

Token order is the policy's: token ``t`` of a layer is latent dimension ``t`` (chunk and dct layouts) or
``(step, dim) = divmod(t, hidden_dim)`` (timestep layout). Values are read from the tokenizer's frozen
(eval-mode) stage statistics, so ``latent(codes)`` reproduces ``decode_from_indices`` bit for bit.
"""

from __future__ import annotations

import torch

from common.tokenizer.model import ActionRFSQAE


class TokenCode:
    """Per-token level values ``[L, T, V]`` of an eval-mode tokenizer and the stage arithmetic on them."""

    def __init__(self, model: ActionRFSQAE):
        if model.training:
            raise RuntimeError("TokenCode: expected the tokenizer in eval() mode (frozen stage statistics), found training mode")
        self.model = model
        rfsq = model.rfsq
        repeat = model.chunk_len if model.layout == "timestep" else 1
        levels = rfsq.fsq.indices_to_codes(torch.arange(rfsq.num_levels))  # [V] in [-1, 1]
        scales, centers = [], []
        for layer in range(rfsq.num_layers):
            scale, center = rfsq._stage_affine(layer, None)  # [dim] each
            scales.append(scale.detach().float().cpu().repeat(repeat))
            centers.append(center.detach().float().cpu().repeat(repeat))
        self.scale = torch.stack(scales)  # [L, T]
        self.center = torch.stack(centers)  # [L, T]
        self.levels = levels.float()
        # value of level v of token t at stage l, computed as decode_indices does (code * scale + center)
        self.values = self.levels[None, None, :] * self.scale[..., None] + self.center[..., None]  # [L, T, V]
        self.num_layers, self.tokens_per_layer, self.num_levels = self.values.shape

    def to(self, device: torch.device | str) -> "TokenCode":
        for name in ("scale", "center", "levels", "values"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # --- codes <-> latent ------------------------------------------------------------------------
    def stage_values(self, layer: int, indices: torch.Tensor) -> torch.Tensor:
        """Latent contribution ``[B, T]`` of stage ``layer`` at level ``indices [B, T]``."""
        return torch.gather(self.values[layer].expand(indices.shape[0], -1, -1), 2, indices.long().unsqueeze(-1)).squeeze(-1)

    def latent(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, T, k]`` (the k coarsest layers) -> latent ``[B, T]`` (``decode_indices``' sum order)."""
        out = torch.zeros(codes.shape[0], codes.shape[1], device=codes.device)
        for layer in range(codes.shape[2]):
            out = out + self.stage_values(layer, codes[..., layer])
        return out

    def quantize_stage(self, layer: int, residual: torch.Tensor) -> torch.Tensor:
        """Indices ``[B, T]`` of stage ``layer`` for ``residual [B, T]`` (clipped to the stage's reach)."""
        _, idx = self.model.rfsq.fsq((residual - self.center[layer]) / self.scale[layer])
        return idx

    def encode_after_prefix(self, latent: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """The stages after ``prefix [B, T, p]`` that best encode ``latent [B, T]`` -> codes ``[B, T, L - p]``.

        With the true prefix this is the tokenizer's own code; with a wrong one it is the correction
        the remaining stages can still make (saturated at their reach when the error exceeds it)."""
        residual = latent
        for layer in range(prefix.shape[2]):  # stage by stage: the tokenizer's own rounding order
            residual = residual - self.stage_values(layer, prefix[..., layer])
        out = []
        for layer in range(prefix.shape[2], self.num_layers):
            idx = self.quantize_stage(layer, residual)
            residual = residual - self.stage_values(layer, idx)
            out.append(idx)
        return torch.stack(out, dim=2) if out else prefix.new_zeros(prefix.shape[0], prefix.shape[1], 0)

    # --- expected values ---------------------------------------------------------------------------
    def expected_stage(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """Mean latent contribution ``[B, T]`` of stage ``layer`` under level probabilities ``probs [B, T, V]``."""
        return (probs * self.values[layer].to(probs.dtype)).sum(-1)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, T]`` -> normalized actions ``[B, chunk, action_dim]`` through the tokenizer's decoder."""
        m = self.model
        z = latent.float().reshape(latent.shape[0], m.chunk_len, m.latent_dim) if m.layout == "timestep" else latent.float()
        return m._decode_latent(z)

    @torch.no_grad()
    def decode_expected(self, codes: torch.Tensor, last_probs: torch.Tensor) -> torch.Tensor:
        """Argmax codes of the layers before the last ``[B, T, k-1]`` (k-1 may be 0) plus the last decoded
        layer's level probabilities ``[B, T, V]`` -> normalized actions; the last layer contributes its mean."""
        if last_probs.shape[1:] != (self.tokens_per_layer, self.num_levels):
            raise ValueError(f"last_probs: expected [B, {self.tokens_per_layer}, {self.num_levels}], found {list(last_probs.shape)}")
        k = codes.shape[2] + 1
        if not 1 <= k <= self.num_layers:
            raise ValueError(f"decode_expected: {codes.shape[2]} argmax layers + 1 expected layer must be within {self.num_layers} layers")
        latent = self.latent(codes) if codes.shape[2] else torch.zeros(codes.shape[0], codes.shape[1])
        return self.decode_latent(latent + self.expected_stage(k - 1, last_probs.float()))
