"""A human-teleoperator model: the scripted expert's commands as a person at a spacemouse would send them.

Human teleoperation differs from the scripted expert in ways that matter to an action tokenizer
(rougher spectra, heavy-tailed changes, flat stretches). ``HumanOperator.apply`` turns the expert's
command of each step into what the "operator" sends, with four effects:

- **band-limited velocity noise**: an AR(1) (Ornstein-Uhlenbeck) process per arm dimension with a
  correlation time of ``noise_tau`` steps, std ``noise_std`` — hand tremor and drift, not white noise;
- **second-order response (overshoot and correction)**: the sent command follows the expert's through
  an under-damped second-order filter (damping ``damping`` < 1, natural period ``response_period``
  steps), so step changes overshoot and ring back; the expert's closed loop corrects what remains;
- **hesitations / pauses**: with probability ``pause_rate`` per step the operator stops for
  ``pause_steps`` steps (arm command ~0, a small tremor only), then resumes;
- **uneven gripper timing**: each change of the gripper command is delayed by a random
  ``0..gripper_delay_max`` steps.

The expert stays closed-loop (it reads the state every step), so episodes still succeed; the
collector keeps only successful episodes. The module only needs numpy and is used by
``ScriptedExpert`` when ``ExpertConfig.operator == "human"``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

OPERATORS = ("none", "human")


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    noise_std: float = 0.12  # std of the band-limited velocity noise (action units)
    noise_tau: float = 4.0  # correlation time of the noise, steps (20 Hz control)
    damping: float = 0.45  # damping ratio of the operator's second-order response (< 1: overshoot)
    response_period: float = 6.0  # natural period of that response, steps
    pause_rate: float = 1.0 / 70.0  # probability per step of starting a hesitation
    pause_steps: tuple[int, int] = (4, 14)  # hesitation length range, steps (inclusive)
    tremor_std: float = 0.01  # arm command std while paused
    gripper_delay_max: int = 5  # a gripper change is delayed by 0..this many steps

    def __post_init__(self) -> None:
        if self.noise_std < 0 or self.tremor_std < 0:
            raise ValueError("noise_std and tremor_std must be >= 0")
        if self.noise_tau <= 0 or self.response_period <= 0 or self.damping <= 0:
            raise ValueError("noise_tau, response_period and damping must be > 0")
        if not 0.0 <= self.pause_rate < 1.0:
            raise ValueError(f"pause_rate must be in [0, 1); got {self.pause_rate}")
        lo, hi = self.pause_steps
        if not 1 <= lo <= hi:
            raise ValueError(f"pause_steps must be (lo, hi) with 1 <= lo <= hi; got {self.pause_steps}")
        if self.gripper_delay_max < 0:
            raise ValueError("gripper_delay_max must be >= 0")


class HumanOperator:
    """Stateful per-episode transform of expert commands ``(arm[6], gripper)``; ``reset(rng)`` per episode."""

    def __init__(self, config: OperatorConfig | None = None):
        self.config = config or OperatorConfig()
        self.reset(np.random.default_rng(0))

    def reset(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._noise = np.zeros(6)
        self._pos = np.zeros(6)  # second-order filter state: output and its rate
        self._vel = np.zeros(6)
        self._pause_left = 0
        self._gripper_sent: float | None = None
        self._gripper_pending: tuple[float, int] | None = None  # (new value, steps left)

    def apply(self, arm: np.ndarray, gripper: float) -> tuple[np.ndarray, float]:
        cfg, rng = self.config, self._rng
        # Second-order response to the expert's command (semi-implicit Euler, dt = 1 step).
        omega = 2.0 * np.pi / cfg.response_period
        accel = omega**2 * (np.asarray(arm, dtype=np.float64) - self._pos) - 2.0 * cfg.damping * omega * self._vel
        self._vel = self._vel + accel
        self._pos = self._pos + self._vel
        # Band-limited noise: AR(1) with stationary std noise_std.
        a = np.exp(-1.0 / cfg.noise_tau)
        self._noise = a * self._noise + np.sqrt(1.0 - a * a) * cfg.noise_std * rng.standard_normal(6)
        out = self._pos + self._noise
        # Hesitations.
        if self._pause_left == 0 and rng.random() < cfg.pause_rate:
            self._pause_left = int(rng.integers(cfg.pause_steps[0], cfg.pause_steps[1] + 1))
        if self._pause_left > 0:
            self._pause_left -= 1
            out = cfg.tremor_std * rng.standard_normal(6)
            self._pos, self._vel = np.zeros(6), np.zeros(6)  # resume from rest
        return out, self._gripper(float(gripper))

    def _gripper(self, wanted: float) -> float:
        if self._gripper_sent is None:
            self._gripper_sent = wanted
        if self._gripper_pending is None and wanted != self._gripper_sent:
            self._gripper_pending = (wanted, int(self._rng.integers(0, self.config.gripper_delay_max + 1)))
        if self._gripper_pending is not None:
            value, left = self._gripper_pending
            if value != wanted:  # the expert changed its mind again: drop the pending change
                self._gripper_pending = None
            elif left <= 0:
                self._gripper_sent, self._gripper_pending = value, None
            else:
                self._gripper_pending = (value, left - 1)
        return self._gripper_sent


def make_operator(name: str) -> HumanOperator | None:
    """``"none"`` -> None (the expert's commands as they are); ``"human"`` -> a ``HumanOperator``."""
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}; expected one of {OPERATORS}")
    return HumanOperator() if name == "human" else None


def humanize_actions(actions: np.ndarray, *, seed: int = 0, config: OperatorConfig | None = None) -> np.ndarray:
    """Open-loop: pass a recorded ``[T, 7]`` action sequence through a ``HumanOperator``.

    Without the simulator nothing corrects the operator's errors, so this is only a stand-in for
    fast tests and for quantizer studies on synthetic episodes; demos for training come from the
    closed-loop expert (``ExpertConfig(operator="human")``).
    """
    actions = np.asarray(actions, dtype=np.float64)
    if actions.ndim != 2 or actions.shape[1] != 7:
        raise ValueError(f"actions must have shape [T, 7]; got {actions.shape}")
    operator = HumanOperator(config)
    operator.reset(np.random.default_rng(seed))
    out = np.empty_like(actions)
    for t, a in enumerate(actions):
        arm, gripper = operator.apply(a[:6], float(a[6]))
        out[t, :6], out[t, 6] = np.clip(arm, -1.0, 1.0), gripper
    return out
