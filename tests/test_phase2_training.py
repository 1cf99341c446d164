"""Phase 2 training: 1-epoch local runs on a tiny LIBERO-layout HDF5 (state backbone and cached
OpenVLA features via a stub), metrics/checkpoint contents, load_policy checks, the Modal module."""

import dataclasses
import json

import h5py
import numpy as np
import pytest
import torch

import rsd_entry
from common.data.episodes import synthetic_episodes
from common.tokenizer.model import ActionRFSQAE, load_tokenizer
from common.checkpoints import CheckpointError, read_checkpoint
from common.data.episodes import split_episodes
from common.policy.feature_cache import cache_features_for_file
from common.policy.labels import build_split, load_policy_episodes
from common.policy.metrics import compute_features, evaluate_draft, evaluate_main
from common.policy.model import HEAD_KIND, load_policy
from common.policy.distillation import perturbed_distillation_set
from common.policy.train import PolicyTrainConfig


def _split(cfg, tok, episodes):
    return build_split(tok, episodes, backbone=cfg.backbone, data_paths=cfg.data_paths, feature_cache_paths=cfg.feature_cache_paths)
from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer

OBS_DIM, STEPS, NUM_EPS = 12, 40, 8
TINY = ["--epochs", "1", "--batch-size", "64", "--d-model", "32", "--num-blocks", "1", "--num-heads", "2",
        "--draft-width", "16", "--timing-repeats", "5", "--no-progress"]


def write_demos(path, *, with_low_dim=True, images=False, collector_layout=True):
    eps = synthetic_episodes(NUM_EPS, seed=3, length=(STEPS + 5, STEPS + 20))
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["suite"] = "libero_object"
        if collector_layout:
            data.attrs["tasks"] = json.dumps([{"task_id": 0}, {"task_id": 1}])
        for i, ep in enumerate(eps):
            actions = ep.actions[:STEPS].astype(np.float64)
            g = data.create_group(f"demo_{i}")
            g.create_dataset("actions", data=actions)
            pos = np.cumsum(actions[:, :3], axis=0)  # the state carries information about the actions
            obs = np.concatenate([pos, actions[:, 6:7], rng.normal(size=(STEPS, OBS_DIM - 4))], axis=1).astype(np.float32)
            if with_low_dim:
                g.create_dataset("obs/low_dim", data=obs)
            if images:
                img = np.zeros((STEPS, 8, 8, 3), np.uint8)
                img[:, 0, 0, 0] = 255  # marks the top-left corner: lands bottom-right after a 180° flip
                g.create_dataset("obs/agentview_rgb", data=img)
                g.create_dataset("obs/eye_in_hand_rgb", data=img)
                g.create_dataset("obs/ee_pos", data=pos)
                g.create_dataset("obs/ee_ori", data=np.zeros((STEPS, 3)))
                g.create_dataset("obs/gripper_states", data=np.zeros((STEPS, 2)))
            g.attrs["task_id"] = i % 2
            g.attrs["language_instruction"] = f"put object {i % 2} in the basket"
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Demo file, robust + naive tokenizers and one 1-epoch CLI run (shared by the tests below)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("phase2")
    models, results = root / "models", root / "results"
    mp = pytest.MonkeyPatch()
    mp.setenv("RSD_RESULTS_DIR", str(results))
    mp.setenv("RSD_MODELS_DIR", str(models))
    mp.setenv("RSD_DATA_DIR", str(root / "data"))
    demos = write_demos(root / "demos.hdf5")
    for layernorm in (True, False):
        train_tokenizer(TokenizerTrainConfig(
            data=str(demos), epochs=1, num_episodes=NUM_EPS, layout="chunk", latent_dim=4, batch_size=256, models_dir=str(models),
            progress=False, use_layernorm=layernorm,
        ))
    from phase2_draft_retrain.modal_train_draft_with_projection import cli

    summary = cli(TINY + ["--data", str(demos), "--models-dir", str(models)])
    yield {"root": root, "models": models, "results": results, "demos": demos, "summary": summary}
    mp.undo()


