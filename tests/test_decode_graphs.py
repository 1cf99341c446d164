"""GraphedDecoder (common/decoding/graphs.py): the same codes, accepted layers and last logits as the
eager paths, from static buffers; with real CUDA graphs where a GPU is present (the device check)."""

import shutil

import pytest
import torch

from common.decoding.graphs import GraphedDecoder, Replay
from common.decoding.speculative import main_only_decode, speculative_decode
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead

D, T, L, V, K = 10, 4, 6, 7, 3
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_pair(seed, device="cpu", dtype=torch.float64, k=K, **draft_kw):
    torch.manual_seed(seed)
    main = RFSQHead(feature_dim=D, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=32, num_heads=2, num_blocks=2)
    settings = dict(width=16, hidden_layers=2, mode="parallel", trunk="mlp", activation="relu")
    settings.update(draft_kw)
    draft = DraftWithProjection(feature_dim=D, coarse_layers=k, tokens_per_layer=T, num_levels=V, **settings)
    return main.to(device, dtype).eval(), draft.to(device, dtype).eval()


class RowsOracle(torch.nn.Module):
    """Runs the draft, then proposes the main model's greedy rows with layer ``wrong`` and after changed:
    exactly ``wrong`` layers are accepted. One proposal buffer, rewritten in place (a graph reads it)."""

    def __init__(self, draft, main, features, wrong):
        super().__init__()
        self.draft, self.coarse_layers = draft, draft.coarse_layers
        self.tokens_per_layer, self.num_levels = draft.tokens_per_layer, draft.num_levels
        self.rows = torch.zeros(1, draft.coarse_layers, draft.tokens_per_layer, dtype=torch.long, device=features.device)
        self.aim(main, features, wrong)
        self.train(False)

    def aim(self, main, features, wrong):
        greedy = main.greedy_decode(features)[..., : self.coarse_layers].transpose(1, 2)
        self.rows.copy_(greedy)
        self.rows[:, wrong:] = (greedy[:, wrong:] + 1) % self.num_levels

    def propose_rows(self, features):
        self.draft.propose_rows(features)
        return self.rows


