"""RFSQHead: shapes, teacher-forced == cached sequential, verify == sequential, config round trip."""

import pytest
import torch

from common.policy.head import RFSQHead


def tiny(**kw):
    cfg = dict(feature_dim=12, num_layers=5, tokens_per_layer=3, num_levels=7, d_model=32, num_heads=4, num_blocks=2)
    cfg.update(kw)
    torch.manual_seed(cfg.pop("seed", 0))
    return RFSQHead(**cfg).eval()


def rand_codes(b, T, L, V=7):
    return torch.randint(0, V, (b, T, L))


def test_forward_shapes_and_loss():
    m = tiny()
    f = torch.randn(4, 12)
    codes = rand_codes(4, 3, 5)
    logits = m(f, codes)
    assert logits.shape == (4, 5, 3, 7)
    assert torch.isfinite(logits).all()
    loss = m.loss(f, codes)
    loss.backward()
    assert loss.item() > 0


def test_forward_rejects_bad_inputs():
    m = tiny()
    f = torch.randn(2, 12)
    with pytest.raises(ValueError, match="expected values in"):
        m(f, torch.full((2, 3, 5), 7))
    with pytest.raises(ValueError, match=r"features: expected \[B, 12\]"):
        m(torch.randn(2, 11), rand_codes(2, 3, 5))
    with pytest.raises(ValueError, match="layers"):
        m(f, rand_codes(2, 3, 2))


def test_teacher_forced_equals_cached_sequential():
    for seed in range(3):
        m = tiny(seed=seed)
        f = torch.randn(3, 12)
        codes = rand_codes(3, 3, 5)
        with torch.no_grad():
            tf = m(f, codes)
            cache, lg = m.start(f)
            steps = [lg]
            for l in range(4):
                cache, lg = m.extend(cache, codes[:, :, l])
                steps.append(lg)
        assert cache.length == 5
        torch.testing.assert_close(torch.stack(steps, 1), tf, atol=1e-5, rtol=0)


def test_teacher_forced_is_causal_over_layers():
    m = tiny()
    f = torch.randn(2, 12)
    a = rand_codes(2, 3, 5)
    b = a.clone()
    b[:, :, 3:] = (b[:, :, 3:] + 1) % 7  # change layers >= 3
    with torch.no_grad():
        la, lb = m(f, a), m(f, b)
    torch.testing.assert_close(la[:, :4], lb[:, :4])  # outputs 0..3 only see layers 0..2
    assert not torch.allclose(la[:, 4], lb[:, 4])


def test_verify_equals_sequential_and_cache_truncation():
    m = tiny()
    f = torch.randn(2, 12)
    proposed = rand_codes(2, 3, 3)
    with torch.no_grad():
        vlogits, vcache = m.verify(f, proposed)
        assert vlogits.shape == (2, 4, 3, 7) and vcache.length == 4
        cache, lg = m.start(f)
        seq = [lg]
        for l in range(3):
            cache, lg = m.extend(cache, proposed[:, :, l])
            seq.append(lg)
        torch.testing.assert_close(torch.stack(seq, 1), vlogits, atol=1e-5, rtol=0)
        # continuing from a truncated verify cache == continuing from a sequential cache
        nxt = rand_codes(2, 3, 1)[..., 0]
        for a in range(4):
            c1, l1 = m.extend(vcache.truncate(a + 1), nxt)
            c2, _ = m.start(f)
            for l in range(a):
                c2, _ = m.extend(c2, proposed[:, :, l])
            c2, l2 = m.extend(c2, nxt)
            torch.testing.assert_close(l1, l2, atol=1e-5, rtol=0)


