"""Which layers to decode, and how, chosen on held-out data by action-space error (not token accuracy).

A robust code decodes exactly from any coarse prefix, so the policy need not execute the layers it
cannot predict: beyond some depth its greedy tokens are near chance and add error, not detail. For
every depth k and both rules for the last decoded layer (``argmax``; ``expected``: the mean of its
level values under the model's distribution, see ``common/tokenizer/token_code.py``), this measures
the policy's held-out action MSE (normalized action units) against the demo chunk as the tokenizer
writes it (all L true layers decoded), and picks the smallest depth within ``tolerance`` of the best
(fewer layers = fewer main passes). Phase 2 stores the result in the head checkpoint's metrics
(``decode_choice``); Phase 3 ``--auto-decode`` executes it.
"""

from __future__ import annotations

from typing import Any

import torch

from common.policy.head import RFSQHead
from common.policy.labels import batches
from common.tokenizer.model import ActionRFSQAE
from common.tokenizer.token_code import TokenCode

RULES = ("argmax", "expected")


@torch.no_grad()
def action_errors_by_depth(head: RFSQHead, feats: torch.Tensor, codes: torch.Tensor, tokenizer: ActionRFSQAE, *,
                           batch_size: int = 2048) -> dict[str, list[float]]:
    """Held-out action MSE per depth k = 1..L for each rule -> ``{"argmax": [..L], "expected": [..L]}``."""
    was = head.training
    head.eval()
    code = TokenCode(tokenizer)
    L = head.num_layers
    sums = {rule: torch.zeros(L, dtype=torch.float64) for rule in RULES}
    n = 0
    for sl in batches(len(feats), batch_size):
        f = feats[sl].to(next(head.parameters()).device, next(head.parameters()).dtype)
        greedy = head.greedy_decode(f)  # [B, T, L]
        logits = head(f, greedy).float().cpu()  # row l = the logits greedy decoding read for layer l
        greedy = greedy.cpu()
        target = tokenizer.decode_from_indices(codes[sl].long())  # the demo chunk as the tokenizer writes it
        for k in range(1, L + 1):
            argmax = tokenizer.decode_from_indices(greedy[..., :k])
            expected = code.decode_expected(greedy[..., : k - 1], torch.softmax(logits[:, k - 1].double(), -1))
            sums["argmax"][k - 1] += ((argmax - target) ** 2).mean(dim=(1, 2)).double().sum()
            sums["expected"][k - 1] += ((expected - target) ** 2).mean(dim=(1, 2)).double().sum()
        n += len(f)
    head.train(was)
    return {rule: (s / max(n, 1)).tolist() for rule, s in sums.items()}


def choose_decoding(errors: dict[str, list[float]], *, tolerance: float = 0.02) -> dict[str, Any]:
    """The smallest depth (then ``argmax`` before ``expected``) whose MSE is within ``tolerance``
    (relative) of the lowest over all depths and rules."""
    best = min(min(v) for v in errors.values())
    for k in range(1, len(errors["argmax"]) + 1):
        for rule in RULES:
            if errors[rule][k - 1] <= best * (1 + tolerance):
                return {"layers": k, "rule": rule, "val_action_mse": errors[rule][k - 1], "best_val_action_mse": best,
                        "tolerance": tolerance, "val_action_mse_by_depth": errors}
    raise AssertionError("unreachable: the best entry is within tolerance of itself")