@pytest.mark.parametrize("device", DEVICES)
def test_graphed_decode_equals_eager_paths_over_random_models(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    for seed in range(6):
        main, draft = make_pair(seed, device, dtype, mode="chained" if seed % 3 == 2 else "parallel",
                                trunk="residual" if seed % 3 == 2 else "mlp", activation="gelu" if seed % 3 == 2 else "relu")
        decoder = GraphedDecoder(main, draft)
        assert decoder.coarse_layers == K and decoder.main_only.captured == (device == "cuda")
        for trial in range(3):  # the same captured graphs serve every new input
            f = torch.randn(1, D, generator=torch.Generator().manual_seed(100 * seed + trial)).to(device, dtype) * (1 + trial)
            ref_codes, ref_stats = speculative_decode(main, draft, f)
            codes, a, last = decoder.decode(f)
            assert torch.equal(codes, ref_codes) and a == ref_stats.accepted_layers[0], (seed, trial)
            assert torch.allclose(last, ref_stats.last_logits)
            mo_codes, mo_stats = main_only_decode(main, f)
            got_codes, got_last = decoder.decode_main_only(f)
            assert torch.equal(got_codes, mo_codes) and torch.equal(got_codes, codes)
            assert torch.allclose(got_last, mo_stats.last_logits)


@pytest.mark.parametrize("device", DEVICES)
def test_every_accepted_count_takes_its_own_finish_and_stays_exact(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    main, draft = make_pair(7, device, dtype)
    f = torch.randn(1, D, generator=torch.Generator().manual_seed(3)).to(device, dtype)
    oracle = RowsOracle(draft, main, f, wrong=0)
    decoder = GraphedDecoder(main, oracle)
    ref = main.greedy_decode(f)
    for wrong in [K, 0, 2, 1, K]:  # the proposal buffer changes under the captured graph
        oracle.aim(main, f, wrong)
        codes, a, _ = decoder.decode(f)
        assert a == wrong and torch.equal(codes, ref)


def test_prefix_depth_and_full_acceptance_at_the_last_layer():
    main, draft = make_pair(1)
    f = torch.randn(1, D, dtype=torch.float64)
    # decode 3 of 6 layers: K is capped at 2 so that the verify pass stays inside them
    decoder = GraphedDecoder(main, RowsOracle(draft, main, f, wrong=K), num_layers=3)
    codes, a, last = decoder.decode(f)
    assert decoder.coarse_layers == 2 and a == 2  # all accepted: the verify pass yields every layer, no finish pass
    assert torch.equal(codes, main.greedy_decode(f, 3))
    assert torch.allclose(last, main_only_decode(main, f, num_layers=3)[1].last_logits)



@pytest.mark.parametrize("cap", [1, 2])
def test_capped_drafted_layers_match_the_eager_cap(cap):
    main, draft = make_pair(4)
    oracle_f = torch.randn(1, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    decoder = GraphedDecoder(main, RowsOracle(draft, main, oracle_f, wrong=K), coarse_layers=cap)
    assert decoder.coarse_layers == cap and len(decoder.finish) == cap + 1
    codes, a, last = decoder.decode(oracle_f)
    ref_codes, ref_stats = speculative_decode(main, RowsOracle(draft, main, oracle_f, wrong=K), oracle_f, coarse_layers=cap)
    assert a == cap == ref_stats.accepted_layers[0]  # every drafted layer right: all of the capped ones accepted
    assert torch.equal(codes, ref_codes) and torch.equal(codes, main.greedy_decode(oracle_f))
    assert torch.allclose(last, ref_stats.last_logits)
    with pytest.raises(ValueError, match=r"coarse_layers: expected an integer >= 1 \(or None for all the draft's\), found 0"):
        GraphedDecoder(main, draft, coarse_layers=0)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_replay_gives_the_eager_tokens():
    main, draft = make_pair(3, dtype=torch.float32, k=1)  # few, short bodies: each compile takes seconds
    decoder = GraphedDecoder(main, draft, num_layers=3, replay="compile")
    assert all(r.compiled for r in [decoder.main_only, decoder.propose_verify, *decoder.finish])
    with torch.inference_mode():  # callers decode in inference mode; the compiled bodies run outside it
        for trial in range(4):
            f = torch.randn(1, D, generator=torch.Generator().manual_seed(trial)) * (1 + trial)
            ref_codes, ref_stats = speculative_decode(main, draft, f, num_layers=3)
            codes, a, last = decoder.decode(f)
            assert torch.equal(codes, ref_codes) and a == ref_stats.accepted_layers[0]
            assert torch.allclose(last, ref_stats.last_logits, atol=1e-5)
            assert torch.equal(decoder.decode_main_only(f)[0], main.greedy_decode(f, 3))
    with pytest.raises(ValueError, match="replay: expected 'graphs' or 'compile', found 'jit'"):
        GraphedDecoder(main, draft, replay="jit")

def test_outputs_are_static_buffers_and_errors_are_clear():
    main, draft = make_pair(2)
    decoder = GraphedDecoder(main, draft)
    f1, f2 = torch.randn(1, D, dtype=torch.float64), 5 * torch.randn(1, D, dtype=torch.float64)
    first = decoder.decode_main_only(f1)[0]
    kept = first.clone()
    second = decoder.decode_main_only(f2)[0]
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, main.greedy_decode(f2))
    assert torch.equal(kept, main.greedy_decode(f1))
    with pytest.raises(RuntimeError, match="built without a draft; use decode_main_only"):
        GraphedDecoder(main).decode(f1)
    with pytest.raises(RuntimeError, match="expected main and draft in eval"):
        GraphedDecoder(main, draft.train())
    draft.eval()
    with pytest.raises(ValueError, match=r"num_layers: expected 1 <= n <= 6, found 9"):
        GraphedDecoder(main, draft, num_layers=9)
    with pytest.raises(ValueError, match="speculation needs num_layers >= 2"):
        GraphedDecoder(main, draft, num_layers=1)
    hidden = DraftWithProjection(feature_dim=32, coarse_layers=2, tokens_per_layer=T, num_levels=V, input="main_hidden").double().eval()
    with pytest.raises(ValueError, match="expected a features draft with propose_rows"):
        GraphedDecoder(main, hidden)


def test_replay_off_cuda_calls_the_function_once_at_capture_and_at_every_replay():
    calls = []
    replay = Replay(lambda: calls.append(torch.is_inference_mode_enabled()), torch.device("cpu"))
    replay()
    replay()
    assert calls == [True, True, True] and not replay.captured
