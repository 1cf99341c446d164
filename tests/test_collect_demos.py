"""Demo collection: HDF5 layout, resume without duplicates, CLI == Modal entrypoint flags."""

import dataclasses
import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from common.sim.libero_env import LOW_DIM_OBS_DIM


@pytest.mark.slow
def test_collect_layout_and_resume(tmp_path):
    h5py = pytest.importorskip("h5py")
    from common.sim.demo_collection import collect_demos

    out = tmp_path / "demos.hdf5"
    summary = collect_demos("libero_object", [0], 2, out, workers=1, progress=False)
    assert summary["tasks"][0]["kept"] == 2 and summary["given_up_tasks"] == []

    with h5py.File(out, "r") as f:
        data = f["data"]
        assert sorted(data) == ["demo_0", "demo_1"]
        assert data.attrs["suite"] == "libero_object"
        assert data.attrs["language_instruction"] == "pick up the alphabet soup and place it in the basket"
        assert data.attrs["bddl_file_name"].endswith(".bddl")
        assert json.loads(data.attrs["env_args"])["task_id"] == 0
        assert [t["task_id"] for t in json.loads(data.attrs["tasks"])] == [0]
        assert "mujoco" in json.loads(data.attrs["versions"])
        assert "problem_name" in json.loads(data.attrs["problem_info"])
        demo = data["demo_0"]
        T = demo.attrs["num_samples"]
        assert demo["actions"].shape == (T, 7) and demo["states"].shape[0] == T
        assert demo["rewards"].shape == (T,) and demo["dones"].shape == (T,)
        assert demo["dones"][-1] == 1 and demo["rewards"][-1] == 1.0
        assert np.all(np.abs(demo["actions"][:]) <= 1.0)
        for key, width in [("ee_pos", 3), ("ee_ori", 3), ("ee_states", 6), ("gripper_states", 2),
                           ("joint_states", 7), ("alphabet_soup_1_pos", 3), ("alphabet_soup_1_quat", 4),
                           ("low_dim", LOW_DIM_OBS_DIM)]:
            assert demo["obs"][key].shape == (T, width), key
        assert demo.attrs["task_id"] == 0 and bool(demo.attrs["success"])
        assert demo.attrs["language_instruction"] == data.attrs["language_instruction"]
        assert {demo.attrs["init_state_index"], data["demo_1"].attrs["init_state_index"]} == {0, 1}
        seeds = {demo.attrs["seed"], data["demo_1"].attrs["seed"]}
        assert len(seeds) == 2

    # Resume: ask for 3, get exactly one more, with a new episode index.
    summary = collect_demos("libero_object", [0], 3, out, workers=1, progress=False)
    assert summary["tasks"][0] == {"existing": 2, "new": 1, "kept": 3, "attempts": 1}
    with h5py.File(out, "r") as f:
        data = f["data"]
        assert sorted(data) == ["demo_0", "demo_1", "demo_2"]
        assert sorted(data[d].attrs["episode_index"] for d in data) == [0, 1, 2]
        assert data.attrs["num_demos"] == 3


