"""Backbones: StateBackbone normalizer/round trip; OpenVLA prompt, preprocessing, feature selection (stub)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common.policy.backbones import StateBackbone, build_backbone
from common.policy.backbones.openvla import OpenVLAFeatureExtractor
from common.policy.backbones.openvla_preprocessing import (
    IGNORE_INDEX,
    OFT_ACTION_TOKEN_BEGIN_IDX,
    OFT_STOP_INDEX,
    PROMPT_SUFFIX_TOKEN_ID,
    build_openvla_prompt,
    preprocess_image_for_openvla,
    select_feature,
)


# ----------------------------------------------------------------------------- state backbone

def test_state_backbone_normalizer_shapes_and_round_trip():
    torch.manual_seed(0)
    bb = build_backbone("state", obs_dim=5, num_tasks=3, hidden_dim=16, feature_dim=8, task_embed_dim=4)
    obs = torch.randn(50, 5) * torch.tensor([1.0, 10.0, 0.1, 5.0, 0.0]) + 3.0
    with pytest.raises(RuntimeError, match="normalizer not fitted"):
        bb(obs[:2], torch.tensor([0, 1]))
    bb.fit_normalizer(obs)
    assert torch.allclose(bb.normalize(obs).mean(0), torch.zeros(5), atol=1e-5)
    assert bb.obs_std[4] == 1.0  # constant dim -> std 1, no division by zero
    feats = bb(obs[:4], torch.tensor([0, 1, 2, 0]))
    assert feats.shape == (4, 8) and bb.feature_dim == 8
    clone = StateBackbone.from_config(bb.config)
    clone.load_state_dict(bb.state_dict())
    assert torch.equal(clone(obs[:4], torch.tensor([0, 1, 2, 0])), feats)
    with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, 3\)"):
        bb(obs[:1], torch.tensor([3]))
    with pytest.raises(ValueError, match=r"obs: expected \[B, 5\]"):
        bb(obs[:1, :4], torch.tensor([0]))


def test_state_backbone_eef_relative_offsets_values_and_round_trip():
    from common.policy.backbones.state import EEF_RELATIVE_DIM
    from common.sim.libero_env import LOW_DIM_OBS_DIM

    obs = torch.zeros(2, LOW_DIM_OBS_DIM)
    obs[:, :3] = torch.tensor([[0.1, 0.2, 0.3], [0.0, 0.0, 1.0]])  # end effector
    obs[:, 16:19] = torch.tensor([[0.5, 0.5, 0.5], [1.0, 2.0, 3.0]])  # slot 0: the goal's object
    obs[:, 23] = 1.0
    obs[0, 24:27] = torch.tensor([0.4, 0.0, 0.1])  # slot 1: its target, present in the first sample only
    obs[0, 31] = 1.0
    bb = StateBackbone(obs_dim=LOW_DIM_OBS_DIM, num_tasks=2, hidden_dim=16, feature_dim=8, eef_relative=True)
    extra = bb.inputs(obs)[:, LOW_DIM_OBS_DIM:]
    assert extra.shape == (2, EEF_RELATIVE_DIM) and bb.obs_mean.shape == (LOW_DIM_OBS_DIM + EEF_RELATIVE_DIM,)
    assert torch.allclose(extra[0, :6], torch.tensor([0.4, 0.3, 0.2, 0.3, -0.2, -0.2]))
    assert torch.allclose(extra[1, :6], torch.tensor([1.0, 2.0, 2.0, 0.0, 0.0, 0.0]))  # absent slot 1 -> 0, not -eef
    assert torch.count_nonzero(extra[:, 6:-3]) == 0  # empty slots
    assert torch.allclose(extra[:, -3:], torch.tensor([[0.1, 0.5, 0.4], [0.0, 0.0, 0.0]]))  # object - target; absent target -> 0
    bb.fit_normalizer(torch.cat([obs, obs + 0.01]))
    clone = StateBackbone.from_config(bb.config)
    clone.load_state_dict(bb.state_dict())
    ids = torch.tensor([0, 1])
    assert clone.eef_relative and torch.equal(clone(obs, ids), bb(obs, ids))
    legacy = {k: v for k, v in bb.config.items() if k != "eef_relative"}  # checkpoints from before the option
    assert StateBackbone.from_config(legacy).eef_relative is False
    with pytest.raises(ValueError, match="eef_relative needs the 96-float"):
        StateBackbone(obs_dim=5, num_tasks=1, eef_relative=True)


def test_build_backbone_unknown_kind():
    with pytest.raises(ValueError, match="expected 'state' or 'openvla-oft', found 'resnet'"):
        build_backbone("resnet")


# ----------------------------------------------------------------------------- OpenVLA pure functions

def test_prompt():
    assert build_openvla_prompt("Pick up the Black Bowl") == (
        "In: What action should the robot take to pick up the black bowl?\nOut:"
    )
    with pytest.raises(ValueError):
        build_openvla_prompt("")


def test_preprocess_flip_size_range():
    img = np.zeros((128, 128, 3), dtype=np.uint8)
    img[:64, :, 0] = 255  # top half red
    out = preprocess_image_for_openvla(img, flip=False)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert out[10, 100, 0] == 255 and out[200, 100, 0] == 0
    flipped = preprocess_image_for_openvla(img, flip=True)
    assert flipped[10, 100, 0] == 0 and flipped[200, 100, 0] == 255  # 180 deg: top <-> bottom
    img2 = np.zeros((128, 128, 3), dtype=np.uint8)
    img2[:, :64, 1] = 200  # left half green
    f2 = preprocess_image_for_openvla(img2, flip=True)
    assert f2[100, 200, 1] == 200 and f2[100, 10, 1] == 0  # and left <-> right
    with pytest.raises(TypeError, match="uint8"):
        preprocess_image_for_openvla(img.astype(np.float32), flip=False)


def test_preprocess_center_crop_zooms_in():
    img = np.zeros((224, 224, 3), dtype=np.uint8)
    img[:, :3] = 255  # thin border at the left edge, outside the central 90%-area crop (6 px cut per side)
    no_crop = preprocess_image_for_openvla(img, flip=False, center_crop=False)
    crop = preprocess_image_for_openvla(img, flip=False, center_crop=True)
    assert no_crop[:, :3].min() == 255
    assert crop.max() == 0  # the border disappears
    mid = np.zeros((224, 224, 3), dtype=np.uint8)
    mid[102:122, 102:122] = 255  # centered square grows by 1/sqrt(0.9)
    grown = (preprocess_image_for_openvla(mid, flip=False, center_crop=True)[..., 0] > 127).sum()
    assert 20 * 20 / 0.9 * 0.9 < grown < 20 * 20 / 0.9 * 1.15


def test_select_feature_positions():
    B, S_text, n_patch, H = 2, 10, 4, 6
    S = S_text + n_patch
    hs = torch.arange(B * S * H, dtype=torch.float32).view(B, S, H)
    mask = torch.ones(B, S_text, dtype=torch.long)
    mask[1, -2:] = 0  # right padding on sample 1
    f = select_feature((hs * 0, hs), mask)  # tuple: last layer is used
    assert torch.equal(f[0], hs[0, S - 1]) and torch.equal(f[1], hs[1, S - 3])
    # 3 action placeholders + stop appended after the prompt
    f = select_feature(hs, mask, mode="last_prompt_token", num_action_tokens=3)
    assert torch.equal(f[0], hs[0, S - 5])
    f = select_feature(hs, mask, mode="action_tokens_mean", num_action_tokens=3)
    assert torch.allclose(f[0], hs[0, S - 4 : S - 1].mean(0)) and torch.allclose(f[1], hs[1, S - 6 : S - 3].mean(0))
    with pytest.raises(ValueError, match="mode"):
        select_feature(hs, mask, mode="cls")


# ----------------------------------------------------------------------------- extractor with a stub model

class StubProcessor:
    def __call__(self, text, image):
        ids = [1] + [100 + (ord(c) % 50) for c in text]  # <BOS> + fake tokens, no trailing 29871
        arr = np.array(image)
        self.last_image = arr
        px = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 255.0
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                "pixel_values": px}


class StubVisionBackbone:
    def __init__(self):
        self.n = 1

    def set_num_images_in_input(self, n):
        self.n = n


class StubOFT:
    """Has OpenVLA-OFT's forward signature; mimics its patch insertion after <BOS>."""

    hidden = 16
    n_patches = 5

    def __init__(self, fail=False):
        self.config = SimpleNamespace(text_config=SimpleNamespace(hidden_size=self.hidden))
        self.vision_backbone = StubVisionBackbone()
        self.fail = fail
        self.calls = []

    def __call__(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, inputs_embeds=None,
                 past_key_values=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                 output_projector_features=None, return_dict=None, proprio=None, proprio_projector=None,
                 noisy_actions=None, noisy_action_projector=None, diffusion_timestep_embeddings=None,
                 use_film=False):
        self.calls.append(dict(input_ids=input_ids, labels=labels, pixel_values=pixel_values,
                               attention_mask=attention_mask, output_hidden_states=output_hidden_states))
        if self.fail or labels is None:
            raise TypeError("'NoneType' object is not subscriptable")  # what OFT does without labels
        B, S_text = input_ids.shape
        S = S_text + self.n_patches * self.vision_backbone.n
        # hidden state at position p, channel c = p (so the test can read positions back)
        last = torch.arange(S, dtype=torch.float32)[None, :, None].expand(B, S, self.hidden)
        return SimpleNamespace(hidden_states=(last * 0, last), logits=None)


