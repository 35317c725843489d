"""A per-layer key/value cache with attention sinks: the state of segment recurrence and sliding windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from stm.memory.base import BackboneOutput, KeyValues


@dataclass
class KVCache:
    """Cached keys/values of the stream so far, oldest first.

    keys, values: per layer, (B, H, n_sink + n_recent, head_dim), unrotated.
    mask:         (B, n_sink + n_recent) bool, True at real (non-padding) tokens.
    n_sink:       how many leading entries are attention sinks (the stream's first tokens, kept for good).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    n_sink: int = 0

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def as_past_key_values(self) -> KeyValues | None:
        if self.length == 0:
            return None
        return list(zip(self.keys, self.values))

    def detach(self) -> KVCache:
        return KVCache([k.detach() for k in self.keys], [v.detach() for v in self.values], self.mask, self.n_sink)


def empty_cache(batch_size: int, device) -> KVCache:
    return KVCache(keys=[], values=[], mask=torch.ones(batch_size, 0, dtype=torch.bool, device=device))


def segment_key_values(outputs: BackboneOutput) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The keys, values (per layer (B, H, T, hd)) and mask (B, T) of the segment's own tokens.

    Memory-token positions (prefix/suffix of another mechanism) are left out: a cache holds text.
    """
    P, S = outputs.n_prefix, outputs.n_suffix
    end = lambda t: t.shape[2] - S  # noqa: E731
    keys = [k[:, :, P:end(k)] for k, _ in outputs.present_key_values]
    values = [v[:, :, P:end(v)] for _, v in outputs.present_key_values]
    B = outputs.hidden_states.shape[0]
    T = outputs.hidden_states.shape[1] - P - S
    mask = outputs.attention_mask
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=outputs.hidden_states.device)
    return keys, values, mask


def append_and_trim(cache: KVCache, outputs: BackboneOutput, keep_recent: int, n_sink: int,
                    stop_gradient: bool) -> KVCache:
    """Add the segment's keys/values to the cache, keep the first `n_sink` tokens of the stream and the
    `keep_recent` most recent ones."""
    keys, values, mask = segment_key_values(outputs)
    if stop_gradient:
        keys, values = [k.detach() for k in keys], [v.detach() for v in values]
    if cache.length:
        keys = [torch.cat([old, new], dim=2) for old, new in zip(cache.keys, keys)]
        values = [torch.cat([old, new], dim=2) for old, new in zip(cache.values, values)]
        mask = torch.cat([cache.mask, mask], dim=1)
    sinks = min(n_sink, mask.shape[1])
    total = mask.shape[1]
    if total > sinks + keep_recent:
        keep = torch.cat([torch.arange(sinks), torch.arange(total - keep_recent, total)]).to(mask.device)
        keys = [k.index_select(2, keep) for k in keys]
        values = [v.index_select(2, keep) for v in values]
        mask = mask.index_select(1, keep)
    return KVCache(keys, values, mask, sinks)