def test_one_epoch_cli_run_writes_checkpoints_metrics_and_summary(env):
    models, s = env["models"], env["summary"]
    assert (models / "best_rfsq_head.pt").exists() and (models / "best_draft_with_projection.pt").exists()
    assert (models / "rfsq_head_last.pt").exists() and (models / "draft_with_projection_last.pt").exists()
    for name, stage in (("rfsq_head_metrics.jsonl", "main"), ("draft_with_projection_metrics.jsonl", "draft")):
        lines = [json.loads(l) for l in (models / name).read_text().splitlines()]
        assert [r["epoch"] for r in lines] == [1] and lines[0]["stage"] == stage and lines[0]["best"]
    on_disk = json.loads((env["results"] / "phase2" / "train_summary.json").read_text())
    assert on_disk["head_hash"] == s["head_hash"] and on_disk["provenance"]["git_sha"]
    assert "| token acc (teacher-forced) |" in (env["results"] / "phase2" / "train_summary.md").read_text()
    assert s["num_tasks"] == 2 and s["train_episodes"] + s["val_episodes"] == NUM_EPS
    assert s["val_steps"] == s["val_episodes"] * STEPS  # a label at EVERY step (end padded)
    L, K = 8, 3
    main, draft = s["main"], s["draft"]
    for key, n in (("val_token_acc", L), ("val_layer_all_correct", L), ("val_greedy_token_acc", L)):
        assert len(main[key]) == n and all(0.0 <= v <= 1.0 for v in main[key])
    for key in ("val_token_acc", "val_layer_all_correct", "agreement_per_layer", "token_agreement_per_layer"):
        assert len(draft[key]) == K and all(0.0 <= v <= 1.0 for v in draft[key])
    dist = draft["accepted_layers_distribution"]
    assert len(dist) == K + 1 and sum(dist) == pytest.approx(1.0)
    assert draft["mean_main_passes_per_chunk"] == pytest.approx(L - draft["mean_accepted_layers"])
    # agreement of layer 0 >= P(accepted >= 1)
    assert draft["agreement_per_layer"][0] >= 1 - dist[0] - 1e-9
    c = draft["costs"]
    assert c["draft_params"] > 0 and c["draft_time_s_median"] > 0 and c["flops_ratio_draft_over_main_pass"] > 0


def test_checkpoint_round_trip_reproduces_recorded_metrics(env):
    models = env["models"]
    tok = load_tokenizer(models / "rfsq_robust_best.pt")
    pol = load_policy(models / "best_rfsq_head.pt", models / "best_draft_with_projection.pt", tok)
    assert not pol.tokenizer_mismatch and not pol.policy.training and not pol.draft.training
    assert pol.normalizer == tok.normalizer
    assert pol.task_index(instruction="Put object 1 in the basket") == 1
    assert pol.task_index(task_id=0, suite="libero_object") == 0
    # rebuild the same held-out split and recompute: identical to what training recorded
    cfg = PolicyTrainConfig(data=str(env["demos"]))
    chosen, _ = load_policy_episodes(cfg.data_paths)
    _, val_eps = split_episodes(chosen, val_fraction=cfg.val_fraction, seed=cfg.seed)
    val = _split(cfg, tok, val_eps)
    cpu = torch.device("cpu")
    ev = evaluate_main(pol.policy, val, device=cpu)
    assert ev["val_token_acc"] == pytest.approx(pol.head_metrics["val_token_acc"], abs=1e-12)
    dv = evaluate_draft(pol.draft, compute_features(pol.policy, val, device=cpu), val.codes, device=cpu)
    assert dv["val_coarse_acc"] == pytest.approx(pol.draft_metrics["val_coarse_acc"], abs=1e-12)
    # a second load gives bit-identical logits
    pol2 = load_policy(models / "best_rfsq_head.pt", None, tok)
    x, t, c = val.inputs[:16], val.task_ids[:16], val.codes[:16].long()
    with torch.no_grad():
        assert torch.equal(pol.policy(x, t, c), pol2.policy(x, t, c))


