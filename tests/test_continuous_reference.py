"""The continuous-action baseline (common/policy/continuous.py, benchmarks.evaluation.continuous_reference) without
the simulator: the chunk regressor learns, plan() undoes the normalization exactly, the split is the head's own,
errors count apart from failures, no silent overwrite."""

import h5py
import numpy as np
import pytest
import torch

from benchmarks.evaluation.continuous_reference import main, markdown
from common.eval.continuous import summarize
from common.policy.continuous import ChunkRegressor, ContinuousPolicy, chunk_mse, load_reference_data, train_regressor
from common.checkpoints import read_checkpoint
from common.data.episodes import future_chunks, synthetic_episodes
from common.data.normalization import ActionNormalizer

BACKBONE = dict(obs_dim=6, num_tasks=2, task_embed_dim=4, hidden_dim=32, feature_dim=32)
TASKS = [{"index": 0, "suite": "libero_object", "task_id": 3, "instruction": "pick up the milk"},
         {"index": 1, "suite": "libero_object", "task_id": 5, "instruction": "pick up the butter"}]


def _tiny_split(n=96, chunk_len=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, BACKBONE["obs_dim"], generator=g)
    task_ids = torch.randint(0, 2, (n,), generator=g)
    mix = torch.randn(BACKBONE["obs_dim"], chunk_len * 7, generator=g) / 3
    targets = torch.tanh(inputs @ mix + task_ids[:, None].float()).view(n, chunk_len, 7)
    return {"inputs": inputs, "task_ids": task_ids, "targets": targets}


def test_chunk_regressor_fits_a_tiny_dataset():
    torch.manual_seed(0)
    split = _tiny_split()
    model = ChunkRegressor(BACKBONE, chunk_len=4, hidden=64)
    model.backbone.fit_normalizer(split["inputs"])
    before = chunk_mse(model, split)
    history = train_regressor(model, split, split, epochs=40, batch_size=16, lr=3e-3, progress=False)
    assert model(split["inputs"][:5], split["task_ids"][:5]).shape == (5, 4, 7)
    assert [h["epoch"] for h in history] == list(range(1, 41))
    best = min(h["held_out_mse"] for h in history)
    assert chunk_mse(model, split) == pytest.approx(best, rel=1e-5)  # the best epoch's weights are kept
    assert best < 0.05 * before


def test_plan_unnormalizes_the_predicted_chunk_exactly():
    normalizer = ActionNormalizer(low=(-0.5, -0.4, -0.3, -0.2, -0.1, -0.05, -1.0), high=(0.5, 0.6, 0.7, 0.2, 0.1, 0.05, 1.0))
    raw = np.stack([np.linspace(-0.4, 0.4, 4), np.linspace(0.5, -0.3, 4), np.zeros(4), np.full(4, 0.1), np.full(4, -0.05),
                    np.full(4, 0.02), np.array([-1.0, -1.0, 1.0, 1.0])], axis=1).astype(np.float32)
    model = ChunkRegressor(BACKBONE, chunk_len=4)
    model.backbone.fit_normalizer(torch.randn(8, BACKBONE["obs_dim"]))
    last = model.mlp[-1]
    with torch.no_grad():  # a model that always predicts the normalized chunk of `raw`
        last.weight.zero_()
        last.bias.copy_(torch.from_numpy(normalizer.normalize(raw)).flatten())
    policy = ContinuousPolicy(model, normalizer, TASKS)
    actions, info = policy.plan(np.zeros(BACKBONE["obs_dim"], np.float32), policy.task_index("libero_object", 5, "Pick up the butter"))
    assert actions.shape == (4, 7) and info["policy_s"] >= 0
    np.testing.assert_allclose(actions, raw, atol=1e-6)
    with pytest.raises(KeyError, match="expected one match in the trained task table, found 0"):
        policy.task_index("libero_object", 1, "pick up the ketchup")


