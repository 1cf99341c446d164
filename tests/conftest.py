import os

import pytest
import torch

# Tiny models: one thread is fastest on a shared 2-core machine (thread start-up otherwise dominates: 34 s -> 5 s).
torch.set_num_threads(1)
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """An isolated models dir (the env var every entry point honours)."""
    path = tmp_path / "models"
    monkeypatch.setenv("RSD_MODELS_DIR", str(path))
    monkeypatch.setenv("RSD_RESULTS_DIR", str(tmp_path / "results"))
    return path
