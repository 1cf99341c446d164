"""DAgger rollouts: a trained policy drives the robot and the scripted expert labels every state it
visits (issue 12's data lever). Demonstrations and DART only show the expert's own path and noise
around it; a policy that drifts reaches states neither covers, where it has never seen how to recover.
Here the expert observes each step as in a demo (its phases track where the hand and the object
actually are), its intended action is stored as the label (``expert_actions``) and the executed
action is the policy's (``actions``, so the file still replays exactly).

Per chunk the driver hands control to the expert with probability ``beta`` (DAgger's mixture: at 0
the policy drives the whole episode; later rounds usually lower beta). The policy replans every
``replan_steps`` as Phase 3 does, main-only (speculation never changes the tokens).
Every episode is kept, successful or not: the failing ones hold the states the policy needs most.

The policy itself is loaded by the caller's ``driving_policy(config, suite)`` (the Phase 3 policy,
``common.eval.policy.dagger_policy``), handed down to the workers: the simulator layer drives any
object with ``policy_input`` / ``plan`` / ``task_index`` and never imports the evaluation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DaggerConfig:
    models_dir: str  # the policy that drives: its Phase 2 head (and tokenizer) under this folder
    tokenizer: str = "robust"  # robust | naive (which of the folder's policies)
    beta: float = 0.0  # probability that the expert drives a chunk instead of the policy
    replan_steps: int = 4  # policy actions executed per decoded chunk (as Phase 3's --replan-steps)

    def __post_init__(self) -> None:
        if not self.models_dir:
            raise ValueError("DAgger: expected the driving policy's models folder, found ''")
        if self.tokenizer not in ("robust", "naive"):
            raise ValueError(f"DAgger tokenizer: expected 'robust' or 'naive', found {self.tokenizer!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"DAgger beta: expected a probability in [0, 1], found {self.beta}")
        if self.replan_steps < 1:
            raise ValueError(f"DAgger replan_steps: expected >= 1, found {self.replan_steps}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PolicyDriver:
    """Chooses each executed action: the policy's chunk (replanned every ``replan_steps``) or, for a
    chunk drawn with probability ``beta``, the expert's own actions. Call ``reset`` per episode."""

    def __init__(self, policy, *, task_index: int, replan_steps: int, beta: float, seed: int) -> None:
        self.policy, self.task_index, self.replan_steps, self.beta = policy, task_index, replan_steps, beta
        self.reset(seed)

    def reset(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._queue: list[np.ndarray] = []
        self._expert_left = 0
        self.policy_steps = self.expert_steps = 0

    def __call__(self, env, obs: dict[str, np.ndarray], expert_action: np.ndarray) -> np.ndarray:
        if not self._queue and not self._expert_left:
            if self.beta > 0 and self._rng.random() < self.beta:
                self._expert_left = self.replan_steps
            else:
                actions, _ = self.policy.plan(self.policy.policy_input(env, obs), self.task_index)
                self._queue = list(np.asarray(actions, dtype=np.float64)[: self.replan_steps])
        if self._expert_left:
            self._expert_left -= 1
            self.expert_steps += 1
            return expert_action
        self.policy_steps += 1
        return self._queue.pop(0)
