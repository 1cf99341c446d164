"""The cheap draft: plain-MLP trunk, soft distillation targets, closed-loop rollout states."""

import json

import pytest
import torch

from common.eval.config import EvalConfig
from common.data.rollouts import read_rollout_features
from common.policy.config import PolicyTrainConfig
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead
from common.policy.metrics import candidate_acceptance, draft_main_agreement, main_distributions

D, T, L, V = 10, 4, 5, 7


def test_mlp_trunk_has_no_norms_round_trips_and_counts_flops():
    d = DraftWithProjection(feature_dim=D, width=16, coarse_layers=2, tokens_per_layer=T, num_levels=V, hidden_layers=2, trunk="mlp").eval()
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in d.modules()) == 1  # the input projection's only
    assert d.count_flops(1)["draft_pass"] == 2 * D * 16 + 2 * 16 * 16 + 2 * 16 * 2 * T * V
    again = DraftWithProjection.from_config(d.config)
    again.load_state_dict(d.state_dict())
    f = torch.randn(3, D)
    assert torch.equal(again.propose(f), d.propose(f)) and d.propose(f).shape == (3, T, 2)
    assert torch.equal(d.propose_rows(f).transpose(1, 2), d.propose(f))
    with pytest.raises(ValueError, match="trunk"):
        DraftWithProjection(feature_dim=D, tokens_per_layer=T, trunk="conv")


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_lean_proposal_path_equals_the_module_forward(activation):
    """``propose_rows`` of a parallel MLP draft skips the module machinery; its tokens must be the
    forward's argmax exactly, for every activation, and the activation must survive a round trip."""
    torch.manual_seed(0)
    d = DraftWithProjection(feature_dim=D, width=16, coarse_layers=2, tokens_per_layer=T, num_levels=V, hidden_layers=3,
                            trunk="mlp", activation=activation).eval()
    f = torch.randn(64, D)
    with torch.no_grad():
        expected = d(f).argmax(dim=-1)
    assert torch.equal(d.propose_rows(f), expected) and expected.shape == (64, 2, T)
    assert DraftWithProjection.from_config(d.config).activation == activation
    acts = [m for m in d.blocks if not isinstance(m, torch.nn.Linear)]
    assert len(acts) == 3 and all(type(m) is type(acts[0]) for m in acts)
    assert isinstance(acts[0], torch.nn.ReLU) == (activation == "relu")
    with pytest.raises(ValueError, match="activation 'relu' needs trunk='mlp'"):
        DraftWithProjection(feature_dim=D, tokens_per_layer=T, trunk="residual", activation="relu")
    with pytest.raises(ValueError, match="activation"):
        DraftWithProjection(feature_dim=D, tokens_per_layer=T, trunk="mlp", activation="tanh")


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_lean_chained_mlp_draft_proposes_the_forward_argmax_and_decodes_losslessly(activation):
    """A chained MLP draft: each step is h + act(Linear(h + tokens)), no LayerNorm; ``propose_rows``
    (module forwards called directly, one embedding_bag per layer) gives the forward's greedy tokens,
    and speculative decoding with it stays identical to main-only greedy."""
    from common.decoding.speculative import speculative_decode

    torch.manual_seed(1)
    d = DraftWithProjection(feature_dim=D, width=16, coarse_layers=3, tokens_per_layer=T, num_levels=V, hidden_layers=2,
                            trunk="mlp", activation=activation, mode="chained").eval()
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in d.modules()) == 1 and len(d.chain_blocks) == 2
    f = torch.randn(64, D)
    with torch.no_grad():
        free = d(f)
    rows = d.propose_rows(f)
    assert torch.equal(rows, free.argmax(dim=-1)) and rows.shape == (64, 3, T)
    # teacher-forcing its own tokens reproduces the free-running logits; other tokens change layer 1
    assert torch.equal(d(f, rows.transpose(1, 2)), free)
    assert not torch.allclose(d(f, (rows.transpose(1, 2) + 1) % V)[:, 1], free[:, 1])
    again = DraftWithProjection.from_config(d.config)
    again.load_state_dict(d.state_dict())
    assert torch.equal(again.eval().propose_rows(f), rows)
    main = RFSQHead(feature_dim=D, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=16, num_heads=2, num_blocks=1).eval()
    for i in range(16):
        codes, stats = speculative_decode(main, d, f[i : i + 1])
        assert torch.equal(codes, main.greedy_decode(f[i : i + 1])) and stats.main_passes == L - stats.accepted_layers[0]


def test_soft_targets_loss_is_the_kl_to_the_main_distribution():
    torch.manual_seed(0)
    d = DraftWithProjection(feature_dim=D, width=16, coarse_layers=2, tokens_per_layer=T, num_levels=V, trunk="mlp").eval()
    f, codes = torch.randn(6, D), torch.randint(0, V, (6, T, L))
    own = d(f).softmax(dim=-1).detach()
    assert d.loss(f, codes, own).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full_like(own, 1.0 / V)
    log_q = d(f).log_softmax(-1)
    kl_per_token = (uniform * (uniform.log() - log_q)).sum(-1).mean()  # KL(main || draft), mean over tokens
    assert d.loss(f, codes, uniform).item() == pytest.approx(kl_per_token.item(), rel=1e-5) and kl_per_token.item() > 0