def test_tokenizer_hash_mismatch_and_explicit_opt_in(env, tmp_path):
    models = env["models"]
    naive = load_tokenizer(models / "rfsq_best.pt")
    head, draft = models / "best_rfsq_head.pt", models / "best_draft_with_projection.pt"
    with pytest.raises(CheckpointError, match="trained against tokenizer .* but the loaded tokenizer is"):
        load_policy(head, draft, naive)
    pol = load_policy(head, draft, naive, allow_tokenizer_mismatch=True)  # Strategy B
    assert pol.tokenizer_mismatch and pol.tokenizer_hash != naive.content_hash
    other = dataclasses.replace(naive, model=ActionRFSQAE(layout="chunk", latent_dim=3, conditioning="none"), content_hash="0" * 16)
    with pytest.raises(CheckpointError, match="tokens_per_layer 4 .*vs 3"):
        load_policy(head, draft, other, allow_tokenizer_mismatch=True)
    # a draft trained on another head's features is refused
    ck = torch.load(draft, weights_only=True)
    ck["extra"]["head_hash"] = "f" * 16
    bad = tmp_path / "draft.pt"
    torch.save(ck, bad)
    with pytest.raises(CheckpointError, match="draft was trained on the features of head ffff"):
        load_policy(head, bad, load_tokenizer(models / "rfsq_robust_best.pt"))


