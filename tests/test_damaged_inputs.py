"""Damaged inputs never pass silently, and every error says what to do (issue 38), one test or a few each:

- NaN observations are an error naming the file and the demo, whichever split the demo lands in;
- an HDF5 group where the ``actions`` dataset belongs names the file and demo;
- a corrupt ``.pt`` is one line ("not readable as a checkpoint (...); re-create it"), never advice to load unsafely;
- a full disk while saving is "no space left while writing <path>", and the earlier file is kept;
- ``--resume`` with nothing to resume is refused; a copied models folder resumes; a differing setting
  is named with both values and what to do;
- Phase 1's comparison checks ``--out`` before the work;
- rates with no episodes are written as ``null`` (strict JSON), and files with bare ``NaN`` still read;
- the head/tokenizer mismatch names the CLI flag.
"""

import errno
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

import common.checkpoints as checkpoints
from common.checkpoints import CheckpointError, NoSpaceError, atomic_torch_save, read_checkpoint, read_training_state
from common.data.episodes import load_hdf5_episodes, split_episodes
from common.jsonl import append_jsonl, read_jsonl
from common.provenance import write_json
from common.training_loop import RunFiles

TINY_TOKENIZER = dict(epochs=1, num_episodes=6, latent_dim=4, batch_size=256, progress=False)


def _strict(text: str):
    """What a strict JSON reader (JavaScript's JSON.parse) accepts: no NaN / Infinity."""
    def refuse(name):
        raise ValueError(f"bare {name}")
    return json.loads(text, parse_constant=refuse)


def _demos(path: Path, n: int = 6, *, obs_nan: tuple[int, ...] = (), actions_group: int | None = None) -> Path:
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i in range(n):
            g = f.create_group(f"data/demo_{i}")
            if i == actions_group:
                g.create_group("actions").create_dataset("x", data=np.zeros((20, 7), np.float32))
            else:
                g.create_dataset("actions", data=rng.uniform(-0.5, 0.5, (20, 7)).astype(np.float32))
            obs = rng.normal(size=(20, 9)).astype(np.float32)
            if i in obs_nan:
                obs[3, 2] = np.nan
            g.create_dataset("obs/low_dim", data=obs)
            g.attrs["task_id"] = 0
    return path


# --- demo files ---------------------------------------------------------------------------------------
def test_nan_observations_name_file_and_demo_whichever_split_the_demo_lands_in(tmp_path):
    train, val = split_episodes(load_hdf5_episodes(_demos(tmp_path / "ok.hdf5")), val_fraction=0.2, seed=0)
    held_out = int(val[0].name.split("_")[1])
    path = _demos(tmp_path / "d.hdf5", obs_nan=(held_out,))
    with pytest.raises(ValueError, match=rf"d\.hdf5:data/demo_{held_out}/obs/low_dim: observations contain NaN/inf in 1 of 20 rows \(first: row 3\)"):
        load_hdf5_episodes(path)
    with pytest.raises(ValueError, match=r"all\.hdf5:data/demo_0/obs/low_dim: observations contain NaN/inf"):
        load_hdf5_episodes(_demos(tmp_path / "all.hdf5", obs_nan=tuple(range(6))))


def test_nan_observations_stop_phase2_before_training(tmp_path):
    from common.policy.config import PolicyTrainConfig
    from common.policy.train import train_policy
    from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    models = tmp_path / "models"
    train_tokenizer(TokenizerTrainConfig(data=str(_demos(tmp_path / "ok.hdf5")), models_dir=str(models), **TINY_TOKENIZER))
    bad = _demos(tmp_path / "bad.hdf5", obs_nan=(5,))
    with pytest.raises(ValueError, match=r"bad\.hdf5:data/demo_5/obs/low_dim: observations contain NaN/inf"):
        train_policy(PolicyTrainConfig(data=str(bad), models_dir=str(models), results_dir=str(tmp_path / "results"), epochs=1,
                                       d_model=32, num_blocks=1, num_heads=2, progress=False))
    assert not list(models.glob("*head*"))


