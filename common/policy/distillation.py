"""Extra distillation data for the draft: the main model's own greedy choices on perturbed inputs.

Distillation targets cost nothing to compute on any input, so the draft can learn what the main model
does off the demo states, where the robot drifts in closed loop (``--draft-augment-copies``)."""

from __future__ import annotations

import torch

from common.policy.labels import PolicyData, batches
from common.policy.model import PolicyModel


@torch.no_grad()
def perturbed_distillation_set(
    policy: PolicyModel, data: PolicyData, *, noise: float, copies: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of ``copies`` noisy versions of ``data.inputs`` and the main model's greedy codes on them.

    Copy c (0-based) adds N(0, ((c+1)/copies * noise * std_d)^2) to input dimension d, std over
    ``data``'s steps (task ids untouched). Returns CPU tensors [copies*N, F] and [copies*N, T, L].
    """
    was = policy.training
    policy.eval()
    std = data.inputs.std(dim=0)
    gen = torch.Generator().manual_seed(seed)
    feats, codes = [], []
    for c in range(copies):
        scale = (c + 1) / copies * noise
        for sl in batches(len(data), 2048):
            x = data.inputs[sl] + scale * std * torch.randn(data.inputs[sl].shape, generator=gen)
            f = policy.features(x.to(device), data.task_ids[sl].to(device)).float()
            feats.append(f.cpu())
            codes.append(policy.head.greedy_decode(f).cpu())
    policy.train(was)
    return torch.cat(feats), torch.cat(codes)
