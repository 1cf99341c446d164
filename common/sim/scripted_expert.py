"""Privileged-state pick-and-place expert for LIBERO tasks whose goal is one `on` / `in` predicate.

It reads the BDDL goal (`('on', obj, target)` or `('in', obj, region)`), object poses from the
simulator and object heights from collision-geom extents (body origins differ per object:
bowls/plates sit on theirs, cans are centred), then runs a phase machine:

    approach -> descend -> grasp -> lift -> carry -> place -> release -> retreat -> done
    (a blocked descent or a grasp that leaves the object behind goes through `reopen` back to
     `approach`, replanned from the object's new pose, at most MAX_RETRIES times)

Facts it relies on (measured, BRIEF §5):
  * OSC_POSE actions are deltas; 1.0 moves the hand only ~1 cm/step from rest, and a pure
    proportional controller stalls 1-2 cm short under load, hence the integral term.
  * Fingers close along world y and open ~7.6 cm; the hand housing is wide along y, so bowls are
    grasped at the rim on the +y or -y side, whichever has more clearance from tall neighbours.
    The rim point is built in the bowl's body frame, so a bowl tilted on a support (the ramekin)
    still gets a point on its rim; approach and descent track the object as it moves.
  * The carry height clears every movable object (and the target), not only the target.
  * Placement is closed loop on the *object* pose (what the success check looks at), not the hand.
  * The hand orientation is held at its start value with small rotation actions (it drifts under
    a held bowl otherwise).

With ``ExpertConfig(operator="human")`` every command goes through the human-teleoperator model of
``common/sim/operator_model.py`` (band-limited noise, hesitations, overshoot, late gripper changes);
the expert stays closed-loop, so it corrects the operator's errors.

Not handled (measured rates: benchmarks/evaluation/expert_success.py, results/expert_success.md):
  * goals other than one on/in predicate: libero_10 (two predicates), libero_goal's
    open/close/turnon goals -> UnsupportedGoalError;
  * the bowl inside the open top drawer (libero_spatial task 4): the hand housing hits the cabinet
    when it reaches down into the drawer; this needs a sideways approach the expert does not have;
  * objects wider than the finger opening that are not bowls (no wrist rotation).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.sim.expert_geometry import ObjectGeometry, rotation_error
from common.sim.libero_env import LiberoTaskEnv
from common.sim.operator_model import OPERATORS, make_operator

PHASES = ("approach", "reopen", "descend", "grasp", "lift", "carry", "place", "release", "retreat", "done")

FINGER_OPENING = 0.076  # m, max distance between the fingers
HOUSING_HALF_X = 0.035  # m, half size of the hand housing footprint (across the fingers)
HOUSING_HALF_Y = 0.10  # m, along the finger closing axis (wide)
HOUSING_ABOVE_GRIP = 0.045  # m, the housing starts this far above the grip site
RIM_INSET = 0.012  # m, rim grasp point lies this far inside the bowl's outer radius
RIM_DEPTH = 0.025  # m, grasp this far below the rim top
CARRY_MARGIN = 0.04  # m, clearance between the held object's bottom and every other top
MAX_RETRIES = 3  # re-grasp attempts after a blocked descent or a grasp that did not lift the object
# a grip (``is_gripping``): finger opening (m) between shut-on-air and open, hand within reach of the object's box
GRIP_OPENING_MIN, GRIP_OPENING_MAX, GRIP_REACH = 0.002, 0.06, 0.03


class UnsupportedGoalError(ValueError):
    """The task's BDDL goal is not a single `on`/`in` pick-and-place predicate."""


@dataclasses.dataclass
class ExpertConfig:
    action_noise: float = 0.0  # std of Gaussian noise added to the 6 arm dims (not the gripper)
    grasp_jitter: float = 0.0  # std (m) of a random xy offset of the grasp point
    smoothing: float = 0.0  # EMA factor on arm actions in [0, 1); 0 = none
    action_cap: float = 1.0  # max |action| on the arm dims
    seed: int = 0
    gain: float = 20.0  # proportional gain, action per metre of error
    integral_gain: float = 2.0  # integral gain, action per metre*step of accumulated error
    rot_gain: float = 2.0  # action per radian of orientation error (holds the start orientation)
    operator: str = "none"  # "none" | "human": send the commands through common.sim.operator_model

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"operator must be one of {OPERATORS}, got {self.operator!r}")
        if self.action_noise < 0 or self.grasp_jitter < 0:
            raise ValueError("action_noise and grasp_jitter must be >= 0")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if not 0.0 < self.action_cap <= 1.0:
            raise ValueError(f"action_cap must be in (0, 1], got {self.action_cap}")


