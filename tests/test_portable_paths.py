"""Results record repo-relative paths (common/provenance.py ``portable_path``) and the readers that take a
path back from a results file resolve it against the repository root, so they behave as before."""

import json
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.eval.closed_loop import _check_resume
from common.eval.config import EvalConfig
from common.pipeline.stages import Stages
from common.policy.config import PolicyTrainConfig
from common.policy.summary import summary_markdown
from common.policy.train import _check_before_training
from common.provenance import REPO_ROOT, json_safe, portable_path, recorded_path, write_json

ROOT = REPO_ROOT.as_posix()


def test_portable_path_makes_paths_under_the_repository_relative_and_leaves_others_alone():
    assert portable_path(REPO_ROOT / "artifacts" / "models" / "rfsq_best.pt") == "artifacts/models/rfsq_best.pt"
    assert portable_path(f"{ROOT}/results/phase1") == "results/phase1"
    assert portable_path(ROOT) == "."
    for other in ("/models/rfsq_best.pt", "/data/libero_object_demos.hdf5", "/tmp/x/models", "artifacts/models",
                  f"{ROOT}2/models", "robust", "0,3,5", ""):
        assert portable_path(other) == other  # Modal volumes, scratch folders, relative paths, a sibling folder, no path
    # a comma-separated --data list, item by item
    assert portable_path(f"{ROOT}/data/a.hdf5,/data/b.hdf5,data/c.hdf5") == "data/a.hdf5,/data/b.hdf5,data/c.hdf5"


def test_recorded_path_reads_back_what_portable_path_wrote():
    inside = REPO_ROOT / "artifacts" / "pipeline" / "quick" / "models"
    assert recorded_path(portable_path(inside)) == inside
    assert recorded_path("/models") == Path("/models")
    assert recorded_path(Path("/tmp/x")) == Path("/tmp/x")


def test_json_safe_converts_paths_at_any_depth_and_nothing_else():
    payload = {"config": {"models_dir": str(REPO_ROOT / "m"), "out": REPO_ROOT / "r" / "x", "seed": 3},
               "files": [str(REPO_ROOT / "d.hdf5"), "/data/d.hdf5"], "note": f"made in {ROOT}/x", "rate": 0.5}
    assert json_safe(payload) == {"config": {"models_dir": "m", "out": "r/x", "seed": 3},
                                  "files": ["d.hdf5", "/data/d.hdf5"], "note": f"made in {ROOT}/x", "rate": 0.5}


def test_write_json_records_repo_relative_paths(tmp_path):
    path = write_json(tmp_path / "x.json", {"head_checkpoint": REPO_ROOT / "artifacts" / "models" / "best_rfsq_head.pt"})
    assert json.loads(path.read_text()) == {"head_checkpoint": "artifacts/models/best_rfsq_head.pt"}
    assert ROOT not in path.read_text()


def test_phase2_summary_markdown_prints_repo_relative_paths():
    s = {"tokenizer": {"conditioning": "layernorm", "path": f"{ROOT}/artifacts/models/rfsq_robust_best.pt", "content_hash": "h",
                       "num_layers": 8, "tokens_per_layer": 4, "num_levels": 7},
         "tag": "", "data": f"{ROOT}/data/a.hdf5,/data/b.hdf5", "num_episodes": 2, "train_episodes": 1, "val_episodes": 1,
         "train_steps": 10, "val_steps": 5, "num_tasks": 1, "backbone": "state", "device": "cpu", "wall_seconds": 1.0}
    md = summary_markdown(s)
    assert "Data: `data/a.hdf5,/data/b.hdf5`" in md and "Tokenizer `artifacts/models/rfsq_robust_best.pt`" in md
    assert ROOT not in md


def test_evaluation_resumes_from_a_key_recorded_repo_relative_and_refuses_another_models_dir(tmp_path):
    """Writer + reader: the key ``evaluate`` writes records models_dir repo-relative; the resume check of the
    same configuration (models_dir absolute, as the pipeline passes it) still accepts it."""
    cfg = EvalConfig(models_dir=str(REPO_ROOT / "artifacts" / "models"), out=str(tmp_path / "run"))
    key_path = tmp_path / "run" / "eval_config.json"
    write_json(key_path, {"resume_key": cfg.resume_key(), "config": asdict(cfg), "checkpoints": {"head": "abc"}})
    on_disk = json.loads(key_path.read_text())
    assert on_disk["resume_key"]["models_dir"] == "artifacts/models"
    _check_resume(cfg, tmp_path / "run", key_path, {"head": "abc"}, has_rows=True)  # same configuration: resumes
    # a key written before paths were recorded repo-relative (absolute) resumes too
    (tmp_path / "old.json").write_text(json.dumps({"resume_key": cfg.resume_key(), "checkpoints": {"head": "abc"}}))
    _check_resume(cfg, tmp_path / "run", tmp_path / "old.json", {"head": "abc"}, has_rows=True)
    other = EvalConfig(models_dir=str(REPO_ROOT / "artifacts" / "other"), out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="holds results of a different configuration"):
        _check_resume(other, tmp_path / "run", key_path, {"head": "abc"}, has_rows=True)


def _phase2_check(tmp_path, models_dir: Path) -> None:
    cfg = PolicyTrainConfig(data="d.hdf5", train="main", models_dir=str(models_dir))
    paths = {"head": tmp_path / "models" / "best_rfsq_head.pt", "summary_json": tmp_path / "results" / "train_summary.json"}
    _check_before_training(cfg, SimpleNamespace(model=SimpleNamespace(num_layers=8), path="tok.pt"), paths)


def test_phase2_summary_of_the_same_models_dir_recorded_repo_relative_is_recognized(tmp_path):
    """Writer + reader: a summary recording its models_dir repo-relative belongs to the run training into
    that folder (given absolute); another models dir is still refused."""
    models = REPO_ROOT / "artifacts" / "pipeline" / "quick" / "models"
    write_json(tmp_path / "results" / "train_summary.json", {"train_config": {"models_dir": str(models)}})
    assert json.loads((tmp_path / "results" / "train_summary.json").read_text())["train_config"]["models_dir"] == \
        "artifacts/pipeline/quick/models"
    _phase2_check(tmp_path, models)
    with pytest.raises(FileExistsError, match=r"holds the summary of the models in .*artifacts/pipeline/quick/models"):
        _phase2_check(tmp_path, REPO_ROOT / "artifacts" / "pipeline" / "other" / "models")


def test_a_stage_stamp_records_repo_relative_inputs_and_names_only_what_changed(tmp_path):
    logs: list[str] = []
    stages = Stages(tmp_path, logs.append)
    out = tmp_path / "out.txt"

    def write() -> str:
        out.write_text("x")
        return "wrote"

    inputs = {"cfg": {"models_dir": str(REPO_ROOT / "artifacts" / "models"), "epochs": 1}}
    stages.run("s", inputs, [out], write)
    assert json.loads((tmp_path / "stamps" / "s.json").read_text())["inputs"]["cfg"]["models_dir"] == "artifacts/models"
    stages.run("s", inputs, [out], write)
    assert logs[-1].startswith("[s] up to date")
    stages.run("s", {"cfg": {**inputs["cfg"], "epochs": 2}}, [out], write)
    assert "[s] rerun: settings or inputs changed: cfg.epochs" in logs
