"""The ONE preparation of OpenVLA-OFT inputs, shared by feature caching (demo files, Phase 2) and
closed-loop evaluation (env observations, Phase 3), so the features the head was trained on and the
features it sees in the simulator cannot drift apart.

* ``VLAInputSpec``: what a feature cache was computed with (checkpoint, feature, cameras, proprio,
  center crop, JPEG round trip, rendered image size). ``cache_features_for_file`` writes it into the
  cache's attributes; Phase 3 reads it back (``feature_cache.spec_for_head``) and renders/prepares accordingly.
* ``prepare_vla_inputs``: orientation (the 180° flip where the source is upside down), camera
  selection, OFT's 8-d proprio, shape/type checks -> ``VLABatch``. Demo steps (``demo_step_inputs``)
  and env observations (``env_observation_inputs``) both go through it; the extractor then applies
  JPEG, resize to 224, center crop and the prompt template (``OpenVLAFeatureExtractor``) the same way.
* ``build_extractor``: the frozen extractor for a spec. Model loaders are looked up by checkpoint id
  in ``MODEL_LOADERS`` (tests register a small stand-in there; nothing on the command line can):
  any id not registered loads the real OpenVLA-OFT checkpoint, which fails loudly where it cannot.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from common.policy.backbones.openvla import OpenVLAFeatureExtractor
from common.policy.backbones.openvla_preprocessing import OPENVLA_OFT_UNNORM_KEYS

# proprio = eef position (3) + eef axis-angle (3) + gripper finger positions (2): OFT's LIBERO state
OFT_PROPRIO_DIM = 8
# cache attributes that describe how its features were computed (all must match at evaluation)
SPEC_ATTRS = ("checkpoint", "feature", "use_wrist", "use_proprio", "center_crop", "jpeg_roundtrip", "image_size")


@dataclass(frozen=True)
class VLAInputSpec:
    """How OpenVLA-OFT features were (and must again be) computed."""

    checkpoint: str  # Hugging Face id or local directory of the OFT checkpoint
    feature: str = "action_tokens_mean"  # which hidden state (see openvla_preprocessing.select_feature)
    use_wrist: bool = True  # second image: the wrist camera
    use_proprio: bool = True  # 8-d proprio token (OFT's ProprioProjector)
    center_crop: bool = True  # checkpoints trained with image_aug
    jpeg_roundtrip: bool = True  # OFT's RLDS data and eval JPEG-encode the frames
    image_size: int = 128  # side of the rendered camera images the features came from (pixels)

    @property
    def cameras(self) -> tuple[str, ...]:
        """``LiberoTaskEnv`` cameras to render at evaluation."""
        return ("agentview", "wrist") if self.use_wrist else ("agentview",)

    def attrs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_attrs(cls, attrs: Any, where: str) -> "VLAInputSpec":
        missing = [k for k in SPEC_ATTRS if k not in attrs]
        if missing:
            raise ValueError(
                f"{where}: feature cache attributes lack {missing} (found {sorted(attrs)}); it was written without "
                "the settings evaluation must reproduce: recompute it with cache_openvla_features"
            )

        def as_bool(k: str) -> bool:
            v = attrs[k]
            if isinstance(v, (bool, np.bool_, int, np.integer)):
                return bool(v)
            raise ValueError(f"{where}: attribute {k}: expected a bool, found {v!r}")

        return cls(
            checkpoint=str(attrs["checkpoint"]), feature=str(attrs["feature"]), use_wrist=as_bool("use_wrist"),
            use_proprio=as_bool("use_proprio"), center_crop=as_bool("center_crop"),
            jpeg_roundtrip=as_bool("jpeg_roundtrip"), image_size=int(attrs["image_size"]),
        )


def unnorm_key_for(spec: VLAInputSpec, suite: str) -> str | None:
    """The checkpoint's proprio-statistics key for a suite (the same rule when caching and evaluating)."""
    if not spec.use_proprio:
        return None
    if suite not in OPENVLA_OFT_UNNORM_KEYS:
        raise ValueError(
            f"suite {suite!r} has no OpenVLA-OFT proprio statistics (known: {sorted(OPENVLA_OFT_UNNORM_KEYS)}); "
            "cache features with --no-use-proprio"
        )
    return OPENVLA_OFT_UNNORM_KEYS[suite]


