"""benchmarks/diagnostics/trace_episode: the trace record's frame and how an episode's ending is named (no simulator)."""

import numpy as np
import pytest

from benchmarks.diagnostics.trace_episode import markdown, summarize_trace, trace_row
from common.sim.libero_env import LOW_DIM_OBS_DIM


def obs(eef, obj, target, opening):
    o = np.zeros(LOW_DIM_OBS_DIM)
    o[:3], o[16:19], o[24:27] = eef, obj, target
    o[7], o[8] = opening / 2, -opening / 2
    return o


def test_trace_row_offsets_and_opening():
    row = trace_row(12, obs([0.1, 0.2, 1.0], [0.3, 0.2, 0.9], [0.3, 0.0, 0.9], 0.078), np.arange(7))
    assert row["step"] == 12 and row["gripper_opening"] == pytest.approx(0.078)
    assert np.allclose(row["object_minus_eef"], [0.2, 0.0, -0.1]) and np.allclose(row["object_minus_target"], [0.0, 0.2, 0.0])
    assert row["action"] == list(range(7))


def rows_of(*states):
    return [trace_row(8 * i, obs(*s), np.zeros(7)) for i, s in enumerate(states)]


def test_endings():
    far, near = [0.3, 0.3, 0.9], [0.01, 0.04, 0.9]
    placed = rows_of(([0, 0, 1.0], far, [0, 0, 0.9], 0.078), ([0, 0, 1.0], far, [0, 0, 0.9], 0.007), ([0, 0, 1.0], near, [0, 0, 0.9], 0.078))
    assert summarize_trace(placed, success=False, steps=220)["ending"] == "released off target"
    assert summarize_trace(placed, success=True, steps=120)["ending"] == "success"
    still = rows_of(*[([0.05, 0.0, 1.1], far, [0, 0, 0.9], 0.078)] * 8)  # 56 steps without moving, never grasped
    s = summarize_trace(still, success=False, steps=220)
    assert s["ending"] == "stuck" and s["eef_moved_last_steps"] == 0.0 and np.allclose(s["final_object_minus_target"], [0.3, 0.3, 0.0])
    moving = rows_of(*[([0.02 * i, 0.0, 1.1], far, [0, 0, 0.9], 0.078) for i in range(8)])
    assert summarize_trace(moving, success=False, steps=220)["ending"] == "still moving"
    with pytest.raises(ValueError, match="expected at least one record"):
        summarize_trace([], success=False, steps=0)


def test_markdown_names_the_ending():
    rows = rows_of(([0, 0, 1.0], [0.3, 0.3, 0.9], [0, 0, 0.9], 0.078))
    r = {"suite": "libero_spatial", "task": 5, "trial": 21, "instruction": "pick", "tokenizer": "robust", "models_dir": "m",
         "summary": summarize_trace(rows, success=False, steps=220), "rows": rows}
    text = markdown(r)
    assert "**still moving** after 220 steps" in text and "| 0 | (+0.000, +0.000, +1.000) |" in text


def test_parse_trials_and_errors():
    from benchmarks.diagnostics.trace_episode import parse_trials

    assert parse_trials("21,22") == [21, 22] and parse_trials("20-23") == [20, 21, 22, 23] and parse_trials("5, 7-8") == [5, 7, 8]
    for bad in ("x", "23-20", "1,1", "-3"):
        with pytest.raises(ValueError, match="--trials"):
            parse_trials(bad)


def test_missed_grasp():
    rows = rows_of(([0, 0, 1.0], [0.2, 0.0, 0.9], [0, 0, 0.9], 0.078), ([0.1, 0, 0.95], [0.2, 0.0, 0.9], [0, 0, 0.9], 0.001))
    assert summarize_trace(rows, success=False, steps=220)["ending"] == "missed grasp"
