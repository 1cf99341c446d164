"""Held-out metrics of the main and draft models, their agreement (what speculative decoding would
accept), and the draft's cost next to one main pass."""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from common.policy.draft import DraftWithProjection, check_proposal
from common.policy.head import RFSQHead
from common.policy.labels import PolicyData, batches
from common.policy.model import PolicyModel


@torch.no_grad()
def compute_features(policy: PolicyModel, data: PolicyData, *, device: torch.device, batch_size: int = 2048) -> torch.Tensor:
    """Frozen features of every step (CPU tensor [N, F])."""
    was = policy.training
    policy.eval()
    out = [
        policy.features(data.inputs[sl].to(device), data.task_ids[sl].to(device)).float().cpu()
        for sl in batches(len(data), batch_size)
    ]
    policy.train(was)
    return torch.cat(out)


@torch.no_grad()
def evaluate_main(policy: PolicyModel, data: PolicyData, *, device: torch.device, batch_size: int = 1024, greedy: bool = False) -> dict[str, Any]:
    """Teacher-forced held-out metrics per layer (and greedy-decode accuracy when ``greedy``)."""
    was = policy.training
    policy.eval()
    head = policy.head
    L = head.num_layers
    correct = torch.zeros(L, dtype=torch.float64)
    all_ok = torch.zeros(L, dtype=torch.float64)
    g_correct = torch.zeros(L, dtype=torch.float64)
    g_all = torch.zeros(L, dtype=torch.float64)
    ce_sum = 0.0
    for sl in batches(len(data), batch_size):
        codes = data.codes[sl].to(device).long()
        feats = policy.features(data.inputs[sl].to(device), data.task_ids[sl].to(device))
        logits = head(feats, codes)  # [B, L, T, V]
        target = codes.transpose(1, 2)  # [B, L, T]
        ce_sum += F.cross_entropy(logits.reshape(-1, head.num_levels), target.reshape(-1), reduction="sum").item()
        hit = logits.argmax(-1) == target  # [B, L, T]
        correct += hit.double().mean(dim=2).sum(dim=0).cpu()
        all_ok += hit.all(dim=2).double().sum(dim=0).cpu()
        if greedy:
            g_hit = head.greedy_decode(feats).transpose(1, 2) == target
            g_correct += g_hit.double().mean(dim=2).sum(dim=0).cpu()
            g_all += g_hit.all(dim=2).double().sum(dim=0).cpu()
    policy.train(was)
    n = len(data)
    token_acc = (correct / n).tolist()
    out = {
        "val_ce": ce_sum / (n * L * head.tokens_per_layer),
        "val_token_acc": token_acc,
        "val_layer_all_correct": (all_ok / n).tolist(),
        "val_mean_token_acc": float(np.mean(token_acc)),
    }
    if greedy:
        out["val_greedy_token_acc"] = (g_correct / n).tolist()
        out["val_greedy_layer_all_correct"] = (g_all / n).tolist()
        out["val_greedy_mean_token_acc"] = float(np.mean(out["val_greedy_token_acc"]))
    return out


