"""The main model's key/value cache: pre-allocated buffers for the layer positions decoded so far,
written in place by each pass (``RFSQHead``) and cut back to an accepted prefix after a verify pass
(``common.decoding.speculative``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVCache:
    """Pre-allocated per-block key/value buffers for the positions decoded so far.

    keys[i], values[i]: [B, num_heads, num_layers, head_dim] for transformer block i; positions
    ``0..length-1`` are valid. Decoding writes each new position in place (no reallocation, no
    concatenation). ``truncate`` returns a copy-on-write view (the parent stays valid);
    ``truncate_`` shortens this cache in place (what the decode loop uses).
    """

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    shared: bool = False  # buffers shared with another cache: copy before the next write

    @property
    def batch_size(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[0])

    def truncate(self, length: int) -> "KVCache":
        """Keep the first ``length`` positions (e.g. the accepted prefix after verification)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"truncate: expected 0 <= length <= {self.length}, found {length}")
        self.shared = True
        return KVCache(self.keys, self.values, length, shared=True)

    def truncate_(self, length: int) -> "KVCache":
        self.length = length
        return self

    def writable(self) -> "KVCache":
        if self.shared:
            self.keys = [k.clone() for k in self.keys]
            self.values = [v.clone() for v in self.values]
            self.shared = False
        return self
