"""The `Memory` interface: what a segment may see of the segments before it.

A mechanism keeps an explicit state that is passed in and returned (never hidden in module attributes), so
the same module serves training, evaluation, generation, DDP and checkpoint resume. The segment loop in
`stm/loop/segments.py` drives every mechanism the same way:

    state = memory.init_state(batch_size, device)
    for segment in segments:
        extras = memory.prepare(state)             # what this segment gets to see
        outputs = backbone(segment, extras=extras)
        losses = memory.auxiliary_losses(state, outputs)   # optional extra training losses, by name
        state = memory.update(state, outputs)      # what this segment leaves behind
        state = memory.detach(state)               # every `bptt_depth` segments (truncated BPTT)

A backbone understands only `SegmentExtras`; it never knows which mechanism produced them. A mechanism can act
around the segment (memory tokens in `prefix`/`suffix`), on attention (cached `past_key_values`, a `window`), and
inside every layer (`layer_memory`: a read added to a layer's input, and the layer's outputs handed back in
`BackboneOutput.layer_outputs` for the mechanism to write from). Several mechanisms at once combine their
extras with `merge_extras`, the one rule for what two mechanisms may supply together.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

State = Any
"""A mechanism's state: None, a tensor, or (nested) tuples, lists, dicts and dataclasses of tensors."""

KeyValues = list[tuple[torch.Tensor, torch.Tensor]]
"""Per layer, (keys, values), each (B, H, T, head_dim). Keys are stored *before* rotary embedding."""


