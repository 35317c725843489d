"""A per-layer key/value cache with attention sinks: the state of segment recurrence and sliding windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stm.memory.base import BackboneOutput, KeyValues


@dataclass
class KVCache:
    """Cached keys/values of the stream so far, oldest first.

    keys, values: per layer, (B, H, n_sink + n_recent, head_dim), unrotated.
    mask:         (B, n_sink + n_recent) bool, True at real (non-padding) tokens; None when all are real
                  (then no padding mask is built at all, which keeps the fast attention kernels usable).
    n_sink:       how many leading entries are attention sinks (the stream's first tokens, kept for good).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor | None
    n_sink: int = 0

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def as_past_key_values(self) -> KeyValues | None:
        if self.length == 0:
            return None
        return list(zip(self.keys, self.values))

    def detach(self) -> KVCache:
        return KVCache([k.detach() for k in self.keys], [v.detach() for v in self.values], self.mask, self.n_sink)


def empty_cache(batch_size: int, device) -> KVCache:
    return KVCache(keys=[], values=[], mask=None)


def segment_key_values(outputs: BackboneOutput) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
    """The keys, values (per layer (B, H, T, hd)) and mask (B, T) or None of the segment's own tokens.

    Memory-token positions (prefix/suffix of another mechanism) are left out: a cache holds text.
    """
    P, S = outputs.n_prefix, outputs.n_suffix
    end = lambda t: t.shape[2] - S  # noqa: E731
    keys = [k[:, :, P:end(k)] for k, _ in outputs.present_key_values]
    values = [v[:, :, P:end(v)] for _, v in outputs.present_key_values]
    return keys, values, outputs.attention_mask


def append_and_trim(cache: KVCache, outputs: BackboneOutput, keep_recent: int, n_sink: int,
                    stop_gradient: bool) -> KVCache:
    """Add the segment's keys/values to the cache, keep the first `n_sink` tokens of the stream and the
    `keep_recent` most recent ones."""
    keys, values, mask = segment_key_values(outputs)
    if stop_gradient:
        keys, values = [k.detach() for k in keys], [v.detach() for v in values]
    if cache.length:
        if mask is not None or cache.mask is not None:
            B, device = keys[0].shape[0], keys[0].device
            old = cache.mask if cache.mask is not None else torch.ones(B, cache.length, dtype=torch.bool,
                                                                        device=device)
            new = mask if mask is not None else torch.ones(B, keys[0].shape[2], dtype=torch.bool, device=device)
            mask = torch.cat([old, new.bool()], dim=1)
        keys = [torch.cat([old, new], dim=2) for old, new in zip(cache.keys, keys)]
        values = [torch.cat([old, new], dim=2) for old, new in zip(cache.values, values)]
    total = keys[0].shape[2]
    sinks = min(n_sink, total)
    if total > sinks + keep_recent:
        if sinks == 0:  # a plain slice: no copy of the index
            keys = [k[:, :, total - keep_recent:] for k in keys]
            values = [v[:, :, total - keep_recent:] for v in values]
            mask = mask[:, total - keep_recent:] if mask is not None else None
        else:
            keep = torch.cat([torch.arange(sinks), torch.arange(total - keep_recent, total)]).to(keys[0].device)
            keys = [k.index_select(2, keep) for k in keys]
            values = [v.index_select(2, keep) for v in values]
            mask = mask.index_select(1, keep) if mask is not None else None
    return KVCache(keys, values, mask, sinks)
