"""FSQ / residual FSQ / ActionRFSQAE invariants, for every conditioning and layout."""

import pytest
import torch
import torch.nn.functional as F

from common.tokenizer.model import ActionRFSQAE
from common.tokenizer.fsq import FSQ
from common.tokenizer.residual_fsq import CONDITIONINGS, ResidualFSQ
from phase1_improved.rfsq_robust import ActionRFSQAE as SeedImport

CASES = [(c, layout) for c in CONDITIONINGS for layout in ("chunk", "timestep")]


def _trained(conditioning, layout, steps=3, seed=0):
    torch.manual_seed(seed)
    model = ActionRFSQAE(conditioning=conditioning, layout=layout, latent_dim=None, mlp_width=32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.rand(64, 8, 7) * 2 - 1
    for _ in range(steps):
        recon, _ = model(x)
        loss = F.mse_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x


def test_seed_import_path_is_the_common_class():
    assert SeedImport is ActionRFSQAE


def test_fsq_indices_codes_round_trip():
    fsq = FSQ(num_levels=7)
    u = torch.linspace(-1.5, 1.5, 101)
    codes, idx = fsq(u)
    assert idx.min() == 0 and idx.max() == 6
    assert torch.equal(fsq.indices_to_codes(idx), codes)
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    # evenly spaced levels on [-1, 1], clamped outside
    assert torch.allclose(torch.unique(codes), torch.arange(-3, 4) / 3.0)


def test_fsq_rejects_even_levels():
    with pytest.raises(ValueError, match="odd num_levels"):
        FSQ(num_levels=8)


@pytest.mark.parametrize("conditioning,layout", CASES)
def test_decode_from_indices_equals_forward(conditioning, layout):
    model, x = _trained(conditioning, layout)
    recon, codes = model(x)
    assert codes.shape == (64, model.tokens_per_layer, 8)
    assert codes.dtype == torch.long and codes.min() >= 0 and codes.max() < 7
    assert torch.equal(model.encode(x), codes)
    decoded = model.decode_from_indices(codes)
    assert (decoded - recon).abs().max().item() <= 1e-6


@pytest.mark.parametrize("conditioning,layout", CASES)
def test_prefix_decode_equals_k_layer_reconstruction(conditioning, layout):
    model, x = _trained(conditioning, layout)
    codes = model.encode(x)
    for k in range(1, 9):
        recon_k, codes_k = model(x, num_layers=k)
        assert torch.equal(codes_k, codes[..., :k])
        assert (model.decode_from_indices(codes[..., :k]) - recon_k).abs().max().item() <= 1e-6


def test_robust_tokens_decode_without_per_sample_statistics():
    """The earlier attempt's bug: decoding needed per-sample mean/std. Decoding one sample alone must
    equal decoding it inside a batch."""
    model, x = _trained("layernorm", "chunk")
    codes = model.encode(x)
    alone = torch.cat([model.decode_from_indices(codes[i : i + 1]) for i in range(4)])
    assert (alone - model.decode_from_indices(codes[:4])).abs().max() <= 1e-6


def test_gradients_reach_the_encoder_through_straight_through_path():
    for conditioning in CONDITIONINGS:
        model = ActionRFSQAE(conditioning=conditioning, layout="chunk", mlp_width=16)
        x = torch.rand(16, 8, 7) * 2 - 1
        recon, _ = model(x)
        F.mse_loss(recon, x).backward()
        grad = model.encoder.linear.weight.grad
        assert grad is not None and grad.abs().sum() > 0, conditioning


def test_learnable_scale_receives_gradient():
    model = ActionRFSQAE(conditioning="scale", mlp_width=16)
    x = torch.rand(16, 8, 7) * 2 - 1
    recon, _ = model(x)
    F.mse_loss(recon, x).backward()
    assert model.rfsq.log_scale.grad.abs().sum() > 0


def test_running_statistics_update_in_train_and_freeze_in_eval():
    rfsq = ResidualFSQ(dim=4, num_layers=3, conditioning="layernorm")
    z = torch.randn(32, 4) * 3 + 1
    rfsq.train()
    rfsq(z)
    first = rfsq.running_mean.clone(), rfsq.running_var.clone(), rfsq.running_absmax.clone()
    assert torch.allclose(first[0][0], z.mean(0), atol=1e-5)  # first batch initializes
    rfsq(z * 2)
    assert not torch.equal(rfsq.running_var, first[1])  # moved in train mode
    frozen = {k: v.clone() for k, v in rfsq.state_dict().items()}
    rfsq.eval()
    rfsq(torch.randn(32, 4) * 10)
    for k, v in rfsq.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert {"running_mean", "running_var", "running_absmax", "stats_initialized"} <= set(rfsq.state_dict())


def test_calibration_sets_exact_statistics_stage_by_stage():
    rfsq = ResidualFSQ(dim=3, num_layers=4, conditioning="layernorm")
    z = torch.randn(500, 3)
    rfsq.calibrate(z)
    _, _, residuals = rfsq.eval()(z, return_residuals=True)
    for layer, r in enumerate(residuals):
        assert torch.allclose(rfsq.running_mean[layer], r.mean(0), atol=1e-6)
        assert torch.allclose(rfsq.running_absmax[layer], (r - r.mean(0)).abs().amax(0), atol=1e-6)


def test_robust_layers_all_active_naive_layers_collapse():
    """On an in-range latent, naive stages after the first see less than half a step and emit the
    middle index; the robust stages keep using their levels."""
    z = torch.rand(4096, 8) * 1.6 - 0.8
    naive = ResidualFSQ(dim=8, num_layers=4, conditioning="none").eval()
    robust = ResidualFSQ(dim=8, num_layers=4, conditioning="layernorm")
    robust.calibrate(z)
    _, idx_n = naive(z)
    _, idx_r = robust.eval()(z)
    assert (idx_n[..., 1:] == 3).all()
    for layer in range(4):
        assert len(torch.unique(idx_r[..., layer])) >= 5
    qn, _ = naive(z)
    qr, _ = robust(z)
    assert F.mse_loss(qr, z) < F.mse_loss(qn, z) / 1000


def test_fixed_schedule_shrinks_error_geometrically():
    rfsq = ResidualFSQ(dim=4, num_layers=5, conditioning="fixed").eval()
    z = torch.rand(2048, 4) * 2 - 1
    errors = [F.mse_loss(rfsq(z, num_layers=k)[0], z).item() for k in range(1, 6)]
    for a, b in zip(errors, errors[1:]):
        assert a / b > 20  # ideal is 36x per stage for 7 levels


def test_bad_shapes_and_indices_are_rejected():
    model = ActionRFSQAE(layout="chunk", mlp_width=8)
    with pytest.raises(ValueError, match=r"\[B, 8, 7\]"):
        model(torch.zeros(2, 8, 6))
    with pytest.raises(ValueError, match="tokens_per_layer=16"):
        model.decode_from_indices(torch.zeros(2, 15, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        model.decode_from_indices(torch.full((2, 16, 3), 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[1, 8\]"):
        model.decode_from_indices(torch.zeros(2, 16, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown conditioning"):
        ActionRFSQAE(conditioning="batchnorm")


def test_use_layernorm_switch_and_config_rebuild():
    assert ActionRFSQAE(use_layernorm=True).conditioning == "layernorm"
    assert ActionRFSQAE(use_layernorm=False).conditioning == "none"
    assert ActionRFSQAE(conditioning="fixed").conditioning == "fixed"
    model, x = _trained("layernorm", "chunk")
    # one stored representation (the seed's switch is only a constructor keyword)
    assert model.config["conditioning"] == "layernorm" and "use_layernorm" not in model.config
    clone = ActionRFSQAE(**model.config)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    assert torch.equal(clone(x)[0], model(x)[0])
    old_style = ActionRFSQAE(**{**model.config, "use_layernorm": True})  # checkpoints written before this
    assert old_style.config == model.config