def test_a_complete_file_is_left_byte_for_byte_as_it_was(tmp_path):
    """A rerun with nothing to add must not rewrite the file (not even its attributes): the pipeline
    fingerprints demo files by content, and a rewritten file reruns every stage after it."""
    h5py = pytest.importorskip("h5py")
    from common.sim.demo_collection import collect_demos, episode_seed
    from common.sim.scripted_expert import ExpertConfig
    from common.pipeline.stages import file_hash

    out = tmp_path / "demos.hdf5"
    with h5py.File(out, "w") as f:
        data = f.create_group("data")
        data.attrs["suite"] = "libero_object"
        data.attrs["layouts"] = "fixed"
        for i in range(2):
            demo = data.create_group(f"demo_{i}")
            demo.attrs.update({"task_id": 0, "success": True, "episode_index": i, "seed": episode_seed(0, 0, i)})
    before = file_hash(out)
    summary = collect_demos("libero_object", [0], 2, out, workers=1, progress=False)
    assert summary["tasks"][0] == {"existing": 2, "new": 0, "kept": 2, "attempts": 0}
    assert summary["episodes_run"] == 0 and file_hash(out) == before
    from common.sim.demo_collection import CollectConfig, run_collection  # the CLI's and the pipeline's path

    assert run_collection(CollectConfig(suite="libero_object", tasks="0", demos_per_task=2, workers=1, out=str(out)),
                          progress=False)["episodes_run"] == 0
    assert file_hash(out) == before
    with pytest.raises(ValueError, match="holds demos from fixed layouts; cannot add demos from fresh layouts"):
        collect_demos("libero_object", [0], 2, out, workers=1, fresh_layouts=True, progress=False)
    with pytest.raises(ValueError, match="another expert seed base than 3 .*resume with the same --seed"):
        collect_demos("libero_object", [0], 2, out, workers=1, seed=3, progress=False)
    with pytest.raises(ValueError, match="holds noise-free demos; cannot add DART demos"):
        collect_demos("libero_object", [0], 2, out, workers=1, expert_config=ExpertConfig(action_noise=0.2), progress=False)
    assert file_hash(out) == before


def test_cli_flags_match_modal_entrypoint():
    from phase1_improved.collect_demos import CollectConfig, build_parser, main

    cli_flags = {
        opt for action in build_parser()._actions for opt in action.option_strings
        if opt.startswith("--") and opt != "--help" and not opt.startswith("--no-")
    }
    # modal 1.6 keeps the decorated function at `.info.raw_f`; `modal run` builds flags from it.
    entry_params = inspect.signature(main.info.raw_f).parameters
    assert cli_flags == {"--" + name.replace("_", "-") for name in entry_params}
    assert set(entry_params) == {f.name for f in dataclasses.fields(CollectConfig)}
    for field in dataclasses.fields(CollectConfig):
        assert entry_params[field.name].default == field.default, field.name


def test_out_path_resolves_against_data_dir(monkeypatch, tmp_path):
    import rsd_entry
    from phase1_improved.collect_demos import CollectConfig

    monkeypatch.setenv("RSD_DATA_DIR", str(tmp_path))  # read once, at the entry point
    assert rsd_entry.resolve(CollectConfig(out="demos.hdf5")).out_path() == tmp_path / "demos.hdf5"
    assert rsd_entry.resolve(CollectConfig(out="/abs/demos.hdf5")).out_path() == Path("/abs/demos.hdf5")


def test_cli_bool_flags():
    from phase1_improved.collect_demos import build_parser

    args = build_parser().parse_args(["--record-images", "--no-keep-failures", "--tasks", "0,3"])
    assert args.record_images is True and args.keep_failures is False and args.tasks == "0,3"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"suite": "libero_nope"}, "unknown suite 'libero_nope'"),
        ({"demos_per_task": 0}, "demos_per_task must be > 0"),
        ({"workers": 0}, "workers must be >= 1"),
        ({"out": "demos.txt"}, "must be an .hdf5 file"),
        ({"action_noise": -0.1}, "action_noise must be >= 0"),
    ],
)
def test_collect_config_rejects_bad_values(kwargs, message):
    from phase1_improved.collect_demos import CollectConfig

    with pytest.raises(ValueError, match=message):
        CollectConfig(**kwargs)


def test_operator_option_is_a_flag_and_is_validated():
    from phase1_improved.collect_demos import CollectConfig

    import rsd_entry

    assert "--operator" in rsd_entry.cli_flags(CollectConfig)
    assert CollectConfig(operator="human").operator == "human"
    with pytest.raises(ValueError, match="operator must be one of"):
        CollectConfig(operator="robot")


