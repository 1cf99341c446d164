"""Phase 3 with the OpenVLA-OFT backbone, locally: a small deterministic stand-in with OFT's forward
signature (defined here, registered in ``vla_inputs.MODEL_LOADERS`` under a test-only checkpoint id)
goes through the real extractor (JPEG, resize, crop, prompt, proprio), the real feature cache, Phase 2
training on the cache, and the closed loop with LIBERO cameras on: rendering, preprocessing, caching
parity (eval-time features == cached features, exactly), the latency breakdown, Modal sharding and
resume, and ``--plan``."""

import json
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.data.episodes import synthetic_episodes
from common.decoding.timing import StageTimer
from common.eval.config import EvalConfig
from common.eval.policy import TokenPolicy
from common.eval.summary import latency_breakdown, summarize
from common.policy.backbones import vla_inputs
from common.policy.backbones.vla_inputs import (
    VLAInputSpec, build_extractor, env_observation_inputs, run_extractor,
)
from common.policy.feature_cache import cache_features_for_file, spec_for_head
from common.policy.train import PolicyTrainConfig, train_policy
from common.sim.libero_env import quat_to_axis_angle
from common.sim.libero_env import LiberoTaskEnv, get_suite
from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

SUITE = "libero_object"
STANDIN = "test/tiny-oft-standin"  # registered below; not a Hugging Face id, unreachable from any CLI
HIDDEN = 16
SIZE = 64  # rendered camera side (small: rendering dominates the run time)


# ----------------------------------------------------------------------------- the stand-in backbone
class TinyProcessor:
    """OpenVLA's processor interface: (prompt, PIL image) -> input_ids, attention_mask, pixel_values."""

    def __call__(self, text, image):
        ids = [1] + [3 + ord(c) % 90 for c in text]
        px = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 255.0
        return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long), "pixel_values": px}


class TinyOFT(nn.Module):
    """OFT's forward signature; hidden states depend on the pixels, the prompt and the proprio token."""

    def __init__(self):
        super().__init__()
        self.llm_dim = HIDDEN
        self.vision_backbone = SimpleNamespace(n=1, set_num_images_in_input=lambda n: setattr(self.vision_backbone, "n", n))
        self.img = nn.Linear(3 * 16, HIDDEN)
        self.tok = nn.Embedding(97, HIDDEN)
        self.norm_stats = {"libero_object_no_noops": {"proprio": {"q01": [-1.0] * 8, "q99": [1.0] * 8}}}

    def forward(self, input_ids=None, attention_mask=None, pixel_values=None, labels=None, output_hidden_states=None,
                return_dict=None, proprio=None, proprio_projector=None, **unused):
        assert labels is not None and output_hidden_states
        B = input_ids.shape[0]
        px = pixel_values.float()
        n = px.shape[1] // 3
        patches = self.img(F.adaptive_avg_pool2d(px, 4).reshape(B, n, 3 * 16))
        if proprio is not None:
            patches = torch.cat([patches, proprio_projector(proprio.float())[:, None]], dim=1)
        text = self.tok(input_ids % 97)
        hs = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1) + patches.mean(1, keepdim=True)
        return SimpleNamespace(hidden_states=(hs * 0, torch.tanh(hs)))


def tiny_loader(spec, device):
    with torch.random.fork_rng():
        torch.manual_seed(0)  # same weights on every load (cache time and eval time)
        model, projector = TinyOFT().eval(), nn.Linear(8, HIDDEN).eval()
    return model, TinyProcessor(), projector if spec.use_proprio else None


@pytest.fixture(autouse=True)
def standin_registered(monkeypatch):
    monkeypatch.setitem(vla_inputs.MODEL_LOADERS, STANDIN, tiny_loader)


SPEC = VLAInputSpec(checkpoint=STANDIN, image_size=SIZE)


def extractor():
    return build_extractor(SPEC, suite=SUITE, device="cpu")


