"""Candidate proposals: N drafts of the first layer verified in one main pass, still exact."""

import pytest
import torch

from common.decoding.speculative import main_only_decode, speculative_decode
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead

D, T, L, V, K = 10, 4, 5, 7, 2


def make_main(seed=0):
    torch.manual_seed(seed)
    return RFSQHead(feature_dim=D, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=32, num_heads=2, num_blocks=2).eval()


def make_draft(seed=0, k=K):
    torch.manual_seed(seed + 1000)
    return DraftWithProjection(feature_dim=D, width=16, coarse_layers=k, tokens_per_layer=T, num_levels=V).eval()


class NearMissDraft(DraftWithProjection):
    """Ranks the main model's greedy tokens first, except on token ``wrong`` of layer 0 where the
    main's choice comes second by a small margin (the least confident token)."""

    def __init__(self, main, wrong=1):
        super().__init__(feature_dim=D, width=8, coarse_layers=K, tokens_per_layer=T, num_levels=V)
        self.main, self.wrong = main, wrong
        self.eval()

    def forward(self, features, codes=None, *, prefix=None):
        greedy = self.main.greedy_decode(features)[..., :K]  # [B, T, K]
        logits = torch.nn.functional.one_hot(greedy.transpose(1, 2), V).float() * 5.0  # [B, K, T, V]
        g = greedy[:, self.wrong, 0]
        rows = torch.arange(len(g))
        logits[rows, 0, self.wrong, g] = 0.9
        logits[rows, 0, self.wrong, (g + 1) % V] = 1.0
        return logits


def test_candidates_differ_from_the_greedy_proposal_only_on_the_least_confident_first_layer_tokens():
    draft = make_draft()
    f = torch.randn(3, D)
    cands = draft.propose_candidates(f, 4)
    assert cands.shape == (3, 4, T, K)
    assert torch.equal(cands[:, 0], draft.propose(f))
    assert torch.equal(cands[..., 1:], draft.propose(f)[:, None, :, 1:].expand(3, 4, T, K - 1))
    logits = draft(f)[:, 0]  # [B, T, V]
    top_val, top_idx = logits.topk(2, dim=-1)
    unsure = (top_val[..., 0] - top_val[..., 1]).topk(2, largest=False).indices
    for b in range(3):
        layer0 = {tuple(c.tolist()) for c in cands[b, :, :, 0]}
        assert len(layer0) == 4  # all 2^2 combinations, no duplicates
        changed = (cands[b, :, :, 0] != cands[b, 0, :, 0]).any(dim=0).nonzero().flatten()
        assert set(changed.tolist()) == set(unsure[b].tolist())
        for t in unsure[b].tolist():
            assert set(cands[b, :, t, 0].tolist()) == set(top_idx[b, t].tolist())


def test_one_candidate_is_the_plain_proposal_and_sizes_are_checked():
    draft = make_draft()
    f = torch.randn(2, D)
    assert torch.equal(draft.propose_candidates(f, 1)[:, 0], draft.propose(f))
    with pytest.raises(ValueError, match="power of two"):
        draft.propose_candidates(f, 3)
    with pytest.raises(ValueError, match="power of two"):
        draft.propose_candidates(f, 2 ** (T + 1))


def test_a_near_miss_is_accepted_with_two_candidates_and_rejected_with_one():
    main = make_main()
    draft = NearMissDraft(main)
    f = torch.randn(1, D)
    ref = main.greedy_decode(f)
    out1, st1 = speculative_decode(main, draft, f)
    out2, st2 = speculative_decode(main, draft, f, candidates=2)
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    assert st1.accepted_layers == [0] and st1.main_passes == L
    assert st2.accepted_layers == [K] and st2.main_passes == L - K and st2.candidates == 2
    assert st2.main_positions == 2 * (K + 1) + (L - K - 1)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_candidates_stay_lossless_and_never_accept_less(n):
    for seed in range(8):
        main, draft = make_main(seed), make_draft(seed, k=1 + seed % (L - 1))
        torch.manual_seed(500 + seed)
        f = torch.randn(1 + seed % 3, D) * (1 + seed % 4)
        ref, _ = main_only_decode(main, f)
        for layers in (2, L):
            out1, st1 = speculative_decode(main, draft, f, num_layers=layers)
            out, st = speculative_decode(main, draft, f, num_layers=layers, candidates=n)
            assert torch.equal(out, ref[..., :layers]) and torch.equal(out1, out), (seed, layers)
            assert all(a >= b for a, b in zip(st.accepted_layers, st1.accepted_layers))
            assert st.main_passes == layers - st.used_prefix
            # the last layer's logits are the ones main-only decoding read it from
            _, last = main.greedy_decode(f, layers, return_last_logits=True)
            torch.testing.assert_close(st.last_logits, last, atol=1e-5, rtol=1e-5)


def test_main_hidden_drafts_take_one_candidate():
    main = make_main()
    draft = DraftWithProjection(feature_dim=32, width=8, coarse_layers=1, tokens_per_layer=T, num_levels=V, input="main_hidden").eval()
    with pytest.raises(ValueError, match="candidates"):
        speculative_decode(main, draft, torch.randn(1, D), candidates=2)
