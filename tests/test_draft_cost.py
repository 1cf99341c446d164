"""benchmarks.decoding.draft_cost: every draft architecture is timed warm and cold next to a main pass."""

import torch

from benchmarks.decoding.draft_cost import DRAFTS, markdown, measure
from common.policy.draft import DraftWithProjection


def test_draft_cost_rows_cover_every_architecture_with_their_sizes():
    result = measure(torch.float32, repeats=10)
    rows = {r["draft"]: r for r in result["drafts"]}
    assert len(rows) == len(DRAFTS) == 9
    for act, width, hidden in DRAFTS:
        r = rows[f"{act} w{width} h{hidden}"]
        expected = DraftWithProjection(feature_dim=128, width=width, coarse_layers=2, tokens_per_layer=16, hidden_layers=hidden,
                                       trunk="mlp", activation=act).num_parameters()
        assert r["parameters"] == expected
        for mode in ("warm", "cold"):
            assert r[f"{mode}_ms"] > 0 and abs(r[f"{mode}_c"] - r[f"{mode}_ms"] / result["main_pass_ms"][mode]) < 1e-9
    assert set(result["activation_us_per_call_1x256"]) == {"gelu", "gelu_tanh", "relu"}
    text = markdown(result)
    assert "| relu w128 h1 | 45,664 |" in text and text.count("\n| ") >= 9 + 3