# ----------------------------------------------------------------------------- fixtures
def write_demo_file(path, frames, *, upright=True):
    """frames: list of demos, each a dict of per-step arrays (agentview, wrist, eef_pos, eef_quat, gripper, actions)."""
    instruction = get_suite(SUITE).get_task(0).language
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        if upright:
            data.attrs["tasks"] = json.dumps([{"task_id": 0}])  # our collector's layout: images stored upright
        for i, d in enumerate(frames):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=d["actions"])
            flip = (lambda a: a) if upright else (lambda a: a[:, ::-1, ::-1])  # official files: upside down
            g.create_dataset("obs/agentview_rgb", data=flip(d["agentview"]))
            g.create_dataset("obs/eye_in_hand_rgb", data=flip(d["wrist"]))
            g.create_dataset("obs/ee_pos", data=d["eef_pos"])
            g.create_dataset("obs/ee_ori", data=quat_to_axis_angle(d["eef_quat"]))
            g.create_dataset("obs/gripper_states", data=d["gripper"])
            g.attrs["task_id"] = 0
            g.attrs["language_instruction"] = instruction
    return path


@pytest.fixture(scope="module")
def rendered():
    """A few real LIBERO frames (cameras on) of libero_object task 0, trial 0, and their observations."""
    env = LiberoTaskEnv(suite=SUITE, task_id=0, cameras=("agentview", "wrist"), camera_size=SIZE)
    obs = [env.reset_to_trial(0)]
    for _ in range(2):
        obs.append(env.step([0.2, 0.0, 0.1, 0.0, 0.0, 0.0, -1.0])[0])
    env.close()
    demo = {
        "agentview": np.stack([o["agentview_rgb"] for o in obs]), "wrist": np.stack([o["eye_in_hand_rgb"] for o in obs]),
        "eef_pos": np.stack([o["robot0_eef_pos"] for o in obs]), "eef_quat": np.stack([o["robot0_eef_quat"] for o in obs]),
        "gripper": np.stack([o["robot0_gripper_qpos"] for o in obs]), "actions": np.zeros((len(obs), 7)),
    }
    return {"obs": obs, "demo": demo, "instruction": get_suite(SUITE).get_task(0).language}