@torch.no_grad()
def draft_inputs(head: RFSQHead | None, draft: DraftWithProjection, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the draft reads for these backbone features: the features themselves, or (``main_hidden``)
    the main model's position-0 hidden state and its greedy layer-0 tokens."""
    if draft.input != "main_hidden":
        return feats, None
    if head is None:
        raise ValueError("a main_hidden draft reads the main model's hidden state: pass head=")
    _, logits0, hidden0 = head.start_with_hidden(feats)
    return hidden0, logits0.argmax(dim=-1)


@torch.no_grad()
def evaluate_draft(draft: DraftWithProjection, feats: torch.Tensor, codes: torch.Tensor, *, device: torch.device,
                   batch_size: int = 2048, head: RFSQHead | None = None) -> dict[str, Any]:
    """Held-out accuracy of the drafted layers against ``codes`` (feats: backbone features; a
    ``main_hidden`` draft also needs the main model ``head``)."""
    was = draft.training
    draft.eval()
    K, first = draft.coarse_layers, draft.first_layer
    correct = torch.zeros(K, dtype=torch.float64)
    all_ok = torch.zeros(K, dtype=torch.float64)
    ce_sum = 0.0
    for sl in batches(len(codes), batch_size):
        x, prefix = draft_inputs(head, draft, feats[sl].to(device))
        logits = draft(x, prefix=prefix)  # [B, K, T, V]
        target = codes[sl, :, first : first + K].to(device).long().transpose(1, 2)  # [B, K, T]
        ce_sum += F.cross_entropy(logits.reshape(-1, draft.num_levels), target.reshape(-1), reduction="sum").item()
        hit = logits.argmax(-1) == target
        correct += hit.double().mean(dim=2).sum(dim=0).cpu()
        all_ok += hit.all(dim=2).double().sum(dim=0).cpu()
    draft.train(was)
    n = len(codes)
    token_acc = (correct / n).tolist()
    return {
        "val_ce": ce_sum / (n * K * draft.tokens_per_layer),
        "val_token_acc": token_acc,
        "val_layer_all_correct": (all_ok / n).tolist(),
        "val_coarse_acc": float(np.mean(token_acc)),
    }


@torch.no_grad()
def draft_main_agreement(head: RFSQHead, draft: DraftWithProjection, feats: torch.Tensor, *, device: torch.device, batch_size: int = 1024) -> dict[str, Any]:
    """What speculative decoding (exact acceptance) would do on these features.

    Per batch: ONE ``head.verify(features, proposed)`` pass (a ``main_hidden`` draft: the position-0
    pass, then one pass over the proposed layers). ``agreement[l]`` = fraction of chunks whose drafted
    layer l equals (all T tokens) the main model's greedy layer given the DRAFT's coarser layers.
    ``accepted`` = longest agreeing prefix (0..K); main passes per chunk = L - accepted.
    """
    was_h, was_d = head.training, draft.training
    head.eval()
    draft.eval()
    K, L = draft.coarse_layers, head.num_layers
    agree = torch.zeros(K, dtype=torch.float64)
    token_agree = torch.zeros(K, dtype=torch.float64)
    hist = torch.zeros(K + 1, dtype=torch.float64)
    for sl in batches(len(feats), batch_size):
        f = feats[sl].to(device)
        if draft.input == "main_hidden":
            cache, logits0, hidden0 = head.start_with_hidden(f)
            layer0 = logits0.argmax(dim=-1)
            proposed = draft.propose(hidden0, prefix=layer0)  # [B, T, K]: layers 1..K
            logits = head.extend_many_(cache, torch.cat([layer0.unsqueeze(2), proposed.long()], dim=2))
        else:
            proposed = draft.propose(f)  # [B, T, K]
            logits, _ = head.verify(f, proposed)  # [B, K+1, T, V]
        same, layer_ok, accepted = check_proposal(proposed, logits.argmax(-1).transpose(1, 2))
        agree += layer_ok.double().sum(dim=0).cpu()
        token_agree += same.double().mean(dim=1).sum(dim=0).cpu()
        hist += torch.bincount(accepted.cpu(), minlength=K + 1).double()
    head.train(was_h)
    draft.train(was_d)
    n = len(feats)
    dist = (hist / n).tolist()
    mean_acc = float(sum(a * p for a, p in enumerate(dist)))
    return {
        "agreement_per_layer": (agree / n).tolist(),
        "token_agreement_per_layer": (token_agree / n).tolist(),
        "accepted_layers_distribution": dist,  # index a = P(exactly a layers accepted)
        "mean_accepted_layers": mean_acc,
        "mean_main_passes_per_chunk": float(L - mean_acc),
        "main_passes_without_draft": L,
    }


@torch.no_grad()
def candidate_acceptance(head: RFSQHead, draft: DraftWithProjection, feats: torch.Tensor, *, device: torch.device,
                         counts: tuple[int, ...] = (1, 2, 4, 8), batch_size: int = 512) -> dict[str, Any]:
    """Exact acceptance with N candidates per chunk (``speculative_decode(candidates=N)``), per N:
    ``{"N": {"mean_accepted_layers", "accepted_layers_distribution"}}`` (index a = P(a layers))."""
    K = draft.coarse_layers
    out = {}
    for n in counts:
        hist = torch.zeros(K + 1, dtype=torch.float64)
        for sl in batches(len(feats), batch_size):
            f = feats[sl].to(device)
            cands = draft.propose_candidates(f, n)  # [B, N, T, K]
            flat = cands.reshape(-1, *cands.shape[2:])
            logits, _ = head.verify(f.repeat_interleave(n, dim=0), flat)
            _, _, accepted = check_proposal(flat, logits.argmax(-1).transpose(1, 2))
            hist += torch.bincount(accepted.view(len(f), n).max(dim=1).values.cpu(), minlength=K + 1).double()
        dist = (hist / len(feats)).tolist()
        out[str(n)] = {"mean_accepted_layers": float(sum(a * p for a, p in enumerate(dist))), "accepted_layers_distribution": dist}
    return out


@torch.no_grad()
def main_distributions(head: RFSQHead, feats: torch.Tensor, codes: torch.Tensor, *, layers: range, device: torch.device,
                       batch_size: int = 2048) -> torch.Tensor:
    """The main model's token distributions [N, len(layers), T, V] (float32, CPU) for ``layers``,
    teacher-forced on ``codes`` (its own greedy codes, for distillation)."""
    head.eval()
    out = [head(feats[sl].to(device), codes[sl].to(device).long())[:, layers.start : layers.stop].softmax(dim=-1).float().cpu()
           for sl in batches(len(feats), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def measure_costs(head: RFSQHead, draft: DraftWithProjection, *, repeats: int = 200, seed: int = 0) -> dict[str, Any]:
    """Draft pass vs one main pass: params, analytic FLOPs, measured batch-1 CPU time (medians).

    One main pass = one cached sequential step of ``greedy_decode`` (its time / L); the backbone is
    shared by both and not counted. Runs on CPU copies with the process's thread count (the entry
    points set 1, which ``timing`` records).
    """
    head = copy.deepcopy(head).cpu().eval()
    draft = copy.deepcopy(draft).cpu().eval()
    # timing input only: the cost of a pass does not depend on the feature values
    f = torch.randn(1, head.feature_dim, generator=torch.Generator().manual_seed(seed))
    d_in = f if draft.input != "main_hidden" else torch.randn(1, draft.feature_dim, generator=torch.Generator().manual_seed(seed))
    prefix = None if draft.input != "main_hidden" else torch.zeros(1, draft.tokens_per_layer, dtype=torch.long)
    for _ in range(min(10, repeats)):  # warm-up
        draft(d_in, prefix=prefix)
        head.greedy_decode(f)
    d_times, m_times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        draft.propose(d_in, prefix=prefix)
        d_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        head.greedy_decode(f)
        m_times.append((time.perf_counter() - t0) / head.num_layers)
    d_flops = int(draft.count_flops(1)["draft_pass"])
    m_flops = float(head.count_flops(1)["per_pass_mean"])
    d_med, m_med = statistics.median(d_times), statistics.median(m_times)
    return {
        "draft_params": draft.num_parameters(),
        "main_head_params": head.num_parameters(),
        "draft_flops_per_pass": d_flops,
        "main_flops_per_pass_mean": m_flops,
        "flops_ratio_draft_over_main_pass": d_flops / m_flops,
        "draft_time_s_median": d_med,
        "main_pass_time_s_median": m_med,
        "time_ratio_draft_over_main_pass": d_med / m_med,
        "timing": f"CPU, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}, batch 1, median of {repeats} calls",
    }



@torch.no_grad()
def greedy_codes(head: RFSQHead, feats: torch.Tensor, *, device: torch.device, batch_size: int = 2048) -> torch.Tensor:
    """The main model's greedy (sequential) codes ``[N, T, L]`` for precomputed features."""
    head.eval()
    out = [head.greedy_decode(feats[s : s + batch_size].to(device)).cpu() for s in range(0, len(feats), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def hidden_states(head: RFSQHead, feats: torch.Tensor, *, device: torch.device, batch_size: int = 2048) -> torch.Tensor:
    """The main model's position-0 hidden states ``[N, d_model]`` (CPU) for precomputed features
    (what a ``main_hidden`` draft reads)."""
    head.eval()
    return torch.cat([head.start_with_hidden(feats[sl].to(device))[2].cpu() for sl in batches(len(feats), batch_size)])