def _extractor(model, **kw):
    args = dict(model=model, processor=StubProcessor(), device="cpu", flip_images=True, jpeg_roundtrip=False,
                num_images_in_input=1)
    args.update(kw)
    return OpenVLAFeatureExtractor(**args)


def test_extractor_builds_oft_inputs_and_selects_action_tokens():
    model = StubOFT()
    ex = _extractor(model, num_action_tokens=4)
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    feats = ex([img, img], ["Open the drawer", "close it"])
    assert feats.shape == (2, 16) and feats.dtype == torch.float32 and ex.feature_dim == 16
    call = model.calls[0]
    ids, labels = call["input_ids"][0], call["labels"][0]
    assert call["output_hidden_states"] is True and call["pixel_values"].dtype == torch.bfloat16
    n_prompt = len("In: What action should the robot take to open the drawer?\nOut:") + 1
    assert ids[n_prompt] == PROMPT_SUFFIX_TOKEN_ID  # empty token appended after "Out:"
    assert ids[-1] == OFT_STOP_INDEX and (ids[n_prompt + 1 : -1] == 1).all() and len(ids) == n_prompt + 1 + 4 + 1
    assert (labels[: n_prompt + 1] == IGNORE_INDEX).all() and (labels[n_prompt + 1 : -1] > OFT_ACTION_TOKEN_BEGIN_IDX).all()
    # action placeholders sit at multimodal positions n_patches + n_prompt + 1 .. +4
    start = StubOFT.n_patches + n_prompt + 1
    assert torch.allclose(feats[0], torch.full((16,), start + 1.5))