def test_verify_logits_equal_the_cached_verify_pass_and_carry_gradients():
    m = tiny()
    f = torch.randn(2, 12)
    rows = rand_codes(2, 3, 3).transpose(1, 2)  # [B, K, T]
    with torch.no_grad():
        cached, _ = m.verify_rows_(f, rows)
    logits = m.verify_logits(f, rows)
    torch.testing.assert_close(logits, cached, atol=1e-6, rtol=0)
    logits[:, 1].logsumexp(-1).sum().backward()
    assert m.out.weight.grad is not None and m.out.weight.grad.abs().sum() > 0
    assert m.code_embed.weight.grad[rows[:, 0].long() + m._slot_offsets].abs().sum() > 0  # position 1 reads layer 0's rows


def test_passes_from_position_zero_use_sdpa_causal_and_match_the_explicit_mask():
    """Verify and teacher-forced passes start at position 0, where the layer mask is plain causal:
    they take SDPA's is_causal path (no mask tensor), which must give the explicit mask's result."""
    m = tiny()
    f, proposed = torch.randn(3, 12), rand_codes(3, 3, 4)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        seen.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    with torch.no_grad():
        x = torch.cat([m._embed_features(f), m._embed_layers(proposed, 0)], dim=1)  # positions 0..4
        h = x
        for blk in m.blocks:  # the same blocks with the explicit [5, 5] mask
            h = blk(h, None, 0, m._visible[:5, :5])
        masked = m.out(m.ln_f(h)).view(3, 5, 3, 7)
        torch.nn.functional.scaled_dot_product_attention = spy
        try:
            logits, _ = m.verify(f, proposed)
            cache, _ = m.start(f)
            m.extend(cache, proposed[:, :, :2])  # positions 1..2 after a cached prefix: the mask
        finally:
            torch.nn.functional.scaled_dot_product_attention = real
    torch.testing.assert_close(logits, masked, atol=1e-6, rtol=0)
    assert torch.equal(logits.argmax(-1), masked.argmax(-1))
    blocks = len(m.blocks)
    assert seen[:blocks] == [(5, 5, True, True)] * blocks  # verify: causal, no mask tensor
    assert seen[blocks : 2 * blocks] == [(1, 1, True, False)] * blocks  # one position: nothing to mask
    assert seen[2 * blocks :] == [(2, 3, False, False)] * blocks  # after a prefix: the explicit mask


def test_extend_multi_layer_and_limits():
    m = tiny()
    f = torch.randn(1, 12)
    codes = rand_codes(1, 3, 5)
    with torch.no_grad():
        cache, _ = m.start(f)
        cache, lg = m.extend(cache, codes[:, :, :4])
        assert lg.shape == (1, 4, 3, 7) and cache.length == 5
        with pytest.raises(ValueError, match="at most num_layers=5"):
            m.extend(cache, codes[:, :, 4])
        with pytest.raises(ValueError, match="1 <= K <= 4"):
            m.verify(f, codes)


def test_greedy_decode_shape_range_and_consistency():
    m = tiny()
    f = torch.randn(3, 12)
    codes = m.greedy_decode(f)
    assert codes.shape == (3, 3, 5) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 7
    with torch.no_grad():
        # greedy codes are the argmax of the teacher-forced logits on themselves
        assert torch.equal(m(f, codes).argmax(-1).transpose(1, 2), codes)


def test_state_dict_round_trip_and_config():
    m = tiny(dropout=0.1)
    clone = RFSQHead.from_config(m.config).eval()
    clone.load_state_dict(m.state_dict())
    f = torch.randn(2, 12)
    codes = rand_codes(2, 3, 5)
    with torch.no_grad():
        assert torch.equal(m(f, codes), clone(f, codes))
    assert m.config["dropout"] == 0.1 and m.num_parameters() == clone.num_parameters()


def test_count_flops_structure():
    m = tiny()
    fl = m.count_flops()
    assert len(fl["per_position"]) == 5
    assert fl["greedy_decode_total"] == sum(fl["per_position"])
    assert fl["verify_pass"][3] == sum(fl["per_position"][:4])
    assert m.count_flops(batch=2)["greedy_decode_total"] == 2 * fl["greedy_decode_total"]
