"""``ActionRFSQAE``: an action-chunk autoencoder whose latent is quantized by a residual FSQ stack.

Input ``x``: normalized actions ``[B, chunk_len, action_dim]`` (see ``normalization.py``).

Token layout (``codes``: LongTensor ``[B, tokens_per_layer, num_layers]``, values in
``[0, num_levels)``; ``codes[..., :k]`` are the ``k`` coarsest layers):

- ``layout="dct"`` (the exact option): no autoencoder. The latent is the fixed
  orthonormal DCT-II over time of every action dim (frequency-major: coefficient ``f`` of dims
  0..6, then ``f + 1``), exactly inverted by its transpose, so the only error is quantization (no
  autoencoder floor): 56 tokens per layer. ``latent_dim`` keeps the ``latent_dim / action_dim``
  lowest frequencies per dim (default: all ``chunk_len * action_dim``, exact); dropped frequencies
  are error. Nothing to train: the robust stages' statistics come from ``calibrate`` or from
  training-mode forward passes (see below). Rate-distortion: ``results/bench_rate_distortion.md``.
- ``layout="chunk"`` (the default): the whole chunk is encoded into one latent of ``latent_dim``
  numbers, so one RFSQ layer of a chunk is ``latent_dim`` tokens; the autoencoder's own error is
  a floor that the quantizer layers cannot go below. It stays the default because a policy predicts
  its 16 tokens per layer far better than the DCT's 56: in the same ``make run`` profile the robust
  policy succeeded 56.7% with it against 30.0% with ``dct`` (``results/pipeline_layout_ab/``).
- ``layout="timestep"`` (the seed's): every timestep is encoded separately into ``hidden_dim``
  numbers; tokens per layer = ``chunk_len * hidden_dim`` (timestep-major).

Calibration in a user's own loop: in training mode the model remembers the last
``CALIBRATION_BUFFER`` input chunks; the switch to eval (``model.eval()``) recalibrates the robust
stages on them with the current encoder (``calibrate``), so a plain ``recon, _ = model(x)`` loop
gets exact, frozen statistics. ``save_tokenizer`` refuses a robust model whose statistics were never
set or that has training passes not yet calibrated.

The learned layouts use an MLP with a linear skip path (the skip makes the near-linear part of the map easy to
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

LAYOUTS = ("chunk", "timestep", "dct")
CALIBRATION_BUFFER = 8192  # input chunks remembered in training mode for the eval-time calibration


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``[n, n]``: ``coeffs = D @ signal``, ``signal = D.T @ coeffs``."""
    t = torch.arange(n, dtype=torch.float64)
    k = t[:, None]
    d = torch.cos(torch.pi * (t[None, :] + 0.5) * k / n) * (2.0 / n) ** 0.5
    d[0] /= 2.0**0.5
    return d.to(torch.float32)


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
        first_stage_margin: float = 1.5,
        reach: str = "absmax",
        reach_quantile: float = 0.99,
        reach_std: float = 3.0,
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
        elif layout == "dct":
            self.latent_dim = latent_dim or chunk_len * action_dim
            if self.latent_dim % action_dim or not action_dim <= self.latent_dim <= chunk_len * action_dim:
                raise ValueError(
                    f"layout='dct' keeps whole frequencies: latent_dim must be a multiple of action_dim={action_dim} "
                    f"in [{action_dim}, {chunk_len * action_dim}]; got {self.latent_dim}"
                )
            in_dim, self.tokens_per_layer = chunk_len * action_dim, self.latent_dim
        else:
            if latent_dim not in (None, hidden_dim):
                raise ValueError("layout='timestep' uses hidden_dim as the per-step latent; do not pass latent_dim")
            self.latent_dim = hidden_dim
            in_dim, self.tokens_per_layer = action_dim, chunk_len * hidden_dim
        self._config = dict(
            action_dim=action_dim, chunk_len=chunk_len, hidden_dim=hidden_dim, num_layers=num_layers,
            num_levels=num_levels, conditioning=conditioning,
            layout=layout, latent_dim=self.latent_dim, mlp_width=mlp_width, mlp_depth=mlp_depth,
            reach_margin=reach_margin,
            stats_momentum=stats_momentum, first_stage_margin=first_stage_margin, reach=reach,
            reach_quantile=reach_quantile, reach_std=reach_std,
        )
        if layout == "dct":
            self.encoder = self.decoder = None
            # Frequency-major basis rows [latent_dim, chunk_len]: row f*action_dim + d is frequency f of dim d.
            self.register_buffer("dct_basis", dct_matrix(chunk_len)[: self.latent_dim // action_dim], persistent=False)
        else:
            self.encoder = _SkipMLP(in_dim=in_dim, out_dim=self.latent_dim, width=mlp_width, depth=mlp_depth)
            self.decoder = _SkipMLP(in_dim=self.latent_dim, out_dim=in_dim, width=mlp_width, depth=mlp_depth)
        self.rfsq = ResidualFSQ(
            dim=self.latent_dim, num_layers=num_layers, num_levels=num_levels, conditioning=conditioning,
            reach_margin=reach_margin,
            stats_momentum=stats_momentum, first_stage_margin=first_stage_margin, reach=reach,
            reach_quantile=reach_quantile, reach_std=reach_std,
        )
        self._seen: list[torch.Tensor] = []  # recent training inputs for the eval-time calibration (not state)
        self._seen_count = 0

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
        if self.layout == "dct":  # [B, F, D] coefficients -> frequency-major [B, F*D]
            return torch.einsum("ft,btd->bfd", self.dct_basis, x).reshape(x.shape[0], -1)
        if self.layout == "chunk":
            return self.encoder(x.reshape(x.shape[0], -1))  # [B, latent]
        return self.encoder(x)  # [B, chunk, hidden]

    def _decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        if self.layout == "dct":
            coeffs = z.reshape(z.shape[0], -1, self.action_dim)
            return torch.einsum("ft,bfd->btd", self.dct_basis, coeffs)
        out = self.decoder(z)
        return out.reshape(z.shape[0], self.chunk_len, self.action_dim)

    def _flat_codes(self, idx: torch.Tensor) -> torch.Tensor:
        # chunk: [B, latent, L] already; timestep: [B, chunk, hidden, L] -> [B, chunk*hidden, L]
        return idx if self.layout != "timestep" else idx.reshape(idx.shape[0], -1, idx.shape[-1])

    def _unflat_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 3 or codes.shape[1] != self.tokens_per_layer:
            raise ValueError(
                f"codes must have shape [B, {self.tokens_per_layer}, k] (tokens_per_layer={self.tokens_per_layer}); "
                f"got {tuple(codes.shape)}"
            )
        if self.layout != "timestep":
            return codes
        return codes.reshape(codes.shape[0], self.chunk_len, self.latent_dim, codes.shape[-1])

    # --- the seed's API ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, num_layers: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``recon, codes = model(x)``; ``num_layers=k`` reconstructs from the ``k`` coarsest layers."""
        z = self._encode_latent(x)  # checks the shape
        if self.training and self.conditioning == "layernorm":
            self._remember(x)
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
        """Recompute the robust quantizer's per-stage statistics from actions ``x`` (see ``ResidualFSQ.calibrate``).

        An explicit calibration replaces the pending one from remembered training inputs.
        """
        self._seen, self._seen_count = [], 0
        was_training = self.training
        super().train(False)
        self.rfsq.calibrate(self._encode_latent(x))
        super().train(was_training)

    # --- calibration in a user's own loop ----------------------------------------------------------
    @torch.no_grad()
    def _remember(self, x: torch.Tensor) -> None:
        self._seen.append(x.detach().reshape(-1, self.chunk_len, self.action_dim).clone())
        self._seen_count += len(self._seen[-1])
        while self._seen_count - len(self._seen[0]) >= CALIBRATION_BUFFER:
            self._seen_count -= len(self._seen.pop(0))

    @property
    def calibration_pending(self) -> bool:
        """True when training passes happened since the last calibration (``eval()`` will run one)."""
        return bool(self._seen)

    @property
    def is_calibrated(self) -> bool:
        """Whether every robust stage has statistics (always True for the other conditionings)."""
        if self.conditioning != "layernorm":
            return True
        return bool(self.rfsq.stats_initialized.all()) and not self.calibration_pending

    def train(self, mode: bool = True) -> "ActionRFSQAE":
        """``train(False)`` / ``eval()`` after training passes calibrates on the remembered inputs."""
        if not mode and self.training and self._seen:
            self.calibrate(torch.cat(self._seen)[-CALIBRATION_BUFFER:])
        return super().train(mode)

    @torch.no_grad()
    def latent_and_residuals(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Diagnostics: ``(latent, raw residual entering each stage, codes)``."""
        z = self._encode_latent(x)
        _, idx, residuals = self.rfsq(z, return_residuals=True)
        return z, residuals, self._flat_codes(idx)


# --- checkpoints -------------------------------------------------------------------------------------
TOKENIZER_KIND = "rfsq_tokenizer"
# Constructor arguments added after checkpoints were written, with the value those checkpoints used.
LEGACY_CONFIG = {"first_stage_margin": 1.0}


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
    if not model.is_calibrated:
        raise ValueError(
            f"{path}: refusing to save a robust tokenizer whose quantizer statistics are not calibrated "
            "(call model.eval() after training, or model.calibrate(train_chunks))"
        )
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
    config = {**LEGACY_CONFIG, **config}  # a checkpoint without a newer key was trained with its old value
    try:
        model = ActionRFSQAE(**config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: config does not match ActionRFSQAE's arguments ({exc}); retrain it with "
            "python -m phase1_improved.train_rfsq_robust"
        ) from exc
    load_state_strict(model, ckpt, path)
    if ckpt.get("normalizer") is None:
        raise CheckpointError(f"{path}: tokenizer checkpoint has no action normalizer")
    model.eval()
    return LoadedTokenizer(
        model=model, normalizer=ActionNormalizer.from_dict(ckpt["normalizer"]),
        content_hash=ckpt["content_hash"], metrics=ckpt.get("metrics", {}), path=Path(path),
        extra=ckpt.get("extra", {}),
    )