def test_naive_tokenizer_gets_its_own_names_and_resume_continues(env):
    from phase2_draft_retrain.modal_train_draft_with_projection import cli

    models = env["models"]
    args = TINY + ["--data", str(env["demos"]), "--models-dir", str(models), "--rfsq-checkpoint", str(models / "rfsq_best.pt"), "--train", "main"]
    s = cli(args)
    assert s["tag"] == "naive" and (models / "best_rfsq_head_naive.pt").exists()
    cli(args + ["--epochs", "2", "--resume"])  # the last --epochs wins
    epochs = [json.loads(l)["epoch"] for l in (models / "rfsq_head_naive_metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    with pytest.raises(CheckpointError, match="different configuration"):
        cli(args + ["--resume", "--lr", "1e-3"])


def test_missing_low_dim_and_missing_data_and_missing_tokenizer(env, tmp_path, capsys):
    from phase2_draft_retrain.modal_train_draft_with_projection import cli

    no_obs = write_demos(tmp_path / "no_obs.hdf5", with_low_dim=False)
    with pytest.raises(ValueError, match="has no obs/low_dim; --backbone state needs"):
        cli(TINY + ["--data", str(no_obs), "--models-dir", str(env["models"]), "--overwrite"])
    with pytest.raises(SystemExit):
        cli(TINY)
    assert "--data is required" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--data is required"):
        PolicyTrainConfig()
    with pytest.raises(ValueError, match="--train must be"):
        PolicyTrainConfig(data="x.hdf5", train="main,verify")
    with pytest.raises(FileNotFoundError, match="train Phase 1 first"):
        cli(TINY + ["--data", str(env["demos"]), "--models-dir", str(tmp_path / "empty")])


def test_openvla_feature_cache_with_stub_and_training_on_it(env, tmp_path):
    from phase2_draft_retrain.modal_train_draft_with_projection import cli

    seen = []

    def stub(images, tasks, *, wrist_images=None, proprio=None):
        assert len(images) == len(tasks) == len(wrist_images) == len(proprio) and proprio.shape[1] == 8
        seen.append(images[0])
        return torch.randn(len(images), 24)

    official = write_demos(tmp_path / "official.hdf5", images=True, collector_layout=False)
    models = env["models"]
    args = TINY + ["--data", str(official), "--models-dir", str(models), "--backbone", "openvla-oft", "--tag", "vla"]
    with pytest.raises(FileNotFoundError, match="cache_openvla_features --data"):
        cli(args)
    cache = tmp_path / "official.feats.h5"
    res = cache_features_for_file(stub, official, cache, progress=False, batch_steps=16)
    assert res["flip_applied"] and res["written"] == NUM_EPS
    assert seen[0][-1, -1, 0] == 255 and seen[0][0, 0, 0] == 0  # official images were rotated 180°
    assert cache_features_for_file(stub, official, cache, progress=False)["skipped"] == NUM_EPS  # resumes
    s = cli(args + ["--feature-cache", str(cache)])
    assert s["tag"] == "vla" and s["draft"]["costs"]["draft_params"] > 0
    pol = load_policy(s["head_checkpoint"], s["draft_checkpoint"], load_tokenizer(models / "rfsq_robust_best.pt"))
    assert pol.backbone is None and pol.head.feature_dim == 24 and pol.draft.feature_dim == 24


def test_modal_module_imports_without_token_and_flags_match_cli(monkeypatch):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    from modal.cli.run import _get_click_command_for_local_entrypoint

    import phase2_draft_retrain.modal_train_draft_with_projection as mod

    parser = rsd_entry.build_parser(PolicyTrainConfig)
    parser_flags = {a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    click_cmd = _get_click_command_for_local_entrypoint(mod.app, mod.main)
    modal_flags = {opt for p in click_cmd.params for opt in p.opts}
    assert parser_flags == modal_flags == set(rsd_entry.cli_flags(PolicyTrainConfig))
    for flag in ("--num-episodes", "--epochs", "--batch-size", "--lr", "--seed", "--data", "--rfsq-checkpoint",
                 "--backbone", "--coarse-layers", "--train"):
        assert flag in modal_flags
    assert "--no-resume" in {opt for p in click_cmd.params for opt in p.secondary_opts}
    assert mod.app.name == "rsd-phase2-train"


@pytest.mark.filterwarnings("ignore:The train_remote function is executing locally")
def test_modal_function_body_runs_locally_draft_only(env):
    from phase2_draft_retrain.modal_train_draft_with_projection import train_remote

    models = env["models"]
    head_hash = torch.load(models / "best_rfsq_head.pt", weights_only=True)["content_hash"]
    cfg = PolicyTrainConfig(data=str(env["demos"]), models_dir=str(models), train="draft", epochs=1, batch_size=64,
                            d_model=32, num_blocks=1, num_heads=2, draft_width=16, timing_repeats=5, progress=False,
                            draft_mode="chained", draft_augment_copies=2, overwrite=True)
    out = train_remote.local(dataclasses.asdict(cfg))
    assert out["head_hash"] == head_hash and out["main_seconds"] == 0.0
    ckpt = torch.load(models / "best_draft_with_projection.pt", weights_only=True)
    assert ckpt["extra"]["head_hash"] == head_hash and ckpt["config"]["mode"] == "chained"
    # the chained draft is rebuilt from its checkpoint and decodes losslessly with the head
    policy = load_policy(models / "best_rfsq_head.pt", models / "best_draft_with_projection.pt", load_tokenizer(models / "rfsq_robust_best.pt"))
    assert policy.draft.mode == "chained"


def test_perturbed_distillation_set_labels_noisy_inputs_with_the_main_models_choice(env):
    models = env["models"]
    tok = load_tokenizer(models / "rfsq_robust_best.pt")
    cfg = PolicyTrainConfig(data=str(env["demos"]), num_episodes=NUM_EPS)
    chosen, _ = load_policy_episodes(cfg.data_paths, num_episodes=NUM_EPS)
    data = _split(cfg, tok, chosen[:2])
    policy = load_policy(models / "best_rfsq_head.pt", None, tok).policy
    feats, codes = perturbed_distillation_set(policy, data, noise=0.5, copies=2, seed=0, device=torch.device("cpu"))
    clean = compute_features(policy, data, device=torch.device("cpu"))
    n = len(data)
    assert feats.shape == (2 * n, clean.shape[1]) and codes.shape == (2 * n, *data.codes.shape[1:])
    assert not torch.allclose(feats[:n], clean) and not torch.allclose(feats[n:], clean)
    # copy 1 has twice the noise of copy 0
    assert (feats[n:] - clean).norm() > (feats[:n] - clean).norm()
    assert torch.equal(codes, policy.head.greedy_decode(feats))
    again, _ = perturbed_distillation_set(policy, data, noise=0.5, copies=2, seed=0, device=torch.device("cpu"))
    assert torch.equal(again, feats)  # seeded


@pytest.mark.parametrize("kw, msg", [
    (dict(draft_augment_copies=2, draft_targets="labels"), "needs --draft-targets main"),
    (dict(draft_augment_copies=2, draft_augment_noise=0.0), "needs --draft-augment-noise > 0"),
    (dict(draft_augment_copies=-1), "must be >= 0"),
    (dict(draft_mode="tree"), "--draft-mode must be one of"),
])
def test_draft_flag_validation(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PolicyTrainConfig(data="x.hdf5", **kw)


def test_main_hidden_draft_trains_loads_and_decodes_losslessly(env, tmp_path):
    """A draft that reads the main model's position-0 hidden state: trained by distillation, rebuilt
    from its checkpoint, and exact under speculative decoding with the head it was trained on."""
    import shutil

    from common.decoding.speculative import speculative_decode

    models = tmp_path / "models"
    shutil.copytree(env["models"], models)
    cfg = PolicyTrainConfig(data=str(env["demos"]), models_dir=str(models), results_dir=str(tmp_path / "results"),
                            train="draft", epochs=2, batch_size=64, d_model=32, num_blocks=1, num_heads=2,
                            draft_width=16, timing_repeats=5, progress=False, draft_mode="chained", draft_input="main_hidden",
                            overwrite=True)
    from common.policy.train import train_policy

    summary = train_policy(cfg)
    d = summary["draft"]
    assert len(d["agreement_per_layer"]) == cfg.coarse_layers and 0 <= d["mean_accepted_layers"] <= cfg.coarse_layers
    policy = load_policy(models / "best_rfsq_head.pt", models / "best_draft_with_projection.pt", load_tokenizer(models / "rfsq_robust_best.pt"))
    assert policy.draft.input == "main_hidden" and policy.draft.feature_dim == policy.head.d_model
    tok = load_tokenizer(models / "rfsq_robust_best.pt")
    chosen, _ = load_policy_episodes(cfg.data_paths, num_episodes=NUM_EPS)
    feats = compute_features(policy.policy, _split(cfg, tok, chosen[:2]), device=torch.device("cpu"))
    for i in range(0, len(feats), 7):
        codes, stats = speculative_decode(policy.head, policy.draft, feats[i : i + 1])
        assert torch.equal(codes, policy.head.greedy_decode(feats[i : i + 1]))
        assert stats.main_passes == policy.head.num_layers - stats.accepted_layers[0]
    with pytest.raises(ValueError, match="needs --draft-targets main"):
        PolicyTrainConfig(data="x.hdf5", draft_input="main_hidden", draft_targets="labels")


def test_two_files_of_one_suite_share_task_indices_other_suites_do_not(tmp_path):
    """Clean + DART (or fresh-layout) demos of the same task train one task embedding: one policy task
    index per (suite, task_id), so evaluation finds exactly one row per task; another suite's task 0
    is a different task."""
    clean = write_demos(tmp_path / "clean.hdf5")
    extra = write_demos(tmp_path / "dart.hdf5")
    other = write_demos(tmp_path / "spatial.hdf5")
    with h5py.File(other, "a") as f:
        f["data"].attrs["suite"] = "libero_spatial"
    chosen, table = load_policy_episodes([str(clean), str(extra), str(other)])
    assert [(r["suite"], r["task_id"], r["index"]) for r in table] == [
        ("libero_object", 0, 0), ("libero_object", 1, 1), ("libero_spatial", 0, 2), ("libero_spatial", 1, 3)]
    assert table[0]["files"] == [str(clean), str(extra)] and table[2]["files"] == [str(other)]
    assert len(chosen) == 3 * NUM_EPS and len({c["key"] for c in chosen}) == 3 * NUM_EPS
    by_file = {(c["file_index"], c["episode"].task_id): c["task_index"] for c in chosen}
    assert by_file[(0, 0)] == by_file[(1, 0)] == 0 and by_file[(2, 0)] == 2
    with h5py.File(extra, "a") as f:  # the same task id under another instruction is refused
        f["data"]["demo_0"].attrs["language_instruction"] = "put object 9 in the basket"
    with pytest.raises(ValueError, match="libero_object task 0: .*clean.hdf5 says .*dart.hdf5 says"):
        load_policy_episodes([str(clean), str(extra)])


def test_decode_depth_is_chosen_on_the_clean_held_out_demos_when_relabelled_ones_are_mixed_in(env, tmp_path):
    """DART / DAgger episodes (labels = the expert's intent, ``expert_actions``) raise the policy's error
    floor enough to hide what a finer layer adds; Phase 2 picks the depth on the clean held-out demos."""
    from phase2_draft_retrain.modal_train_draft_with_projection import cli

    assert env["summary"]["main"]["decode_choice"]["held_out"] == "all"  # clean demos only: nothing to set apart
    relabelled = write_demos(tmp_path / "dart.hdf5")
    with h5py.File(relabelled, "a") as f:
        for name, g in f["data"].items():
            g.create_dataset("expert_actions", data=np.clip(g["actions"][()] + 0.1, -1, 1))
    models = tmp_path / "models"
    models.mkdir()
    (models / "rfsq_robust_best.pt").write_bytes((env["models"] / "rfsq_robust_best.pt").read_bytes())
    s = cli(TINY + ["--data", f"{env['demos']},{relabelled}", "--models-dir", str(models), "--results-dir", str(tmp_path / "results"),
                    "--train", "main", "--val-fraction", "0.5"])
    choice = s["main"]["decode_choice"]
    held_out = read_checkpoint(models / "best_rfsq_head.pt", kind=HEAD_KIND)["metrics"]["val_episode_keys"]
    clean = [k for k in held_out if k.startswith("demos/")]
    assert choice["held_out"] == "clean demos" and 0 < len(clean) < len(held_out)
    assert choice["held_out_episodes"] == len(clean)
    assert "clean held-out demos, apart from the expert-relabelled ones" in (tmp_path / "results" / "phase2" / "train_summary.md").read_text()


def test_draft_run_completes_a_head_whose_main_run_stopped_early(env, tmp_path, capsys):
    """A main run cut by a time limit leaves its best head without the decode choice (chosen after the
    last epoch); a draft-only run completes it as the main stage would have, weights and hash unchanged."""
    from phase2_draft_retrain.modal_train_draft_with_projection import cli

    models = tmp_path / "models"
    models.mkdir()
    for name in ("rfsq_robust_best.pt", "best_rfsq_head.pt"):
        (models / name).write_bytes((env["models"] / name).read_bytes())
    full = read_checkpoint(models / "best_rfsq_head.pt", kind=HEAD_KIND)
    cut = dict(full, metrics={k: v for k, v in full["metrics"].items() if k not in ("decode_choice", "val_greedy_token_acc")})
    torch.save(cut, models / "best_rfsq_head.pt")

    s = cli(TINY + ["--data", str(env["demos"]), "--models-dir", str(models), "--results-dir", str(tmp_path / "results"),
                    "--train", "draft"])
    assert "no decode choice recorded" in capsys.readouterr().out
    done = read_checkpoint(models / "best_rfsq_head.pt", kind=HEAD_KIND)
    assert done["metrics"]["decode_choice"] == full["metrics"]["decode_choice"]
    assert done["metrics"]["val_greedy_token_acc"] == full["metrics"]["val_greedy_token_acc"]
    assert done["content_hash"] == full["content_hash"] == s["head_hash"]
    assert all(torch.equal(done["model"][k], full["model"][k]) for k in full["model"])

    # a head from another split is refused rather than completed on the wrong held-out demos
    torch.save(dict(cut, metrics={**cut["metrics"], "val_episode_keys": ["demos/demo_99"]}), models / "best_rfsq_head.pt")
    with pytest.raises(CheckpointError, match="no decode choice yet, and was trained on another train/held-out split"):
        cli(TINY + ["--data", str(env["demos"]), "--models-dir", str(models), "--results-dir", str(tmp_path / "results"),
                    "--train", "draft", "--overwrite"])
