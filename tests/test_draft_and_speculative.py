"""Draft model + speculative decoding: pass accounting, losslessness, relaxed mode, timer."""

import pytest
import torch
import torch.nn as nn

from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead
from common.decoding.speculative import SpecStats, main_only_decode, speculative_decode
from common.decoding.timing import StageTimer


D, T, L, V, K = 10, 3, 6, 7, 3


def make_main(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(feature_dim=D, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=32, num_heads=2, num_blocks=2)
    cfg.update(kw)
    return RFSQHead(**cfg).eval()


def make_draft(seed=0, k=K, mode="parallel"):
    torch.manual_seed(seed + 1000)
    return DraftWithProjection(feature_dim=D, width=16, coarse_layers=k, tokens_per_layer=T, num_levels=V, mode=mode).eval()


class OracleDraft(nn.Module):
    """Proposes the main model's own greedy codes, optionally corrupting one layer."""

    def __init__(self, main, k=K, corrupt_layer=None, shift=3):
        super().__init__()
        self.main, self.coarse_layers, self.corrupt_layer, self.shift = main, k, corrupt_layer, shift
        self.tokens_per_layer, self.num_levels = main.tokens_per_layer, main.num_levels
        self.train(False)

    def propose(self, features):
        codes = self.main.greedy_decode(features)[..., : self.coarse_layers].clone()
        if self.corrupt_layer is not None:
            codes[:, 0, self.corrupt_layer] = (codes[:, 0, self.corrupt_layer] + self.shift) % self.num_levels
        return codes


def test_draft_shapes_propose_and_loss():
    d = make_draft()
    f = torch.randn(4, D)
    assert d(f).shape == (4, K, T, V)
    p = d.propose(f)
    assert p.shape == (4, T, K) and int(p.min()) >= 0 and int(p.max()) < V
    d.train()
    d.loss(f, torch.randint(0, V, (4, T, L))).backward()
    with pytest.raises(ValueError, match=r"expected \[B, 10\]"):
        d(torch.randn(2, D + 1))


@pytest.mark.parametrize("mode", ["parallel", "chained"])
def test_draft_state_dict_round_trip(mode):
    d = make_draft(mode=mode)
    c = DraftWithProjection.from_config(d.config).eval()
    c.load_state_dict(d.state_dict())
    f = torch.randn(3, D)
    assert torch.equal(d(f), c(f))


def test_old_draft_config_without_mode_loads_as_parallel():
    cfg = make_draft().config
    del cfg["mode"]
    assert DraftWithProjection.from_config(cfg).mode == "parallel"
    with pytest.raises(ValueError, match="expected mode in"):
        DraftWithProjection(feature_dim=D, coarse_layers=K, tokens_per_layer=T, mode="tree")


def test_chained_draft_conditions_each_layer_on_its_own_coarser_tokens():
    d = make_draft(mode="chained")
    f = torch.randn(5, D)
    free = d(f)
    proposed = d.propose(f)  # [B, T, K]
    # teacher-forcing the draft's own greedy tokens reproduces the free-running logits exactly
    assert torch.equal(d(f, proposed), free)
    # layer 0 never depends on the forced tokens; layer 1 does
    other = (proposed + 1) % V
    forced = d(f, other)
    assert torch.equal(forced[:, 0], free[:, 0])
    assert not torch.allclose(forced[:, 1], free[:, 1])
    # the loss trains through the chain; FLOPs count the chain blocks
    d.train()
    d.loss(f, torch.randint(0, V, (5, T, L))).backward()
    assert d.chain_blocks[0].fc.weight.grad is not None
    assert d.count_flops()["draft_pass"] > 0


def test_float32_draft_proposes_for_float64_main_losslessly():
    main = make_main(seed=4).double()
    d = make_draft(seed=4, mode="chained")  # stays float32
    f = torch.randn(8, D, dtype=torch.float64)
    assert torch.equal(d.propose(f), d.propose(f.float()))
    for i in range(8):
        codes, _ = speculative_decode(main, d, f[i : i + 1])
        assert torch.equal(codes, main.greedy_decode(f[i : i + 1]))


def test_chained_draft_is_lossless_under_speculative_decoding():
    main = make_main(seed=3)
    d = make_draft(seed=3, mode="chained")
    f = torch.randn(16, D)
    for i in range(16):
        codes, st = speculative_decode(main, d, f[i : i + 1])
        assert torch.equal(codes, main.greedy_decode(f[i : i + 1]))
        assert st.main_passes == L - st.accepted_layers[0]


def test_draft_much_cheaper_than_main_pass():
    main = RFSQHead(feature_dim=256, num_layers=8, tokens_per_layer=8)
    draft = DraftWithProjection(feature_dim=256, coarse_layers=3, tokens_per_layer=8)
    assert draft.count_flops()["draft_pass"] * 5 < main.count_flops()["per_pass_mean"]
    assert draft.num_parameters() * 5 < main.num_parameters()


def test_perfect_draft_accepts_all_and_counts_passes():
    main = make_main()
    f = torch.randn(1, D)
    codes, st = speculative_decode(main, OracleDraft(main), f)
    assert torch.equal(codes, main.greedy_decode(f))
    assert st.accepted_layers == [K] and st.used_prefix == K
    assert st.main_passes == L - K  # verify pass yields layers 0..K, then L-K-1 sequential passes
    assert st.main_positions == L and st.draft_passes == 1 and not st.lossy


@pytest.mark.parametrize("bad_layer", [0, 1, 2])
def test_wrong_draft_costs_verify_plus_rest(bad_layer):
    main = make_main()
    f = torch.randn(1, D)
    codes, st = speculative_decode(main, OracleDraft(main, corrupt_layer=bad_layer), f)
    assert torch.equal(codes, main.greedy_decode(f))
    assert st.accepted_layers == [bad_layer]
    assert st.main_passes == 1 + (L - bad_layer - 1)
    assert st.main_positions == (K + 1) + (L - bad_layer - 1)


@pytest.mark.parametrize("cap", [1, 2])
def test_capping_drafted_layers_keeps_the_tokens_and_verifies_fewer_positions(cap):
    main = make_main()
    f = torch.randn(1, D)
    codes, st = speculative_decode(main, OracleDraft(main), f, coarse_layers=cap)
    assert torch.equal(codes, main.greedy_decode(f))
    assert st.coarse_layers == cap and st.accepted_layers == [cap]
    assert st.main_passes == L - cap and st.main_positions == L  # verify over cap + 1 positions, then one each
    for seed in range(5):  # the batch-1 path of a real draft (propose_rows)
        f = torch.randn(1, D)
        codes, st = speculative_decode(main, make_draft(seed), f, coarse_layers=cap)
        assert torch.equal(codes, main.greedy_decode(f))
        assert st.coarse_layers == cap and 0 <= st.accepted_layers[0] <= cap
        assert st.main_passes == L - st.accepted_layers[0]
    # a cap above what the draft proposes changes nothing
    _, st = speculative_decode(main, OracleDraft(main), f, coarse_layers=K + 2)
    assert st.coarse_layers == K


def test_main_only_accounting():
    main = make_main()
    f = torch.randn(2, D)
    codes, st = main_only_decode(main, f)
    assert torch.equal(codes, main.greedy_decode(f))
    assert st.main_passes == L and st.draft_passes == 0 and st.main_time_s > 0


def test_lossless_property_random_models():
    """Exact mode == main-only greedy over random models, drafts, feature batches and K."""
    for seed in range(12):
        k = 1 + seed % (L - 1)
        main = make_main(seed)
        draft = make_draft(seed, k=k)
        torch.manual_seed(10_000 + seed)
        f = torch.randn(1 + seed % 3, D) * (1 + seed % 4)
        ref, _ = main_only_decode(main, f)
        out, st = speculative_decode(main, draft, f)
        assert torch.equal(out, ref), seed
        assert st.main_passes == L - st.used_prefix
        assert st.used_prefix == min(st.accepted_layers)
        # oracle drafts (all accepted) and partly wrong ones must stay lossless too
        out2, st2 = speculative_decode(main, OracleDraft(main, k=k), f)
        assert torch.equal(out2, ref) and st2.used_prefix == k
        bad = seed % k
        out3, st3 = speculative_decode(main, OracleDraft(main, k=k, corrupt_layer=bad), f)
        assert torch.equal(out3, ref) and st3.used_prefix == bad and st3.main_passes == L - bad


def test_batch_uses_min_prefix_and_stays_lossless():
    main = make_main(3)
    f = torch.randn(4, D)
    greedy = main.greedy_decode(f)

    class MixedDraft(OracleDraft):
        def propose(self, features):
            codes = super().propose(features)
            codes[1, 0, 1] = (codes[1, 0, 1] + 2) % V  # sample 1 fails at layer 1
            codes[2, 0, 2] = (codes[2, 0, 2] + 2) % V  # sample 2 fails at layer 2
            return codes

    out, st = speculative_decode(main, MixedDraft(main), f)
    assert st.accepted_layers == [K, 1, 2, K] and st.used_prefix == 1
    assert st.main_passes == L - 1
    assert torch.equal(out, greedy)


def test_relaxed_accepts_within_tolerance_only():
    main = make_main(5)
    f = torch.randn(1, D)
    greedy = main.greedy_decode(f)
    # shift layer 1 of a perfect proposal by +1 level (clamped into range so |diff| == 1)
    class NearDraft(OracleDraft):
        def propose(self, features):
            c = super().propose(features)
            c[:, :, 1] = torch.where(c[:, :, 1] < V - 1, c[:, :, 1] + 1, c[:, :, 1] - 1)
            return c

    draft = NearDraft(main)
    codes, st = speculative_decode(main, draft, f, acceptance="relaxed", tolerance=1)
    acc = st.accepted_layers[0]
    assert acc >= 2 and st.lossy  # layer 1 is off by one level: accepted under tolerance 1
    assert torch.equal(codes[..., :acc], draft.propose(f)[..., :acc])  # accepted layers are the draft's
    assert (codes[..., 1] - greedy[..., 1]).abs().max() == 1
    _, st0 = speculative_decode(main, draft, f, acceptance="relaxed", tolerance=0)
    assert st0.accepted_layers == [1] and not st0.lossy
    _, st_exact = speculative_decode(main, draft, f)
    assert st_exact.accepted_layers == [1]
    # a shift of 3 levels is outside tolerance 1
    far = OracleDraft(main, corrupt_layer=0, shift=3)
    _, st_far = speculative_decode(main, far, f, acceptance="relaxed", tolerance=1)
    assert st_far.accepted_layers == [0]


def test_relaxed_layers_apply_the_tolerance_to_the_coarse_drafted_layers_only():
    """relaxed_layers=n: a one-level error is accepted on the n coarsest drafted layers and rejected
    on the finer ones, which must equal the main model's tokens given the draft's coarse ones."""
    from common.policy.draft import check_proposal

    main_tokens = torch.tensor([[[2, 3, 4]]])  # [B=1, T=1, K=3]
    off_by_one = main_tokens + 1
    for n, accepted in ((0, 3), (1, 1), (2, 2), (3, 3), (5, 3)):
        token_ok, layer_ok, acc = check_proposal(off_by_one, main_tokens, tolerance=1, relaxed_layers=n)
        assert acc.tolist() == [accepted], n
    assert check_proposal(off_by_one, main_tokens, tolerance=0, relaxed_layers=1)[2].tolist() == [0]

    main = make_main(5)
    f = torch.randn(1, D)

    class CoarseOffDraft(OracleDraft):  # layer 0 off by one level, layers 1.. the main's given that layer 0
        def propose(self, features):
            c = self.main.greedy_decode(features)[..., :1].clone()
            c = torch.where(c < V - 1, c + 1, c - 1)
            cache, _ = self.main.start(features)
            layers = [c[..., 0]]
            for _ in range(1, self.coarse_layers):
                cache, logits = self.main.extend(cache, layers[-1])
                layers.append(logits.argmax(-1))
            return torch.stack(layers, dim=2)

    draft = CoarseOffDraft(main)
    codes, st = speculative_decode(main, draft, f, acceptance="relaxed", tolerance=1, relaxed_layers=1)
    assert st.accepted_layers == [K] and st.relaxed_layers == 1 and st.lossy
    assert torch.equal(codes[..., :K], draft.propose(f))  # the draft's coarse layer, the main's finer ones given it
    class FineOffDraft(OracleDraft):  # layer 0 the main's, layer 1 one level off
        def propose(self, features):
            c = super().propose(features)
            c[:, :, 1] = torch.where(c[:, :, 1] < V - 1, c[:, :, 1] + 1, c[:, :, 1] - 1)
            return c

    fine_off = FineOffDraft(main)
    _, st1 = speculative_decode(main, fine_off, f, acceptance="relaxed", tolerance=1, relaxed_layers=1)
    _, st_all = speculative_decode(main, fine_off, f, acceptance="relaxed", tolerance=1)
    assert st1.accepted_layers == [1] and st_all.accepted_layers[0] >= 2  # exact on layer 1 / tolerant there
    with pytest.raises(ValueError, match="relaxed_layers: only relaxed acceptance"):
        speculative_decode(main, draft, f, relaxed_layers=1)
    with pytest.raises(ValueError, match="relaxed_layers: expected an integer >= 1"):
        speculative_decode(main, draft, f, acceptance="relaxed", tolerance=1, relaxed_layers=0)


def test_argument_checks():
    main = make_main()
    f = torch.randn(1, D)
    with pytest.raises(ValueError, match="acceptance"):
        speculative_decode(main, make_draft(), f, acceptance="fuzzy")
    with pytest.raises(ValueError, match="tolerance=0"):
        speculative_decode(main, make_draft(), f, tolerance=1)
    with pytest.raises(ValueError, match="1 <= K <= num_layers-1"):
        speculative_decode(main, make_draft(k=L), f)
    with pytest.raises(ValueError, match="coarse_layers: expected an integer >= 1"):
        speculative_decode(main, make_draft(), f, coarse_layers=0)
    main.train()
    with pytest.raises(RuntimeError, match="eval"):
        speculative_decode(main, make_draft(), f)


def test_stage_timer_and_stats_times():
    timer = StageTimer(cuda_sync=False)
    main, draft = make_main(), make_draft()
    f = torch.randn(1, D)
    _, st = speculative_decode(main, draft, f, timer=timer)
    _, st2 = speculative_decode(main, draft, f, timer=timer)
    assert isinstance(st, SpecStats) and st.draft_time_s > 0 and st.main_time_s > 0
    assert timer.counts == {"draft": 2, "main": 2}
    assert abs(timer.totals["main"] - (st.main_time_s + st2.main_time_s)) < 1e-9
    with timer.stage("backbone"):
        pass
    assert set(timer.summary()) == {"draft", "main", "backbone"}
    with pytest.raises(KeyError, match="no timings"):
        timer.mean("tokenizer_decode")
    assert st.as_dict()["main_passes"] == st.main_passes


# --- drafts that read the main model's position-0 hidden state (EAGLE / Medusa style) -------------------
def make_hidden_draft(main, seed=0, k=K, mode="chained"):
    torch.manual_seed(seed + 2000)
    return DraftWithProjection(feature_dim=main.d_model, width=16, coarse_layers=k, tokens_per_layer=T, num_levels=V,
                               mode=mode, input="main_hidden").eval()


class HiddenOracleDraft(nn.Module):
    """A main_hidden draft that proposes the main model's own greedy layers 1..K (optionally one wrong)."""

    input, first_layer = "main_hidden", 1

    def __init__(self, main, features, k=K, corrupt_layer=None):
        super().__init__()
        self.coarse_layers, self.tokens_per_layer, self.num_levels, self.feature_dim = k, T, V, main.d_model
        codes = main.greedy_decode(features)[..., 1 : 1 + k].clone()
        if corrupt_layer is not None:
            codes[:, 0, corrupt_layer] = (codes[:, 0, corrupt_layer] + 1) % V
        self.codes = codes
        self.train(False)

    def propose(self, hidden, prefix=None):
        assert hidden.shape[1] == self.feature_dim and prefix is not None
        return self.codes


@pytest.mark.parametrize("mode", ["parallel", "chained"])
def test_hidden_draft_is_lossless_and_counts_passes(mode):
    for seed in range(8):
        k = 1 + seed % (L - 2)
        main = make_main(seed)
        f = torch.randn(1 + seed % 2, D)
        ref = main.greedy_decode(f)
        out, st = speculative_decode(main, make_hidden_draft(main, seed, k=k, mode=mode), f)
        assert torch.equal(out, ref), seed
        assert st.main_passes == L - st.used_prefix
    main = make_main(5)
    f = torch.randn(1, D)
    out, st = speculative_decode(main, HiddenOracleDraft(main, f), f)
    assert torch.equal(out, main.greedy_decode(f)) and st.accepted_layers == [K] and st.main_passes == L - K
    out, st = speculative_decode(main, HiddenOracleDraft(main, f, corrupt_layer=1), f)
    assert torch.equal(out, main.greedy_decode(f)) and st.accepted_layers == [1] and st.main_passes == L - 1


def test_hidden_draft_trains_on_layers_after_the_prefix_and_checks_sizes():
    main = make_main(1)
    d = make_hidden_draft(main).train()
    codes = torch.randint(0, V, (4, T, L))
    loss = d.loss(torch.randn(4, main.d_model), codes)
    loss.backward()
    assert loss.item() > 0 and d.prefix_embed.weight.grad.abs().sum() > 0  # layer-0 tokens reach the draft
    with pytest.raises(ValueError, match="1 <= K <= num_layers-2 = 4"):
        speculative_decode(main, make_hidden_draft(main, k=L - 1), torch.randn(1, D))
    wrong = DraftWithProjection(feature_dim=D, width=8, coarse_layers=2, tokens_per_layer=T, num_levels=V, input="main_hidden").eval()
    with pytest.raises(ValueError, match="feature_dim = main d_model 32"):
        speculative_decode(main, wrong, torch.randn(1, D))
    assert DraftWithProjection.from_config(d.config).input == "main_hidden"


@pytest.mark.parametrize("hidden", [False, True])
def test_prefix_depth_decoding_is_the_prefix_of_full_decoding(hidden):
    """Decoding only the first n layers (speculative or main-only) gives exactly the first n layers
    of full greedy decoding, in n - accepted main passes."""
    for seed in range(4):
        main = make_main(seed)
        draft = make_hidden_draft(main, seed) if hidden else make_draft(seed)
        f = torch.randn(2, D)
        full = main.greedy_decode(f)
        for n in range(1, L + 1):
            ref, st_ref = main_only_decode(main, f, num_layers=n)
            assert torch.equal(ref, full[..., :n]) and st_ref.main_passes == n
            out, st = speculative_decode(main, draft, f, num_layers=n)
            assert torch.equal(out, full[..., :n]), (seed, n)
            assert st.main_passes == n - st.used_prefix and st.coarse_layers <= max(0, n - (2 if hidden else 1))
    with pytest.raises(ValueError, match="1 <= n <= 6"):
        main_only_decode(make_main(), torch.randn(1, D), num_layers=7)


def test_lossless_in_float32_too():
    """Phase 3 decodes in float32 by default: the verify pass (K+1 positions at once) and the
    sequential one-position passes then run different kernel shapes, so exactness is checked against
    the float32 main-only decode, the path actually run (Phase 3 also counts it on every chunk)."""
    for seed in range(8):
        k = 1 + seed % (L - 1)
        main, draft = make_main(seed).float(), make_draft(seed, k=k).float()
        torch.manual_seed(20_000 + seed)
        for batch in (1, 3):
            f = torch.randn(batch, D) * (1 + seed % 4)
            ref, _ = main_only_decode(main, f)
            for candidates in (1, 2):
                out, st = speculative_decode(main, draft, f, candidates=candidates)
                assert torch.equal(out, ref), (seed, batch, candidates)
                assert st.main_passes == L - st.used_prefix