@dataclass
class VLABatch:
    """Upright uint8 frames, instructions and raw (unnormalized) proprio of n steps."""

    images: list[np.ndarray]
    instructions: list[str]
    wrist_images: list[np.ndarray] | None
    proprio: np.ndarray | None  # [n, 8] float64


def oft_proprio(eef_pos: np.ndarray, eef_axis_angle: np.ndarray, gripper_qpos: np.ndarray) -> np.ndarray:
    """[n, 8] = position (3) + axis-angle (3) + gripper finger positions (2), float64."""
    parts = [np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (eef_pos, eef_axis_angle, gripper_qpos)]
    for name, arr, dim in zip(("eef_pos", "eef_axis_angle", "gripper_qpos"), parts, (3, 3, 2)):
        if arr.shape[1] != dim:
            raise ValueError(f"proprio {name}: expected [n, {dim}], found {list(arr.shape)}")
    return np.concatenate(parts, axis=1)


def _frames(images: Any, n: int, size: int, flip: bool, what: str) -> list[np.ndarray]:
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[0] != n or arr.shape[3] != 3:
        raise ValueError(f"{what}: expected [{n}, H, W, 3] frames, found {list(arr.shape)}")
    if arr.dtype != np.uint8:
        raise TypeError(f"{what}: expected uint8 frames, found {arr.dtype}")
    if arr.shape[1:3] != (size, size):
        raise ValueError(
            f"{what}: expected {size}x{size} frames (the size the features were cached from), found "
            f"{arr.shape[1]}x{arr.shape[2]}"
        )
    if flip:  # LIBERO renders upside down: rotate 180 degrees, as OFT's data conversion did
        arr = arr[:, ::-1, ::-1]
    return [np.ascontiguousarray(a) for a in arr]


def prepare_vla_inputs(
    images: Any,
    instructions: Sequence[str],
    *,
    spec: VLAInputSpec,
    flip: bool,
    wrist_images: Any = None,
    proprio: np.ndarray | None = None,
) -> VLABatch:
    """The shared step: frames in the orientation OFT trained on + the cameras/proprio the spec uses."""
    n = len(instructions)
    out_images = _frames(images, n, spec.image_size, flip, "agentview images")
    wrist = None
    if spec.use_wrist:
        if wrist_images is None:
            raise ValueError("wrist images: the features use the wrist camera (use_wrist), found none")
        wrist = _frames(wrist_images, n, spec.image_size, flip, "wrist images")
    p = None
    if spec.use_proprio:
        if proprio is None:
            raise ValueError("proprio: the features use OFT's 8-d proprio (use_proprio), found none")
        p = np.asarray(proprio, dtype=np.float64)
        if p.shape != (n, OFT_PROPRIO_DIM) or not np.isfinite(p).all():
            raise ValueError(f"proprio: expected finite [{n}, {OFT_PROPRIO_DIM}], found {list(p.shape)}")
    return VLABatch(images=out_images, instructions=[str(i) for i in instructions], wrist_images=wrist, proprio=p)


def demo_step_inputs(demo: Any, steps: slice, instruction: str, *, spec: VLAInputSpec, flip: bool) -> VLABatch:
    """Inputs of demo steps ``steps`` of one HDF5 demo group (``obs/agentview_rgb`` ...)."""
    images = demo["obs/agentview_rgb"][steps]
    n = len(images)
    wrist = demo["obs/eye_in_hand_rgb"][steps] if spec.use_wrist else None
    proprio = None
    if spec.use_proprio:
        proprio = oft_proprio(demo["obs/ee_pos"][steps], demo["obs/ee_ori"][steps], demo["obs/gripper_states"][steps])
    return prepare_vla_inputs(images, [instruction] * n, spec=spec, flip=flip, wrist_images=wrist, proprio=proprio)


