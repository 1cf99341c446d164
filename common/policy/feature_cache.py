"""OpenVLA-OFT feature cache: per-step backbone features of every demo, computed once (on Modal) and
read by Phase 2 training, so the 7B model never runs per epoch; and, read back from a trained head's
caches, the input settings Phase 3 must reproduce (``spec_for_head``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from common.policy.backbones.vla_inputs import VLAInputSpec, demo_step_inputs, run_extractor, spec_of_extractor

FEATURE_CACHE_SUFFIX = ".openvla_oft_features.h5"
CACHE_COMMAND = (
    "modal run phase2_draft_retrain/modal_train_draft_with_projection.py::cache_openvla_features --data {data}"
)


def feature_cache_path(data_dir: Path, data_path: str | Path) -> Path:
    """Where ``cache_openvla_features`` writes (and training reads) the features of one demo file."""
    return Path(data_dir) / "features" / (Path(data_path).stem + FEATURE_CACHE_SUFFIX)


def read_cached_features(cache_path: Path, names: list[str], lengths: list[int], data_path: str) -> list[np.ndarray]:
    """Per-step OpenVLA features for the given demos of one file (``features/<demo name>`` [T, F])."""
    import h5py

    if not cache_path.exists():
        raise FileNotFoundError(
            f"{cache_path}: OpenVLA-OFT feature cache not found for {data_path}; compute it on Modal with "
            f"`{CACHE_COMMAND.format(data=data_path)}` (or pass --feature-cache, or use --backbone state)"
        )
    out = []
    with h5py.File(cache_path, "r") as f:
        if "features" not in f:
            raise ValueError(f"{cache_path}: no 'features' group (expected features/<demo name> [T, F])")
        grp = f["features"]
        for name, n in zip(names, lengths):
            if name not in grp:
                raise FileNotFoundError(
                    f"{cache_path}: no cached features for {name} of {data_path} (incomplete cache?); rerun "
                    f"`{CACHE_COMMAND.format(data=data_path)}` (it resumes)"
                )
            arr = grp[name][()].astype(np.float32)
            if arr.ndim != 2 or arr.shape[0] != n:
                raise ValueError(f"{cache_path}:features/{name}: expected [{n}, F] (one row per demo step), found {list(arr.shape)}")
            if not np.isfinite(arr).all():
                raise ValueError(f"{cache_path}:features/{name}: contains NaN/inf")
            out.append(arr)
    return out



def images_already_upright(data_path: str | Path) -> bool:
    """Whether a demo file's camera images are already rotated 180° (upright), as OpenVLA-OFT trained on.

    IMPORTANT: LIBERO renders upside down. The OFFICIAL LIBERO HDF5 files store the raw (upside-down)
    renders; openvla-oft rotated them by 180° when converting HDF5 -> RLDS for training (and flips
    the env's images with ``img[::-1, ::-1]`` at evaluation), so official files must be flipped.
    Our collector (``common/sim/demo_collection.py``) already stores flipped (upright) images. An explicit
    ``data.attrs["images_flipped"]`` wins; otherwise our collector's files are recognised by their
    ``tasks`` attribute (the official files have none).
    """
    import h5py

    with h5py.File(data_path, "r") as f:
        attrs = f["data"].attrs
        if "images_flipped" in attrs:
            return bool(attrs["images_flipped"])
        return "tasks" in attrs


def cache_features_for_file(
    extract: Callable[..., torch.Tensor],
    data_path: str | Path,
    out_path: str | Path,
    *,
    flip: str = "auto",
    num_episodes: int = 0,
    use_wrist: bool = True,
    use_proprio: bool = True,
    attrs: dict | None = None,
    on_progress: Callable[[], None] | None = None,
    progress: bool = True,
    batch_steps: int = 16,
) -> dict[str, Any]:
    """Write ``features/<demo name>`` [T, F] float32 for every demo of ``data_path`` into ``out_path``.

    ``extract(images, instructions, wrist_images=..., proprio=...) -> [n, F]`` (an
    ``OpenVLAFeatureExtractor`` built with ``flip_images=False``: the flip is decided here per file,
    ``flip`` = auto | yes | no). Images come from ``obs/agentview_rgb`` (+ ``obs/eye_in_hand_rgb``);
    proprio = ``ee_pos`` (3) + ``ee_ori`` axis-angle (3) + ``gripper_states`` (2), OFT's 8-d state.
    Inputs are prepared by ``vla_inputs.demo_step_inputs`` -> ``prepare_vla_inputs``, the function
    Phase 3 applies to env observations. For an ``OpenVLAFeatureExtractor`` the cache records its
    ``VLAInputSpec`` (checkpoint, feature, crop, JPEG, cameras, proprio, image size) in its attributes,
    which is what Phase 3 reproduces; a plain callable's settings are unknown, so its cache cannot be
    evaluated in closed loop. Resumable: demos already in the cache are skipped; ``attrs``
    (checkpoint, feature, ...) must match an existing cache. ``on_progress`` runs after each demo
    (Modal: volume commit).
    """
    import h5py

    data_path, out_path = Path(data_path), Path(out_path)
    if flip not in ("auto", "yes", "no"):
        raise ValueError(f"flip: expected auto, yes or no; got {flip!r}")
    do_flip = (not images_already_upright(data_path)) if flip == "auto" else flip == "yes"
    image_size = _image_size(data_path)
    known = spec_of_extractor(extract, use_wrist=use_wrist, use_proprio=use_proprio, image_size=image_size)
    prep = known or VLAInputSpec(checkpoint=str((attrs or {}).get("checkpoint", "")), use_wrist=use_wrist, use_proprio=use_proprio, image_size=image_size)
    meta = {"source": str(data_path), "flip_applied": do_flip, **(known.attrs() if known else {"use_wrist": use_wrist, "use_proprio": use_proprio, "image_size": image_size}), **(attrs or {})}
    if known is not None:
        clash = {k: (meta[k], v) for k, v in known.attrs().items() if str(meta[k]) != str(v)}
        if clash:
            raise ValueError(f"attrs: {clash} contradict the extractor's settings (attr, extractor)")
    meta = {k: "" if v is None else v for k, v in meta.items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    written = skipped = 0
    with h5py.File(data_path, "r") as src, h5py.File(out_path, "a") as dst:
        for key, value in meta.items():
            if key in dst.attrs and str(dst.attrs[key]) != str(value):
                raise ValueError(f"{out_path}: existing cache has {key}={dst.attrs[key]!r}, this run {value!r}; use another output path")
            dst.attrs[key] = value
        grp = dst.require_group("features")
        data = src["data"]
        names = sorted((k for k in data.keys() if k.startswith("demo")), key=lambda n: int(n.split("_")[-1]) if n.split("_")[-1].isdigit() else 1 << 30)
        if num_episodes > 0:
            names = names[:num_episodes]
        for name in tqdm(names, desc=f"features[{data_path.stem}]", disable=not progress):
            if name in grp:
                skipped += 1
                continue
            demo = data[name]
            if "obs/agentview_rgb" not in demo:
                raise ValueError(f"{data_path}: data/{name} has no obs/agentview_rgb (collect demos with images)")
            instr = demo_instruction(data, name)
            T = int(demo["actions"].shape[0])
            if len(demo["obs/agentview_rgb"]) != T:
                raise ValueError(f"{data_path}: data/{name}: {len(demo['obs/agentview_rgb'])} images for {T} actions")
            feats = [
                run_extractor(extract, demo_step_inputs(demo, slice(s, min(s + batch_steps, T)), instr, spec=prep, flip=do_flip)).numpy()
                for s in range(0, T, batch_steps)
            ]
            arr = np.concatenate(feats)
            if arr.shape[0] != T or not np.isfinite(arr).all():
                raise RuntimeError(f"{data_path}: data/{name}: bad features {arr.shape} (finite={np.isfinite(arr).all()})")
            grp.create_dataset(name, data=arr.astype(np.float32))
            dst.attrs["feature_dim"] = int(arr.shape[1])
            dst.flush()
            written += 1
            if on_progress is not None:
                on_progress()
    return {"data": str(data_path), "cache": str(out_path), "flip_applied": do_flip, "written": written, "skipped": skipped}


def demo_instruction(data: Any, name: str) -> str:
    """A demo's language instruction: its own attribute, the file's, or the official ``problem_info``."""
    demo = data[name]
    instr = demo.attrs.get("language_instruction", data.attrs.get("language_instruction", ""))
    instr = instr.decode() if isinstance(instr, bytes) else str(instr)
    if not instr and "problem_info" in data.attrs:
        instr = json.loads(data.attrs["problem_info"]).get("language_instruction", "")
    return instr


def _image_size(data_path: Path) -> int:
    """Side of the square camera frames of a demo file (the size Phase 3 must render)."""
    import h5py

    with h5py.File(data_path, "r") as f:
        for name, demo in f["data"].items():
            if name.startswith("demo") and "obs/agentview_rgb" in demo:
                shape = demo["obs/agentview_rgb"].shape
                if len(shape) != 4 or shape[1] != shape[2]:
                    raise ValueError(f"{data_path}: data/{name}/obs/agentview_rgb: expected square [T, H, H, 3] frames, found {list(shape)}")
                return int(shape[1])
    raise ValueError(f"{data_path}: no demo has obs/agentview_rgb (collect demos with images)")


# --- which spec a trained head needs -------------------------------------------------------------------------
def head_feature_caches(head_config: dict, head_extra: dict, head_path: Path) -> list[Path]:
    """The feature caches a head was trained on (from its recorded Phase 2 train config)."""
    train = head_extra.get("train_config") or {}
    if train.get("backbone") != "openvla-oft":
        raise ValueError(f"{head_path}: recorded train config has backbone {train.get('backbone')!r}, expected 'openvla-oft'")
    if train.get("feature_cache"):
        return [Path(p.strip()) for p in str(train["feature_cache"]).split(",") if p.strip()]
    data = [p.strip() for p in str(train.get("data", "")).split(",") if p.strip()]
    if not data or not train.get("data_dir"):
        raise ValueError(f"{head_path}: recorded train config names no --data / data_dir to find its feature caches")
    return [feature_cache_path(Path(train["data_dir"]), p) for p in data]


def spec_of_caches(caches: Sequence[Path], where: str) -> VLAInputSpec:
    """The one ``VLAInputSpec`` a set of feature caches was computed with (they must all agree)."""
    import h5py

    specs: dict[VLAInputSpec, str] = {}
    for cache in map(Path, caches):
        if not cache.exists():
            raise FileNotFoundError(
                f"{cache}: feature cache of {where} not found; evaluation reads the input settings "
                "(checkpoint, cameras, crop, proprio) from it: mount the data volume or pass the same --data-dir"
            )
        with h5py.File(cache, "r") as f:
            specs.setdefault(VLAInputSpec.from_attrs(dict(f.attrs), str(cache)), str(cache))
    if len(specs) != 1:
        raise ValueError(f"{where}: its feature caches were computed with different settings: {json.dumps({v: k.attrs() for k, v in specs.items()})}")
    return next(iter(specs))


def spec_for_head(head_config: dict, head_extra: dict, head_path: Path) -> VLAInputSpec:
    """The input spec of an openvla-oft head: ``config["vla_inputs"]`` when Phase 2 recorded it, else
    read from the attributes of the feature caches it was trained on (all must agree)."""
    if head_config.get("vla_inputs"):
        return VLAInputSpec.from_attrs(head_config["vla_inputs"], f"{head_path}:config.vla_inputs")
    return spec_of_caches(head_feature_caches(head_config, head_extra, head_path), f"head {head_path}")
