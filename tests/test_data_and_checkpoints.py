"""Normalizer, episode reader, chunking, and the checkpoint format/loader errors."""

import h5py
import numpy as np
import pytest
import torch

from common.data.episodes import (
    future_chunks,
    load_episodes,
    load_hdf5_episodes,
    make_chunks,
    split_episodes,
    synthetic_episodes,
)
from common.tokenizer.model import ActionRFSQAE, load_tokenizer, save_tokenizer
from common.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from common.data.normalization import ActionNormalizer


def _write_demos(path, episodes, *, drop=None):
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for i, actions in enumerate(episodes):
            g = data.create_group(f"demo_{i}")
            if drop != "actions":
                g.create_dataset("actions", data=actions)
            g.attrs["task_id"] = 3
        data.attrs["problem_info"] = '{"language_instruction": "put the bowl on the plate"}'


# --- normalizer ---------------------------------------------------------------------------------
def test_normalizer_round_trip_and_gripper():
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(-0.5, 0.8, (1000, 6)), rng.choice([-1.0, 1.0], (1000, 1))], axis=1)
    norm = ActionNormalizer.fit(actions)
    x = norm.normalize(actions)
    assert x.min() >= -1 and x.max() <= 1
    assert set(np.unique(x[:, 6])) == {-1.0, 1.0}
    inside = np.all((actions[:, :6] >= norm.low[:6]) & (actions[:, :6] <= norm.high[:6]), axis=1)
    back = norm.unnormalize(x)
    assert np.allclose(back[inside], actions[inside], atol=1e-5)
    assert ActionNormalizer.from_dict(norm.to_dict()) == norm


@pytest.mark.parametrize(
    "bad,match",
    [
        (np.full((4, 7), np.nan), "NaN/inf"),
        (np.ones((4, 6)), r"\[\.\.\., 7\]"),
        (np.zeros((0, 7)), "empty"),
    ],
)
def test_normalizer_rejects_bad_actions(bad, match):
    with pytest.raises(ValueError, match=match):
        ActionNormalizer.fit(bad)


# --- episodes and chunks ---------------------------------------------------------------------
def test_synthetic_episodes_are_deterministic_and_in_range():
    a = synthetic_episodes(3, seed=1)
    b = synthetic_episodes(3, seed=1)
    assert all(np.array_equal(x.actions, y.actions) for x, y in zip(a, b))
    acts = np.concatenate([e.actions for e in a])
    assert acts.shape[1] == 7 and np.abs(acts).max() <= 1.0
    assert set(np.unique(acts[:, 6])) == {-1.0, 1.0}  # the gripper toggles


def test_episode_split_is_by_episode_and_deterministic():
    eps = synthetic_episodes(10)
    train, val = split_episodes(eps, val_fraction=0.2, seed=0)
    assert len(val) == 2 and len(train) == 8
    assert not {e.name for e in train} & {e.name for e in val}
    assert [e.name for e in split_episodes(eps, val_fraction=0.2, seed=0)[1]] == [e.name for e in val]


def test_chunks_and_future_chunks():
    actions = np.arange(10 * 7, dtype=np.float32).reshape(10, 7)
    eps = [type(synthetic_episodes(1)[0])(actions=actions)]
    chunks = make_chunks(eps, chunk_len=4, stride=2)
    assert chunks.shape == (4, 4, 7) and np.array_equal(chunks[1], actions[2:6])
    fut = future_chunks(actions, chunk_len=4)
    assert fut.shape == (10, 4, 7)
    assert np.array_equal(fut[0], actions[:4])
    assert np.array_equal(fut[-1], np.repeat(actions[-1:], 4, axis=0))  # padded with the last action
    with pytest.raises(ValueError, match="every episode of the episode set is shorter than one chunk"):
        make_chunks(eps, chunk_len=11)


def test_hdf5_reader_reads_libero_layout_and_honours_num_episodes(tmp_path):
    path = tmp_path / "demos.hdf5"
    _write_demos(path, [np.zeros((5 + i, 7), np.float32) for i in range(12)])
    eps = load_hdf5_episodes(path)
    assert [len(e) for e in eps] == [5 + i for i in range(12)]  # demo_10 sorts after demo_9
    assert eps[0].instruction == "put the bowl on the plate" and eps[0].task_id == 3
    assert len(load_episodes(path, num_episodes=4)) == 4


