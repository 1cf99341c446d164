"""Phase 2 — train the main model (backbone + RFSQ head) and the draft model with projection on
RFSQ tokens of expert demonstrations.

Local:  python -m phase2_draft_retrain.modal_train_draft_with_projection --num-episodes 200 --epochs 50 \
            --batch-size 32 --data data/libero_object.hdf5,data/libero_spatial.hdf5 --backbone state
Modal:  modal run phase2_draft_retrain/modal_train_draft_with_projection.py --num-episodes 200 --epochs 50 \
            --batch-size 32 --data /data/libero_object.hdf5,/data/libero_spatial.hdf5

Both take the same flags (fields of ``PolicyTrainConfig``; see ``common/policy/train.py``).
Naive tokens: add ``--rfsq-checkpoint <models>/rfsq_best.pt`` (outputs get the suffix ``_naive``).

OpenVLA-OFT features (cloud only; computed once and cached on the ``rsd-data`` volume):
    modal run phase2_draft_retrain/modal_train_draft_with_projection.py::cache_openvla_features \
        --data /data/libero_object.hdf5,/data/libero_spatial.hdf5
then train with ``--backbone openvla-oft``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

import modal

import rsd_entry
from common.policy.config import PolicyTrainConfig
from common.policy.train import train_policy

app = modal.App("rsd-phase2-train")
models_volume = rsd_entry.models_volume()
data_volume = rsd_entry.data_volume()

@app.function(
    image=rsd_entry.cloud_image(),
    gpu="A10G",
    volumes={rsd_entry.MODELS_MOUNT: models_volume, rsd_entry.DATA_MOUNT: data_volume},
    timeout=8 * 3600,
)
def train_remote(config: dict) -> dict:
    cfg = rsd_entry.resolve(PolicyTrainConfig(**config))  # the container's /models, /data
    rsd_entry.setup_process(cfg.torch_threads)
    if not modal.is_local():
        data_volume.reload()  # see demos / feature caches written since the container started

    def commit() -> None:
        models_volume.commit()
        data_volume.commit()  # the results JSON lives under /data/results

    # .local() (tests) has no volume to commit; in the container, persist every checkpoint.
    return train_policy(cfg, on_checkpoint=None if modal.is_local() else commit)


@app.function(
    image=rsd_entry.vla_image(),
    gpu="H100",
    volumes={rsd_entry.DATA_MOUNT: data_volume},
    timeout=24 * 3600,
)
def cache_openvla_features(
    data: str,
    checkpoint: str = "combined",
    feature: str = "action_tokens_mean",
    flip: str = "auto",
    num_episodes: int = 0,
    out: str = "",
    use_wrist: bool = True,
    use_proprio: bool = True,
) -> list[dict]:
    """Run OpenVLA-OFT once per demo step and write the feature cache that ``--backbone openvla-oft`` reads.

    data: comma-separated HDF5 paths on the data volume (with ``obs/agentview_rgb`` / ``eye_in_hand_rgb``);
    checkpoint: a key of ``OPENVLA_OFT_LIBERO_CHECKPOINTS`` (libero_spatial/object/goal/10, combined)
      or a Hugging Face id; out: comma-separated cache paths ("" = <data dir>/features/<stem>.openvla_oft_features.h5);
    flip: auto | yes | no (IMPORTANT: official LIBERO HDF5 images are upside down and must be flipped,
      our collector's are already upright; see ``images_already_upright``).
    Resumable: rerunning skips demos already cached; the volume is committed after every demo.
    """
    from common.artifacts import ArtifactDirs
    from common.policy.backbones.openvla import OpenVLAFeatureExtractor, load_oft_proprio_projector
    from common.policy.backbones.openvla_preprocessing import OPENVLA_OFT_LIBERO_CHECKPOINTS, OPENVLA_OFT_UNNORM_KEYS
    from common.policy.feature_cache import cache_features_for_file, feature_cache_path
    from common.policy.labels import file_suite

    if not modal.is_local():
        data_volume.reload()
    paths = [p.strip() for p in data.split(",") if p.strip()]
    data_dir = ArtifactDirs.from_env(os.environ).data
    outs = [o.strip() for o in out.split(",") if o.strip()] if out else [str(feature_cache_path(data_dir, p)) for p in paths]
    if len(outs) != len(paths):
        raise ValueError(f"--out must name one cache per --data file ({len(paths)}); got {out!r}")
    hf_id = OPENVLA_OFT_LIBERO_CHECKPOINTS.get(checkpoint, checkpoint)
    projector = load_oft_proprio_projector(hf_id) if use_proprio else None
    extractor = OpenVLAFeatureExtractor(
        checkpoint=hf_id, device="cuda", flip_images=False,  # the flip is decided per file below
        center_crop=True, num_images_in_input=2 if use_wrist else 1, feature=feature, proprio_projector=projector,
        unnorm_key=None,
    )
    results = []
    for path, cache in zip(paths, outs):
        suite = file_suite(path)
        if use_proprio:
            if suite not in OPENVLA_OFT_UNNORM_KEYS:
                raise ValueError(f"{path}: suite {suite!r} has no OpenVLA-OFT proprio statistics; pass --no-use-proprio")
            # the checkpoint's proprio q01/q99 statistics are per training dataset (= suite)
            extractor.unnorm_key = OPENVLA_OFT_UNNORM_KEYS[suite]
            extractor._load_norm_stats(extractor.model, hf_id)
        attrs = {"checkpoint": hf_id, "feature": feature, "suite": suite, "unnorm_key": extractor.unnorm_key}
        res = cache_features_for_file(
            extractor, path, cache, flip=flip, num_episodes=num_episodes, use_wrist=use_wrist,
            use_proprio=use_proprio, attrs=attrs, on_progress=None if modal.is_local() else data_volume.commit,
        )
        print(json.dumps(res))
        results.append(res)
    return results


def _run_on_modal(cfg: PolicyTrainConfig) -> dict:
    result = train_remote.remote(asdict(cfg))
    print(json.dumps(result, indent=2, default=str))
    return result


main = app.local_entrypoint()(rsd_entry.modal_entrypoint(PolicyTrainConfig, _run_on_modal))


def cli(argv: list[str] | None = None) -> dict:
    cfg = rsd_entry.parse_config(
        PolicyTrainConfig, argv, prog="python -m phase2_draft_retrain.modal_train_draft_with_projection"
    )
    result = train_policy(cfg)
    print(json.dumps({k: v for k, v in result.items() if k not in ("task_table", "provenance", "train_config")}, indent=2, default=str))
    return result


if __name__ == "__main__":
    rsd_entry.main(cli, sys.argv[1:])
