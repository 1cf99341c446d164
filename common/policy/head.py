"""Main model ("RFSQ head"): a small causal transformer over RFSQ *layer* positions.

Sequence layout (one sequence per action chunk, length at most L = num_layers):

    position 0      input = LayerNorm+Linear projection of the backbone features  -> predicts layer 0
    position l+1    input = embedding of layer l's T tokens + layer-position emb  -> predicts layer l+1

The output at position l is a [T, V] block of logits for all T tokens of layer l (the T tokens
of one layer are predicted jointly, conditionally independent given the coarser layers).

Layer embedding: every (token slot t, level v) pair owns one d_model vector; a layer's
embedding is the sum over its T slots of ``table[t * V + codes[t]]``.  This is exactly a linear
map of the concatenated one-hot tokens (slot identity is kept, no information is pooled away),
at the cost of T gathers.

Decoding API (all with a key/value cache so that one sequential step costs one position):
    cache, logits0 = head.start(features)               # position 0
    cache, logits  = head.extend(cache, layer_codes)    # next position(s)
    logits, cache  = head.verify(features, proposed)    # positions 0..K in ONE pass
    codes          = head.greedy_decode(features)       # L sequential passes

Teacher-forced ``forward`` and cached decoding run the same code path (``_run``), so they
agree to float round-off; the tests pin this at atol 1e-5.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.policy.kv_cache import KVCache


def _dropout(p: float) -> nn.Module:
    """Dropout, or nothing at p = 0 (an eval-mode Dropout is still one dispatched op per call)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class _CausalSelfAttention(nn.Module):
    def __init__(self, *, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model must be divisible by num_heads: found d_model={d_model}, num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.attn_dropout = float(dropout)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, past: int,
                visible: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """x [B, n, d] at positions past..past+n-1. ``kv``: this block's cache buffers, into which the
        new keys/values are written (decoding); ``None`` for a teacher-forced pass over the whole sequence.
        ``visible`` [n, past+n] bool: the keys each query may see; None: all of them (n == 1), or
        causal with ``causal`` (past == 0: SDPA's own causal path, no mask tensor to expand and apply)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if kv is not None:
            kv[0][:, :, past : past + n] = k
            kv[1][:, :, past : past + n] = v
            k, v = kv[0][:, :, : past + n], kv[1][:, :, : past + n]
        # one fused op instead of matmul / scale / mask / softmax / matmul: at batch 1 the per-op
        # overhead, not the arithmetic, sets the cost of a pass
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, dropout_p=self.attn_dropout if self.training else 0.0,
                                           is_causal=causal)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, *, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = _CausalSelfAttention(d_model=d_model, num_heads=num_heads, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), _dropout(dropout)
        )
        self.drop = _dropout(dropout)

    def forward(self, x, kv, past, visible=None, causal=False):
        x = x + self.drop(self.attn(self.ln1(x), kv, past, visible, causal))
        return x + self.mlp(self.ln2(x))


class RFSQHead(nn.Module):
    """Main model: predicts RFSQ layers coarse-to-fine, causal over layers (see module docstring)."""

    def __init__(
        self,
        *,
        feature_dim: int,
        num_layers: int = 8,
        tokens_per_layer: int,
        num_levels: int = 7,
        d_model: int = 256,
        num_heads: int = 4,
        num_blocks: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, val in (("feature_dim", feature_dim), ("num_layers", num_layers),
                          ("tokens_per_layer", tokens_per_layer), ("num_levels", num_levels),
                          ("num_blocks", num_blocks)):
            if int(val) < 1:
                raise ValueError(f"RFSQHead: expected {name} >= 1, found {val}")
        self.feature_dim = int(feature_dim)
        self.num_layers = int(num_layers)
        self.tokens_per_layer = int(tokens_per_layer)
        self.num_levels = int(num_levels)
        self.d_model = int(d_model)
        self.num_heads = int(num_heads)
        self.num_blocks = int(num_blocks)
        self.dropout = float(dropout)

        T, V, d = self.tokens_per_layer, self.num_levels, self.d_model
        self.feat_in = nn.Sequential(nn.LayerNorm(self.feature_dim), nn.Linear(self.feature_dim, d))
        self.code_embed = nn.Embedding(T * V, d)  # index slot*V + level, summed over slots
        self.pos_embed = nn.Embedding(self.num_layers, d)  # position l (0 = features)
        self.in_drop = _dropout(self.dropout)
        self.blocks = nn.ModuleList(
            [_Block(d_model=d, num_heads=self.num_heads, dropout=self.dropout) for _ in range(self.num_blocks)]
        )
        self.ln_f = nn.LayerNorm(d)
        self.out = nn.Linear(d, T * V)
        self.register_buffer("_slot_offsets", torch.arange(T) * V, persistent=False)
        # causal mask, built once: the query at position i may see keys 0..i
        pos = torch.arange(self.num_layers)
        self.register_buffer("_visible", pos[None, :] <= pos[:, None], persistent=False)
        nn.init.normal_(self.code_embed.weight, std=0.02 / math.sqrt(T))  # sum of T rows ~ std 0.02
        nn.init.normal_(self.pos_embed.weight, std=0.02)

    # ------------------------------------------------------------------ config / bookkeeping
    @property
    def config(self) -> dict[str, Any]:
        return {
            "feature_dim": self.feature_dim,
            "num_layers": self.num_layers,
            "tokens_per_layer": self.tokens_per_layer,
            "num_levels": self.num_levels,
            "d_model": self.d_model,
            "num_heads": self.num_heads,
            "num_blocks": self.num_blocks,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RFSQHead":
        return cls(**config)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def count_flops(self, batch: int = 1) -> dict[str, Any]:
        """Analytic FLOPs (1 multiply-add = 2 FLOPs; norms, softmax, GELU, embedding sums ignored).

        A cached pass that computes ONE new position attending to n keys costs
            blocks * (24 d^2 + 4 n d) + 2 d T V   (+ 2 D d for the feature projection at position 0)
        Keys: per_position[l] (the pass that computes position l, n = l+1 keys),
        greedy_decode_total (positions 0..L-1, one pass each), per_pass_mean (= total / L),
        verify_pass[K] (positions 0..K in ONE pass; cost grows with K+1 but latency is one step).
        """
        d, T, V, L, nb = self.d_model, self.tokens_per_layer, self.num_levels, self.num_layers, self.num_blocks

        def position_cost(pos: int) -> int:
            c = nb * (24 * d * d + 4 * (pos + 1) * d) + 2 * d * T * V
            if pos == 0:
                c += 2 * self.feature_dim * d
            return batch * c

        per_position = [position_cost(p) for p in range(L)]
        total = sum(per_position)
        verify = {K: sum(per_position[: K + 1]) for K in range(1, L)}
        return {
            "per_position": per_position,
            "greedy_decode_total": total,
            "per_pass_mean": total / L,
            "verify_pass": verify,
        }

    # ------------------------------------------------------------------ embeddings
    def _check_features(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features: expected [B, {self.feature_dim}], found {list(features.shape)}")

    def _check_codes(self, codes: torch.Tensor, name: str) -> None:
        if codes.dim() != 3 or codes.shape[1] != self.tokens_per_layer:
            raise ValueError(f"{name}: expected [B, {self.tokens_per_layer}, k], found {list(codes.shape)}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"{name}: expected an integer tensor, found {codes.dtype}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.num_levels):
            raise ValueError(
                f"{name}: expected values in [0, {self.num_levels}), found [{int(codes.min())}, {int(codes.max())}]"
            )

    def _embed_layers(self, codes: torch.Tensor, first_layer: int) -> torch.Tensor:
        """codes [B, T, k] (layers first_layer..first_layer+k-1) -> inputs for positions first_layer+1.. [B, k, d]."""
        return self._embed_rows(codes.transpose(1, 2), first_layer)

    def _embed_rows(self, rows: torch.Tensor, first_layer: int) -> torch.Tensor:
        """``_embed_layers`` for codes laid out as rows [B, k, T] (one row per layer)."""
        k = rows.shape[1]
        emb = self.code_embed(rows.long() + self._slot_offsets).sum(dim=2)  # [B, k, d]
        return emb + self.pos_embed.weight[first_layer + 1 : first_layer + 1 + k]

    def _embed_features(self, features: torch.Tensor) -> torch.Tensor:
        pos0 = self.pos_embed.weight[0]
        return (self.feat_in(features) + pos0).unsqueeze(1)  # [B, 1, d]

    # ------------------------------------------------------------------ core
    def new_cache(self, batch_size: int, *, like: torch.Tensor) -> KVCache:
        """Empty buffers for a whole sequence (L positions) of ``batch_size`` chunks."""
        shape = (batch_size, self.num_heads, self.num_layers, self.d_model // self.num_heads)
        return KVCache([like.new_empty(shape) for _ in self.blocks], [like.new_empty(shape) for _ in self.blocks], 0)

    def _run(self, x: torch.Tensor, cache: KVCache | None, *, return_hidden: bool = False):
        """Process new positions x [B, n, d] after the cached ones; returns logits [B, n, T, V]
        (and the final hidden states [B, n, d] the output layer reads, with ``return_hidden``).

        With a cache, the new positions' keys/values are written into it and its length grows;
        without one (teacher forcing) the whole sequence is processed at once."""
        past = 0 if cache is None else cache.length
        if past + x.shape[1] > self.num_layers:
            raise ValueError(
                f"sequence would reach {past + x.shape[1]} positions; expected at most num_layers={self.num_layers}"
            )
        h = self.in_drop(x)
        if cache is not None:
            cache.writable()
        n = x.shape[1]
        # from position 0 the mask is plain causal (the verify pass, teacher forcing): SDPA's is_causal
        causal = n > 1 and past == 0
        visible = None if n == 1 or causal else self._visible[past : past + n, : past + n]
        for i, blk in enumerate(self.blocks):
            h = blk(h, None if cache is None else (cache.keys[i], cache.values[i]), past, visible, causal)
        if cache is not None:
            cache.length = past + x.shape[1]
        h = self.ln_f(h)
        b, n = x.shape[:2]
        logits = self.out(h).view(b, n, self.tokens_per_layer, self.num_levels)
        return (logits, h) if return_hidden else logits

    def forward(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, L, T, V] for all layers in one parallel pass.

        codes: [B, T, L] ground-truth tokens (layer L-1 is not used as an input, only as a target;
        a [B, T, L-1] tensor is accepted too).
        """
        self._check_features(features)
        self._check_codes(codes, "codes")
        if codes.shape[2] not in (self.num_layers, self.num_layers - 1):
            raise ValueError(
                f"codes: expected {self.num_layers} (or {self.num_layers - 1}) layers, found {codes.shape[2]}"
            )
        x = self._embed_features(features)
        if self.num_layers > 1:
            x = torch.cat([x, self._embed_layers(codes[:, :, : self.num_layers - 1], 0)], dim=1)
        return self._run(x, None)

    def loss(self, features: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of the teacher-forced logits (convenience for trainers)."""
        logits = self(features, codes)
        return F.cross_entropy(logits.reshape(-1, self.num_levels), codes.transpose(1, 2).reshape(-1).long())

    # ------------------------------------------------------------------ incremental decoding
    def start(self, features: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        """Position 0 only: returns (cache of length 1, logits for layer 0 [B, T, V])."""
        self._check_features(features)
        return self.start_(features)

    def start_(self, features: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        """``start`` without its argument check (the decode loop's first pass)."""
        x = self._embed_features(features)
        cache = self.new_cache(x.shape[0], like=x)
        return cache, self._run(x, cache)[:, 0]

    def start_with_hidden(self, features: torch.Tensor) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """``start`` that also returns the position-0 hidden state [B, d_model] (what a
        ``main_hidden`` draft reads: the main model has computed it anyway)."""
        self._check_features(features)
        x = self._embed_features(features)
        cache = self.new_cache(x.shape[0], like=x)
        logits, h = self._run(x, cache, return_hidden=True)
        return cache, logits[:, 0], h[:, 0]

    def extend_many_(self, cache: KVCache, layer_codes: torch.Tensor) -> torch.Tensor:
        """Feed layers [B, T, k] in ONE pass, in place (no checks) -> logits [B, k, T, V] (a verify pass)."""
        return self._run(self._embed_layers(layer_codes, cache.length - 1), cache)

    def extend(self, cache: KVCache, layer_codes: torch.Tensor) -> tuple[KVCache, torch.Tensor]:
        """Feed the next layer(s) after the cached prefix.

        The cache holds positions 0..n-1, i.e. layers 0..n-2 have been fed; layer_codes are layers
        n-1.. . [B, T] -> logits for the next layer [B, T, V]; [B, T, k] -> logits [B, k, T, V]
        for layers n..n+k-1. Raises if that would go past layer L-1.
        """
        if cache.length < 1:
            raise ValueError("extend: expected a cache from start()/verify(), found an empty cache")
        single = layer_codes.dim() == 2
        codes = layer_codes.unsqueeze(2) if single else layer_codes
        self._check_codes(codes, "layer_codes")
        if codes.shape[0] != cache.batch_size:
            raise ValueError(f"layer_codes: expected batch {cache.batch_size}, found {codes.shape[0]}")
        if cache.length + codes.shape[2] > self.num_layers:
            raise ValueError(
                f"extend: {cache.length} cached + {codes.shape[2]} new positions; expected at most num_layers={self.num_layers}"
            )
        cache = cache.truncate(cache.length)  # extend never changes the caller's cache
        logits = self._run(self._embed_layers(codes, cache.length - 1), cache)
        return cache, (logits[:, 0] if single else logits)

    def extend_(self, cache: KVCache, layer_codes: torch.Tensor) -> torch.Tensor:
        """The decode loop's step: feed one layer [B, T] in place (no checks, no copies) -> logits [B, T, V]."""
        return self._run(self._embed_layers(layer_codes.unsqueeze(2), cache.length - 1), cache)[:, 0]

    def verify(self, features: torch.Tensor, proposed: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """ONE pass over positions 0..K given proposed layers 0..K-1 ([B, T, K], 1 <= K <= L-1).

        Returns logits [B, K+1, T, V] (row l = prediction of layer l given proposed layers < l; row K
        comes for free) and a cache of length K+1. After accepting a layers, ``cache.truncate(a+1)``
        is exactly the cache a sequential decode would hold after feeding those a layers.
        """
        self._check_features(features)
        self._check_codes(proposed, "proposed")
        K = proposed.shape[2]
        if not 1 <= K <= self.num_layers - 1:
            raise ValueError(f"proposed: expected 1 <= K <= {self.num_layers - 1} layers, found {K}")
        if proposed.shape[0] != features.shape[0]:
            raise ValueError(f"proposed: expected batch {features.shape[0]}, found {proposed.shape[0]}")
        return self.verify_(features, proposed)

    def verify_(self, features: torch.Tensor, proposed: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """``verify`` without its argument checks (the decode loop's step; no host syncs)."""
        return self.verify_rows_(features, proposed.transpose(1, 2))

    def verify_rows_(self, features: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """``verify_`` for proposed layers laid out as rows [B, K, T] (what the draft emits)."""
        x = self._verify_inputs(features, rows)
        cache = self.new_cache(x.shape[0], like=x)
        return self._run(x, cache), cache

    def verify_logits(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The verify pass without a cache, so gradients flow (training the main model on what verification
        compares): logits [B, K+1, T, V] of positions 0..K given proposed layers as rows [B, K, T]."""
        return self._run(self._verify_inputs(features, rows), None)

    def _verify_inputs(self, features: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._embed_features(features), self._embed_rows(rows, 0)], dim=1)

    @torch.inference_mode()
    def greedy_decode(self, features: torch.Tensor, num_layers: int | None = None, *, return_last_logits: bool = False):
        """Main-only greedy decoding of the first ``num_layers`` layers (default all L): one sequential
        single-position pass each -> codes [B, T, num_layers] (the tokenizer decodes any coarse prefix).
        ``return_last_logits``: also the logits [B, T, V] the last layer was read from (expected-value decoding)."""
        n = self.num_layers if num_layers is None else int(num_layers)
        if not 1 <= n <= self.num_layers:
            raise ValueError(f"num_layers: expected 1 <= n <= {self.num_layers}, found {num_layers}")
        self._check_features(features)
        codes, logits = self.greedy_decode_(features, n)
        return (codes, logits) if return_last_logits else codes

    def greedy_decode_(self, features: torch.Tensor, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``greedy_decode``'s loop without checks or an inference-mode wrapper (what ``torch.compile``
        traces: it cannot compile under inference mode) -> (codes [B, T, n], last layer's logits [B, T, V])."""
        cache, logits = self.start_(features)
        layers = [logits.argmax(dim=-1)]
        for _ in range(1, num_layers):
            logits = self.extend_(cache, layers[-1])
            layers.append(logits.argmax(dim=-1))
        return torch.stack(layers, dim=2), logits
