"""Statistics of demonstration action sets: per-dim spectrum, pauses, roughness — human-like vs scripted.

    python -m benchmarks.tokenizer.action_statistics \
        --files data/tokenizer_v2/scripted_libero_object.hdf5,data/tokenizer_v2/human_libero_object.hdf5

Per file (raw actions, 20 Hz control): mean episode length; per dim the power spectral density
(Welch: 32-step Hann segments, half overlap, segment mean removed), the fraction of power above
``HIGH_HZ`` and the spectral centroid; the *pause fraction* (steps whose 6 arm dims are all below
``PAUSE_THRESHOLD`` in magnitude, gripper ignored); the kurtosis of step-to-step changes (3 for a
Gaussian; heavy tails above); gripper switches per episode. The operator kind is read from the
file's ``data.attrs["operator"]`` (``none`` for files written before it existed). Writes
``results/action_statistics.{json,md,png}``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import rsd_entry
from common.artifacts import results_dir_of
from common.data.episodes import load_episodes
from common.provenance import provenance, write_results

PROG = "python -m benchmarks.tokenizer.action_statistics"

CONTROL_HZ = 20.0
SEGMENT = 32
HIGH_HZ = 2.0
PAUSE_THRESHOLD = 0.05
DIMS = ("x", "y", "z", "rx", "ry", "rz", "gripper")


@dataclass
class ActionStatsConfig:
    """Statistics of demonstration action sets: per-dim spectrum, pauses, roughness."""

    files: str = "data/tokenizer_v2/scripted_libero_object.hdf5,data/tokenizer_v2/human_libero_object.hdf5"  # demo files, comma-separated
    out: str = ""  # "" = $RSD_RESULTS_DIR


def welch_psd(actions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean PSD ``[freqs, dims]`` over every half-overlapping ``SEGMENT``-step window of every episode."""
    window = np.hanning(SEGMENT)
    spectra = []
    for a in actions:
        for start in range(0, len(a) - SEGMENT + 1, SEGMENT // 2):
            seg = a[start : start + SEGMENT]
            seg = (seg - seg.mean(0)) * window[:, None]
            spectra.append(np.abs(np.fft.rfft(seg, axis=0)) ** 2 / (window**2).sum())
    if not spectra:
        raise ValueError(f"every episode is shorter than the {SEGMENT}-step spectrum window")
    return np.fft.rfftfreq(SEGMENT, d=1.0 / CONTROL_HZ), np.mean(spectra, axis=0)


def file_operator(path: str) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return str(f["data"].attrs.get("operator", "none"))


def action_statistics(path: str) -> dict:
    episodes = load_episodes(path)
    actions = [np.asarray(e.actions, dtype=np.float64) for e in episodes]
    freqs, psd = welch_psd(actions)
    power = psd.sum(0)
    high = psd[freqs > HIGH_HZ].sum(0) / np.maximum(power, 1e-30)
    centroid = (freqs[:, None] * psd).sum(0) / np.maximum(power, 1e-30)
    all_actions = np.concatenate(actions)
    paused = np.abs(all_actions[:, :6]).max(1) < PAUSE_THRESHOLD
    diffs = np.concatenate([np.diff(a, axis=0) for a in actions])
    centred = diffs - diffs.mean(0)
    kurtosis = (centred**4).mean(0) / np.maximum((centred**2).mean(0) ** 2, 1e-30)
    switches = [int((np.diff(np.sign(a[:, 6])) != 0).sum()) for a in actions]
    return {
        "file": path,
        "operator": file_operator(path),
        "episodes": len(actions),
        "steps": int(len(all_actions)),
        "mean_episode_length": float(np.mean([len(a) for a in actions])),
        "pause_fraction": float(paused.mean()),
        "gripper_switches_per_episode": float(np.mean(switches)),
        "per_dim": {
            d: {"high_freq_power_fraction": float(high[i]), "spectral_centroid_hz": float(centroid[i]),
                "diff_kurtosis": float(kurtosis[i]), "std": float(all_actions[:, i].std())}
            for i, d in enumerate(DIMS)
        },
        "psd": {"freqs_hz": freqs.tolist(), "power": psd.T.tolist()},
    }


def render(result: dict) -> str:
    lines = [
        f"Raw actions at {CONTROL_HZ:.0f} Hz. `>{HIGH_HZ:.0f} Hz` = fraction of a dim's power above {HIGH_HZ:.0f} Hz "
        f"(Welch, {SEGMENT}-step windows); `kurt` = kurtosis of step-to-step changes (Gaussian 3); pause = all 6 arm "
        f"dims below {PAUSE_THRESHOLD} in magnitude.",
        "",
        "| file | operator | episodes | mean length | pause fraction | gripper switches/episode | "
        + " | ".join(f"{d} >{HIGH_HZ:.0f} Hz / kurt" for d in DIMS[:6]) + " |",
        "|---|---|---|---|---|---|" + "---|" * 6,
    ]
    for s in result["files"]:
        dims = " | ".join(f"{s['per_dim'][d]['high_freq_power_fraction']:.1%} / {s['per_dim'][d]['diff_kurtosis']:.0f}" for d in DIMS[:6])
        lines.append(
            f"| {Path(s['file']).name} | {s['operator']} | {s['episodes']} | {s['mean_episode_length']:.0f} | "
            f"{s['pause_fraction']:.1%} | {s['gripper_switches_per_episode']:.1f} | {dims} |"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 7, figsize=(20, 3.2), sharex=True)
    for s in result["files"]:
        freqs = s["psd"]["freqs_hz"]
        for i, ax in enumerate(axes):
            ax.semilogy(freqs[1:], s["psd"]["power"][i][1:], label=f"{s['operator']} ({Path(s['file']).stem})")
            ax.set_title(DIMS[i])
            ax.set_xlabel("Hz")
    axes[0].set_ylabel("power spectral density")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(cfg: ActionStatsConfig) -> dict:
    files = [f.strip() for f in cfg.files.split(",") if f.strip()]
    missing = [f for f in files if not Path(f).exists()]
    if missing:
        raise FileNotFoundError(f"--files: no such demo file(s): {', '.join(missing)} (collect with python -m phase1_improved.collect_demos)")
    result = {"config": asdict(cfg), "files": [action_statistics(f) for f in files], "provenance": provenance(seed=0)}
    out = results_dir_of(cfg.out)
    write_results(out, "action_statistics", result, render(result))
    plot(result, out / "action_statistics.png")
    return result


def main(argv: list[str]) -> dict:
    return run(rsd_entry.parse_config(ActionStatsConfig, argv, prog=PROG))


if __name__ == "__main__":
    rsd_entry.main(main, sys.argv[1:])
