"""benchmarks/decoding/decode_trained_graphs: a bundle's decodes, eager and graphed, exact against main-only (tiny CPU run)."""

import pytest
import torch

from benchmarks.decoding import decode_trained_graphs as bench
from common.decoding.measure import BUNDLE_KIND, load_bundle
from common.policy.draft import DraftWithProjection
from common.policy.head import RFSQHead


def write_bundle(path, depth=3, **extra):
    torch.manual_seed(0)
    head = RFSQHead(feature_dim=12, num_layers=4, tokens_per_layer=4, num_levels=7, d_model=16, num_heads=2, num_blocks=1)
    draft = DraftWithProjection(feature_dim=12, coarse_layers=2, tokens_per_layer=4, num_levels=7, width=16, trunk="mlp", activation="relu")
    torch.save({"kind": BUNDLE_KIND, "features": torch.randn(30, 12), "decode_choice": {"layers": depth, "rule": "expected"},
                "head_config": head.config, "head_state": head.state_dict(), "draft_config": draft.config, "draft_state": draft.state_dict(),
                "head": "models/best_rfsq_head.pt", "draft": "models/best_draft_with_projection.pt", "head_hash": "h", "draft_hash": "d", **extra}, path)
    return path


def test_run_writes_exact_rows_for_both_replays(tmp_path):
    bundle = write_bundle(tmp_path / "b.pt")
    result = bench.main(["run", "--bundle", str(bundle), "--chunks", "5", "--repeats", "2", "--out", str(tmp_path / "out")])
    assert result["identical_to_main_only"] == {"eager": 30, "graphs": 30} and result["chunks_checked"] == 30
    assert result["depth"] == 3 and result["drafted_layers"] == 2 and result["chunks_timed"] == 5
    assert sum(result["accepted_distribution"].values()) == 30
    assert result["mean_accepted_layers"] == pytest.approx(sum(int(k) * v for k, v in result["accepted_distribution"].items()) / 30)
    table = (tmp_path / "out" / "decode_trained_graphs.md").read_text()
    assert "| eager (graph stand-in) |" in table and "30 / 30" in table
    assert result["states"] == "held-out demo steps" and "5 chunks (held-out demo steps)" in table  # a bundle from before --states



def test_drafted_layers_caps_both_speculative_paths(tmp_path):
    bundle = write_bundle(tmp_path / "b.pt")
    result = bench.main(["run", "--bundle", str(bundle), "--chunks", "3", "--repeats", "1", "--drafted-layers", "1", "--out", str(tmp_path / "out")])
    assert result["drafted_layers"] == 1 and set(result["accepted_distribution"]) == {"0", "1"}
    assert result["identical_to_main_only"] == {"eager": 30, "graphs": 30}
    assert "the trained draft proposing 1;" in (tmp_path / "out" / "decode_trained_graphs.md").read_text()


def test_cold_caches_are_named(tmp_path):
    bundle = write_bundle(tmp_path / "b.pt")
    result = bench.main(["run", "--bundle", str(bundle), "--chunks", "2", "--repeats", "1", "--cold", "--out", str(tmp_path / "out")])
    assert result["caches"] == "cold" and result["identical_to_main_only"] == {"eager": 30, "graphs": 30}
    assert "each after a 32 MiB cache sweep (cold caches)" in (tmp_path / "out" / "decode_trained_graphs.md").read_text()

def test_closed_loop_states_are_named_in_the_table(tmp_path):
    states = "closed-loop states recorded by runs/robust-A"
    bundle = write_bundle(tmp_path / "b.pt", states=states)
    result = bench.main(["run", "--bundle", str(bundle), "--chunks", "3", "--repeats", "1", "--out", str(tmp_path / "out")])
    assert result["states"] == states
    assert f"3 chunks ({states})" in (tmp_path / "out" / "decode_trained_graphs.md").read_text()


def test_bundle_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such bundle"):
        load_bundle(tmp_path / "none.pt", torch.device("cpu"), torch.float32)
    torch.save({"kind": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="expected a rsd-decode-bundle-v1 file, found other"):
        load_bundle(tmp_path / "x.pt", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="the head decodes 1 layer; speculation needs at least 2"):
        bench.run(write_bundle(tmp_path / "one.pt", depth=1), torch.device("cpu"), torch.float32, 2, 1)
