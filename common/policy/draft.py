"""Draft model: cheap one-pass predictor of the K coarsest RFSQ layers.

features [B, feature_dim] --LayerNorm+Linear--> width --(trunk: hidden_layers residual MLP blocks,
or a plain GELU/Linear MLP)--> h

mode="parallel": Linear(h) -> logits [B, K, T, V] for all K layers at once (independent layers).
mode="chained":  layer l's logits come from h_l; its greedy tokens are embedded (one vector per
                 (slot, level), summed like the main model's layer embedding) and added to h_l
                 through one residual MLP block to give h_{l+1} (``trunk="residual"``: a LayerNorm
                 block; ``trunk="mlp"``: h + act(Linear(h + tokens)), no norm, 3 ops).  The main model predicts layer l
                 GIVEN layers < l, so a draft that also sees its own coarser tokens can match the
                 main's choice on layer 1 and 2, which an independent head can only guess.

Either way the draft is ONE call; what it costs next to one main pass depends on its width and
mode (``count_flops``; Phase 2 also measures the batch-1 time ratio: at small sizes on a CPU the
per-op overhead, not the arithmetic, dominates, so a chained draft of any width costs about a main
pass).  Its errors are caught by the main model's verification pass (``common/decoding/speculative.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F


DRAFT_MODES = ("parallel", "chained")
# The trunk after the input projection: "residual" = pre-LayerNorm residual MLP blocks (4 ops each);
# "mlp" = GELU / Linear pairs with no norms (2 ops each). At batch 1 on a CPU the draft's cost is its
# op count, so the plain MLP is what keeps c small.
DRAFT_TRUNKS = ("residual", "mlp")
# What the draft reads: the backbone features (one call before the main model), or the main
# model's own position-0 hidden state plus its layer-0 tokens (EAGLE / Medusa style: computed anyway
# by the main model's first pass, so the draft is a few small ops and proposes layers 1..K).
DRAFT_INPUTS = ("features", "main_hidden")
# The trunk's nonlinearity. At batch 1 on a CPU, float32 exact GELU (erf) costs 5-7x the tanh
# approximation or ReLU per call (benchmarks/decoding/draft_cost.py), a large share of a small draft's time;
# "gelu" is what drafts from before this option used.
DRAFT_ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "relu": lambda: nn.ReLU()}


class _ResidualMLP(nn.Module):
    def __init__(self, *, width: int, dropout: float) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # eval Dropout still costs an op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(F.gelu(self.fc(self.ln(x))))


class _ResidualChainStep(_ResidualMLP):
    """The chained ``residual`` trunk's step: a residual LayerNorm block on h + token embedding
    (same parameters as ``_ResidualMLP``, so checkpoints load either way), called like ``_ChainStep``."""

    def forward(self, h: torch.Tensor, tokens_embedded: torch.Tensor) -> torch.Tensor:
        return super().forward(h + tokens_embedded)


class _ChainStep(nn.Module):
    """h_{l+1} = h + act(Linear(h + token embedding)): the chained ``mlp`` trunk's step from one
    drafted layer to the next, without the LayerNorm that at batch 1 costs as much as the Linear."""

    def __init__(self, *, width: int, activation: str) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.act = DRAFT_ACTIVATIONS[activation]()

    def forward(self, h: torch.Tensor, tokens_embedded: torch.Tensor) -> torch.Tensor:
        return h + self.act(self.fc(h + tokens_embedded))


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
        mode: str = "parallel",
        input: str = "features",
        trunk: str = "residual",
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if trunk not in DRAFT_TRUNKS:
            raise ValueError(f"DraftWithProjection: expected trunk in {DRAFT_TRUNKS}, found {trunk!r}")
        if activation not in DRAFT_ACTIVATIONS:
            raise ValueError(f"DraftWithProjection: expected activation in {tuple(DRAFT_ACTIVATIONS)}, found {activation!r}")
        if activation != "gelu" and trunk != "mlp":
            raise ValueError(f"DraftWithProjection: activation {activation!r} needs trunk='mlp' (the residual trunk uses GELU), found trunk={trunk!r}")
        if mode not in DRAFT_MODES:
            raise ValueError(f"DraftWithProjection: expected mode in {DRAFT_MODES}, found {mode!r}")
        if input not in DRAFT_INPUTS:
            raise ValueError(f"DraftWithProjection: expected input in {DRAFT_INPUTS}, found {input!r}")
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
        self.mode = mode
        self.input = input
        self.trunk = trunk
        self.activation = activation
        # layers the draft proposes: 0..K-1 from features; 1..K after the main model's layer 0
        self.first_layer = 1 if input == "main_hidden" else 0

        # The projection is what lets one draft architecture sit on any backbone (4096-d OpenVLA or a
        # 256-d state MLP); LayerNorm first because VLA hidden states have large, uneven scales.
        self.projection = nn.Sequential(nn.LayerNorm(self.feature_dim), nn.Linear(self.feature_dim, self.width))
        if trunk == "residual":
            self.blocks = nn.Sequential(*[_ResidualMLP(width=self.width, dropout=self.dropout) for _ in range(self.hidden_layers)])
            self.ln_out = nn.LayerNorm(self.width)
        else:  # hidden_layers nonlinearities: GELU, then (Linear, GELU) pairs
            act = DRAFT_ACTIVATIONS[activation]
            layers: list[nn.Module] = [act()] if self.hidden_layers else []
            for _ in range(self.hidden_layers - 1):
                layers += [nn.Linear(self.width, self.width), act()]
            self.blocks = nn.Sequential(*layers)
            self.ln_out = nn.Identity()
        T, V, K = self.tokens_per_layer, self.num_levels, self.coarse_layers
        if input == "main_hidden":  # the main model's layer-0 tokens, added to the projected hidden state
            self.prefix_embed = nn.Embedding(T * V, self.width)
            nn.init.normal_(self.prefix_embed.weight, std=0.02)
        if input == "main_hidden" or mode == "chained":
            self.register_buffer("_slot_offsets", torch.arange(T) * V, persistent=False)
        if mode == "parallel":
            self.out = nn.Linear(self.width, K * T * V)
        else:
            self.out = nn.Linear(self.width, T * V)  # shared across layers; h_l carries the layer
            self.layer_embed = nn.Embedding(K, self.width)
            self.code_embed = nn.Embedding(T * V, self.width)  # index slot*V + level, summed over slots
            if trunk == "residual":
                self.chain_blocks = nn.ModuleList([_ResidualChainStep(width=self.width, dropout=self.dropout) for _ in range(K - 1)])
            else:
                self.chain_blocks = nn.ModuleList([_ChainStep(width=self.width, activation=activation) for _ in range(K - 1)])
            nn.init.normal_(self.code_embed.weight, std=0.02)
            nn.init.normal_(self.layer_embed.weight, std=0.02)

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
            "mode": self.mode,
            "input": self.input,
            "trunk": self.trunk,
            "activation": self.activation,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DraftWithProjection":
        """Rebuild from ``config`` (a checkpoint's config may hold more keys: tokenizer, head hash)."""
        keys = ("feature_dim", "width", "coarse_layers", "tokens_per_layer", "num_levels", "hidden_layers", "dropout", "mode", "input", "trunk", "activation")
        return cls(**{"mode": "parallel", **{k: config[k] for k in keys if k in config}})  # "mode": checkpoints from before modes existed

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def count_flops(self, batch: int = 1) -> dict[str, int]:
        """Analytic FLOPs of one draft pass (1 multiply-add = 2 FLOPs; norms/GELU ignored)."""
        D, W, h, K = self.feature_dim, self.width, self.hidden_layers, self.coarse_layers
        TV = self.tokens_per_layer * self.num_levels
        trunk = 2 * D * W + (h if self.trunk == "residual" else max(h - 1, 0)) * 2 * W * W
        if self.mode == "parallel":
            return {"draft_pass": batch * (trunk + 2 * W * K * TV)}
        return {"draft_pass": batch * (trunk + K * 2 * W * TV + (K - 1) * 2 * W * W)}

    def forward(self, features: torch.Tensor, codes: torch.Tensor | None = None, *, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, feature_dim] -> logits [B, K, T, V] for layers first_layer..first_layer+K-1 (one call).

        codes [B, T, >=first_layer+K-1] (chained mode only, training): teacher-forced coarser layers
        (RFSQ layer indices); without them each layer is conditioned on the draft's own greedy tokens
        (what ``propose`` uses). ``prefix`` [B, T] (``main_hidden`` input only): the main model's
        layer-0 tokens (taken from ``codes`` when those are given).
        """
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features: expected [B, {self.feature_dim}], found {list(features.shape)}")
        if codes is not None and self.mode != "chained" and self.input != "main_hidden":
            raise ValueError(f"codes: only a chained draft takes teacher-forced codes; this draft is {self.mode!r}")
        B, K, T, V, f = features.shape[0], self.coarse_layers, self.tokens_per_layer, self.num_levels, self.first_layer
        h = self.blocks(self.projection(features))
        if self.input == "main_hidden":
            prefix = codes[:, :, 0] if codes is not None else prefix
            if prefix is None:
                raise ValueError("prefix: a main_hidden draft needs the main model's layer-0 tokens [B, T]")
            h = h + self.prefix_embed(prefix.long() + self._slot_offsets).sum(dim=1)
        if self.mode == "parallel":
            return self.out(self.ln_out(h)).view(B, K, T, V)
        logits = []
        for layer in range(K):
            h = h + self.layer_embed.weight[layer]
            layer_logits = self.out(self.ln_out(h)).view(B, T, V)
            logits.append(layer_logits)
            if layer + 1 < K:
                tokens = layer_logits.argmax(dim=-1) if codes is None else codes[:, :, f + layer].long()
                embedded = self.code_embed(tokens + self._slot_offsets).sum(dim=1)
                h = self.chain_blocks[layer](h, embedded)
        return torch.stack(logits, dim=1)

    def loss(self, features: torch.Tensor, codes: torch.Tensor, soft_targets: torch.Tensor | None = None) -> torch.Tensor:
        """Token cross-entropy against the drafted layers of codes [B, T, >=first_layer+K] (teacher-forced).

        ``soft_targets`` [B, K, T, V]: the main model's distributions for the drafted layers (given
        ``codes`` as its prefix); the loss is then the mean per-token KL(main || draft). Soft targets
        carry how close each token is to a tie, which is where a draft trained on argmax labels
        disagrees with the main model most."""
        f = self.first_layer
        target = codes[:, :, f : f + self.coarse_layers].transpose(1, 2).long()  # [B, K, T]
        forced = self.mode == "chained" or self.input == "main_hidden"
        logits = self(features, codes if forced else None)
        if soft_targets is None:
            return F.cross_entropy(logits.reshape(-1, self.num_levels), target.reshape(-1))
        log_p = logits.reshape(-1, self.num_levels).log_softmax(dim=-1)
        return F.kl_div(log_p, soft_targets.reshape(-1, self.num_levels).to(log_p.dtype), reduction="batchmean")

    @torch.no_grad()
    def propose(self, features: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy proposal codes [B, T, K] for layers first_layer..first_layer+K-1 (same layout as the
        tokenizer's codes). ``prefix``: the main model's layer-0 tokens (``main_hidden`` drafts).

        Features are cast to the draft's own precision (it may run in float32 next to a float64 main
        model: its tokens are verified, so its precision never changes the decoded result)."""
        return self.propose_rows(features, prefix).transpose(1, 2)

    @torch.no_grad()
    def propose_rows(self, features: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``propose`` laid out as rows [B, K, T] (one per drafted layer; what the decode loop feeds)."""
        dtype = self.projection[1].weight.dtype
        x = features if features.dtype == dtype else features.to(dtype)
        if self.trunk == "mlp" and self.input == "features" and not self.training:
            return self._lean_logits(x).argmax(dim=-1) if self.mode == "parallel" else self._lean_chained_rows(x)
        return self(x, prefix=prefix).argmax(dim=-1)

    def _lean_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP trunk for the decode loop: the same ops as ``forward``, each module's ``forward``
        called directly (no argument checks, no ``Module.__call__`` hook handling, which at batch 1
        costs about as much as a small op)."""
        ln, proj = self.projection
        h = proj.forward(ln.forward(x))
        for layer in self.blocks:
            h = layer.forward(h)
        return h

    def _lean_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` of a parallel MLP draft on features, through ``_lean_trunk``."""
        h = self._lean_trunk(x)
        return self.out.forward(h).view(x.shape[0], self.coarse_layers, self.tokens_per_layer, self.num_levels)

    def _lean_chained_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Greedy rows [B, K, T] of a chained MLP draft: ``_lean_trunk``, then each layer's T token
        embeddings summed by one ``embedding_bag``."""
        h = self._lean_trunk(x)
        B, T, V = x.shape[0], self.tokens_per_layer, self.num_levels
        rows = []
        for layer in range(self.coarse_layers):
            h = h + self.layer_embed.weight[layer]
            tokens = self.out.forward(h).view(B, T, V).argmax(dim=-1)
            rows.append(tokens)
            if layer + 1 < self.coarse_layers:
                embedded = F.embedding_bag(tokens + self._slot_offsets, self.code_embed.weight, mode="sum")
                h = self.chain_blocks[layer].forward(h, embedded)
        return torch.stack(rows, dim=1)

    @torch.no_grad()
    def propose_candidates(self, features: torch.Tensor, num_candidates: int) -> torch.Tensor:
        """``num_candidates`` = 2^m proposals [B, N, T, K] for one verify pass over all of them.

        Candidate 0 is ``propose``; the others change the first drafted layer only: each of the m
        tokens with the smallest top-1/top-2 logit margin takes its top-1 or its top-2 level (all
        2^m combinations). The main model's greedy layer 0 is then covered whenever the draft ranks
        it first or second on those m tokens and first everywhere else. (A tree over layer 0 only:
        later layers are conditioned on it, so their alternatives would multiply the batch.)"""
        m = int(num_candidates).bit_length() - 1
        if num_candidates < 1 or 1 << m != num_candidates or m > self.tokens_per_layer:
            raise ValueError(f"num_candidates: expected a power of two <= 2^{self.tokens_per_layer}, found {num_candidates}")
        if self.input == "main_hidden":
            raise ValueError("propose_candidates: a main_hidden draft proposes after the main model's layer 0; use a features draft")
        dtype = self.projection[1].weight.dtype
        logits = self(features if features.dtype == dtype else features.to(dtype))  # [B, K, T, V]
        proposed = logits.argmax(dim=-1).transpose(1, 2)  # [B, T, K]
        if m == 0:
            return proposed.unsqueeze(1)
        B, N = proposed.shape[0], num_candidates
        top_val, top_idx = logits[:, 0].topk(2, dim=-1)  # [B, T, 2]
        unsure = (top_val[..., 0] - top_val[..., 1]).topk(m, dim=-1, largest=False).indices  # [B, m]
        first = top_idx[..., 0].gather(1, unsure).unsqueeze(1)  # [B, 1, m]
        second = top_idx[..., 1].gather(1, unsure).unsqueeze(1)
        swaps = torch.where(_swap_patterns(m, logits.device), second, first)  # [B, N, m]
        candidates = proposed.unsqueeze(1).repeat(1, N, 1, 1)  # [B, N, T, K]
        candidates[..., 0].scatter_(2, unsure.unsqueeze(1).expand(B, N, m), swaps)
        return candidates


_PATTERNS: dict[tuple[int, str], torch.Tensor] = {}


def _swap_patterns(m: int, device: torch.device) -> torch.Tensor:
    """[2^m, m] bool: row n swaps token j to its top-2 level when bit j of n is set (row 0: none)."""
    key = (m, str(device))
    if key not in _PATTERNS:
        n = torch.arange(1 << m)
        _PATTERNS[key] = ((n[:, None] >> torch.arange(m)) & 1).bool().to(device)
    return _PATTERNS[key]


def check_proposal(proposed: torch.Tensor, main_greedy: torch.Tensor, *, tolerance: int = 0,
                   relaxed_layers: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The acceptance rule, in one place: draft tokens ``proposed`` [B, T, K] against the main
    model's greedy tokens given the proposed coarser layers ``main_greedy`` [B, T, >=K].
    ``relaxed_layers`` n > 0: the tolerance holds for the n coarsest drafted layers only; the
    finer ones must match exactly (0: every drafted layer).

    Returns (token_ok [B, T, K], layer_ok [B, K]: every token of the layer within ``tolerance``
    levels, accepted [B]: the longest all-ok prefix of layers, 0..K).
    """
    K = proposed.shape[-1]
    if tolerance == 0 and proposed.dtype == main_greedy.dtype:  # the decode loop's case: one comparison
        token_ok = proposed == main_greedy[..., :K]
    else:
        limit = int(tolerance)
        if 0 < relaxed_layers < K:  # [K]: t for the coarse layers, 0 beyond
            limit = torch.arange(K, device=proposed.device).lt(relaxed_layers).long() * int(tolerance)
        token_ok = (proposed.long() - main_greedy[..., :K].long()).abs() <= limit
    layer_ok = token_ok.all(dim=1)
    accepted = torch.cumprod(layer_ok.long(), dim=1).sum(dim=1)
    return token_ok, layer_ok, accepted
