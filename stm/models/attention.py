"""Attention helpers shared by the backbones: rotary embeddings and the segment attention mask."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rotary_cos_sin(n_positions: int, head_dim: int, base: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of rotary embedding for positions 0..n_positions-1, each (n_positions, head_dim)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by the angles of cos/sin (T, head_dim)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` written into x (B, H, T, head_dim) itself, for tensors outside autograd (no gradients): the
    same products and sums, so the same bits, with two half-size temporaries instead of four full-size copies.
    Returns x."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    first_sin = first * sin[..., half:]
    second_sin = second * sin[..., :half]  # x * cos + [-second, first] * sin, half by half:
    first.mul_(cos[..., :half]).sub_(second_sin)  # first * cos - second * sin (a + (-b) is a - b, exactly)
    second.mul_(cos[..., half:]).add_(first_sin)
    return x


def with_memory_tokens(x: torch.Tensor, extras) -> torch.Tensor:
    """(B, T, D) token embeddings -> (B, P + T + S, D) with the extras' prefix and suffix around them."""
    parts = [p.to(x.dtype) for p in (extras.prefix, x, extras.suffix) if p is not None]
    return torch.cat(parts, dim=1) if len(parts) > 1 else x


def logit_positions(logits_to_keep: int | torch.Tensor, n_tokens: int, offset: int = 0,
                    device=None) -> slice | torch.Tensor:
    """Which of a segment's n_tokens own positions get logits, as an index into a sequence whose own tokens
    start at `offset` (after P memory tokens): `logits_to_keep` as in Hugging Face, 0 = all, an int n > 0 = the
    last n, a 1-D LongTensor = those positions (0 .. n_tokens - 1; may be empty)."""
    if isinstance(logits_to_keep, torch.Tensor):
        if logits_to_keep.dim() != 1:
            raise ValueError("logits_to_keep as a tensor must be 1-D positions, "
                             f"got shape {tuple(logits_to_keep.shape)}")
        return logits_to_keep.to(device) + offset
    if logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0 = every position), got {logits_to_keep}")
    first = 0 if logits_to_keep == 0 else max(n_tokens - logits_to_keep, 0)
    return slice(offset + first, offset + n_tokens)


def segment_key_padding(extras, attention_mask: torch.Tensor | None, batch_size: int, n_tokens: int,
                        device) -> torch.Tensor | None:
    """(B, n_past + P + T + S) bool, False at padding keys (cached or in the segment); None if none is padded."""
    if attention_mask is None and extras.past_mask is None:
        return None

    def ones(n):
        return torch.ones(batch_size, n, dtype=torch.bool, device=device)

    return torch.cat([
        extras.past_mask.bool() if extras.past_mask is not None else ones(extras.n_past),
        ones(extras.n_prefix),
        attention_mask.bool() if attention_mask is not None else ones(n_tokens),
        ones(extras.n_suffix),
    ], dim=1)


def visible(q, k, *, prefix_start: int, window: int | None, n_sink: int, n_prefix: int):
    """The visibility rule, on broadcastable position tensors (dense masks) or index scalars (flex):
    causal; under a window only the last `window` keys, except sinks and the segment's memory tokens, which
    sit at key positions prefix_start .. prefix_start + n_prefix - 1 (right after the memory's cache, or
    inside the cache while a segment is decoded token by token)."""
    allowed = k <= q
    if window is not None:
        always = (k < n_sink) | ((k >= prefix_start) & (k < prefix_start + n_prefix))
        allowed = allowed & ((q - k < window) | always)
    return allowed


def build_attention_mask(
    n_past: int,
    n_query: int,
    *,
    batch_size: int,
    device,
    key_padding: torch.Tensor | None = None,
    window: int | None = None,
    n_sink: int = 0,
    n_prefix: int = 0,
    prefix_start: int | None = None,
) -> torch.Tensor | None:
    """Boolean mask (B, 1, n_query, n_past + n_query), True where a query may attend to a key.

    Queries sit at positions n_past .. n_past + n_query - 1 of the key sequence. Causal, optionally limited
    to the last `window` keys, except that the first `n_sink` keys (attention sinks) and the `n_prefix` memory
    tokens that open the segment (at key positions from `prefix_start`, default n_past) stay visible to every
    later query; padding keys (key_padding False) are
    masked out. Every query always sees itself, so no row is empty (a padded query then gives finite
    garbage that the loss ignores).
    Returns None when plain causal attention without past suffices (the fast `is_causal` path).
    """
    n_keys = n_past + n_query
    if n_past == 0 and key_padding is None and (window is None or window >= n_query):
        return None
    q_pos = torch.arange(n_past, n_keys, device=device)[:, None]
    k_pos = torch.arange(n_keys, device=device)[None, :]
    start = n_past if prefix_start is None else prefix_start
    allowed = visible(q_pos, k_pos, prefix_start=start, window=window, n_sink=n_sink, n_prefix=n_prefix)
    mask = allowed[None].expand(batch_size, n_query, n_keys)
    if key_padding is not None:
        mask = mask & key_padding[:, None, :].bool()
        mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


