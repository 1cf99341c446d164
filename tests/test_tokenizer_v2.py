"""Tokenizer v2: the DCT layout (no autoencoder floor), reach estimators, calibration in a user's
own loop, the human-like operator model, and old checkpoints."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.data.episodes import make_chunks, synthetic_episodes
from common.data.normalization import ActionNormalizer
from common.sim.operator_model import HumanOperator, OperatorConfig, humanize_actions
from common.tokenizer.model import ActionRFSQAE, dct_matrix, load_tokenizer, save_tokenizer


def _human_like_chunks(num_episodes=12, seed=0):
    """Synthetic episodes passed open-loop through the operator model, normalized, as chunks."""
    episodes = synthetic_episodes(num_episodes, seed=seed)
    for i, e in enumerate(episodes):
        e.actions = humanize_actions(e.actions, seed=seed * 1000 + i)
    raw = make_chunks(episodes, chunk_len=8, stride=1)
    norm = ActionNormalizer.fit(raw.reshape(-1, 7))
    return torch.from_numpy(norm.normalize(raw)).float(), norm


@torch.no_grad()
def _mse_per_layer(model, x):
    return [F.mse_loss(model(x, num_layers=k)[0], x).item() for k in range(1, model.num_layers + 1)]


def test_dct_basis_is_orthonormal_and_the_layout_inverts_exactly():
    d = dct_matrix(8)
    assert torch.allclose(d @ d.T, torch.eye(8), atol=1e-6)
    # A constant signal has energy only in frequency 0.
    assert torch.allclose(d @ torch.ones(8), torch.tensor([8**0.5] + [0.0] * 7), atol=1e-5)
    model = ActionRFSQAE(layout="dct")
    x = torch.rand(32, 8, 7) * 2 - 1
    assert model.tokens_per_layer == 56 and list(model.parameters()) == []
    assert (model._decode_latent(model._encode_latent(x)) - x).abs().max() < 1e-6
    # frequency-major: latent number f * 7 + d is frequency f of action dim d
    z = model._encode_latent(x)
    assert torch.allclose(z[:, 3 * 7 + 2], x[:, :, 2] @ d[3], atol=1e-6)


def test_dct_truncation_keeps_the_lowest_frequencies():
    model = ActionRFSQAE(layout="dct", latent_dim=28)
    assert model.tokens_per_layer == 28
    t = torch.arange(8.0)
    smooth = torch.stack([torch.cos(torch.pi * (t + 0.5) * 1 / 8)] * 7, dim=-1)[None]  # frequency 1 only
    assert (model._decode_latent(model._encode_latent(smooth)) - smooth).abs().max() < 1e-6
    with pytest.raises(ValueError, match="multiple of action_dim=7"):
        ActionRFSQAE(layout="dct", latent_dim=16)


def test_dct_robust_every_layer_earns_its_place_on_human_like_data():
    x, _ = _human_like_chunks()
    train, val = x[: len(x) * 3 // 4], x[len(x) * 3 // 4 :]
    robust, naive = ActionRFSQAE(layout="dct"), ActionRFSQAE(layout="dct", conditioning="none")
    robust.calibrate(train)
    mses = _mse_per_layer(robust.eval(), val)
    naive_mse = _mse_per_layer(naive.eval(), val)[-1]
    assert mses[-1] <= 1e-4 and mses[-1] <= 0.1 * naive_mse, (mses[-1], naive_mse)
    # Every added layer cuts the error >= 1.5x until the float32 floor (~1e-12 in normalized units).
    for k in range(1, 8):
        if mses[k - 1] > 1e-11:
            assert mses[k - 1] / mses[k] >= 1.5, (k, mses)


@pytest.mark.parametrize("layout", ["dct", "chunk", "timestep"])
def test_decoding_is_bit_exact_for_every_prefix(layout):
    x, _ = _human_like_chunks(num_episodes=3)
    model = ActionRFSQAE(layout=layout, mlp_width=32)
    model.train()
    model(x)
    model.eval()
    codes = model.encode(x)
    for k in range(1, 9):
        assert torch.equal(model.decode_from_indices(codes[..., :k]), model(x, num_layers=k)[0]), k


@pytest.mark.parametrize("reach", ["quantile", "std"])
def test_reach_estimators_keep_the_first_stage_clipping_safe(reach):
    from common.tokenizer.residual_fsq import ResidualFSQ

    z = torch.randn(4000, 5)
    z[0] = 40.0  # one heavy outlier
    rfsq = ResidualFSQ(dim=5, num_layers=4, conditioning="layernorm", reach=reach)
    rfsq.calibrate(z)
    assert torch.allclose(rfsq.running_absmax[0], (z - z.mean(0)).abs().amax(0))  # stage 0: the max deviation
    _, _, residuals = rfsq.eval()(z, return_residuals=True)
    r1 = residuals[1] - residuals[1].mean(0)
    assert (rfsq.running_absmax[1] < r1.abs().amax(0)).all()  # later stages: narrower than the max
    with pytest.raises(ValueError, match="unknown reach"):
        ResidualFSQ(dim=2, reach="max")


def _plain_loop(model, train, steps=300):
    """recon, _ = model(x); F.mse_loss(recon, x); AdamW 1e-3; batch 64 (no optimizer when nothing to train)."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3) if params else None
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = train[torch.randint(len(train), (64,), generator=gen)]
        recon, _ = model(batch)
        loss = F.mse_loss(recon, batch)
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