@pytest.mark.slow
def test_human_operator_demos_are_marked_and_never_mixed(tmp_path):
    h5py = pytest.importorskip("h5py")
    from common.sim.demo_collection import CollectConfig, run_collection

    cfg = CollectConfig(suite="libero_object", tasks="0", demos_per_task=1, workers=1, out=str(tmp_path / "human.hdf5"),
                        operator="human")
    summary = run_collection(cfg, progress=False)
    assert summary["operator"] == "human" and summary["tasks"][0]["kept"] == 1
    with h5py.File(tmp_path / "human.hdf5", "r") as f:
        assert f["data"].attrs["operator"] == "human"
        assert bool(f["data"]["demo_0"].attrs["success"])
    with pytest.raises(ValueError, match="holds operator='human' demos; cannot add operator='none'"):
        run_collection(CollectConfig(suite="libero_object", tasks="0", demos_per_task=2, workers=1,
                                     out=str(tmp_path / "human.hdf5")), progress=False)


def test_dart_demos_store_the_experts_intent_and_the_loader_learns_it(tmp_path):
    """With action noise the executed actions carry the noise (the file still replays); the expert's
    intended actions are stored beside them and become the episode's actions (DART labels)."""
    h5py = pytest.importorskip("h5py")
    from common.data.episodes import load_hdf5_episodes
    from common.sim.demo_file import _write_demo
    from common.sim.demo_worker import rollout_episode
    from common.sim.libero_env import LiberoTaskEnv
    from common.sim.scripted_expert import ExpertConfig, ScriptedExpert

    with LiberoTaskEnv(suite="libero_object", task_id=0, max_steps=20) as env:
        expert = ScriptedExpert(env, ExpertConfig(action_noise=0.2, seed=3))
        demo = rollout_episode(env, expert, {"suite": "libero_object", "task_id": 0, "episode_index": 0, "seed": 3})
    executed, intended = demo["actions"], demo["expert_actions"]
    assert executed.shape == intended.shape == (20, 7)
    assert np.abs(executed[:, :6] - intended[:, :6]).max() > 0.05  # the noise moved the executed actions
    assert np.array_equal(executed[:, 6], intended[:, 6])  # the gripper is never perturbed
    path = tmp_path / "dart.hdf5"
    with h5py.File(path, "w") as f:
        _write_demo(f.create_group("data"), 0, demo, "pick up the alphabet soup and place it in the basket")
    (ep,) = load_hdf5_episodes(path)
    assert np.array_equal(ep.actions, intended.astype(ep.actions.dtype)) and np.array_equal(ep.executed_actions, executed.astype(ep.actions.dtype))


def test_fresh_layout_demos_are_marked_and_never_mixed_with_fixed_ones(tmp_path):
    """A fresh-layout episode starts from its seed's sampled layout (init_state_index -1, replayable
    from that seed); a file of fixed-layout demos refuses fresh ones and the reverse."""
    h5py = pytest.importorskip("h5py")
    from common.sim.demo_collection import collect_demos
    from common.sim.demo_file import _write_demo
    from common.sim.demo_worker import rollout_episode
    from common.sim.libero_env import LiberoTaskEnv
    from common.sim.scripted_expert import ExpertConfig, ScriptedExpert

    with LiberoTaskEnv(suite="libero_object", task_id=0, max_steps=5) as env:
        expert = ScriptedExpert(env, ExpertConfig(seed=5))
        job = {"suite": "libero_object", "task_id": 0, "episode_index": 0, "seed": 5, "fresh_layout": True}
        demo = rollout_episode(env, expert, job)
        env.reset_to_fresh_layout(5)
        np.testing.assert_array_equal(env.get_state()[1:], demo["states"][0][1:])
        fixed = rollout_episode(env, expert, {**job, "fresh_layout": False})
    assert demo["init_state_index"] == -1 and fixed["init_state_index"] == 0
    assert not np.allclose(demo["states"][0][1:], fixed["states"][0][1:])
    path = tmp_path / "fixed.hdf5"
    with h5py.File(path, "w") as f:
        _write_demo(f.create_group("data"), 0, fixed, "pick up the alphabet soup and place it in the basket")
    with pytest.raises(ValueError, match="holds demos from fixed layouts; cannot add demos from fresh layouts"):
        collect_demos("libero_object", [0], 2, path, workers=1, fresh_layouts=True, progress=False)
