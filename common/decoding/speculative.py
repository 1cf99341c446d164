"""Speculative decoding over RFSQ layers (one action chunk per sample).

Algorithm (``speculative_decode``):
  1. the draft proposes the K coarsest layers 0..K-1 in ONE pass;
  2. the main model verifies them in ONE pass over positions 0..K (``RFSQHead.verify``): row l of
     that pass is the main model's prediction of layer l given the *proposed* layers < l;
  3. acceptance: the longest prefix of layers whose tokens ALL equal the main model's greedy
     tokens (``acceptance="exact"``).  With a accepted layers, layer a is taken from the same
     verify pass (the main's own greedy tokens: the correction when a < K, the free extra layer
     when a == K) -- no extra pass;
  4. the main model decodes layers a+1..L-1 sequentially from ``cache.truncate(a+1)``.

Lossless: in exact mode every emitted layer equals the main model's greedy choice given the
previously emitted layers, so the codes are identical to ``main.greedy_decode`` (up to argmax ties
within float round-off between a multi-position and a single-position pass; the property test
over many random models has never hit one).

Main-pass accounting (what ``SpecStats.main_passes`` counts): a *pass* is one sequential call
of the main model, whatever number of positions it processes.
  * main-only:   L passes (positions 0..L-1, one each).
  * speculative: 1 verification pass (yields layers 0..a) + (L - a - 1) sequential passes
                 = L - a passes, a = accepted layers in 0..K.
                 All K accepted -> L - K passes (the verify pass also yields layer K);
                 none accepted -> L passes (no saving; the K draft-conditioned positions were wasted).
  With K=3, L=8 the ceiling is 8 - 3 = 5 passes of 8, which is the "5 of 8 passes" in the issue.
  ``main_positions`` counts positions computed (a FLOP proxy): (K+1) + (L-a-1) = L + K - a,
  i.e. L when all K are accepted and L + K when none are.

Batches: acceptance is computed per sample (``SpecStats.accepted_layers``), but the KV cache is
shared, so the batch continues from the minimum accepted prefix ``used_prefix``; a sample that
accepted more layers then takes the main's greedy tokens for layers >= used_prefix (identical in
exact mode, so still lossless; in relaxed mode it just replaces some draft tokens by main tokens).
The evaluation runs batch 1, where the two coincide.

``candidates=N`` (a power of two; features drafts): the draft offers N proposals that differ in
the first layer's least confident tokens (``DraftWithProjection.propose_candidates``) and the main
model verifies all of them in the same ONE pass (batch N per chunk); the candidate with the longest
exact prefix is kept, with its cache rows. At batch 1 on a CPU a pass costs about the same for
batch 1 or 4 (per-op overhead), so this raises acceptance for almost nothing; still exact.

``acceptance="relaxed", tolerance=t`` accepts a layer when every draft token is within t levels
of the main's greedy token; accepted layers keep the DRAFT's tokens, so the result is lossy and
``SpecStats.lossy`` is set (report it separately from exact mode). ``relaxed_layers=n`` applies the
tolerance to the n coarsest drafted layers only and accepts the finer ones exactly: the main model
predicts those given the draft's coarse tokens, so a redundant code's later layers could absorb a
coarse error (measured on the make run, they do not absorb enough of it: docs/diagnostics/7_relaxed_acceptance.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from common.decoding.timing import StageTimer
from common.policy.draft import DraftWithProjection, check_proposal
from common.policy.head import RFSQHead
from common.policy.kv_cache import KVCache


@dataclass
class SpecStats:
    num_layers: int
    coarse_layers: int  # K (0 for main-only)
    acceptance: str  # "exact" | "relaxed" | "main_only"
    tolerance: int
    candidates: int = 1  # proposals verified together (``candidates=N``)
    accepted_layers: list[int] = field(default_factory=list)  # per sample, 0..K
    used_prefix: int = 0  # prefix actually used for the (shared-cache) batch = min(accepted_layers)
    main_passes: int = 0  # sequential main calls; the verify pass counts as one
    main_positions: int = 0  # positions computed by the main model (FLOP proxy)
    draft_passes: int = 0
    draft_time_s: float = 0.0
    main_time_s: float = 0.0
    lossy: bool = False  # True for relaxed acceptance with tolerance > 0
    relaxed_layers: int = 0  # relaxed acceptance: the tolerance applied to this many coarsest drafted layers (0 = all)
    # the main model's logits [B, T, V] for the last decoded layer (what expected-value decoding reads);
    # a tensor, so left out of ``as_dict``
    last_logits: Any = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "last_logits"}


def _draft_input(draft) -> str:
    # any object with ``propose`` and the layer attributes may act as a draft (tests, benchmarks)
    return getattr(draft, "input", "features")


def _check_pair(main: RFSQHead, draft: DraftWithProjection) -> None:
    K, L = draft.coarse_layers, main.num_layers
    kind = _draft_input(draft)
    top = L - 2 if kind == "main_hidden" else L - 1  # a main_hidden draft proposes layers 1..K, verified up to K+1
    if not 1 <= K <= top:
        raise ValueError(f"draft.coarse_layers: expected 1 <= K <= num_layers-{L - top} = {top} ({kind} draft), found {K}")
    if kind == "main_hidden" and draft.feature_dim != main.d_model:
        raise ValueError(f"main_hidden draft: expected feature_dim = main d_model {main.d_model}, found {draft.feature_dim}")
    if draft.tokens_per_layer != main.tokens_per_layer:
        raise ValueError(
            f"tokens_per_layer mismatch: main {main.tokens_per_layer}, draft {draft.tokens_per_layer}"
        )
    if draft.num_levels != main.num_levels:
        raise ValueError(f"num_levels mismatch: main {main.num_levels}, draft {draft.num_levels}")
    # dropout in train mode would make verification compare against a random main model
    if main.training or draft.training:
        raise RuntimeError(
            f"speculative_decode: expected main and draft in eval() mode, found "
            f"main.training={main.training}, draft.training={draft.training}"
        )


@torch.inference_mode()
def speculative_decode(
    main: RFSQHead,
    draft: DraftWithProjection,
    features: torch.Tensor,
    *,
    acceptance: str = "exact",
    tolerance: int = 0,
    timer: StageTimer | None = None,
    draft_features: torch.Tensor | None = None,
    num_layers: int | None = None,
    candidates: int = 1,
    coarse_layers: int | None = None,
    relaxed_layers: int | None = None,
) -> tuple[torch.Tensor, SpecStats]:
    """Draft K coarse layers, verify in one main pass, finish sequentially -> (codes [B,T,L], stats).

    draft_features: optional separate input for the draft (defaults to ``features``).
    num_layers: decode only the first n layers (prefix-depth decoding; default all L). The drafted
    layers are capped so that the verify pass stays inside them; with no room left this is main-only.
    coarse_layers: draft at most this many of the draft's layers (default all K): a drafted layer that
    is rarely accepted still widens the verify pass, so fewer can be faster (same tokens either way).
    relaxed_layers: with relaxed acceptance, the tolerance applies to the n coarsest drafted layers
    only (the finer ones are accepted exactly); None = all drafted layers.
    """
    if acceptance not in ("exact", "relaxed"):
        raise ValueError(f"acceptance: expected 'exact' or 'relaxed', found {acceptance!r}")
    if int(tolerance) != tolerance or tolerance < 0:
        raise ValueError(f"tolerance: expected an integer >= 0, found {tolerance!r}")
    if acceptance == "exact" and tolerance != 0:
        raise ValueError(f"tolerance: exact acceptance needs tolerance=0, found {tolerance} (use acceptance='relaxed')")
    if relaxed_layers is not None and (int(relaxed_layers) != relaxed_layers or relaxed_layers < 1):
        raise ValueError(f"relaxed_layers: expected an integer >= 1 (or None for every drafted layer), found {relaxed_layers!r}")
    if relaxed_layers is not None and acceptance != "relaxed":
        raise ValueError(f"relaxed_layers: only relaxed acceptance has a tolerance to apply, found acceptance={acceptance!r}")
    relaxed = 0 if relaxed_layers is None else int(relaxed_layers)  # 0 = every drafted layer
    _check_pair(main, draft)
    timer = timer if timer is not None else StageTimer()
    L = main.num_layers if num_layers is None else int(num_layers)
    if not 1 <= L <= main.num_layers:
        raise ValueError(f"num_layers: expected 1 <= n <= {main.num_layers}, found {num_layers}")
    hidden = _draft_input(draft) == "main_hidden"
    if coarse_layers is not None and (int(coarse_layers) != coarse_layers or coarse_layers < 1):
        raise ValueError(f"coarse_layers: expected an integer >= 1 (or None for all the draft's), found {coarse_layers!r}")
    K = min(draft.coarse_layers, L - (2 if hidden else 1))  # the verify pass must stay inside the decoded layers
    K = K if coarse_layers is None else min(K, int(coarse_layers))
    if K < 1:
        return main_only_decode(main, features, timer, num_layers=L)
    if candidates != 1:
        if hidden:
            raise ValueError(f"candidates: a main_hidden draft proposes one candidate, found candidates={candidates}")
        return _speculative_candidates(main, draft, features, draft_features, acceptance=acceptance, tolerance=int(tolerance), relaxed=relaxed,
                                       timer=timer, K=K, L=L, N=int(candidates))
    if hidden:
        return _speculative_from_hidden(main, draft, features, acceptance=acceptance, tolerance=int(tolerance), relaxed=relaxed,
                                        timer=timer, K=K, L=L)

    if features.shape[0] == 1 and acceptance == "exact" and hasattr(draft, "propose_rows"):
        return _speculative_single(main, draft, features if draft_features is None else draft_features, features, timer=timer, K=K, L=L)
    with timer.stage("draft"):
        proposed = draft.propose(features if draft_features is None else draft_features)[..., :K]  # [B, T, K]
    draft_time = timer.last["draft"]

    with timer.stage("main"):
        logits, cache = main.verify_(features, proposed)  # [B, K+1, T, V]
        main_greedy = logits.argmax(dim=-1).transpose(1, 2)  # [B, T, K+1]
        _, _, accepted = check_proposal(proposed, main_greedy, tolerance=tolerance, relaxed_layers=relaxed)
        a = int(accepted.min())
        # layers < a: the draft's tokens (== main greedy in exact mode); layer a: main's verify row a
        layers = [proposed[..., i].long() for i in range(a)] + [main_greedy[..., a]]
        cache.truncate_(a + 1)
        passes, positions, last_logits = _finish(main, cache, layers, L, logits[:, a])
    stats = _stats(L, K, acceptance, int(tolerance), accepted, a, 1 + passes, K + 1 + positions, draft_time, timer.last["main"], relaxed)
    stats.last_logits = last_logits
    return torch.stack(layers, dim=2), stats


def _speculative_single(main: RFSQHead, draft: DraftWithProjection, draft_features: torch.Tensor, features: torch.Tensor, *,
                        timer: StageTimer, K: int, L: int) -> tuple[torch.Tensor, SpecStats]:
    """The evaluation's case, batch 1 and exact acceptance, with as few ops as the algorithm allows
    (at batch 1 each op costs about as much as its arithmetic): codes stay in the [B, layer, T] rows
    the draft and the main model emit, and a layer is accepted by one ``torch.equal``. Same result
    and accounting as the general path (the tests run both)."""
    with timer.stage("draft"):
        rows = draft.propose_rows(draft_features)  # [1, K_draft, T]
        if rows.shape[1] != K:
            rows = rows[:, :K]
    draft_time = timer.last["draft"]
    with timer.stage("main"):
        logits, cache = main.verify_rows_(features, rows)  # [1, K+1, T, V]
        greedy = logits.argmax(dim=-1)  # [1, K+1, T]
        a = 0
        while a < K and torch.equal(rows[:, a], greedy[:, a]):
            a += 1
        last_logits = logits[:, a]
        passes = positions = 0
        if a + 1 < L:
            cache.truncate_(a + 1)
            layers = [greedy[:, i] for i in range(a + 1)]
            passes, positions, last_logits = _finish(main, cache, layers, L, last_logits)
            codes = torch.stack(layers, dim=2)
        else:
            codes = greedy[:, : a + 1].transpose(1, 2)
    stats = _stats(L, K, "exact", 0, [a], a, 1 + passes, K + 1 + positions, draft_time, timer.last["main"])
    stats.last_logits = last_logits
    return codes, stats


def _speculative_candidates(main: RFSQHead, draft: DraftWithProjection, features: torch.Tensor, draft_features: torch.Tensor | None,
                            *, acceptance: str, tolerance: int, relaxed: int, timer: StageTimer, K: int, L: int, N: int) -> tuple[torch.Tensor, SpecStats]:
    """N proposals per chunk, verified in ONE main pass of batch B*N (see the module docstring)."""
    B = features.shape[0]
    with timer.stage("draft"):
        cands = draft.propose_candidates(features if draft_features is None else draft_features, N)[..., :K]  # [B, N, T, K]
    draft_time = timer.last["draft"]
    with timer.stage("main"):
        flat = cands.reshape(B * N, *cands.shape[2:])
        logits, cache = main.verify_(features.repeat_interleave(N, dim=0), flat)  # [B*N, K+1, T, V]
        main_greedy = logits.argmax(dim=-1).transpose(1, 2)  # [B*N, T, K+1]
        _, _, accepted_all = check_proposal(flat, main_greedy, tolerance=tolerance, relaxed_layers=relaxed)
        accepted, best = accepted_all.view(B, N).max(dim=1)  # the first candidate with the longest prefix
        rows = torch.arange(B, device=best.device) * N + best
        a = int(accepted.min())
        layers = [flat[rows, :, i].long() for i in range(a)] + [main_greedy[rows, :, a]]
        passes, positions = 0, 0
        last_logits = logits[rows, a]
        if a + 1 < L:  # only the kept candidates' cache rows go on
            cache = KVCache([k[rows] for k in cache.keys], [v[rows] for v in cache.values], a + 1)
            passes, positions, last_logits = _finish(main, cache, layers, L, last_logits)
    stats = _stats(L, K, acceptance, tolerance, accepted, a, 1 + passes, N * (K + 1) + positions, draft_time, timer.last["main"], relaxed)
    stats.candidates = N
    stats.last_logits = last_logits
    return torch.stack(layers, dim=2), stats


def _finish(main: RFSQHead, cache, layers: list[torch.Tensor], L: int, last_logits: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """Sequential single-position passes until ``L`` layers are decoded (appended in place);
    returns the passes and positions this took and the logits of the last layer (``last_logits``,
    those of the layer already last, when no pass is needed)."""
    n = 0
    while len(layers) < L:
        last_logits = main.extend_(cache, layers[-1])
        layers.append(last_logits.argmax(dim=-1))
        n += 1
    return n, n, last_logits


def _stats(L: int, K: int, acceptance: str, tolerance: int, accepted: torch.Tensor | list[int], a: int, passes: int, positions: int,
           draft_time: float, main_time: float, relaxed_layers: int = 0) -> SpecStats:
    assert passes == L - a, (passes, L, a)  # the documented accounting
    return SpecStats(
        num_layers=L, coarse_layers=K, acceptance=acceptance, tolerance=tolerance,
        accepted_layers=[int(x) for x in (accepted.tolist() if torch.is_tensor(accepted) else accepted)], used_prefix=a, main_passes=passes,
        main_positions=positions, draft_passes=1, draft_time_s=draft_time, main_time_s=main_time,
        lossy=acceptance == "relaxed" and tolerance > 0, relaxed_layers=relaxed_layers,
    )


def _speculative_from_hidden(main: RFSQHead, draft: DraftWithProjection, features: torch.Tensor, *,
                             acceptance: str, tolerance: int, relaxed: int, timer: StageTimer, K: int, L: int) -> tuple[torch.Tensor, SpecStats]:
    """A ``main_hidden`` draft: pass 1 computes position 0 (layer 0, exact, and the hidden state the
    draft reads); the draft proposes layers 1..K; pass 2 feeds layers 0..K at positions 1..K+1 and
    verifies them; layer a+1 comes free from that pass. Main passes = L - a, as for a feature draft."""
    with timer.stage("main"):
        cache, logits0, hidden0 = main.start_with_hidden(features)
        layer0 = logits0.argmax(dim=-1)
    first_pass = timer.last["main"]
    with timer.stage("draft"):
        proposed = draft.propose(hidden0, prefix=layer0)[..., :K]  # [B, T, K]: layers 1..K
    draft_time = timer.last["draft"]
    with timer.stage("main"):
        logits = main.extend_many_(cache, torch.cat([layer0.unsqueeze(2), proposed.long()], dim=2))  # layers 1..K+1
        main_greedy = logits.argmax(dim=-1).transpose(1, 2)  # [B, T, K+1]
        _, _, accepted = check_proposal(proposed, main_greedy, tolerance=tolerance, relaxed_layers=relaxed)
        a = int(accepted.min())
        layers = [layer0] + [proposed[..., i].long() for i in range(a)] + [main_greedy[..., a]]
        cache.truncate_(a + 2)
        passes, positions, last_logits = _finish(main, cache, layers, L, logits[:, a])
    stats = _stats(L, K, acceptance, tolerance, accepted, a, 2 + passes, K + 2 + positions, draft_time, first_pass + timer.last["main"], relaxed)
    stats.last_logits = last_logits
    return torch.stack(layers, dim=2), stats


@torch.inference_mode()
def main_only_decode(
    main: RFSQHead, features: torch.Tensor, timer: StageTimer | None = None, num_layers: int | None = None
) -> tuple[torch.Tensor, SpecStats]:
    """Baseline: main-model greedy decoding, L (or ``num_layers``) sequential cached passes -> (codes [B,T,L], stats)."""
    timer = timer if timer is not None else StageTimer()
    with timer.stage("main"):
        codes, last_logits = main.greedy_decode(features, num_layers, return_last_logits=True)
    L = codes.shape[2]
    stats = SpecStats(
        num_layers=L,
        coarse_layers=0,
        acceptance="main_only",
        tolerance=0,
        accepted_layers=[0] * features.shape[0],
        used_prefix=0,
        main_passes=L,
        main_positions=L,
        draft_passes=0,
        draft_time_s=0.0,
        main_time_s=timer.last["main"],
        last_logits=last_logits,
    )
    return codes, stats
