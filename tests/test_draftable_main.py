"""benchmarks/decoding/draftable_main: fine-tuning a head toward its draft's tokens, on a tiny Phase 2 run."""

import json

import pytest
import torch

from benchmarks.decoding import draftable_main as bench
from common.decoding.measure import export_bundle
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead
from common.policy.losses import MainLoss
from tests.test_decode_trained_graphs import write_bundle
from tests.test_phase2_training import TINY, write_demos


def tiny_pair():
    torch.manual_seed(0)
    head = RFSQHead(feature_dim=12, num_layers=4, tokens_per_layer=4, num_levels=7, d_model=16, num_heads=2, num_blocks=1).eval()
    draft = DraftWithProjection(feature_dim=12, coarse_layers=2, tokens_per_layer=4, num_levels=7, width=16, trunk="mlp", activation="relu").eval()
    return head, draft


def test_the_agreement_term_pulls_the_verify_rows_toward_the_draft():
    head, draft = tiny_pair()
    feats, codes = torch.randn(256, 12), torch.randint(0, 7, (256, 4, 4))
    rows = bench.draft_rows(draft, feats)
    assert rows.shape == (256, 2, 4) and torch.equal(rows[:5], draft.propose_rows(feats[:5]))
    tuned = {}
    for w in (0.0, 10.0):
        h = RFSQHead.from_config(head.config)
        h.load_state_dict(head.state_dict())
        bench.finetune(h, MainLoss(h, None), feats, codes, rows, weight=w, epochs=10, lr=3e-3, weight_decay=0.0, batch_size=64, seed=0)
        assert not h.training
        with torch.no_grad():
            tuned[w] = float(bench.agreement_loss(h, feats, rows))
    with torch.no_grad():
        before = float(bench.agreement_loss(head, feats, rows))
    assert tuned[10.0] < 0.5 * before and tuned[10.0] < 0.5 * tuned[0.0]
    with pytest.raises(ValueError, match="weight: expected >= 0, found -1"):
        bench.finetune(head, MainLoss(head, None), feats, codes, rows, weight=-1, epochs=1, lr=1e-3, weight_decay=0.0, batch_size=64, seed=0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 1-epoch Phase 2 run (head + draft) on tiny demos, and a bundle of its held-out states."""
    from common.tokenizer.train import TokenizerTrainConfig, train_tokenizer
    from phase2_draft_retrain.modal_train_draft_with_projection import cli

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("draftable")
    demos = write_demos(root / "demos.hdf5")
    mp = pytest.MonkeyPatch()
    mp.setenv("RSD_RESULTS_DIR", str(root / "results"))
    mp.setenv("RSD_MODELS_DIR", str(root / "models"))
    mp.setenv("RSD_DATA_DIR", str(root / "data"))
    train_tokenizer(TokenizerTrainConfig(data=str(demos), epochs=1, num_episodes=8, layout="chunk", latent_dim=4, batch_size=256,
                                         models_dir=str(root / "models"), progress=False, use_layernorm=True))
    cli(TINY + ["--data", str(demos), "--models-dir", str(root / "models")])
    export_bundle(root / "models", "", root / "bundle.pt")
    yield root
    mp.undo()


def test_every_head_is_measured_and_decodes_exactly(models, tmp_path):
    out = tmp_path / "out"
    r = bench.main(["--models-dir", str(models / "models"), "--bundle", str(models / "bundle.pt"), "--weights", "0,5", "--epochs", "1",
                    "--chunks", "3", "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert [h["head"] for h in r["heads"]] == ["trained (no fine-tuning)", "fine-tuned, w = 0", "fine-tuned, w = 5"]
    assert [h["weight"] for h in r["heads"]] == [None, 0.0, 5.0] and r["heads"][0]["val_action_mse_change"] == 0.0
    for h in r["heads"]:
        assert h["identical_to_main_only"] == h["chunks_checked"] == r["val_steps"] and h["chunks_timed"] == 3
        assert sum(h["held_out_accepted_distribution"]) == pytest.approx(1.0)
        assert h["val_action_mse"] > 0 and h["val_action_mse_change"] == pytest.approx(h["val_action_mse"] / r["heads"][0]["val_action_mse"] - 1)
        L, a, c, v = r["decoded_layers"], h["mean_accepted_layers"], h["c"], h["v"]
        assert h["speedup_formula"] == pytest.approx(L / (L - a + c + v))
    # the trained head's held-out acceptance is what Phase 2 recorded for its draft
    recorded = json.loads((models / "results" / "phase2" / "train_summary.json").read_text())["draft"]["mean_accepted_layers"]
    assert r["heads"][0]["held_out_mean_accepted"] == pytest.approx(recorded)
    table = (out / "draftable_main.md").read_text()
    assert "| fine-tuned, w = 5 |" in table and "(+0%)" in table and "ORIGINAL policy's states" in table
    assert json.loads((out / "draftable_main.json").read_text())["provenance"]["git_sha"]
    assert (out / "draftable_main.png").stat().st_size > 0


def test_states_of_another_head_and_bad_weights_are_refused(models, tmp_path):
    other = write_bundle(tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt: expected states recorded with head .+, found head h"):
        bench.run(models / "models", weights=[1.0], epochs=1, lr=1e-3, bundle=other)
    with pytest.raises(SystemExit):
        bench.main(["--models-dir", str(models / "models"), "--weights", "a,b"])