def test_hdf5_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_hdf5_episodes(tmp_path / "missing.hdf5")
    (tmp_path / "text.hdf5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        load_hdf5_episodes(tmp_path / "text.hdf5")
    with h5py.File(tmp_path / "nodata.hdf5", "w") as f:
        f.create_group("other")
    with pytest.raises(ValueError, match="no 'data' group"):
        load_hdf5_episodes(tmp_path / "nodata.hdf5")
    with h5py.File(tmp_path / "empty.hdf5", "w") as f:
        f.create_group("data")
    with pytest.raises(ValueError, match="holds no demos"):
        load_hdf5_episodes(tmp_path / "empty.hdf5")
    _write_demos(tmp_path / "noact.hdf5", [np.zeros((5, 7))], drop="actions")
    with pytest.raises(ValueError, match="no 'actions'"):
        load_hdf5_episodes(tmp_path / "noact.hdf5")
    _write_demos(tmp_path / "dim.hdf5", [np.zeros((5, 6))])
    with pytest.raises(ValueError, match=r"shape \[\.\.\., 7\]"):
        load_hdf5_episodes(tmp_path / "dim.hdf5")
    bad = np.zeros((5, 7))
    bad[2, 3] = np.inf
    _write_demos(tmp_path / "nan.hdf5", [bad])
    with pytest.raises(ValueError, match="NaN/inf"):
        load_hdf5_episodes(tmp_path / "nan.hdf5")


# --- checkpoints ---------------------------------------------------------------------------
def _tokenizer(conditioning="layernorm"):
    torch.manual_seed(0)
    model = ActionRFSQAE(conditioning=conditioning, layout="chunk", mlp_width=16)
    model.train()
    model(torch.rand(32, 8, 7) * 2 - 1)  # move the running statistics off their init
    return model.eval()


def test_checkpoint_round_trip_is_exact_and_weights_only(tmp_path):
    model = _tokenizer()
    norm = ActionNormalizer.fit(np.random.default_rng(0).uniform(-1, 1, (100, 7)))
    saved = save_tokenizer(tmp_path / "t.pt", model, norm, metrics={"val_mse": 0.1})
    raw = torch.load(tmp_path / "t.pt", map_location="cpu", weights_only=True)
    assert {"model", "config", "normalizer", "metrics", "format_version", "content_hash", "kind"} <= set(raw)
    loaded = load_tokenizer(tmp_path / "t.pt", require_conditioning="layernorm")
    x = torch.rand(16, 8, 7) * 2 - 1
    assert torch.equal(loaded.model(x)[0], model(x)[0])
    assert loaded.normalizer == norm and loaded.content_hash == saved["content_hash"]
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temp file


def test_content_hash_changes_with_weights(tmp_path):
    model = _tokenizer()
    norm = ActionNormalizer.fit(np.random.default_rng(0).uniform(-1, 1, (100, 7)))
    h1 = save_tokenizer(tmp_path / "a.pt", model, norm)["content_hash"]
    with torch.no_grad():
        model.decoder.linear.bias.add_(1e-3)
    assert save_tokenizer(tmp_path / "b.pt", model, norm)["content_hash"] != h1


def test_checkpoint_errors(tmp_path):
    norm = ActionNormalizer.fit(np.random.default_rng(0).uniform(-1, 1, (100, 7)))
    with pytest.raises(CheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nope.pt")
    save_tokenizer(tmp_path / "naive.pt", _tokenizer("none"), norm)
    with pytest.raises(CheckpointError, match="expected a tokenizer with conditioning 'layernorm', found 'none'"):
        load_tokenizer(tmp_path / "naive.pt", require_conditioning="layernorm")
    save_checkpoint(tmp_path / "head.pt", kind="rfsq_head", model=torch.nn.Linear(2, 2), config={})
    with pytest.raises(CheckpointError, match="expected a rfsq_tokenizer checkpoint, found kind 'rfsq_head'"):
        load_tokenizer(tmp_path / "head.pt")
    torch.save({"model": ActionRFSQAE().state_dict()}, tmp_path / "seed.pt")  # the earlier attempt's format
    with pytest.raises(CheckpointError, match="pre-RSD checkpoint"):
        load_tokenizer(tmp_path / "seed.pt")
    ckpt = read_checkpoint(tmp_path / "naive.pt", kind="rfsq_tokenizer")
    ckpt["config"]["latent_dim"] = 8
    torch.save(ckpt, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_tokenizer(tmp_path / "shape.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not readable as a checkpoint \(.*\); re-create it"):
        load_tokenizer(tmp_path / "junk.pt")


def test_several_files_are_interleaved(tmp_path):
    _write_demos(tmp_path / "a.hdf5", [np.zeros((5, 7), np.float32)] * 3)
    _write_demos(tmp_path / "b.hdf5", [np.ones((6, 7), np.float32)] * 2)
    eps = load_episodes(f"{tmp_path / 'a.hdf5'},{tmp_path / 'b.hdf5'}", num_episodes=4)
    assert [e.name for e in eps] == ["a/demo_0", "b/demo_0", "a/demo_1", "b/demo_1"]


def test_demo_order_follows_task_and_episode_index_not_write_order(tmp_path):
    """Parallel collection writes demos as workers finish; readers must not depend on that timing."""
    import h5py

    from common.data.episodes import load_hdf5_episodes

    path = tmp_path / "demos.hdf5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for number, (task, episode) in enumerate([(1, 0), (0, 1), (0, 0), (1, 1)]):
            g = data.create_group(f"demo_{number}")
            g.create_dataset("actions", data=np.full((9, 7), 0.05 * (10 * task + episode)))
            g.attrs.update(task_id=task, episode_index=episode)
    eps = load_hdf5_episodes(path)
    assert [(e.task_id, int(e.attrs["episode_index"])) for e in eps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [e.name for e in eps] == ["demo_2", "demo_1", "demo_0", "demo_3"]