# ---------------------------------------------------------------------------- small math helpers
class ScriptedExpert:
    """Phase-machine expert. Call `reset()` after `env.reset_to_trial(...)`, then `act(obs)`."""

    def __init__(self, env: LiberoTaskEnv, config: ExpertConfig | None = None):
        self.env = env
        self.config = config or ExpertConfig()
        self.obj, self.target, self.region, self.relation = self._parse_goal(env)
        self._geom = ObjectGeometry(env)
        self._rng = np.random.default_rng(self.config.seed)
        self._operator = make_operator(self.config.operator)
        self.phase = "approach"

    # ------------------------------------------------------------------ goal
    @staticmethod
    def _parse_goal(env: LiberoTaskEnv) -> tuple[str, str, str | None, str]:
        goal = env.goal_state
        if len(goal) != 1 or goal[0][0].lower() not in ("on", "in") or len(goal[0]) != 3:
            raise UnsupportedGoalError(
                f"{env.suite} task {env.task_id}: the expert handles one ('on'|'in', obj, target) "
                f"predicate, got goal {goal}"
            )
        relation, obj, target = goal[0][0].lower(), goal[0][1], goal[0][2]
        inner = env.env.env
        if obj not in inner.objects_dict:
            raise UnsupportedGoalError(f"goal object {obj!r} is not a movable object")
        if target in inner.obj_body_id:
            return obj, target, None, relation
        site = inner.object_sites_dict.get(target)
        if site is None or site.parent_name not in inner.obj_body_id:
            raise UnsupportedGoalError(f"goal target {target!r} is neither an object nor an object's region")
        return obj, site.parent_name, target, relation

    # ------------------------------------------------------------------ episode state
    def reseed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def reset(self) -> None:
        """Plan the grasp from the current (settled) state; call after env.reset_to_trial."""
        obs_quat = self.env.env.env._get_observations()["robot0_eef_quat"]
        self._hold_quat = np.array(obs_quat, dtype=np.float64)
        self.phase = "approach"
        self._phase_steps = 0
        self._integral = np.zeros(3)
        self._prev_arm = np.zeros(6)
        self._retries = 0
        self._plan()
        self._best_err = np.inf
        self._stall = 0
        if self._operator is not None:
            self._operator.reset(np.random.default_rng(self._rng.integers(2**63)))

    def _plan(self) -> None:
        """(Re)plan the grasp from the current object pose."""
        self._grasp_local, self._is_rim_grasp = self._plan_grasp()
        if self.config.grasp_jitter > 0:
            jitter = np.array([*self._rng.normal(0.0, self.config.grasp_jitter, 2), 0.0])
            self._grasp_local = self._to_local(self._grasp_world() + jitter)
        self._grasp_hold = None  # hand position frozen while the fingers close
        # Fixed per attempt: the hand must not sink while it travels towards the object.
        self._hover_z = max(self._grasp_world()[2] + 0.08, self._movable_tops(exclude=self.obj) + 0.02)
        self._hand_minus_bottom = None  # set after the grasp: hand z - object bottom z
        self._carry_z = None
        self._lift_start = None

    def _retry(self) -> bool:
        """Missed grasp: open, replan from where the object is now, approach again."""
        if self._retries >= MAX_RETRIES:
            return False
        self._retries += 1
        self._plan()
        self._set_phase("reopen")
        return True

    def _movable_tops(self, exclude: str) -> float:
        inner = self.env.env.env
        names = [n for n in inner.objects_dict if n != exclude] + [self.target]
        return max(self._geom.aabb(n)[1][2] for n in names)

    def _housing_clearance(self, point: np.ndarray) -> float:
        """Smallest xy gap between the hand housing footprint at `point` and any object tall
        enough to reach the housing (negative = overlap)."""
        inner = self.env.env.env
        gaps = []
        for name in inner.obj_body_id:
            if name == self.obj:
                continue
            lo, hi = self._geom.aabb(name)
            if hi[2] < point[2] + HOUSING_ABOVE_GRIP:
                continue
            dx = max(lo[0] - (point[0] + HOUSING_HALF_X), (point[0] - HOUSING_HALF_X) - hi[0])
            dy = max(lo[1] - (point[1] + HOUSING_HALF_Y), (point[1] - HOUSING_HALF_Y) - hi[1])
            gaps.append(max(dx, dy))
        return min(gaps) if gaps else np.inf

    def _plan_grasp(self) -> tuple[np.ndarray, bool]:
        """Grasp point in the object's body frame (so approach/descend track a moving object)."""
        lo, hi = self._geom.aabb(self.obj)
        center = (lo + hi) / 2.0
        height = hi[2] - lo[2]
        width_y = hi[1] - lo[1]
        if width_y < FINGER_OPENING - 0.01:
            # Fits between the fingers: grasp near the top (less housing collision with tall
            # neighbours) but never lower than half height, never closer than 8 mm to the floor.
            z = max(hi[2] - 0.03, lo[2] + 0.5 * height)
            z = max(z, lo[2] + 0.008)
            return self._to_local(np.array([center[0], center[1], z])), False
        # Too wide (bowls): pinch the rim wall on the +y or -y side, whichever is clearer.
        # Built from the body frame so a bowl tilted on a support still gets a point on its rim.
        pos, rot = self._body_pose(self.obj)
        llo, lhi = self._geom.local_aabb(self.obj)
        radius = min(lhi[0] - llo[0], lhi[1] - llo[1]) / 2.0
        axis = rot[:, 2]
        rim_top = pos + rot @ np.array([(llo[0] + lhi[0]) / 2.0, (llo[1] + lhi[1]) / 2.0, lhi[2]])
        candidates = []
        for sign in (1.0, -1.0):
            d = np.array([0.0, sign, 0.0])
            d = d - d.dot(axis) * axis
            d /= np.linalg.norm(d)
            candidates.append(rim_top + (radius - RIM_INSET) * d - RIM_DEPTH * axis)
        best = max(candidates, key=self._housing_clearance)
        return self._to_local(best), True

    def _body_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        body = self.env.env.env.obj_body_id[name]
        data = self.env.sim.data
        return np.array(data.body_xpos[body]), np.array(data.body_xmat[body]).reshape(3, 3)

    def _to_local(self, world_point: np.ndarray) -> np.ndarray:
        pos, rot = self._body_pose(self.obj)
        return rot.T @ (world_point - pos)

    def _grasp_world(self) -> np.ndarray:
        pos, rot = self._body_pose(self.obj)
        return pos + rot @ self._grasp_local

    # ------------------------------------------------------------------ control
    def _goto(self, eef: np.ndarray, target: np.ndarray) -> np.ndarray:
        err = target - eef
        self._integral = np.clip(self._integral + err, -0.3, 0.3)
        return self.config.gain * err + self.config.integral_gain * self._integral

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self._phase_steps = 0
        self._integral = np.zeros(3)
        self._best_err = np.inf
        self._stall = 0

    def _place_xy(self) -> np.ndarray:
        if self.region is not None:
            return np.asarray(self.env.sim.data.get_site_xpos(self.region))[:2].copy()
        return self.env.object_pose(self.target)[0][:2]

    def _place_bottom_z(self) -> float:
        """Where the held object's bottom should be when released."""
        _, target_hi = self._geom.aabb(self.target)
        if self.relation == "in":
            return target_hi[2] + 0.015  # drop just above the container rim
        return target_hi[2] + 0.01

    def is_gripping(self, obs: dict[str, np.ndarray]) -> bool:
        """Something is between the fingers (neither open nor shut on air) and the hand is at the object."""
        fingers = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64)
        opening = float(fingers[0] - fingers[1])
        if not GRIP_OPENING_MIN < opening < GRIP_OPENING_MAX:
            return False
        lo, hi = self._geom.aabb(self.obj)
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        gap = np.maximum(np.maximum(lo - eef, eef - hi), 0.0)  # distance from the hand to the object's box
        return float(np.linalg.norm(gap)) < GRIP_REACH

    def sync_to_state(self, obs: dict[str, np.ndarray]) -> None:
        """DAgger: another policy moves the hand, so the phase may no longer match the scene. Make it
        match before ``act`` labels the state: holding the object -> from ``lift`` on (the hand holds
        where it grips, not where this expert would have); the object lost after the grasp -> reopen
        and approach again from its new pose. Without a grip the approach and descent phases stay:
        they steer to this expert's grasp point from wherever the hand is."""
        gripping = self.is_gripping(obs)
        if gripping and self.phase in ("approach", "reopen", "descend"):
            eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
            self._grasp_hold = eef.copy()
            lo, _ = self._geom.aabb(self.obj)
            self._hand_minus_bottom = eef[2] - lo[2]
            self._carry_z = self._movable_tops(exclude=self.obj) + CARRY_MARGIN + self._hand_minus_bottom
            self._lift_start = None
            self._set_phase("lift")
        elif not gripping and self.phase in ("lift", "carry", "place"):
            self._plan()
            self._set_phase("reopen")

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        self._phase_steps += 1
        gripper = -1.0
        move = np.zeros(3)
        # Approach/descend track the object (a neighbour or the fingers may nudge it).
        gp = self._grasp_world() if self.phase in ("approach", "descend") else self._grasp_hold

        if self.phase == "approach":
            target = np.array([gp[0], gp[1], self._hover_z])
            move = self._goto(eef, target)
            if np.linalg.norm((target - eef)[:2]) < 0.008 or self._phase_steps > 120:
                self._set_phase("descend")
        elif self.phase == "reopen":
            # Open the fingers and rise to hover height before approaching again.
            move = self._goto(eef, np.array([eef[0], eef[1], self._hover_z]))
            if self._phase_steps >= 8 and eef[2] > self._hover_z - 0.02 or self._phase_steps > 60:
                self._set_phase("approach")
        elif self.phase == "descend":
            move = self._goto(eef, gp)
            err = np.linalg.norm(gp - eef)
            if err < self._best_err - 1e-3:
                self._best_err, self._stall = err, 0
            else:
                self._stall += 1
            if err < 0.007 or self._stall > 12 or self._phase_steps > 60:
                if err > 0.015 and self._retry():
                    pass  # blocked (e.g. a finger on the rim): try again from above
                else:
                    self._grasp_hold = gp.copy()
                    self._set_phase("grasp")
        elif self.phase == "grasp":
            gripper = 1.0
            move = self._goto(eef, gp)
            if self._phase_steps >= 15:
                lo, _ = self._geom.aabb(self.obj)
                self._hand_minus_bottom = eef[2] - lo[2]
                self._carry_z = self._movable_tops(exclude=self.obj) + CARRY_MARGIN + self._hand_minus_bottom
                self._set_phase("lift")
        elif self.phase == "lift":
            gripper = 1.0
            target = np.array([gp[0], gp[1], self._carry_z])
            move = self._goto(eef, target)
            obj_z = self.env.object_pose(self.obj)[0][2]
            if self._lift_start is None:
                self._lift_start = (eef[2], obj_z)
            hand_rise, obj_rise = eef[2] - self._lift_start[0], obj_z - self._lift_start[1]
            if hand_rise > 0.04 and obj_rise < 0.5 * hand_rise and self._retry():
                pass  # the object stayed behind: the grasp missed
            elif eef[2] > self._carry_z - 0.015 or self._phase_steps > 80:
                self._set_phase("carry")
        elif self.phase == "carry":
            gripper = 1.0
            obj_xy = self.env.object_pose(self.obj)[0][:2]
            xy_err = self._place_xy() - obj_xy
            target = np.array([eef[0] + xy_err[0], eef[1] + xy_err[1], self._carry_z])
            move = self._goto(eef, target)
            if np.linalg.norm(xy_err) < 0.008 or self._phase_steps > 150:
                self._set_phase("place")
        elif self.phase == "place":
            gripper = 1.0
            obj_xy = self.env.object_pose(self.obj)[0][:2]
            xy_err = self._place_xy() - obj_xy
            lo, _ = self._geom.aabb(self.obj)
            z_err = self._place_bottom_z() - lo[2]
            target = eef + np.array([xy_err[0], xy_err[1], z_err])
            move = self._goto(eef, target)
            err = abs(z_err) + np.linalg.norm(xy_err)
            # Stalled (object resting on something) counts as arrived.
            if err < self._best_err - 1e-3:
                self._best_err, self._stall = err, 0
            else:
                self._stall += 1
            if (z_err > -0.006 and np.linalg.norm(xy_err) < 0.012) or self._stall > 15 or self._phase_steps > 100:
                self._set_phase("release")
        elif self.phase == "release":
            gripper = -1.0
            if self._phase_steps >= 10:
                self._retreat_z = eef[2] + 0.08
                self._set_phase("retreat")
        elif self.phase == "retreat":
            move = self._goto(eef, np.array([eef[0], eef[1], self._retreat_z]))
            if eef[2] > self._retreat_z - 0.01 or self._phase_steps > 40:
                self._set_phase("done")

        rot = self.config.rot_gain * rotation_error(self._hold_quat, np.asarray(obs["robot0_eef_quat"]))
        arm = np.concatenate([move, rot])
        if self._operator is not None:
            arm, gripper = self._operator.apply(arm, gripper)
        cap, s = self.config.action_cap, self.config.smoothing
        # the expert's intended action at this state, without the injected noise (a DART label: the
        # noise moves the robot off the expert's path, the label says how the expert would correct)
        clean = np.clip(s * self._prev_arm + (1.0 - s) * arm, -cap, cap)
        self.last_clean_action = np.concatenate([clean, [gripper]]).astype(np.float64)
        if self.config.action_noise > 0:
            arm = arm + self._rng.normal(0.0, self.config.action_noise, 6)
        if s > 0:
            arm = s * self._prev_arm + (1.0 - s) * arm
        arm = np.clip(arm, -cap, cap)
        self._prev_arm = arm
        return np.concatenate([arm, [gripper]]).astype(np.float64)
