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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The ``tiny`` pipeline profile run once per session through the real simulator (demos -> tokenizers
    -> main models -> rollouts -> drafts -> Phase 3 comparison), the naive and robust branches side by
    side as the 2-worker profiles run them. Its root is laid out as ``make run``'s is."""
    from common.pipeline.run import PROFILES, run_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    logs: list[str] = []
    summary = run_pipeline(PROFILES["tiny"], root=root / "artifacts", report_dir=root / "report", log=logs.append, progress=False,
                           branches=2)
    return {"root": root, "summary": summary, "logs": logs}
