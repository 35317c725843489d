"""The compact transformer: causal, and exact under every kind of SegmentExtras it accepts."""

import torch

from stm.memory import SegmentExtras
from stm.models import Transformer, TransformerConfig


def make_model(n_layers=2, seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(vocab_size=50, d_model=32, n_layers=n_layers, n_heads=4, **kw).eval()


def tokens(B, T, seed=1):
    return torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_causality():
    model = make_model()
    x = tokens(2, 12)
    logits = model(x).logits
    assert logits.shape == (2, 12, 50)
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 50  # change the future
    changed = model(y).logits
    torch.testing.assert_close(logits[:, :8], changed[:, :8])
    assert not torch.allclose(logits[:, 8:], changed[:, 8:])


def test_cached_keys_values_equal_one_pass():
    """Segment 2 attending to segment 1's cached K/V gives the logits of reading both at once."""
    model = make_model()
    x = tokens(2, 20)
    whole = model(x).logits
    first = model(x[:, :12])
    second = model(x[:, 12:], extras=SegmentExtras(past_key_values=first.present_key_values))
    torch.testing.assert_close(torch.cat([first.logits, second.logits], dim=1), whole, atol=1e-5, rtol=1e-5)


def test_window_equals_reading_only_the_window():
    """With one layer, position i under a window w sees exactly tokens i-w+1..i (rotary is relative)."""
    model = make_model(n_layers=1)
    x, w = tokens(1, 16), 5
    windowed = model(x, extras=SegmentExtras(window=w)).logits
    for i in range(16):
        alone = model(x[:, max(0, i - w + 1):i + 1]).logits[:, -1]
        torch.testing.assert_close(windowed[:, i], alone, atol=1e-5, rtol=1e-5)
    # a window at least as long as the segment is plain causal attention
    torch.testing.assert_close(model(x, extras=SegmentExtras(window=16)).logits, model(x).logits)


def test_padding_does_not_change_real_positions():
    model = make_model()
    x = tokens(1, 10)
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 10 + [0] * 4])
    out = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(out[:, :10], model(x).logits, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_prefix_and_suffix_embeddings():
    model = make_model()
    x = tokens(2, 8)
    prefix, suffix = torch.randn(2, 3, 32), torch.randn(2, 2, 32)
    out = model(x, extras=SegmentExtras(prefix=prefix, suffix=suffix))
    assert out.logits.shape == (2, 8, 50)
    assert out.hidden_states.shape == (2, 13, 32)
    assert out.present_key_values[0][0].shape == (2, 4, 13, 8)
    assert (out.n_prefix, out.n_suffix) == (3, 2)
    # the prefix is read by the segment; the suffix comes after it and cannot change its logits
    assert not torch.allclose(out.logits, model(x).logits)
    no_suffix = model(x, extras=SegmentExtras(prefix=prefix)).logits
    torch.testing.assert_close(out.logits, no_suffix, atol=1e-5, rtol=1e-5)
    # empty prefix/suffix tensors are the same as none
    empty = model(x, extras=SegmentExtras(prefix=torch.zeros(2, 0, 32), suffix=torch.zeros(2, 0, 32))).logits
    torch.testing.assert_close(empty, model(x).logits)


def test_default_feed_forward_width():
    # (that a segment's result does not depend on its place in the stream is tested in test_memory.py)
    assert TransformerConfig(vocab_size=50, d_model=32, n_heads=4).d_ff == 128  # 8/3 * 32 -> multiple of 64
    assert TransformerConfig(vocab_size=50, d_model=576, n_heads=9).d_ff == 1536


def test_bad_shapes_are_named():
    import pytest

    with pytest.raises(ValueError, match="divisible by model.n_heads"):
        TransformerConfig(vocab_size=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="model.vocab_size"):
        TransformerConfig(vocab_size=0)


def test_banded_path_equals_dense_mask():
    """Windows much shorter than the segment run chunk by chunk; the numbers are those of the dense mask."""
    import torch.nn.functional as F

    from stm.models.attention import BandedLayout, banded_attention, build_attention_mask

    torch.manual_seed(0)
    B, H, n_past, L, hd = 2, 3, 7, 29, 8
    for window, n_sink, n_prefix, padded in ((4, 0, 0, False), (5, 2, 3, True), (3, 0, 2, False), (6, 3, 0, True)):
        q = torch.randn(B, H, L, hd, requires_grad=True)
        k = torch.randn(B, H, n_past + L, hd, requires_grad=True)
        v = torch.randn(B, H, n_past + L, hd)
        padding = torch.rand(B, n_past + L) > 0.2 if padded else None
        dense_mask = build_attention_mask(n_past, L, batch_size=B, device="cpu", key_padding=padding,
                                          window=window, n_sink=n_sink, n_prefix=n_prefix)
        dense = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)
        banded = banded_attention(q, k, v, BandedLayout(n_past, window, n_sink, n_prefix, padding))
        torch.testing.assert_close(banded, dense, atol=1e-5, rtol=1e-5)
        g_dense = torch.autograd.grad(dense.sum(), (q, k))
        g_banded = torch.autograd.grad(banded.sum(), (q, k))
        for a, b in zip(g_banded, g_dense):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