def test_the_default_layout_is_the_chunk_autoencoder_with_16_tokens_per_layer():
    """The default follows the closed-loop A/B (results/pipeline_layout_ab): a policy predicts 16 tokens
    per layer far better than the DCT layout's 56."""
    model = ActionRFSQAE()
    assert model.layout == "chunk" and model.tokens_per_layer == 16 and model.num_layers == 8


def test_a_plain_user_loop_with_the_dct_layout_meets_the_goals():
    """layout="dct", a user's loop, then eval(): robust 8-layer MSE <= 1e-4 and >= 90% below naive."""
    x, _ = _human_like_chunks()
    train, val = x[: len(x) * 3 // 4], x[len(x) * 3 // 4 :]
    robust = _plain_loop(ActionRFSQAE(use_layernorm=True, layout="dct"), train)
    naive = _plain_loop(ActionRFSQAE(use_layernorm=False, layout="dct"), train)
    assert robust.calibration_pending
    robust.eval(), naive.eval()
    assert robust.is_calibrated
    mses, naive_mse = _mse_per_layer(robust, val), _mse_per_layer(naive, val)[-1]
    assert mses[-1] <= 1e-4 and mses[-1] <= 0.1 * naive_mse, (mses, naive_mse)
    codes = robust.encode(val)
    for k in range(1, 9):
        assert torch.equal(robust.decode_from_indices(codes[..., :k]), robust(val, num_layers=k)[0])


def test_a_plain_user_loop_on_a_learned_layout_calibrates_itself_on_eval():
    x, _ = _human_like_chunks()
    train, val = x[: len(x) * 3 // 4], x[len(x) * 3 // 4 :]
    results = {}
    for conditioning in ("none", "layernorm"):
        torch.manual_seed(0)
        model = _plain_loop(ActionRFSQAE(conditioning=conditioning, layout="chunk", latent_dim=56, mlp_width=64), train)
        if conditioning == "layernorm":
            assert model.calibration_pending and not model.is_calibrated
            seen = torch.cat(model._seen)
        model.eval()
        results[conditioning] = _mse_per_layer(model, val)
        if conditioning == "layernorm":
            assert model.is_calibrated and not model.calibration_pending
            reference = ActionRFSQAE.from_config(model.config)
            reference.load_state_dict(model.state_dict())
            reference.calibrate(seen)
            assert torch.equal(reference.rfsq.running_absmax, model.rfsq.running_absmax)
            codes = model.encode(val)
            for k in (1, 3, 8):
                assert torch.equal(model.decode_from_indices(codes[..., :k]), model(val, num_layers=k)[0])
    # Robust beats naive with the same loop, but the autoencoder's own error is a floor (no 1e-4 here).
    assert results["layernorm"][-1] < 0.85 * results["none"][-1], results
    assert results["layernorm"][-1] > 1e-4


def test_saving_refuses_an_uncalibrated_robust_tokenizer(tmp_path):
    norm = ActionNormalizer.fit(np.random.default_rng(0).uniform(-1, 1, (100, 7)))
    with pytest.raises(ValueError, match="not calibrated"):
        save_tokenizer(tmp_path / "t.pt", ActionRFSQAE(layout="dct"), norm)
    model = ActionRFSQAE(layout="dct")
    model.train()
    x = torch.rand(256, 8, 7) * 2 - 1
    model(x)
    with pytest.raises(ValueError, match="model.eval"):
        save_tokenizer(tmp_path / "t.pt", model, norm)  # training passes not yet calibrated
    model.eval()
    save_tokenizer(tmp_path / "t.pt", model, norm)
    loaded = load_tokenizer(tmp_path / "t.pt")
    assert loaded.model.layout == "dct"
    assert torch.equal(loaded.model(x)[0], model(x)[0])


def test_old_default_checkpoint_config_still_loads(tmp_path):
    """A checkpoint of the previous default (chunk/16, config without the reach keys) loads unchanged."""
    from common.checkpoints import save_checkpoint

    torch.manual_seed(0)
    old = ActionRFSQAE(layout="chunk", latent_dim=16, mlp_width=16, first_stage_margin=1.0)  # the old stage-0 reach
    old.train()
    old(torch.rand(64, 8, 7) * 2 - 1)
    old.eval()
    new_keys = ("reach", "reach_quantile", "reach_std", "first_stage_margin")
    config = {k: v for k, v in old.config.items() if k not in new_keys}
    norm = ActionNormalizer.fit(np.random.default_rng(0).uniform(-1, 1, (100, 7)))
    save_checkpoint(tmp_path / "old.pt", kind="rfsq_tokenizer", model=old, config=config, normalizer=norm.to_dict())
    loaded = load_tokenizer(tmp_path / "old.pt").model
    x = torch.rand(8, 8, 7) * 2 - 1
    assert loaded.layout == "chunk" and loaded.tokens_per_layer == 16
    assert torch.equal(loaded(x)[0], old(x)[0])


def test_train_tokenizer_handles_a_fixed_transform(tmp_path):
    from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(layout="dct", num_episodes=6, epochs=1, progress=False, models_dir=str(tmp_path))
    summary = train_tokenizer(cfg)
    loaded = load_tokenizer(summary["best_checkpoint"])
    assert loaded.model.layout == "dct" and loaded.model.tokens_per_layer == 56  # all 8 frequencies of 7 dims
    assert summary["best_val_mse"] < 1e-6
    four = train_tokenizer(dataclasses.replace(cfg, dct_frequencies=4, overwrite=True, models_dir=str(tmp_path / "four")))
    assert load_tokenizer(four["best_checkpoint"]).model.tokens_per_layer == 28


# --- the human-like operator -------------------------------------------------------------------------
def test_operator_is_seeded_and_adds_pauses_noise_and_gripper_delays():
    episodes = synthetic_episodes(4, seed=1)
    raw = np.concatenate([e.actions for e in episodes])
    a, b = humanize_actions(raw, seed=3), humanize_actions(raw, seed=3)
    assert np.array_equal(a, b) and not np.array_equal(a, humanize_actions(raw, seed=4))
    assert np.abs(a).max() <= 1.0
    arm_diff = np.diff(a[:, :6], axis=0)
    assert arm_diff.std() > 1.5 * np.diff(raw[:, :6], axis=0).std()  # rougher than the source
    # Gripper changes happen at most gripper_delay_max steps late, never early, never dropped.
    delay_max = OperatorConfig().gripper_delay_max
    src_switch = np.flatnonzero(np.diff(raw[:, 6]) != 0)
    out_switch = np.flatnonzero(np.diff(a[:, 6]) != 0)
    assert len(src_switch) == len(out_switch) > 0
    assert np.all((out_switch - src_switch >= 0) & (out_switch - src_switch <= delay_max))


def test_operator_pauses_hold_the_arm():
    op = HumanOperator(OperatorConfig(pause_rate=0.5, noise_std=0.0, tremor_std=0.0))
    op.reset(np.random.default_rng(0))
    out = np.array([op.apply(np.full(6, 0.5), -1.0)[0] for _ in range(200)])
    paused = np.abs(out).max(1) == 0.0
    assert 0.3 < paused.mean() < 0.95


def test_operator_option_is_validated():
    from common.sim.operator_model import make_operator
    from common.sim.scripted_expert import ExpertConfig

    assert make_operator("none") is None and isinstance(make_operator("human"), HumanOperator)
    with pytest.raises(ValueError, match="operator must be one of"):
        ExpertConfig(operator="robot")
    with pytest.raises(ValueError, match="pause_steps"):
        OperatorConfig(pause_steps=(5, 2))