def env_observation_inputs(obs: dict[str, np.ndarray], instruction: str, *, spec: VLAInputSpec) -> VLABatch:
    """Inputs of one ``LiberoTaskEnv`` observation (cameras on). The env already rotates its frames
    upright (``LiberoTaskEnv._postprocess``), so no flip here; the axis-angle comes from the same
    quaternion conversion our demo collector stores as ``ee_ori``."""
    from common.sim.libero_env import quat_to_axis_angle

    keys = {"agentview": "agentview_rgb", "wrist": "eye_in_hand_rgb"}
    missing = [keys[c] for c in spec.cameras if keys[c] not in obs]
    if missing:
        raise ValueError(f"observation: expected camera frames {missing} (create the env with cameras={spec.cameras}), found keys {sorted(obs)}")
    proprio = None
    if spec.use_proprio:
        proprio = oft_proprio(obs["robot0_eef_pos"], quat_to_axis_angle(np.asarray(obs["robot0_eef_quat"])[None]), obs["robot0_gripper_qpos"])
    wrist = obs["eye_in_hand_rgb"][None] if spec.use_wrist else None
    return prepare_vla_inputs(obs["agentview_rgb"][None], [instruction], spec=spec, flip=False, wrist_images=wrist, proprio=proprio)


def run_extractor(extract: Callable[..., torch.Tensor], batch: VLABatch, *, timer: Any = None) -> torch.Tensor:
    """features [n, F] float32 of a prepared batch (``timer`` splits preprocess / backbone stages)."""
    kwargs: dict[str, Any] = {}
    if batch.wrist_images is not None:
        kwargs["wrist_images"] = batch.wrist_images
    if batch.proprio is not None:
        kwargs["proprio"] = batch.proprio
    if timer is not None:
        kwargs["timer"] = timer
    feats = torch.as_tensor(extract(batch.images, batch.instructions, **kwargs)).float().cpu()
    if feats.dim() != 2 or feats.shape[0] != len(batch.images):
        raise RuntimeError(f"extractor: expected features [{len(batch.images)}, F], found {list(feats.shape)}")
    return feats


# --- the extractor for a spec ----------------------------------------------------------------------------
# checkpoint id -> loader(spec, device) -> (model, processor, proprio_projector or None). Tests register a
# stand-in here; an unregistered id loads the real checkpoint (cloud image: transformers + prismatic).
ModelLoader = Callable[[VLAInputSpec, str], tuple[Any, Any, Any]]
MODEL_LOADERS: dict[str, ModelLoader] = {}


def _load_openvla_oft(spec: VLAInputSpec, device: str) -> tuple[Any, Any, Any]:
    from common.policy.backbones.openvla import load_oft_proprio_projector, load_openvla_model

    model, processor = load_openvla_model(spec.checkpoint, device=device)
    projector = load_oft_proprio_projector(spec.checkpoint, device=device) if spec.use_proprio else None
    return model, processor, projector


def build_extractor(spec: VLAInputSpec, *, suite: str, device: str) -> OpenVLAFeatureExtractor:
    """The frozen extractor that reproduces ``spec`` for ``suite`` (proprio statistics are per suite)."""
    loader = MODEL_LOADERS.get(spec.checkpoint, _load_openvla_oft)
    model, processor, projector = loader(spec, device)
    unnorm_key = unnorm_key_for(spec, suite)
    extractor = OpenVLAFeatureExtractor(
        checkpoint=spec.checkpoint, device=device, flip_images=False, center_crop=spec.center_crop,
        jpeg_roundtrip=spec.jpeg_roundtrip, num_images_in_input=2 if spec.use_wrist else 1, feature=spec.feature,
        unnorm_key=unnorm_key, proprio_projector=projector, model=model, processor=processor,
    )
    if unnorm_key is not None and getattr(model, "norm_stats", None) is None:
        extractor._load_norm_stats(model, spec.checkpoint)
    return extractor


def spec_of_extractor(extract: Any, *, use_wrist: bool, use_proprio: bool, image_size: int) -> VLAInputSpec | None:
    """The spec an ``OpenVLAFeatureExtractor`` computes (None for a plain callable, whose settings are unknown)."""
    if not isinstance(extract, OpenVLAFeatureExtractor):
        return None
    if extract.flip_images:
        raise ValueError("extractor: build it with flip_images=False; the flip is decided per demo file (flip=auto|yes|no)")
    if (extract.num_images_in_input == 2) != use_wrist:
        raise ValueError(f"extractor takes {extract.num_images_in_input} image(s) but use_wrist={use_wrist}")
    return VLAInputSpec(
        checkpoint=extract.checkpoint, feature=extract.feature, use_wrist=use_wrist, use_proprio=use_proprio,
        center_crop=extract.center_crop, jpeg_roundtrip=extract.jpeg_roundtrip, image_size=image_size,
    )
