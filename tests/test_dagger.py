"""DAgger (common/sim/dagger.py): the driver's replanning and mixture, the expert following a scene
another policy changed, and the settings' checks. The end-to-end collection with a trained policy is
in tests/test_phase3_eval.py (it needs that file's tiny models)."""

import numpy as np
import pytest

from common.sim.dagger import DaggerConfig, PolicyDriver


class ChunkPolicy:
    """Plans chunks whose actions number the plan call and the step: action[0] = 100 * call + step."""

    def __init__(self):
        self.calls = 0

    def policy_input(self, env, obs):
        return obs

    def plan(self, observation, task_index):
        self.calls += 1
        chunk = np.zeros((8, 7))
        chunk[:, 0] = 100 * self.calls + np.arange(8)
        return chunk, {}


def test_driver_replans_every_replan_steps_and_hands_chunks_to_the_expert_with_beta():
    policy = ChunkPolicy()
    driver = PolicyDriver(policy, task_index=0, replan_steps=3, beta=0.0, seed=1)
    expert_action = np.full(7, -5.0)
    executed = [driver(None, {}, expert_action)[0] for _ in range(7)]
    assert executed == [100, 101, 102, 200, 201, 202, 300] and policy.calls == 3
    assert driver.policy_steps == 7 and driver.expert_steps == 0

    always = PolicyDriver(ChunkPolicy(), task_index=0, replan_steps=4, beta=1.0, seed=1)
    assert all(always(None, {}, expert_action)[0] == -5.0 for _ in range(9)) and always.policy.calls == 0

    def run(seed):
        d = PolicyDriver(ChunkPolicy(), task_index=0, replan_steps=2, beta=0.5, seed=seed)
        return [d(None, {}, expert_action)[0] for _ in range(40)], d

    first, d = run(3)
    again, _ = run(3)
    assert first == again  # the mixture is seeded
    assert d.expert_steps % 2 == 0 and 0 < d.expert_steps < 40 and d.policy_steps + d.expert_steps == 40
    d.reset(3)  # a new episode with the same seed hands the same chunks to the expert
    assert [x == -5.0 for x in (d(None, {}, expert_action)[0] for _ in range(40))] == [x == -5.0 for x in first]
    assert d.policy_steps + d.expert_steps == 40


@pytest.mark.parametrize("kwargs, message", [
    ({"models_dir": ""}, "expected the driving policy's models folder"),
    ({"models_dir": "m", "tokenizer": "fsq"}, "DAgger tokenizer: expected 'robust' or 'naive'"),
    ({"models_dir": "m", "beta": 1.5}, r"DAgger beta: expected a probability in \[0, 1\], found 1.5"),
    ({"models_dir": "m", "replan_steps": 0}, "DAgger replan_steps: expected >= 1"),
])
def test_dagger_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DaggerConfig(**kwargs)


def test_collect_config_dagger_flags(tmp_path):
    from common.sim.demo_collection import CollectConfig

    assert CollectConfig().dagger() is None
    cfg = CollectConfig(dagger_models_dir=str(tmp_path), dagger_beta=0.25)
    assert cfg.dagger() == {"models_dir": str(tmp_path.resolve()), "tokenizer": "robust", "beta": 0.25, "replan_steps": 4}
    with pytest.raises(ValueError, match="choose one way to leave the expert's path"):
        CollectConfig(dagger_models_dir=str(tmp_path), action_noise=0.2)
    with pytest.raises(FileNotFoundError, match="nowhere: not a folder"):
        CollectConfig(dagger_models_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="DAgger beta"):
        CollectConfig(dagger_models_dir=str(tmp_path), dagger_beta=-1)


def test_expert_follows_a_grip_it_did_not_make_and_reopens_when_it_is_lost():
    from common.sim.libero_env import LiberoTaskEnv
    from common.sim.scripted_expert import ScriptedExpert

    with LiberoTaskEnv(suite="libero_object", task_id=0, max_steps=20) as env:
        obs = env.reset_to_trial(0)
        expert = ScriptedExpert(env)
        expert.reset()
        lo, hi = expert._geom.aabb(expert.obj)
        at_object = {**obs, "robot0_eef_pos": (lo + hi) / 2}
        open_fingers = np.array([0.04, -0.04])
        holding = {**at_object, "robot0_gripper_qpos": np.array([0.005, -0.005])}
        assert not expert.is_gripping({**at_object, "robot0_gripper_qpos": open_fingers})
        assert not expert.is_gripping({**at_object, "robot0_gripper_qpos": np.array([0.0, 0.0])})  # shut on air
        assert not expert.is_gripping({**holding, "robot0_eef_pos": hi + 0.2})  # far from the object
        assert expert.is_gripping(holding)

        expert.sync_to_state({**at_object, "robot0_gripper_qpos": open_fingers})
        assert expert.phase == "approach"  # no grip: the approach stays
        expert.sync_to_state(holding)
        assert expert.phase == "lift" and np.allclose(expert._grasp_hold, holding["robot0_eef_pos"])
        assert expert.act(holding)[6] == 1.0  # holding: the label keeps the fingers closed
        expert.sync_to_state({**at_object, "robot0_gripper_qpos": np.array([0.0, 0.0])})
        assert expert.phase == "reopen" and expert.act(holding)[6] == -1.0