@pytest.fixture(scope="module")
def vla_models(tmp_path_factory):
    """Tokenizer + openvla-oft head/draft trained on features the stand-in cached from image demos."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vla")
    mp = pytest.MonkeyPatch()
    mp.setitem(vla_inputs.MODEL_LOADERS, STANDIN, tiny_loader)
    rng = np.random.default_rng(0)
    demos = []
    for ep in synthetic_episodes(4, seed=2, length=(24, 32)):
        T = len(ep)
        demos.append({
            "agentview": rng.integers(0, 256, (T, SIZE, SIZE, 3), dtype=np.uint8), "wrist": rng.integers(0, 256, (T, SIZE, SIZE, 3), dtype=np.uint8),
            "eef_pos": rng.normal(size=(T, 3)), "eef_quat": np.tile([0.0, 0.0, 0.0, 1.0], (T, 1)), "gripper": rng.normal(size=(T, 2)) * 0.01,
            "actions": ep.actions.astype(np.float64),
        })
    data = write_demo_file(root / "demos.hdf5", demos)
    cache = root / "demos.feats.h5"
    cache_features_for_file(extractor(), data, cache, progress=False)
    models = root / "models"
    train_tokenizer(TokenizerTrainConfig(data=str(data), epochs=1, num_episodes=4, latent_dim=4, batch_size=256,
                                         models_dir=str(models), progress=False, use_layernorm=True))
    summary = train_policy(PolicyTrainConfig(
        data=str(data), models_dir=str(models), results_dir=str(root / "results"), backbone="openvla-oft", feature_cache=str(cache),
        epochs=1, batch_size=64, d_model=32, num_blocks=1, num_heads=2, draft_width=16, timing_repeats=3, progress=False,
    ))
    yield {"root": root, "models": models, "cache": cache, "summary": summary}
    mp.undo()


def _cfg(vla_models, out, **kw):
    base = dict(task_suite=SUITE, tasks="0", num_trials=2, max_steps=8, workers=1, models_dir=str(vla_models["models"]), out=str(out))
    return EvalConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("upright", [True, False], ids=["collector-upright", "official-upside-down"])
def test_eval_time_features_equal_cached_features_of_the_same_frames(rendered, tmp_path, upright):
    data = write_demo_file(tmp_path / "rendered.hdf5", [rendered["demo"]], upright=upright)
    cache = tmp_path / "rendered.feats.h5"
    res = cache_features_for_file(extractor(), data, cache, progress=False)
    assert res["flip_applied"] is (not upright) and res["written"] == 1
    with h5py.File(cache, "r") as f:
        cached = f["features/demo_0"][()]
        spec = VLAInputSpec.from_attrs(dict(f.attrs), str(cache))
    assert spec == SPEC and spec.cameras == ("agentview", "wrist")
    fresh = extractor()  # eval builds its own extractor from the recorded spec
    for k, obs in enumerate(rendered["obs"]):
        live = run_extractor(fresh, env_observation_inputs(obs, rendered["instruction"], spec=spec))
        assert torch.equal(live[0], torch.from_numpy(cached[k]))
    assert not np.allclose(cached[0], cached[-1])  # the features do follow the frames


def test_a_plain_callable_cache_cannot_be_evaluated_and_sizes_must_match(rendered, tmp_path):
    data = write_demo_file(tmp_path / "r.hdf5", [rendered["demo"]])
    cache = tmp_path / "r.feats.h5"
    cache_features_for_file(lambda im, tasks, **kw: torch.ones(len(im), HIDDEN), data, cache, progress=False)
    head_extra = {"train_config": {"backbone": "openvla-oft", "feature_cache": str(cache)}}
    with pytest.raises(ValueError, match="lack .*center_crop.*recompute"):
        spec_for_head({}, head_extra, tmp_path / "head.pt")
    big = VLAInputSpec(checkpoint=STANDIN, image_size=128)
    with pytest.raises(ValueError, match="expected 128x128 frames .* found 64x64"):
        env_observation_inputs(rendered["obs"][0], "go", spec=big)
    with pytest.raises(ValueError, match="eye_in_hand_rgb"):
        env_observation_inputs({k: v for k, v in rendered["obs"][0].items() if k != "eye_in_hand_rgb"}, "go", spec=SPEC)


# ----------------------------------------------------------------------------- the policy
def test_token_policy_reads_the_backbone_from_the_head_and_times_every_stage(vla_models, rendered, tmp_path):
    policy = TokenPolicy(_cfg(vla_models, tmp_path / "p"))
    assert policy.policy.backbone_kind == "openvla-oft" and policy.vla_spec == SPEC
    assert policy.cameras == ("agentview", "wrist") and policy.camera_size == SIZE
    obs = rendered["obs"][1]
    assert policy.policy_input(None, obs) is obs
    task = policy.task_index(SUITE, 0, rendered["instruction"])
    actions, info = policy.plan(obs, task)
    assert actions.shape == (8, 7) and np.isfinite(actions).all()
    assert info["identical_to_main_only"] is True
    parts = info["preprocess_s"] + info["backbone_s"] + info["draft_s"] + info["main_s"] + info["tokenizer_decode_s"]
    assert info["policy_s"] == pytest.approx(parts) and min(info["preprocess_s"], info["backbone_s"]) > 0
    # the features the head decoded are the cached-path features of this frame
    feats = run_extractor(extractor(), env_observation_inputs(obs, rendered["instruction"], spec=SPEC))
    assert torch.equal(policy._features(obs, task, StageTimer()), feats)
    with pytest.raises(TypeError, match="env observation dict"):
        policy.plan(np.zeros(96, np.float32), task)
    with pytest.raises(ValueError, match="trained with the 'openvla-oft' backbone"):
        TokenPolicy(_cfg(vla_models, tmp_path / "p", backbone="state"))


def test_latency_breakdown_values():
    chunks = [
        {"env_step_s": 0.4, "preprocess_s": 0.01, "backbone_s": 0.05, "draft_s": 0.001, "main_s": 0.004, "tokenizer_decode_s": 0.001,
         "policy_s": 0.066, "ref_main_s": 0.008, "ref_policy_s": 0.069},
        {"env_step_s": 0.4, "preprocess_s": 0.01, "backbone_s": 0.05, "draft_s": 0.001, "main_s": 0.006, "tokenizer_decode_s": 0.001,
         "policy_s": 0.068, "ref_main_s": 0.008, "ref_policy_s": 0.069},
    ]
    b = latency_breakdown(chunks, env_steps=8)
    assert b["per_chunk_ms"]["backbone"] == pytest.approx(50.0) and b["per_env_step_ms"]["env_step"] == pytest.approx(100.0)
    assert b["backbone_share_of_policy"] == pytest.approx(60.0 / 67.0)
    assert b["speculation_saving_ms_per_chunk"] == pytest.approx(8.0 - 6.0)
    assert b["speculation_saving_share_of_main_only_policy"] == pytest.approx(2.0 / 69.0)
    assert b["max_speculation_saving_share_of_main_only_policy"] == pytest.approx(8.0 / 69.0)
    assert latency_breakdown([], env_steps=0) is None


# ----------------------------------------------------------------------------- closed loop, sharding, resume
@pytest.mark.filterwarnings("ignore:The run_shard function is executing locally")
def test_closed_loop_with_cameras_shards_resume_and_breakdown(vla_models, tmp_path, monkeypatch):
    import common.eval.shards as shards
    import phase3.modal_phase3_libero_eval as mod

    cfg = _cfg(vla_models, tmp_path / "run")
    ran = []
    real = shards.run_trial_job
    monkeypatch.setattr(shards, "run_trial_job", lambda c, t, tr: ran.append(tr) or real(c, t, tr))
    assert shards.shard_jobs(cfg, "openvla-oft") == [(0, [0, 1])]
    rows = mod.run_shard.local(cfg.__dict__, 0, [0, 1])
    assert [r["trial"] for r in rows] == [0, 1] and ran == [0, 1]
    assert all(r["status"] in ("success", "failure") for r in rows), rows
    chunk = rows[0]["chunks"][0]
    assert min(chunk["preprocess_s"], chunk["backbone_s"], chunk["env_step_s"]) > 0
    shard = shards.shard_path(cfg, 0, [0, 1])
    # a finished shard is never rerun; a preempted one resumes after its last committed episode
    assert mod.run_shard.local(cfg.__dict__, 0, [0, 1]) == rows and ran == [0, 1]
    shard.write_text(shard.read_text().splitlines(keepends=True)[0])
    again = mod.run_shard.local(cfg.__dict__, 0, [0, 1])
    assert ran == [0, 1, 1] and [r["trial"] for r in again] == [0, 1]
    # what the driver sees before launching
    prep = mod.prepare_run.local(cfg.__dict__)
    assert prep["backbone"] == "openvla-oft" and {(r["task"], r["trial"]) for r in prep["rows"]} == {(0, 0), (0, 1)}
    with pytest.raises(ValueError, match="another configuration"):
        mod.prepare_run.local(_cfg(vla_models, tmp_path / "run", replan_steps=2).__dict__)
    info = summarize(cfg, again, wall_seconds=1.0, episodes_run=2, workers=1)
    b = info["latency_breakdown"]
    assert set(b["per_chunk_ms"]) == {"env_step", "preprocess", "backbone", "draft", "main", "tokenizer_decode"}
    assert 0 < b["backbone_share_of_policy"] < 1 and "preprocess_ms" in info["latency_ms"]


# ----------------------------------------------------------------------------- --plan
def test_plan_prints_shards_and_gpu_without_a_token_or_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    import phase3.modal_phase3_libero_eval as mod

    args = ["--plan", "--task-suite", "libero_spatial", "--tasks", "0-9", "--num-trials", "50", "--models-dir", str(tmp_path)]
    out = mod.cli(args + ["--backbone", "openvla-oft", "--gpu", "A100-80GB"])["plan"]
    assert "run_shard_gpu on 1x A100-80GB" in out and "containers (shards): 20; episodes: 500; episodes per container: 25-25" in out
    assert "at most 220 env steps" in out and "task 9: trials 0-24, 25-49" in out
    state = mod.cli(args + ["--backbone", "state", "--num-trials", "25"])["plan"]
    assert "run_shard on CPU" in state and "containers (shards): 30" in state
    with pytest.raises(ValueError, match="pass --backbone"):
        mod.cli(args)
    # the Modal entrypoint body prints the same plan and returns before any remote call
    assert mod._run_on_modal(EvalConfig(plan=True, backbone="openvla-oft", task_suite="libero_spatial", num_trials=50))["plan"] == out.replace("A100-80GB", "H100")
