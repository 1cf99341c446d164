"""Phase 1 — train the naive or robust RFSQ action tokenizer.

Local:  python -m phase1_improved.train_rfsq_robust --use-layernorm --num-episodes 50 --epochs 100 --batch-size 64
Modal:  modal run phase1_improved/train_rfsq_robust.py --use-layernorm --num-episodes 50 --epochs 100 --batch-size 64

Both take the same flags (fields of ``TokenizerTrainConfig``). Output: ``rfsq_robust_best.pt``
(robust) or ``rfsq_best.pt`` (``--no-use-layernorm``) in the models dir — ``./artifacts/models``
locally, the ``rsd-models`` volume at ``/models`` on Modal (``RSD_MODELS_DIR`` overrides) — plus
``*_last.pt`` for ``--resume`` and ``*_metrics.jsonl`` with one line per epoch.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict

import modal

import rsd_entry
from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

app = modal.App("rsd-phase1-train-rfsq")
models_volume = rsd_entry.models_volume()
data_volume = rsd_entry.data_volume()


@app.function(
    image=rsd_entry.cloud_image(),
    gpu="T4",  # optional: the tokenizer is small; a GPU mostly shortens 100-epoch runs on big datasets
    volumes={rsd_entry.MODELS_MOUNT: models_volume, rsd_entry.DATA_MOUNT: data_volume},
    timeout=4 * 3600,
)
def train_remote(config: dict) -> dict:
    cfg = rsd_entry.resolve(TokenizerTrainConfig(**config))  # the container's /models
    rsd_entry.setup_process(cfg.torch_threads)
    # .local() (tests) has no volume to commit; in the container, persist every checkpoint.
    return train_tokenizer(cfg, on_checkpoint=None if modal.is_local() else models_volume.commit)


def _run_on_modal(cfg: TokenizerTrainConfig) -> dict:
    result = train_remote.remote(asdict(cfg))
    print(json.dumps(result, indent=2))
    return result


main = app.local_entrypoint()(rsd_entry.modal_entrypoint(TokenizerTrainConfig, _run_on_modal))


def cli(argv: list[str] | None = None) -> dict:
    cfg = rsd_entry.parse_config(TokenizerTrainConfig, argv, prog="python -m phase1_improved.train_rfsq_robust")
    result = train_tokenizer(cfg)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    rsd_entry.main(cli, sys.argv[1:])
