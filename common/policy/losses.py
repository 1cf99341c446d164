"""The main model's training loss: token cross-entropy, plus two options that teach the model what
decoding will actually ask of it (Phase 2 flags ``--own-prefix-prob`` and ``--expected-value-weight``).

* **Own prefixes, relabelled** (``own_prefix_prob`` p). Teacher forcing only ever shows the model the
  demo's true coarse layers; at decode time it reads its own, and a robust code cannot undo a wrong
  coarse token with the next layer's default target (each stage spans only the previous one's
  remaining reach). So, per chunk and layer with probability p, the model's own argmax (from a
  teacher-forced pass without gradient) replaces the true tokens as the input, and every later
  layer's target is re-derived from the chunk's true latent and the prefix actually fed
  (``TokenCode.encode_after_prefix``): the correction that brings the decode closest to the demo.
* **Expected-value regression** (``expected_value_weight`` w). Cross-entropy treats the 7 FSQ levels
  as unordered classes: predicting the neighbouring level costs as much as the opposite end. Adding
  w x the squared error between each token's mean level value (under the model's distribution) and its
  target level value, in latent units normalized by the variance of the first stage's values, makes
  the loss ordinal and makes the mean a good estimate — which is what ``--decode-rule expected`` decodes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.policy.head import RFSQHead
from common.tokenizer.token_code import TokenCode


class MainLoss:
    """``loss(features, codes)`` for the RFSQ head; plain token cross-entropy when both options are off."""

    def __init__(self, head: RFSQHead, code: TokenCode | None, *, own_prefix_prob: float = 0.0,
                 expected_value_weight: float = 0.0, value_scale: float = 1.0, seed: int = 0):
        if not 0.0 <= own_prefix_prob <= 1.0:
            raise ValueError(f"own_prefix_prob: expected a probability in [0, 1], found {own_prefix_prob}")
        if expected_value_weight < 0:
            raise ValueError(f"expected_value_weight: expected >= 0, found {expected_value_weight}")
        if (own_prefix_prob or expected_value_weight) and code is None:
            raise ValueError("own_prefix_prob / expected_value_weight need the tokenizer's TokenCode")
        self.head, self.code = head, code
        self.own_prefix_prob, self.expected_value_weight = float(own_prefix_prob), float(expected_value_weight)
        self.value_scale = float(value_scale)
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def for_training(cls, head: RFSQHead, tokenizer, train_codes: torch.Tensor, *, own_prefix_prob: float, expected_value_weight: float,
                     seed: int, device: torch.device) -> "MainLoss":
        """The Phase 2 loss with these options: the tokenizer's ``TokenCode`` only when an option needs it, the
        expected-value unit from the training codes (what Phase 2 trains with and a fine-tuning reuses)."""
        code = TokenCode(tokenizer).to(device) if (own_prefix_prob or expected_value_weight) else None
        return cls(head, code, own_prefix_prob=own_prefix_prob, expected_value_weight=expected_value_weight,
                    value_scale=cls.value_scale_of(code, train_codes) if code is not None else 1.0, seed=seed)

    @staticmethod
    def value_scale_of(code: TokenCode, codes: torch.Tensor) -> float:
        """Variance of the first stage's target values over ``codes [N, T, L]`` (the EV loss's unit)."""
        first = codes[..., 0].to(code.values.device)  # the training codes stay on the CPU; the code may be on a GPU
        return float(code.stage_values(0, first).var()) or 1.0

    def inputs_and_targets(self, features: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The token inputs the model reads and the targets it learns, ``[B, T, L]`` each (see module docstring)."""
        if self.own_prefix_prob == 0.0:
            return codes, codes
        with torch.no_grad():
            was_training = self.head.training
            self.head.eval()
            own = self.head(features.detach(), codes).argmax(dim=-1).transpose(1, 2)  # [B, T, L]: each given the true prefix
            self.head.train(was_training)
            latent = self.code.latent(codes)  # the chunk's latent, exact up to the code's last step
            B, T, L = codes.shape
            use_own = torch.rand(B, L, generator=self.generator) < self.own_prefix_prob
            use_own = use_own.to(codes.device)
            inputs, targets, residual = [], [], latent
            for layer in range(L):  # encode_after_prefix, one stage at a time along the prefix being built
                target = self.code.quantize_stage(layer, residual)
                fed = torch.where(use_own[:, layer, None], own[..., layer], target)
                residual = residual - self.code.stage_values(layer, fed)
                targets.append(target)
                inputs.append(fed)
            return torch.stack(inputs, dim=2), torch.stack(targets, dim=2)

    def __call__(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        inputs, targets = self.inputs_and_targets(features, codes)
        logits = self.head(features, inputs)  # [B, L, T, V]
        flat_targets = targets.transpose(1, 2)  # [B, L, T]
        loss = F.cross_entropy(logits.reshape(-1, self.head.num_levels), flat_targets.reshape(-1).long())
        if self.expected_value_weight:
            values = self.code.values.to(logits.device, logits.dtype)  # [L, T, V]
            mean = (logits.softmax(dim=-1) * values).sum(-1)  # [B, L, T]
            target_values = torch.gather(values.expand(len(logits), -1, -1, -1), 3, flat_targets.long().unsqueeze(-1)).squeeze(-1)
            loss = loss + self.expected_value_weight * ((mean - target_values) ** 2).mean() / self.value_scale
        return loss