def test_extractor_last_prompt_token_and_images():
    model = StubOFT()
    ex = _extractor(model, feature="last_prompt_token", center_crop=False)
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[:16] = 255
    feats = ex([img], ["push the plate"])
    n_text = len(build_openvla_prompt("push the plate")) + 1 + 1  # BOS + chars + 29871
    assert torch.allclose(feats[0], torch.full((16,), float(StubOFT.n_patches + n_text - 1)))
    seen = ex.processor.last_image
    assert seen.shape == (224, 224, 3) and seen[0, 0, 0] == 0 and seen[-1, 0, 0] == 255  # flipped


def test_extractor_two_images_concatenates_pixels():
    model = StubOFT()
    ex = _extractor(model, num_images_in_input=2)
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    ex([img], ["go"], wrist_images=[img])
    assert model.vision_backbone.n == 2 and model.calls[0]["pixel_values"].shape[1] == 6
    with pytest.raises(ValueError, match="wrist image"):
        ex([img], ["go"])


def test_extractor_raises_when_forward_fails():
    ex = _extractor(StubOFT(fail=True))
    with pytest.raises(RuntimeError, match="OpenVLA forward failed"):
        ex([np.zeros((8, 8, 3), dtype=np.uint8)], ["go"])


def test_extractor_jpeg_roundtrip_keeps_range():
    pytest.importorskip("PIL")
    model = StubOFT()
    ex = _extractor(model, jpeg_roundtrip=True)
    img = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    out = ex.prepare_image(img)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------- shared VLA input preparation
def test_prepare_vla_inputs_flips_selects_cameras_and_checks():
    from common.policy.backbones.vla_inputs import VLAInputSpec, oft_proprio, prepare_vla_inputs

    spec = VLAInputSpec(checkpoint="x", image_size=8)
    img = np.zeros((2, 8, 8, 3), np.uint8)
    img[:, 0, 0, 0] = 255  # top-left corner
    p = oft_proprio(np.ones((2, 3)), np.full((2, 3), 2.0), np.full((2, 2), 3.0))
    assert p.shape == (2, 8) and p[0].tolist() == [1, 1, 1, 2, 2, 2, 3, 3]
    b = prepare_vla_inputs(img, ["a", "b"], spec=spec, flip=True, wrist_images=img, proprio=p)
    assert b.images[0][-1, -1, 0] == 255 and b.images[0][0, 0, 0] == 0 and b.wrist_images[1][-1, -1, 0] == 255
    assert prepare_vla_inputs(img, ["a", "b"], spec=spec, flip=False, wrist_images=img, proprio=p).images[0][0, 0, 0] == 255
    no_wrist = VLAInputSpec(checkpoint="x", image_size=8, use_wrist=False, use_proprio=False)
    b = prepare_vla_inputs(img, ["a", "b"], spec=no_wrist, flip=False, wrist_images=img, proprio=p)
    assert b.wrist_images is None and b.proprio is None and no_wrist.cameras == ("agentview",)
    with pytest.raises(ValueError, match="wrist images"):
        prepare_vla_inputs(img, ["a", "b"], spec=spec, flip=False, proprio=p)
    with pytest.raises(ValueError, match="expected 8x8 frames"):
        prepare_vla_inputs(np.zeros((2, 16, 16, 3), np.uint8), ["a", "b"], spec=spec, flip=False, wrist_images=img, proprio=p)
    with pytest.raises(TypeError, match="uint8"):
        prepare_vla_inputs(img.astype(np.float32), ["a", "b"], spec=spec, flip=False, wrist_images=img, proprio=p)
    with pytest.raises(ValueError, match=r"proprio: expected finite \[2, 8\]"):
        prepare_vla_inputs(img, ["a", "b"], spec=spec, flip=False, wrist_images=img, proprio=p[:, :7])


