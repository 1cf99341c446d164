"""benchmarks.diagnostics.slim_demos: training-only copies load the same episodes, keep every attribute, drop the rest,
and refuse to overwrite or to copy onto their source."""

import h5py
import numpy as np
import pytest

from benchmarks.diagnostics.slim_demos import main, slim_copy
from common.data.episodes import load_hdf5_episodes


def _write(path):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["top"] = "kept"
        data = f.create_group("data")
        data.attrs["suite"] = "libero_spatial"
        data.attrs["total"] = 30
        for i in range(3):
            g = data.create_group(f"demo_{i}")
            g.attrs["task_id"] = i % 2
            g.attrs["episode_index"] = i
            g.attrs["language_instruction"] = f"task {i % 2}"
            actions = rng.uniform(-1, 1, size=(10 + i, 7))
            g.create_dataset("actions", data=actions)
            if i == 1:  # a DART demo: executed actions beside the expert's
                g.create_dataset("expert_actions", data=np.clip(actions + 0.1, -1, 1))
            g.create_dataset("obs/low_dim", data=rng.normal(size=(10 + i, 96)).astype(np.float32))
            g.create_dataset("states", data=rng.normal(size=(10 + i, 92)))
            g.create_dataset("obs/plate_1_pos", data=rng.normal(size=(10 + i, 3)))
    return path


def test_copy_loads_the_same_episodes_and_drops_the_rest(tmp_path):
    src = _write(tmp_path / "demos.hdf5")
    row = slim_copy(src, tmp_path / "slim.hdf5")
    assert row["copy_bytes"] < row["source_bytes"]
    a, b = load_hdf5_episodes(src), load_hdf5_episodes(tmp_path / "slim.hdf5")
    assert [e.name for e in a] == [e.name for e in b] == ["demo_0", "demo_2", "demo_1"]  # (task, episode) order
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.actions, y.actions)
        np.testing.assert_array_equal(x.low_dim_obs, y.low_dim_obs)
        assert (x.task_id, x.instruction, x.attrs) == (y.task_id, y.instruction, y.attrs)
    np.testing.assert_array_equal(a[2].executed_actions, b[2].executed_actions)
    with h5py.File(tmp_path / "slim.hdf5", "r") as f:
        assert f.attrs["top"] == "kept" and f["data"].attrs["total"] == 30
        assert sorted(f["data/demo_1"].keys()) == ["actions", "expert_actions", "obs"]
        assert list(f["data/demo_1/obs"].keys()) == ["low_dim"]
        assert f["data/demo_0/actions"].compression == "gzip"


def test_refuses_overwrite_and_own_source(tmp_path):
    src = _write(tmp_path / "demos.hdf5")
    out = tmp_path / "out"
    main([str(src), "--out", str(out)])
    with pytest.raises(FileExistsError, match="already exists .*--overwrite"):
        main([str(src), "--out", str(out)])
    assert main([str(src), "--out", str(out), "--overwrite"])[0]["copy"] == str(out / "demos.hdf5")
    with pytest.raises(ValueError, match="replace its own source"):
        slim_copy(src, src, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no such demo file"):
        slim_copy(tmp_path / "missing.hdf5", tmp_path / "x.hdf5")
    assert not list(out.glob("*.partial"))