def test_errors_are_counted_apart_from_failures():
    rows = [{"task": 3, "trial": 10, "status": "success"}, {"task": 3, "trial": 11, "status": "failure"},
            {"task": 5, "trial": 10, "status": "error", "error": "RuntimeError: x"}, {"task": 5, "trial": 11, "status": "success"}]
    s = summarize(rows, TASKS, "libero_object")
    assert s["overall"] == {"trials": 4, "successes": 2, "errors": 1, "success_rate": 0.5}
    assert [(t["task"], t["successes"], t["errors"], t["instruction"]) for t in s["per_task"]] == [
        (3, 1, 0, "pick up the milk"), (5, 1, 1, "pick up the butter")]
    result = {**s, "head": "m/best_rfsq_head.pt", "training": [{"epoch": 1, "train_mse": 0.2, "held_out_mse": 0.1}],
              "config": {"epochs": 1, "suite": "libero_object", "first_trial": 10, "trials": 2, "replan_steps": 4},
              "data_summary": {"train_steps": 10, "held_out_steps": 5, "train_episodes": 2, "held_out_episodes": 1}}
    text = markdown(result)
    assert "| 5 | pick up the butter | 2 | 1 | 1 | 50% |" in text and "**50.0%**" in text and "best 1.000e-01 at epoch 1" in text


def test_an_existing_result_is_not_overwritten(tmp_path):
    (tmp_path / "continuous_reference.json").write_text("{}")
    with pytest.raises(ValueError, match=r"continuous_reference.json: a result already exists; pass --overwrite"):
        main(["--models-dir", str(tmp_path / "no_models"), "--out", str(tmp_path)])


def test_the_split_and_targets_are_the_heads_own(tmp_path):
    """A tiny tokenizer + head trained on a demo file: the reference rebuilds the head's held-out episodes."""
    from common.policy.train import PolicyTrainConfig, train_policy
    from common.tokenizer.model import load_tokenizer
    from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    demos, models = tmp_path / "demos.hdf5", tmp_path / "models"
    rng = np.random.default_rng(0)
    with h5py.File(demos, "w") as f:
        data = f.create_group("data")
        data.attrs["suite"] = "libero_object"
        for i, ep in enumerate(synthetic_episodes(6, seed=2, length=(30, 40))):
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=ep.actions)
            g.create_dataset("obs/low_dim", data=rng.normal(size=(len(ep), 5)).astype(np.float32))
            g.attrs["task_id"], g.attrs["language_instruction"] = i % 2, f"task {i % 2}"
    train_tokenizer(TokenizerTrainConfig(data=str(demos), models_dir=str(models), epochs=1, num_episodes=6, latent_dim=4, batch_size=256,
                                         progress=False))
    train_policy(PolicyTrainConfig(data=str(demos), models_dir=str(models), results_dir=str(tmp_path / "results"), num_episodes=6, epochs=1, batch_size=64,
                                   d_model=16, num_blocks=1, num_heads=2, draft_width=8, timing_repeats=1, progress=False, train="main"))
    ref = load_reference_data(models)
    head = read_checkpoint(models / "best_rfsq_head.pt", kind="rfsq_head")
    held_out_keys = head["metrics"]["val_episode_keys"]
    assert (ref["train_episodes"], ref["held_out_episodes"]) == (6 - len(held_out_keys), len(held_out_keys))
    assert ref["task_table"] == head["config"]["task_table"] and ref["chunk_len"] == 8
    tok = load_tokenizer(ref["tokenizer"])
    with h5py.File(demos, "r") as f:  # the held-out steps (compared as sets of rows: the loader interleaves tasks)
        names = [k.split("/")[1] for k in held_out_keys]
        obs = np.concatenate([f["data"][n]["obs/low_dim"][()] for n in names])
        targets = np.concatenate([tok.normalizer.normalize(future_chunks(f["data"][n]["actions"][()], chunk_len=8)) for n in names])
    order, ref_order = np.argsort(obs[:, 0]), np.argsort(ref["held_out"]["inputs"][:, 0].numpy())
    np.testing.assert_array_equal(ref["held_out"]["inputs"].numpy()[ref_order], obs[order])
    np.testing.assert_array_equal(ref["held_out"]["targets"].numpy()[ref_order], targets[order])
    assert ref["train"]["inputs"].shape[0] + len(obs) == sum(len(e.actions) for e in synthetic_episodes(6, seed=2, length=(30, 40)))