def test_vla_input_spec_round_trips_through_cache_attrs_and_names_missing_keys():
    from common.policy.backbones.vla_inputs import VLAInputSpec, unnorm_key_for

    spec = VLAInputSpec(checkpoint="moojink/x", center_crop=False, image_size=256)
    attrs = {k: (np.bool_(v) if isinstance(v, bool) else v) for k, v in spec.attrs().items()}  # as h5py returns them
    assert VLAInputSpec.from_attrs({**attrs, "suite": "libero_object"}, "c.h5") == spec
    with pytest.raises(ValueError, match=r"c\.h5: feature cache attributes lack \['jpeg_roundtrip'\]"):
        VLAInputSpec.from_attrs({k: v for k, v in attrs.items() if k != "jpeg_roundtrip"}, "c.h5")
    assert unnorm_key_for(spec, "libero_goal") == "libero_goal_no_noops"
    assert unnorm_key_for(VLAInputSpec(checkpoint="x", use_proprio=False), "libero_90") is None
    with pytest.raises(ValueError, match="no OpenVLA-OFT proprio statistics"):
        unnorm_key_for(spec, "libero_90")


def test_extractor_timer_splits_preprocess_and_forward():
    from common.decoding.timing import StageTimer

    timer = StageTimer(cuda_sync=False)
    ex = _extractor(StubOFT())
    img = np.zeros((16, 16, 3), dtype=np.uint8)
    ex([img, img], ["go", "go"], timer=timer)
    assert timer.counts == {"preprocess": 2, "backbone": 2}


def test_cache_refuses_an_extractor_that_flips_itself(tmp_path):
    import h5py

    from common.policy.feature_cache import cache_features_for_file

    path = tmp_path / "d.hdf5"
    with h5py.File(path, "w") as f:
        g = f.create_group("data/demo_0")
        g.create_dataset("actions", data=np.zeros((2, 7)))
        g.create_dataset("obs/agentview_rgb", data=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="flip_images=False"):
        cache_features_for_file(_extractor(StubOFT()), path, tmp_path / "c.h5", use_wrist=False, use_proprio=False, progress=False)


def test_spec_for_head_prefers_the_recorded_spec_and_requires_agreeing_caches(tmp_path):
    from pathlib import Path

    import h5py

    from common.policy.backbones.vla_inputs import VLAInputSpec
    from common.policy.feature_cache import spec_for_head

    spec = VLAInputSpec(checkpoint="moojink/x")
    assert spec_for_head({"vla_inputs": spec.attrs()}, {}, Path("h.pt")) == spec
    paths = []
    for i, crop in enumerate((True, False)):
        paths.append(tmp_path / f"c{i}.h5")
        with h5py.File(paths[-1], "w") as f:
            f.attrs.update({**spec.attrs(), "center_crop": crop})
    extra = {"train_config": {"backbone": "openvla-oft", "feature_cache": str(paths[0])}}
    assert spec_for_head({}, extra, Path("h.pt")) == spec
    extra["train_config"]["feature_cache"] = ",".join(map(str, paths))
    with pytest.raises(ValueError, match="different settings"):
        spec_for_head({}, extra, Path("h.pt"))
    extra["train_config"]["feature_cache"] = str(tmp_path / "missing.h5")
    with pytest.raises(FileNotFoundError, match="missing.h5: feature cache of head h.pt not found"):
        spec_for_head({}, extra, Path("h.pt"))
    with pytest.raises(ValueError, match="expected 'openvla-oft'"):
        spec_for_head({}, {"train_config": {"backbone": "state"}}, Path("h.pt"))