def test_main_distributions_are_the_teacher_forced_softmax():
    torch.manual_seed(1)
    head = RFSQHead(feature_dim=D, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=16, num_heads=2, num_blocks=1).eval()
    f = torch.randn(5, D)
    codes = head.greedy_decode(f)
    dist = main_distributions(head, f, codes, layers=range(0, 2), device=torch.device("cpu"), batch_size=2)
    torch.testing.assert_close(dist, head(f, codes)[:, :2].softmax(-1))


def test_candidate_acceptance_with_one_candidate_is_the_plain_agreement():
    torch.manual_seed(2)
    head = RFSQHead(feature_dim=D, num_layers=L, tokens_per_layer=T, num_levels=V, d_model=16, num_heads=2, num_blocks=1).eval()
    d = DraftWithProjection(feature_dim=D, width=16, coarse_layers=2, tokens_per_layer=T, num_levels=V).eval()
    f = torch.randn(40, D)
    acc = candidate_acceptance(head, d, f, device=torch.device("cpu"), counts=(1, 4), batch_size=16)
    plain = draft_main_agreement(head, d, f, device=torch.device("cpu"))
    assert acc["1"]["mean_accepted_layers"] == pytest.approx(plain["mean_accepted_layers"])
    assert acc["4"]["mean_accepted_layers"] >= acc["1"]["mean_accepted_layers"]
    assert sum(acc["4"]["accepted_layers_distribution"]) == pytest.approx(1.0)


def _fake_run(tmp_path, head="abc", chunks=({"features": [1.0, 2.0]}, {"features": [3.0, 4.0]})):
    (tmp_path / "eval_config.json").write_text(json.dumps({"checkpoints": {"head": head}}))
    (tmp_path / "episodes.jsonl").write_text(json.dumps({"task": 0, "trial": 0, "status": "success", "chunks": list(chunks)}) + "\n")
    return tmp_path


def test_rollout_features_are_read_back_and_checked(tmp_path):
    run = _fake_run(tmp_path)
    assert torch.equal(read_rollout_features(run, head_hash="abc"), torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ValueError, match="ran head abc, expected xyz"):
        read_rollout_features(run, head_hash="xyz")
    with pytest.raises(FileNotFoundError, match="--record-features"):
        read_rollout_features(tmp_path / "missing", head_hash="abc")
    # rows appended by parallel workers in another order give the same features, in (task, trial) order
    rows = [{"task": t, "trial": tr, "chunks": [{"features": [float(t), float(tr)]}]} for t, tr in ((1, 0), (0, 3), (0, 1))]
    (run / "episodes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_rollout_features(run, head_hash="abc").tolist() == [[0.0, 1.0], [0.0, 3.0], [1.0, 0.0]]
    (tmp_path / "empty").mkdir()
    empty = _fake_run(tmp_path / "empty", chunks=({"main_s": 0.1},))
    with pytest.raises(ValueError, match="no recorded features"):
        read_rollout_features(empty, head_hash="abc")


def test_flags_are_checked():
    with pytest.raises(ValueError, match="power of two"):
        EvalConfig(draft_candidates=3)
    assert EvalConfig(draft_candidates=4).run_name.endswith("_c4")
    with pytest.raises(ValueError, match="--drafted-layers must be >= 0"):
        EvalConfig(drafted_layers=-1)
    assert EvalConfig(drafted_layers=2).run_name.endswith("_d2")
    assert EvalConfig(drafted_layers=2).resume_key()["drafted_layers"] == 2
    assert "drafted_layers" not in EvalConfig().resume_key()  # runs written before the flag still resume
    assert "draft" not in EvalConfig(use_speculative_decoding=False).checkpoint_paths()
    with pytest.raises(ValueError, match="--draft-trunk"):
        PolicyTrainConfig(data="x.hdf5", draft_trunk="conv")
    with pytest.raises(ValueError, match="--draft-activation must be one of"):
        PolicyTrainConfig(data="x.hdf5", draft_trunk="mlp", draft_activation="swish")
    with pytest.raises(ValueError, match="needs --draft-trunk mlp"):
        PolicyTrainConfig(data="x.hdf5", draft_activation="relu")
    with pytest.raises(ValueError, match="--draft-rollouts needs --draft-targets main"):
        PolicyTrainConfig(data="x.hdf5", draft_rollouts="run", draft_targets="labels")
    with pytest.raises(ValueError, match="--coarse-layers must be >= 0"):
        PolicyTrainConfig(data="x.hdf5", coarse_layers=-1)
