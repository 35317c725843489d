"""The `Memory` interface: what a segment may see of the segments before it.

A mechanism keeps an explicit state that is passed in and returned (never hidden in module attributes), so
the same module serves training, evaluation, generation, DDP and checkpoint resume. The segment loop in
`stm/segments.py` drives every mechanism the same way:

    state = memory.init_state(batch_size, device)
    for segment in segments:
        extras = memory.prepare(state)             # what this segment gets to see
        outputs = backbone(segment, extras=extras)
        state = memory.update(state, outputs)      # what this segment leaves behind
        state = memory.detach(state)               # every `bptt_depth` segments (truncated BPTT)

A backbone understands only `SegmentExtras`; it never knows which mechanism produced them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

State = Any
"""A mechanism's state: None, a tensor, or a (nested) tuple/list/dict of tensors."""

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, (keys, values), each (B, H, T, head_dim). Keys are stored *before* rotary embedding."""


@dataclass
class SegmentExtras:
    """What a segment gets to see besides its own tokens.

    prefix:          (B, P, D) embeddings placed before the segment's tokens (e.g. memory read tokens).
    suffix:          (B, S, D) embeddings placed after the segment's tokens (e.g. memory write tokens).
    past_key_values: per layer (keys, values), each (B, H, T_past, head_dim), unrotated; the segment's
                     queries attend to them as to tokens that came right before the prefix.
    past_mask:       (B, T_past) bool, True where a cached position holds a real token.
    window:          if set, a query sees only keys at most `window - 1` positions before it (sliding window).
    n_sink:          the first `n_sink` cached keys (attention sinks) stay visible to every query, window or not.
    n_cached_prefix: decoding token by token inside a segment: that segment's memory tokens and earlier tokens
                     are already in `past_key_values` (the last ones); its `n_cached_prefix` memory tokens
                     start at key position `prefix_start`. They stay visible under a window like `prefix`.
    prefix_start:    see `n_cached_prefix`; None when the segment is read whole (no part of it is cached).
    """

    prefix: torch.Tensor | None = None
    suffix: torch.Tensor | None = None
    past_key_values: KeyValues | None = None
    past_mask: torch.Tensor | None = None
    window: int | None = None
    n_sink: int = 0
    n_cached_prefix: int = 0
    prefix_start: int | None = None

    @property
    def memory_start(self) -> int:
        """Key position of the segment's first memory token (cached or in `prefix`)."""
        return self.n_past if self.prefix_start is None else self.prefix_start

    @property
    def n_memory_tokens(self) -> int:
        """The segment's memory tokens that stay visible under a window: cached ones and the prefix."""
        return self.n_cached_prefix + self.n_prefix

    @property
    def n_prefix(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    @property
    def n_suffix(self) -> int:
        return 0 if self.suffix is None else self.suffix.shape[1]

    @property
    def n_past(self) -> int:
        return 0 if not self.past_key_values else self.past_key_values[0][0].shape[2]


@dataclass
class BackboneOutput:
    """What a backbone returns for one segment.

    logits:              (B, T, V) for the segment's own tokens (prefix and suffix positions excluded).
    hidden_states:       (B, P + T + S, D) final (normalised) hidden states of every position, memory included.
    present_key_values:  per layer (keys, values), each (B, H, P + T + S, head_dim), unrotated: this
                         segment's own keys and values, for mechanisms that cache them.
    attention_mask:      (B, T) bool, True at real (non-padding) segment tokens; None means all real.
    n_prefix, n_suffix:  how many prefix / suffix positions `hidden_states` and `present_key_values` hold.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor
    present_key_values: KeyValues
    attention_mask: torch.Tensor | None = None
    n_prefix: int = 0
    n_suffix: int = 0


class Memory(nn.Module):
    """Base class of memory mechanisms.

    `segmented = False` asks the segment loop to read the whole context as one segment (full attention).
    Subclasses override the four methods; the defaults describe a mechanism without state.
    """

    segmented: bool = True

    def bind(self, backbone: nn.Module) -> None:
        """Called once with the backbone before training, for mechanisms whose parameters depend on it
        (e.g. memory embeddings of width `backbone.d_model`)."""

    def init_state(self, batch_size: int, device: torch.device | str) -> State:
        """Empty state for `batch_size` new documents / stream lanes."""
        return None

    def prepare(self, state: State) -> SegmentExtras:
        """What the next segment sees, given the state the previous segments left."""
        return SegmentExtras()

    def update(self, state: State, outputs: BackboneOutput) -> State:
        """The state after a segment, given what the backbone produced for it."""
        return state

    def detach(self, state: State) -> State:
        """Cut the autograd graph behind the state (truncated backpropagation through time)."""
        return detach_state(state)


def detach_state(state: State) -> State:
    """Detach every tensor in a (nested) state."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (list, tuple)):
        return type(state)(detach_state(s) for s in state)
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    raise TypeError(f"cannot detach a memory state of type {type(state).__name__}")


def map_state(state: State, fn) -> State:
    """Apply `fn` to every tensor of a (nested) state: tensors, lists, tuples, dicts and dataclasses (KVCache);
    other values (ints, None) pass through."""
    import dataclasses

    if isinstance(state, torch.Tensor):
        return fn(state)
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return type(state)(**{f.name: map_state(getattr(state, f.name), fn) for f in dataclasses.fields(state)})
    if isinstance(state, (list, tuple)):
        return type(state)(map_state(s, fn) for s in state)
    if isinstance(state, dict):
        return {k: map_state(v, fn) for k, v in state.items()}
    return state


def select_rows(state: State, rows: torch.Tensor) -> State:
    """The state of batch rows `rows` (B',): every state tensor is batch-first, so index dimension 0
    (repeats and reorders rows for beam search)."""
    return map_state(state, lambda t: t.index_select(0, rows))


def state_to_plain(state: State):
    """A memory state as plain containers and tensors (moved to CPU), safe to store in a checkpoint.

    Dataclass states (such as `KVCache`) become {"__state__": class name, field: value, ...}."""
    import dataclasses

    if state is None or isinstance(state, (int, float, str, bool)):
        return state
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if dataclasses.is_dataclass(state):
        plain = {f.name: state_to_plain(getattr(state, f.name)) for f in dataclasses.fields(state)}
        return {"__state__": type(state).__name__, **plain}
    if isinstance(state, (list, tuple)):
        return [state_to_plain(s) for s in state] if isinstance(state, list) else \
            {"__tuple__": [state_to_plain(s) for s in state]}
    if isinstance(state, dict):
        return {k: state_to_plain(v) for k, v in state.items()}
    raise TypeError(f"cannot store a memory state of type {type(state).__name__} in a checkpoint")


def state_from_plain(plain, device=None) -> State:
    """The inverse of `state_to_plain`, tensors moved to `device`."""
    from stm.memory.kv_cache import KVCache

    kinds = {"KVCache": KVCache}
    if plain is None or isinstance(plain, (int, float, str, bool)):
        return plain
    if isinstance(plain, torch.Tensor):
        return plain.to(device) if device is not None else plain
    if isinstance(plain, list):
        return [state_from_plain(p, device) for p in plain]
    if isinstance(plain, dict):
        if "__tuple__" in plain:
            return tuple(state_from_plain(p, device) for p in plain["__tuple__"])
        if "__state__" in plain:
            fields = {k: state_from_plain(v, device) for k, v in plain.items() if k != "__state__"}
            return kinds[plain["__state__"]](**fields)
        return {k: state_from_plain(v, device) for k, v in plain.items()}
    raise TypeError(f"cannot restore a memory state from {type(plain).__name__}")
