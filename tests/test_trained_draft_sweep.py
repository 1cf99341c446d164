"""benchmarks/decoding/trained_draft_sweep: several trained drafts for one head, each exact against main-only on a bundle's chunks."""

import json

import pytest
import torch

from benchmarks.decoding import trained_draft_sweep as sweep
from common.artifacts import policy_paths
from common.checkpoints import CheckpointError, save_checkpoint
from common.policy.draft import DraftWithProjection
from common.policy.model import DRAFT_KIND
from tests.test_decode_trained_graphs import write_bundle


def write_draft(models_dir, *, width, head_hash="h", held_out_a=None):
    """A draft checkpoint as Phase 2 writes it (config, metrics, the head it was distilled for)."""
    torch.manual_seed(width)
    draft = DraftWithProjection(feature_dim=12, coarse_layers=2, tokens_per_layer=4, num_levels=7, width=width, trunk="mlp", activation="relu")
    models_dir.mkdir(parents=True)
    metrics = {} if held_out_a is None else {"mean_accepted_layers": held_out_a}
    save_checkpoint(policy_paths(models_dir, models_dir, "")["draft"], kind=DRAFT_KIND, model=draft, config=draft.config, metrics=metrics,
                    extra={"head_hash": head_hash})
    return models_dir


def test_every_draft_gets_exact_tokens_and_the_formula_terms(tmp_path):
    bundle = write_bundle(tmp_path / "b.pt")
    small = write_draft(tmp_path / "w8", width=8, held_out_a=0.5)
    large = write_draft(tmp_path / "w32", width=32)
    out = tmp_path / "out"
    result = sweep.main(["--bundle", str(bundle), "--drafts", f"w8={small},w32={large}", "--chunks", "4", "--repeats", "2", "--out", str(out)])
    assert result["chunks_timed"] == 4 and result["chunks_checked"] == 30 and result["decoded_layers"] == 3
    assert [d["draft"] for d in result["drafts"]] == ["w8", "w32"]
    for d in result["drafts"]:
        assert d["identical_to_main_only"] == 30
        assert d["drafted_layers"] == 2 and sum(d["accepted_distribution"]) == pytest.approx(1.0)
        assert d["mean_accepted_layers"] == pytest.approx(sum(k * p for k, p in enumerate(d["accepted_distribution"])))
        L, a, c, v = 3, d["mean_accepted_layers"], d["c"], d["v"]
        assert d["speedup_formula"] == pytest.approx(L / (L - a + c + v))
        assert c > 0 and d["speedup_median_per_chunk"] > 0 and d["speculative_ms_per_chunk"] > 0
        # measured as Phase 3 reports it: mean main-only time over mean speculative time
        assert d["speedup_measured"] == pytest.approx(result["main_only_ms_per_chunk"] / d["speculative_ms_per_chunk"])
    assert result["drafts"][0]["held_out_mean_accepted"] == 0.5 and result["drafts"][1]["held_out_mean_accepted"] is None
    assert result["drafts"][0]["parameters"] < result["drafts"][1]["parameters"]
    table = (out / "trained_draft_sweep.md").read_text()
    assert "| w8 |" in table and "| w32 |" in table and "30 / 30" in table and "| 0.50 |" in table and "median per chunk" in table
    assert json.loads((out / "trained_draft_sweep.json").read_text())["provenance"]["git_sha"]
    assert (out / "trained_draft_sweep.png").stat().st_size > 0


def test_cold_caches_are_named(tmp_path):
    bundle = write_bundle(tmp_path / "b.pt")
    result = sweep.main(["--bundle", str(bundle), "--drafts", f"w8={write_draft(tmp_path / 'w8', width=8)}", "--chunks", "2",
                         "--repeats", "1", "--cold", "--out", str(tmp_path / "out")])
    assert result["caches"] == "cold" and "32 MiB cache sweep" in (tmp_path / "out" / "trained_draft_sweep.md").read_text()


def test_a_draft_of_another_head_is_refused_naming_the_file(tmp_path):
    bundle = write_bundle(tmp_path / "b.pt")
    other = write_draft(tmp_path / "other", width=8, head_hash="not-h")
    with pytest.raises(CheckpointError, match=r"other/best_draft_with_projection\.pt: draft was trained on the features of head not-h, not h \(the bundle's head"):
        sweep.run(bundle, [("other", other)], repeats=1, chunks=1)
    with pytest.raises(ValueError, match="--drafts: expected at least one label=models_dir"):
        sweep.run(bundle, [], repeats=1)
    with pytest.raises(ValueError, match="--drafts: expected label=folder"):
        sweep.main(["--bundle", str(bundle), "--drafts", "no-equals-sign"])
