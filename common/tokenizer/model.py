"""``ActionRFSQAE``: an action-chunk autoencoder whose latent is quantized by a residual FSQ stack.

Input ``x``: normalized actions ``[B, chunk_len, action_dim]`` (see ``normalization.py``).

Token layout (``codes``: LongTensor ``[B, tokens_per_layer, num_layers]``, values in
``[0, num_levels)``; ``codes[..., :k]`` are the ``k`` coarsest layers):

- ``layout="chunk"`` (default): the whole chunk is encoded into one latent of ``latent_dim``
  numbers, so one RFSQ layer of a chunk is ``latent_dim`` tokens. Phase 3 accepts or rejects one
  layer of one chunk as a unit, so fewer tokens per layer make speculative decoding likelier to pay.
- ``layout="timestep"`` (the seed's): every timestep is encoded separately into ``hidden_dim``
  numbers; tokens per layer = ``chunk_len * hidden_dim`` (timestep-major).

Both use an MLP with a linear skip path (the skip makes the near-linear part of the map easy to
learn; the MLP corrects the rest), and are trained with a plain reconstruction loss: the
quantizer's straight-through gradient needs no auxiliary loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoints import CheckpointError, load_state_strict, read_checkpoint, save_checkpoint
from common.data.normalization import ActionNormalizer
from common.tokenizer.residual_fsq import CONDITIONINGS, ResidualFSQ

LAYOUTS = ("chunk", "timestep")


class _SkipMLP(nn.Module):
    """``Linear(x) + MLP(x)``; the MLP's last layer starts at zero so training starts linear."""

    def __init__(self, *, in_dim: int, out_dim: int, width: int, depth: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.GELU()]
            d = width
        last = nn.Linear(d, out_dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class ActionRFSQAE(nn.Module):
    """Action chunk autoencoder with a residual FSQ bottleneck (naive or robust)."""

    def __init__(
        self,
        *,
        action_dim: int = 7,
        chunk_len: int = 8,
        hidden_dim: int = 16,
        num_layers: int = 8,
        num_levels: int = 7,
        use_layernorm: bool = True,
        conditioning: str | None = None,
        layout: str = "chunk",
        latent_dim: int | None = None,
        mlp_width: int = 512,
        mlp_depth: int = 2,
        reach_margin: float = 1.05,
        stats_momentum: float = 0.05,
    ):
        super().__init__()
        if conditioning is None:  # the seed's switch; an explicit conditioning wins over it
            conditioning = "layernorm" if use_layernorm else "none"
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {conditioning!r}; expected one of {CONDITIONINGS}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
        self.action_dim = action_dim
        self.chunk_len = chunk_len
        self.layout = layout
        self.conditioning = conditioning
        if layout == "chunk":
            self.latent_dim = latent_dim or hidden_dim
            in_dim, self.tokens_per_layer = chunk_len * action_dim, self.latent_dim
        else:
            if latent_dim not in (None, hidden_dim):
                raise ValueError("layout='timestep' uses hidden_dim as the per-step latent; do not pass latent_dim")
            self.latent_dim = hidden_dim
            in_dim, self.tokens_per_layer = action_dim, chunk_len * hidden_dim
        self._config = dict(
            action_dim=action_dim, chunk_len=chunk_len, hidden_dim=hidden_dim, num_layers=num_layers,
            num_levels=num_levels, use_layernorm=conditioning == "layernorm", conditioning=conditioning,
            layout=layout, latent_dim=self.latent_dim, mlp_width=mlp_width, mlp_depth=mlp_depth,
            reach_margin=reach_margin,
            stats_momentum=stats_momentum,
        )
        self.encoder = _SkipMLP(in_dim=in_dim, out_dim=self.latent_dim, width=mlp_width, depth=mlp_depth)
        self.decoder = _SkipMLP(in_dim=self.latent_dim, out_dim=in_dim, width=mlp_width, depth=mlp_depth)
        self.rfsq = ResidualFSQ(
            dim=self.latent_dim, num_layers=num_layers, num_levels=num_levels, conditioning=conditioning,
            reach_margin=reach_margin,
            stats_momentum=stats_momentum,
        )

    # --- config ----------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments; ``ActionRFSQAE(**model.config)`` rebuilds the architecture."""
        return dict(self._config)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ActionRFSQAE":
        return cls(**config)

    @property
    def num_layers(self) -> int:
        return self.rfsq.num_layers

    @property
    def num_levels(self) -> int:
        return self.rfsq.num_levels

    # --- shape helpers -----------------------------------------------------------------------
    def _check_actions(self, x: torch.Tensor) -> None:
        expected = (self.chunk_len, self.action_dim)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"actions must have shape [B, {expected[0]}, {expected[1]}]; got {tuple(x.shape)}")

    def _encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        self._check_actions(x)
        if self.layout == "chunk":
            return self.encoder(x.reshape(x.shape[0], -1))  # [B, latent]
        return self.encoder(x)  # [B, chunk, hidden]

    def _decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return out.reshape(z.shape[0], self.chunk_len, self.action_dim)

    def _flat_codes(self, idx: torch.Tensor) -> torch.Tensor:
        # chunk: [B, latent, L] already; timestep: [B, chunk, hidden, L] -> [B, chunk*hidden, L]
        return idx if self.layout == "chunk" else idx.reshape(idx.shape[0], -1, idx.shape[-1])

    def _unflat_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 3 or codes.shape[1] != self.tokens_per_layer:
            raise ValueError(
                f"codes must have shape [B, {self.tokens_per_layer}, k] (tokens_per_layer={self.tokens_per_layer}); "
                f"got {tuple(codes.shape)}"
            )
        if self.layout == "chunk":
            return codes
        return codes.reshape(codes.shape[0], self.chunk_len, self.latent_dim, codes.shape[-1])

    # --- the seed's API ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, num_layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``recon, codes = model(x)``; ``num_layers=k`` reconstructs from the ``k`` coarsest layers."""
        z = self._encode_latent(x)
        zq, idx = self.rfsq(z, num_layers=num_layers)
        return self._decode_latent(zq), self._flat_codes(idx)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Actions ``[B, chunk, action_dim]`` -> codes ``[B, tokens_per_layer, num_layers]``."""
        z = self._encode_latent(x)
        _, idx = self.rfsq(z)
        return self._flat_codes(idx)

    def decode_from_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[B, tokens_per_layer, k]`` (any coarse prefix ``k >= 1``) -> actions ``[B, chunk, action_dim]``."""
        zq = self.rfsq.decode_indices(self._unflat_codes(codes))
        return self._decode_latent(zq)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Recompute the robust quantizer's per-stage statistics from actions ``x`` (see ``ResidualFSQ.calibrate``)."""
        was_training = self.training
        self.eval()
        self.rfsq.calibrate(self._encode_latent(x))
        self.train(was_training)

    @torch.no_grad()
    def latent_and_residuals(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Diagnostics: ``(latent, raw residual entering each stage, codes)``."""
        z = self._encode_latent(x)
        _, idx, residuals = self.rfsq(z, return_residuals=True)
        return z, residuals, self._flat_codes(idx)


# --- checkpoints -------------------------------------------------------------------------------------
TOKENIZER_KIND = "rfsq_tokenizer"


@dataclass
class LoadedTokenizer:
    """A tokenizer rebuilt from its checkpoint, in eval mode, with the normalizer it was trained with."""

    model: ActionRFSQAE
    normalizer: ActionNormalizer
    content_hash: str
    metrics: dict
    path: Path
    extra: dict

    @property
    def conditioning(self) -> str:
        return self.model.conditioning


def save_tokenizer(path: str | Path, model: ActionRFSQAE, normalizer: ActionNormalizer, *, metrics: dict | None = None, extra: dict | None = None) -> dict:
    return save_checkpoint(
        path, kind=TOKENIZER_KIND, model=model, config=model.config, normalizer=normalizer.to_dict(),
        metrics=metrics, extra=extra,
    )


def load_tokenizer(path: str | Path, *, require_conditioning: str | None = None) -> LoadedTokenizer:
    """Rebuild an ``ActionRFSQAE`` from a checkpoint; one-line ``CheckpointError`` on any mismatch.

    ``require_conditioning="layernorm"`` rejects a naive checkpoint where the robust one is needed
    (and vice versa) instead of silently decoding with the wrong quantizer.
    """
    ckpt = read_checkpoint(path, kind=TOKENIZER_KIND)
    config = ckpt["config"]
    found = config.get("conditioning")
    if require_conditioning is not None and found != require_conditioning:
        raise CheckpointError(
            f"{path}: expected a tokenizer with conditioning {require_conditioning!r}, found {found!r}"
        )
    try:
        model = ActionRFSQAE(**config)
    except TypeError as exc:
        raise CheckpointError(f"{path}: config does not match ActionRFSQAE's arguments ({exc})") from exc
    load_state_strict(model, ckpt, path)
    if ckpt.get("normalizer") is None:
        raise CheckpointError(f"{path}: tokenizer checkpoint has no action normalizer")
    model.eval()
    return LoadedTokenizer(
        model=model, normalizer=ActionNormalizer.from_dict(ckpt["normalizer"]),
        content_hash=ckpt["content_hash"], metrics=ckpt.get("metrics", {}), path=Path(path),
        extra=ckpt.get("extra", {}),
    )