def test_an_actions_group_instead_of_a_dataset_names_file_and_demo(tmp_path):
    with pytest.raises(ValueError, match=r"g\.hdf5:data/demo_2/actions: expected a dataset \(an array\), found an HDF5 group"):
        load_hdf5_episodes(_demos(tmp_path / "g.hdf5", actions_group=2))


# --- checkpoint files -----------------------------------------------------------------------------------
@pytest.mark.parametrize("content, reason", [
    (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not a torch checkpoint"),
    (b"", "empty or cut short"),
    ("zip", "a damaged or truncated torch archive"),
])
def test_a_corrupt_checkpoint_is_one_line_and_never_suggests_unsafe_loading(tmp_path, content, reason):
    path = tmp_path / "x.pt"
    if content == "zip":
        torch.save({"model": {"w": torch.ones(100)}}, path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    for read in (lambda: read_checkpoint(path, kind="rfsq_head"), lambda: read_training_state(path, kind="k")):
        with pytest.raises(CheckpointError) as exc:
            read()
        message = str(exc.value)
        assert message.startswith(f"{path}: not readable as a") and reason in message and "\n" not in message
        assert "weights_only" not in message
    with pytest.raises(CheckpointError, match=r"not readable as a checkpoint \(.*\); re-create it$"):
        read_checkpoint(path, kind="rfsq_head")


def test_a_full_disk_names_the_file_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    atomic_torch_save({"epoch": 1}, path)
    before = path.read_bytes()

    def full_disk(obj, fh):  # what torch's zip writer raises when a write hits ENOSPC
        fh.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 768 vs 662")

    monkeypatch.setattr(checkpoints.torch, "save", full_disk)
    with pytest.raises(NoSpaceError, match=rf"^no space left while writing {path} \(the earlier file is unchanged\)") as exc:
        atomic_torch_save({"epoch": 2}, path)
    assert exc.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp file left
    monkeypatch.undo()
    if Path("/dev/full").exists():  # the real thing: torch writing to a device that is always full (ENOSPC)
        monkeypatch.setattr(checkpoints, "open", lambda _, mode: open("/dev/full", mode), raising=False)
        with pytest.raises(NoSpaceError, match=rf"^no space left while writing {path} "):
            atomic_torch_save({"w": torch.ones(100_000)}, path)
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["best.pt"]


# --- --resume ---------------------------------------------------------------------------------------
def test_resume_with_nothing_to_resume_is_refused(tmp_path):
    from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    models = tmp_path / "modles"  # a typo
    with pytest.raises(FileNotFoundError, match=r"--resume: nothing to resume in .*modles: no training state \(rfsq_robust_last\.pt"
                                                r".*check --models-dir, or rerun without --resume"):
        train_tokenizer(TokenizerTrainConfig(data=str(_demos(tmp_path / "d.hdf5")), models_dir=str(models), resume=True, **TINY_TOKENIZER))
    assert not models.exists()  # nothing created in the mistyped folder


def test_a_moved_models_folder_resumes_and_a_changed_setting_is_named(tmp_path):
    from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    data = str(_demos(tmp_path / "d.hdf5"))
    train_tokenizer(TokenizerTrainConfig(data=data, models_dir=str(tmp_path / "a"), **TINY_TOKENIZER))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    result = train_tokenizer(TokenizerTrainConfig(data=data, models_dir=str(tmp_path / "b"), resume=True, **{**TINY_TOKENIZER, "epochs": 2}))
    assert [r["epoch"] for r in read_jsonl(result["metrics_jsonl"])] == [1, 2]
    with pytest.raises(CheckpointError, match=r"cannot resume, a different configuration: --lr 0\.001 \(saved run: 0\.002\); "
                                              r"rerun with the saved value to continue that run, or with --overwrite instead of --resume"):
        train_tokenizer(TokenizerTrainConfig(data=data, models_dir=str(tmp_path / "b"), resume=True, lr=1e-3, **{**TINY_TOKENIZER, "epochs": 3}))


def test_resume_names_every_differing_setting_and_a_changed_input(tmp_path):
    state, log = tmp_path / "x_last.pt", tmp_path / "x_metrics.jsonl"
    torch.save({"kind": "k", "config": {"lr": 1.0, "seed": 0, "models_dir": "/old"}, "epoch": 1, "tokenizer_hash": "aa"}, state)
    files = dict(state_path=state, metrics_path=log, state_kind="k", resumable_changes=(), resume=True)
    with pytest.raises(CheckpointError, match=r"--lr 2\.0 \(saved run: 1\.0\); --seed 1 \(saved run: 0\); rerun with the saved values"):
        RunFiles(config={"lr": 2.0, "seed": 1, "models_dir": "/new"}, checks={}, **files).load_state()
    with pytest.raises(CheckpointError, match=r"trained against tokenizer hash 'aa', this run's is 'bb'; .*--overwrite"):
        RunFiles(config={"lr": 1.0, "seed": 0, "models_dir": "/new"}, checks={"tokenizer_hash": "bb"}, **files).load_state()
    assert RunFiles(config={"lr": 1.0, "seed": 0, "models_dir": "/new"}, checks={"tokenizer_hash": "aa"}, **files).load_state()["epoch"] == 1


# --- Phase 1's comparison checks its output folder first -------------------------------------------------
def test_phase1_comparison_checks_out_before_loading_anything(tmp_path):
    from phase1_improved.test_layernorm_improvement import cli

    (tmp_path / "file").write_text("x")
    # no tokenizers exist: the --out error comes first, before any work
    with pytest.raises(NotADirectoryError, match=r"--out .*file: .*file is a regular file, not a folder; choose another --out"):
        cli(["--out", str(tmp_path / "file"), "--models-dir", str(tmp_path / "none")])


# --- strict JSON ------------------------------------------------------------------------------------------
def test_rates_without_episodes_are_null_and_old_nan_files_still_read(tmp_path):
    from common.eval.config import EvalConfig
    from common.eval.summary import render_table, summarize, write_outputs
    from common.eval.summary import num, pct

    cfg = EvalConfig(tasks="0", num_trials=1, out=str(tmp_path / "run"))
    rows = [{"task": 0, "trial": 0, "instruction": "pick up the alphabet soup and place it in the basket", "status": "success",
             "steps": 40, "chunks": [], "seconds": 1.0}]
    info = summarize(cfg, rows, wall_seconds=1.0, episodes_run=1, workers=1)
    assert math.isnan(info["fine_grained_success_rate"])  # no fine-grained task in this run
    write_outputs(info, tmp_path / "run")
    saved = _strict((tmp_path / "run" / "eval_info.json").read_text())
    assert saved["fine_grained_success_rate"] is None and saved["success_rate"] == 1.0
    assert "fine-grained —" in render_table(saved)
    old = json.loads(json.dumps(info))  # a file written before: bare NaN
    assert math.isnan(old["fine_grained_success_rate"]) and render_table(old) == render_table(saved)
    assert [pct(v) for v in (None, float("nan"), 0.5)] == ["—", "—", "50.0%"] and num(None) == "—"

    write_json(tmp_path / "x.json", {"rate": float("nan"), "inf": float("inf"), "ok": [1.5]})
    assert _strict((tmp_path / "x.json").read_text()) == {"rate": None, "inf": None, "ok": [1.5]}
    rows_path = tmp_path / "rows.jsonl"
    rows_path.write_text('{"val_ce": NaN}\n')  # an old metrics log
    append_jsonl(rows_path, {"val_ce": float("nan"), "epoch": 2})
    old_row, new_row = read_jsonl(rows_path)
    assert math.isnan(old_row["val_ce"]) and new_row == {"val_ce": None, "epoch": 2}
    assert _strict(rows_path.read_text().splitlines()[1])


# --- the head/tokenizer mismatch names the CLI flag ------------------------------------------------------
def test_tokenizer_mismatch_hint_names_the_cli_flag():
    from common.policy.model import _check_tokenizer

    tokenizer = SimpleNamespace(content_hash="b" * 16, path="rfsq_best.pt")
    with pytest.raises(CheckpointError) as exc:
        _check_tokenizer(Path("best_rfsq_head.pt"), "head", "a" * 16, {"path": "rfsq_robust_best.pt"}, tokenizer, allow=False)
    assert "pass --strategy B" in str(exc.value) and "allow_tokenizer_mismatch" not in str(exc.value)