def flex_block_mask(
    n_past: int,
    n_query: int,
    *,
    batch_size: int,
    device,
    key_padding: torch.Tensor | None = None,
    window: int | None = None,
    n_sink: int = 0,
    n_prefix: int = 0,
    prefix_start: int | None = None,
):
    """The mask of `build_attention_mask` as a flex_attention BlockMask (sparse: blocks outside the band
    are skipped, which is what makes sliding windows fast on a GPU). Without padding the mask depends only on
    the sizes, and the same few recur segment after segment: those are built once and reused."""
    start = n_past if prefix_start is None else prefix_start
    if key_padding is None:
        return _cached_block_mask(n_past, n_query, str(device), window, n_sink, n_prefix, start)
    return _block_mask(n_past, n_query, batch_size, device, key_padding, window, n_sink, n_prefix, start)


@functools.lru_cache(maxsize=64)
def _cached_block_mask(n_past, n_query, device, window, n_sink, n_prefix, prefix_start):
    return _block_mask(n_past, n_query, None, torch.device(device), None, window, n_sink, n_prefix, prefix_start)


def _block_mask(n_past, n_query, batch_size, device, key_padding, window, n_sink, n_prefix, prefix_start):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        q = q_idx + n_past
        allowed = visible(q, kv_idx, prefix_start=prefix_start, window=window, n_sink=n_sink, n_prefix=n_prefix)
        if key_padding is not None:
            allowed = (allowed & key_padding[b, kv_idx]) | (kv_idx == q)
        return allowed

    return create_block_mask(
        mask_mod,
        B=batch_size if key_padding is not None else None,
        H=None,
        Q_LEN=n_query,
        KV_LEN=n_past + n_query,
        device=device,
        _compile=torch.device(device).type == "cuda",
    )


_compiled_flex = None


def flex_attention(q, k, v, block_mask):
    """`torch.nn.attention.flex_attention`, compiled once (uncompiled flex is a slow reference)."""
    global _compiled_flex
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise RuntimeError(
            "flex_attention has no backward pass on CPU; train on CPU with model.attention=sdpa "
            "(the default 'auto' picks flex only on a GPU)"
        )
    if _compiled_flex is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        # one compiled kernel per shape (the cache grows while it fills, then stays): allow enough of them,
        # or flex would silently fall back to its slow uncompiled reference
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, key):
                setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 64))

        _compiled_flex = torch.compile(flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


@dataclass
class BandedLayout:
    """What the banded path needs to know: the same visibility rule as `build_attention_mask`.

    Used for sliding windows much shorter than the segment: queries are processed in chunks of `window`,
    each against only the keys its band can reach (plus sinks and memory tokens), so the cost is
    O(L * window) instead of O(L * (n_past + L)). Runs wherever SDPA runs, backward included.
    """

    n_past: int
    window: int
    n_sink: int = 0
    n_prefix: int = 0
    key_padding: torch.Tensor | None = None  # (B, n_past + L) bool
    prefix_start: int | None = None  # key position of the first memory token; None: n_past

    @property
    def memory_start(self) -> int:
        return self.n_past if self.prefix_start is None else self.prefix_start


def banded_attention(q, k, v, layout: BandedLayout, dropout_p: float = 0.0) -> torch.Tensor:
    """q (B, H, L, hd), k/v (B, H, n_past + L, hd) -> (B, H, L, hd), local attention chunk by chunk."""
    L, n_keys, W, n_past = q.shape[2], k.shape[2], layout.window, layout.n_past
    device = q.device
    always = torch.zeros(n_keys, dtype=torch.bool, device=device)
    always[:layout.n_sink] = True
    always[layout.memory_start:layout.memory_start + layout.n_prefix] = True
    outputs = []
    for a in range(0, L, W):
        b = min(a + W, L)
        lo = max(0, n_past + a - W + 1)
        before = always[:lo].nonzero().squeeze(1)
        idx = torch.cat([before, torch.arange(lo, n_past + b, device=device)])
        keys, values = (k[:, :, lo:n_past + b], v[:, :, lo:n_past + b]) if len(before) == 0 else (
            k.index_select(2, idx), v.index_select(2, idx))
        q_pos = torch.arange(n_past + a, n_past + b, device=device)[:, None]
        k_pos = idx[None, :]
        mask = visible(q_pos, k_pos, prefix_start=layout.memory_start, window=W, n_sink=layout.n_sink,
                       n_prefix=layout.n_prefix)[None]
        if layout.key_padding is not None:
            mask = (mask & layout.key_padding[:, idx][:, None, :].bool()) | (k_pos == q_pos)[None]
        outputs.append(F.scaled_dot_product_attention(q[:, :, a:b], keys, values, attn_mask=mask[:, None],
                                                      dropout_p=dropout_p))
    return torch.cat(outputs, dim=2)
