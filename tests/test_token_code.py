"""TokenCode (per-token level values), expected-value decoding and the relabelled own-prefix loss."""

import pytest
import torch

from common.policy.head import RFSQHead
from common.policy.losses import MainLoss
from common.tokenizer.model import ActionRFSQAE
from common.tokenizer.token_code import TokenCode


def _calibrated(layout: str, conditioning: str = "layernorm") -> tuple[ActionRFSQAE, torch.Tensor]:
    torch.manual_seed(0)
    model = ActionRFSQAE(layout=layout, conditioning=conditioning, mlp_width=32)
    actions = torch.randn(256, 8, 7).cumsum(1) * 0.1
    model.calibrate(actions)
    return model.eval(), actions


@pytest.mark.parametrize("layout", ["chunk", "timestep", "dct"])
def test_latent_and_one_hot_expectation_reproduce_the_tokenizer_exactly(layout):
    model, actions = _calibrated(layout)
    code = TokenCode(model)
    codes = model.encode(actions[:32])
    for k in (1, 3, 8):
        exact = model.decode_from_indices(codes[..., :k])
        one_hot = torch.nn.functional.one_hot(codes[..., k - 1], code.num_levels).double()
        assert torch.equal(code.decode_expected(codes[..., : k - 1], one_hot), exact)
    assert code.values.shape == (8, model.tokens_per_layer, 7)


def test_expected_value_is_the_probability_weighted_level_value():
    model, actions = _calibrated("chunk")
    code = TokenCode(model)
    probs = torch.zeros(1, model.tokens_per_layer, 7)
    probs[..., 2], probs[..., 3] = 0.25, 0.75  # mean level index 2.75
    mean = code.expected_stage(0, probs)
    expected = 0.25 * code.values[0, :, 2] + 0.75 * code.values[0, :, 3]
    assert torch.allclose(mean[0], expected)
    assert torch.allclose(mean[0], code.center[0] + code.scale[0] * (2.75 - 3) / 3)


@pytest.mark.parametrize("conditioning", ["layernorm", "none"])
def test_encode_after_prefix_continues_the_code_and_corrects_a_wrong_prefix(conditioning):
    model, actions = _calibrated("chunk", conditioning)
    code = TokenCode(model)
    codes = model.encode(actions[:64])
    with torch.no_grad():
        latent = model._encode_latent(actions[:64])
    # the true prefix: the tokenizer's own later layers
    assert torch.equal(code.encode_after_prefix(latent, codes[..., :2]), codes[..., 2:])
    # a wrong first layer: the relabelled later layers decode closer to the chunk than the original ones
    wrong = codes[..., :1].clone()
    wrong[wrong < 6] += 1
    relabelled = code.encode_after_prefix(latent, wrong)
    err_relabelled = (code.latent(torch.cat([wrong, relabelled], 2)) - latent).pow(2).mean()
    err_original = (code.latent(torch.cat([wrong, codes[..., 1:]], 2)) - latent).pow(2).mean()
    assert err_relabelled < err_original


def test_token_code_refuses_a_training_mode_tokenizer():
    with pytest.raises(RuntimeError, match="eval"):
        TokenCode(ActionRFSQAE(layout="chunk", mlp_width=32))


def test_main_loss_defaults_to_cross_entropy_and_relabels_own_prefixes():
    model, actions = _calibrated("chunk")
    code = TokenCode(model)
    codes = model.encode(actions[:16])
    torch.manual_seed(1)
    head = RFSQHead(feature_dim=8, tokens_per_layer=model.tokens_per_layer, d_model=16, num_heads=2, num_blocks=1)
    feats = torch.randn(16, 8)
    assert torch.allclose(MainLoss(head, None)(feats, codes), head.loss(feats, codes))
    # p = 0: inputs and targets are the demo's tokens
    inputs, targets = MainLoss(head, code, own_prefix_prob=0.0).inputs_and_targets(feats, codes)
    assert torch.equal(inputs, codes) and torch.equal(targets, codes)
    # p = 1: every input layer is the model's own argmax, and targets follow the relabelling rule
    inputs, targets = MainLoss(head, code, own_prefix_prob=1.0).inputs_and_targets(feats, codes)
    own = head(feats, codes).argmax(-1).transpose(1, 2)
    assert torch.equal(inputs, own)
    latent = code.latent(codes)
    for layer in range(8):
        assert torch.equal(targets[..., layer], code.encode_after_prefix(latent, inputs[..., :layer])[..., 0])
    assert torch.equal(targets[..., 0], codes[..., 0])  # layer 0 has no prefix to correct
    # the ordinal term adds a non-negative amount
    ce = MainLoss(head, code)(feats, codes)
    ev = MainLoss(head, code, expected_value_weight=1.0)(feats, codes)
    assert ev > ce
    with pytest.raises(ValueError, match="own_prefix_prob"):
        MainLoss(head, code, own_prefix_prob=1.5)


def test_decode_choice_measures_every_depth_and_picks_the_smallest_within_tolerance():
    from common.policy.decode_choice import action_errors_by_depth, choose_decoding

    errors = {"argmax": [0.05, 0.021, 0.0200, 0.0200], "expected": [0.03, 0.0203, 0.0201, 0.0200]}
    choice = choose_decoding(errors, tolerance=0.02)
    assert (choice["layers"], choice["rule"]) == (2, "expected")  # 0.0203 <= 0.0200 * 1.02; argmax 0.021 is not
    assert choose_decoding(errors, tolerance=0.0)["layers"] == 3
    # on a real (tiny) head: one entry per depth and rule; a head that predicts the true codes has zero error at full depth
    model, actions = _calibrated("chunk")
    codes = model.encode(actions[:8])
    torch.manual_seed(0)
    head = RFSQHead(feature_dim=4, tokens_per_layer=model.tokens_per_layer, d_model=16, num_heads=2, num_blocks=1)
    errors = action_errors_by_depth(head, torch.randn(8, 4), codes, model)
    assert len(errors["argmax"]) == len(errors["expected"]) == 8 and min(errors["argmax"]) > 0

    class Oracle(torch.nn.Module):  # greedy decoding reads these logits: one-hot on the true codes
        num_layers, num_levels = 8, 7

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def greedy_decode(self, feats):
            return codes

        def forward(self, feats, prefix):
            return 50.0 * torch.nn.functional.one_hot(codes, 7).permute(0, 2, 1, 3).float()

    exact = action_errors_by_depth(Oracle(), torch.zeros(8, 4), codes, model)
    assert exact["argmax"][-1] == 0.0 and exact["expected"][-1] < 1e-10
    assert exact["argmax"][0] > exact["argmax"][2] > exact["argmax"][-1]