class LayerMemory:
    """Per-layer access to a mechanism's state during one segment's forward pass.

    A backbone with `n_layers` layers does, for each layer i:

        delta = layer_memory.read(i, hidden)        # hidden: (B, L, D), the layer's input, L = P + T + S
        if delta is not None: hidden = hidden + delta
        hidden = layer(hidden)
        if i in layer_memory.write_layers: outputs.layer_outputs[i] = hidden   # (B, L, D)

    The mechanism builds one in `prepare` from its state (reads only, no side effects) and writes its new state
    in `update` from `BackboneOutput.layer_outputs`. Subclasses override `read` and set `write_layers`.
    """

    write_layers: frozenset[int] = frozenset()

    def read(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        """What to add to layer `layer`'s input `hidden` (B, L, D): a (B, L, D) tensor, or None for nothing."""
        return None


class LayerMemories(LayerMemory):
    """Several mechanisms' layer memories at once: reads add up, writes collect the union of layers."""

    def __init__(self, parts: list[LayerMemory]):
        self.parts = list(parts)
        self.write_layers = frozenset().union(*(p.write_layers for p in self.parts))

    def read(self, layer, hidden):
        total = None
        for part in self.parts:
            delta = part.read(layer, hidden)
            if delta is not None:
                total = delta if total is None else total + delta
        return total


def read_layer_memory(extras: SegmentExtras, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """A layer's input with the extras' layer memory read into it (unchanged without one)."""
    if extras.layer_memory is None:
        return hidden
    delta = extras.layer_memory.read(layer, hidden)
    return hidden if delta is None else hidden + delta.to(hidden.dtype)


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
    layer_memory:    per-layer reads (and which layers' outputs to hand back), see `LayerMemory`.
    """

    prefix: torch.Tensor | None = None
    suffix: torch.Tensor | None = None
    past_key_values: KeyValues | None = None
    past_mask: torch.Tensor | None = None
    window: int | None = None
    n_sink: int = 0
    n_cached_prefix: int = 0
    prefix_start: int | None = None
    layer_memory: LayerMemory | None = None

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

    logits:              (B, T, V) for the segment's own tokens (prefix and suffix positions excluded), or
                         (B, K, V) for the K positions the caller's `logits_to_keep` asked for.
    hidden_states:       (B, P + T + S, D) final (normalised) hidden states of every position, memory included.
    present_key_values:  per layer (keys, values), each (B, H, P + T + S, head_dim), unrotated: this
                         segment's own keys and values, for mechanisms that cache them.
    attention_mask:      (B, T) bool, True at real (non-padding) segment tokens; None means all real.
    n_prefix, n_suffix:  how many prefix / suffix positions `hidden_states` and `present_key_values` hold.
    layer_outputs:       {layer: (B, P + T + S, D)} the outputs of the layers in `extras.layer_memory.write_layers`
                         (before the final norm); empty without a layer memory.
    """

    logits: torch.Tensor
    hidden_states: torch.Tensor
    present_key_values: KeyValues
    attention_mask: torch.Tensor | None = None
    n_prefix: int = 0
    n_suffix: int = 0
    layer_outputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)


def _one_of(name):
    def merge(a, b):
        if a is not None and b is not None:
            raise ValueError(f"memory: two composed mechanisms both supply {name}; compose at most one of them")
        return a if a is not None else b
    return merge


def _merge_cache(a: SegmentExtras, b: SegmentExtras) -> dict:
    if a.past_key_values is not None and b.past_key_values is not None:
        raise ValueError("memory: two composed mechanisms both supply cached keys/values (past_key_values); "
                         "compose at most one of them")
    src = a if a.past_key_values is not None else b
    return {"past_key_values": src.past_key_values, "past_mask": src.past_mask}


def _merge_layer_memory(a, b):
    if a is None or b is None:
        return a if b is None else b
    parts = [*(a.parts if isinstance(a, LayerMemories) else [a]), *(b.parts if isinstance(b, LayerMemories) else [b])]
    return LayerMemories(parts)


def _min_window(a, b):
    return a if b is None else b if a is None else min(a, b)


# How two mechanisms' extras combine, field by field. Every field of SegmentExtras has a rule here (tested), so a
# new field cannot be dropped silently by composition or by cached decoding.
_MERGE_RULES = {
    "prefix": _one_of("memory tokens before the segment (prefix)"),
    "suffix": _one_of("memory tokens after the segment (suffix)"),
    "window": _min_window,                  # the narrowest window
    "n_sink": max,                          # sinks belong to the one cache (or window) that has them
    "n_cached_prefix": max,                 # set only by the decoder
    "prefix_start": _one_of("prefix_start"),
    "layer_memory": _merge_layer_memory,    # reads add up
}
_MERGED_TOGETHER = {"past_key_values", "past_mask"}  # the cache and its padding mask come from one mechanism


def merge_extras(a: SegmentExtras, b: SegmentExtras) -> SegmentExtras:
    """The extras of two mechanisms at once: memory tokens and cached keys/values each from at most one of them
    (an error names the clash), the narrowest window, layer memories read together."""
    merged = {name: rule(getattr(a, name), getattr(b, name)) for name, rule in _MERGE_RULES.items()}
    merged.update(_merge_cache(a, b))
    return SegmentExtras(**merged)


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

    def auxiliary_losses(self, state: State, outputs: BackboneOutput) -> dict[str, torch.Tensor]:
        """Extra training losses of this segment, by name (0-dim tensors), given the state it started from.

        The segment loop sums each over the segments (`SegmentRun.aux_losses`); tasks add them to the loss and
        log them as `train/aux/<name>`. None by default."""
        return {}

    def detach(self, state: State) -> State:
        """Cut the autograd graph behind the state (truncated backpropagation through time)."""
        return detach_state(state)


def detach_state(state: State) -> State:
    """Detach every tensor in a (nested) state: tensors, lists, tuples, dicts and dataclasses."""
    return map_state(state, torch.Tensor.detach)


def map_state(state: State, fn) -> State:
    """Apply `fn` to every tensor of a (nested) state: tensors, lists, tuples, dicts and dataclasses (KVCache);
    other values (ints, None) pass through."""
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

    A dataclass state becomes {"__state__": "module:QualName", field: value, ...}; a tuple {"__tuple__": [...]}.
    """
    if state is None or isinstance(state, (int, float, str, bool)):
        return state
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        plain = {f.name: state_to_plain(getattr(state, f.name)) for f in dataclasses.fields(state)}
        return {"__state__": f"{type(state).__module__}:{type(state).__qualname__}", **plain}
    if isinstance(state, (list, tuple)):
        return [state_to_plain(s) for s in state] if isinstance(state, list) else \
            {"__tuple__": [state_to_plain(s) for s in state]}
    if isinstance(state, dict):
        return {k: state_to_plain(v) for k, v in state.items()}
    raise TypeError(f"cannot store a memory state of type {type(state).__name__} in a checkpoint")


def _state_class(name: str) -> type:
    """The dataclass a stored state names. Only dataclasses of memory modules already imported are accepted
    (stm.memory.* or a module that defines a Memory subclass, as a mechanism of your own does): restoring a state
    never imports a module, and builds nothing else."""
    if ":" in name:
        module_name, qualname = name.split(":", 1)
        candidates = [sys.modules.get(module_name)]
    else:  # checkpoints before module-qualified names stored the bare class name of an stm state
        qualname = name
        candidates = [m for n, m in list(sys.modules.items()) if n.startswith("stm.memory.")]
    for module in candidates:
        if module is None or not _is_memory_module(module):
            continue
        obj = module
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
            return obj
    raise TypeError(f"a stored memory state names the class {name!r}, which is not a dataclass of a loaded memory "
                    f"module; build the memory mechanism (memory=...) before restoring its state")


def _is_memory_module(module) -> bool:
    if module.__name__.startswith("stm.memory."):
        return True
    return any(isinstance(v, type) and issubclass(v, Memory) and v.__module__ == module.__name__
               for v in vars(module).values())


def state_from_plain(plain, device=None) -> State:
    """The inverse of `state_to_plain`, tensors moved to `device`."""
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
            return _state_class(plain["__state__"])(**fields)
        return {k: state_from_plain(v, device) for k, v in plain.items()}
    raise TypeError(f"cannot restore a memory state from {type(plain).__name__}")
