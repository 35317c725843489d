"""The decoder under memory: read the context once into the memory state, then extend it in the final segment.

The context's whole segments go through the segment loop (`stm.loop.segments.run_segments`); what is left of it
(at least one token) opens the final segment, and the new tokens are decoded there:

- with a key/value cache inside the final segment (`use_cache=True`, the default): each step feeds only
  the new token, its queries attending to the memory's cached keys/values, the segment's memory tokens and
  the segment's earlier tokens (`SegmentExtras.n_cached_prefix` / `prefix_start` keep the attention rule
  exactly that of the whole segment), so decoding does not recompute the prefix;
- without it, each step re-reads the final segment (the reference the cache is tested against).

When the final segment fills up, it is read once more with the memory's write tokens and pushed into the
memory state, and a new segment begins (`segment_overflow="push"`, the default). With `segment_overflow="extend"`
the final segment grows past `segment_len` instead, so that what is decoded stays in one segment with the
context's last tokens (the reference generate of RMT / ARMT works this way): a short answer to a question at the
end of a context is then never cut from its question by a segment boundary that happens to fall inside it. No
write tokens are used while decoding (they come after the tokens and cannot change their logits).

Batches of rows of different lengths: each row keeps its own memory state and its own segments (counted from its
own start), and every row gives the tokens it gives alone (tests/test_generation.py checks equal token ids):

- reading the contexts: the rows read their first segments together, and a row leaves the batch when its whole
  segments are read (all rows in a forward pass have read equally many: their states have the same shapes);
- opening a final segment, and pushing a full one into the memory: rows of the same shapes (tail length, shapes
  of the memory state) go through the model together;
- decoding steps: one forward pass for all rows. Each row's cached keys (the memory's cache, the segment's memory
  tokens, the segment so far) are left-padded to the longest with masked keys. Rotary positions and windows depend
  only on the distance between a query and a key, which left padding keeps; attention sinks and memory tokens
  under a window are found by absolute position, so with those (`swa` with `sink_tokens`, `[rmt,swa]`) a step
  batches the rows whose caches have the same lengths instead.

`SegmentDecoder` holds the rows' states and next-token logits; the strategies that choose the tokens are in
`stm.loop.generation` (greedy, sampling) and `stm.loop.beam_search`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from stm.loop.segments import reads_segment_outputs, run_segments
from stm.memory.base import KeyValues, LayerMemory, Memory, SegmentExtras, State, select_rows


def state_signature(state: State):
    """What must agree for memory states to be stacked into one batch: the types, the shapes of their tensors
    beyond the batch dimension and dtypes, and every other value (ints, None) in them."""
    if isinstance(state, torch.Tensor):
        return "tensor", tuple(state.shape[1:]), state.dtype
    if dataclasses.is_dataclass(state) and not isinstance(state, type):
        return type(state), tuple((f.name, state_signature(getattr(state, f.name))) for f in dataclasses.fields(state))
    if isinstance(state, (list, tuple)):
        return type(state), tuple(state_signature(s) for s in state)
    if isinstance(state, dict):
        return dict, tuple((k, state_signature(v)) for k, v in state.items())
    return "value", state if isinstance(state, (int, float, str, bool, type(None))) else repr(state)


def cat_states(states: Sequence[State]) -> State:
    """Stack the batch rows of memory states of one `state_signature` into one state (the inverse of `select_rows`)."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(states), dim=0)
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return type(first)(**{f.name: cat_states([getattr(s, f.name) for s in states])
                              for f in dataclasses.fields(first)})
    if isinstance(first, (list, tuple)):
        return type(first)(cat_states(parts) for parts in zip(*states))
    if isinstance(first, dict):
        return {k: cat_states([s[k] for s in states]) for k in first}
    return first


def _grouped(indices, key) -> list[list[int]]:
    """`indices` in groups of equal `key(i)`, each in the order given."""
    groups: dict = {}
    for i in indices:
        groups.setdefault(key(i), []).append(i)
    return list(groups.values())


class RowLayerMemories(LayerMemory):
    """The layer memories of rows whose states cannot be stacked: each reads its own row of the hidden states."""

    def __init__(self, parts: list[LayerMemory | None]):
        self.parts = parts
        self.write_layers = frozenset().union(*(p.write_layers for p in parts if p is not None))

    def read(self, layer: int, hidden: torch.Tensor) -> torch.Tensor | None:
        deltas = [None if p is None else p.read(layer, hidden[j:j + 1]) for j, p in enumerate(self.parts)]
        if all(d is None for d in deltas):
            return None
        return torch.cat([torch.zeros_like(hidden[j:j + 1]) if d is None else d.to(hidden.dtype)
                          for j, d in enumerate(deltas)])


def _position_free(extras: SegmentExtras) -> bool:
    """Whether the attention rule under these extras depends only on distances between queries and keys (then left
    padding of the cached keys changes nothing): no attention sinks and no memory tokens under a window."""
    return extras.n_sink == 0 and (extras.window is None or extras.n_prefix == 0)


def _left_pad(x: torch.Tensor, length: int, dim: int, value=0) -> torch.Tensor:
    n = length - x.shape[dim]
    if n == 0:
        return x
    return F.pad(x, (0, 0) * (x.dim() - 1 - dim) + (n, 0), value=value)


@dataclass
class _Row:
    """One row of a `SegmentDecoder` (every tensor has a batch dimension of 1)."""

    state: State                          # the memory state before the final segment
    tail: torch.Tensor                    # (1, t): the final segment's tokens so far
    extras: SegmentExtras | None = None   # what the final segment sees (no write tokens)
    past: KeyValues | None = None         # cached decoding: the memory's keys/values, then the segment's
    past_mask: torch.Tensor | None = None  # (1, n) bool, False at padding; None when every cached key is real
    logits: torch.Tensor | None = None    # (V,) the next token's logits


SEGMENT_OVERFLOW = ("push", "extend")


def context_rows(context_ids) -> list[torch.Tensor]:
    """The rows of a context batch as 1-D token tensors: a (B, T) tensor, or a sequence of 1-D tensors or lists
    of token ids (rows of different lengths)."""
    if isinstance(context_ids, torch.Tensor):
        if context_ids.dim() != 2:
            raise ValueError(f"context_ids must be (B, T) or a list of rows, got a tensor of shape "
                             f"{tuple(context_ids.shape)}")
        return list(context_ids)
    return [torch.as_tensor(row, dtype=torch.long) for row in context_ids]


class SegmentDecoder:
    """Decoding state of a batch of rows: per row, its memory state, the final segment's tokens and its key/value
    cache (see the module docstring for how rows of different lengths share forward passes).

    context_ids: a (B, T) tensor, or a sequence of B 1-D token tensors of any lengths (at least one token each).
    After construction `logits` (B, V) holds the next-token logits; `append(tokens)` adds one token per row
    and refreshes them.
    """

    def __init__(self, model: nn.Module, memory: Memory, context_ids, segment_len: int | None,
                 use_cache: bool = True, segment_overflow: str = "push"):
        contexts = context_rows(context_ids)
        if not contexts or any(len(c) == 0 for c in contexts):
            raise ValueError("generate needs a non-empty context in every row")
        if segment_overflow not in SEGMENT_OVERFLOW:
            raise ValueError(f"segment_overflow must be one of {SEGMENT_OVERFLOW} (push: a full final segment goes "
                             f"into the memory; extend: it grows while decoding), got {segment_overflow!r}")
        self.model, self.memory, self.use_cache = model, memory, use_cache
        self.push_full = segment_overflow == "push"
        self.segment_len = segment_len if (memory.segmented and segment_len is not None) else None
        self.device = contexts[0].device
        seg = self.segment_len
        n_read = [((len(c) - 1) // seg) * seg if seg else 0 for c in contexts]  # keep a token for the last segment
        states = self._read_contexts(contexts, n_read)
        self.rows = [_Row(state, c[n:][None]) for state, c, n in zip(states, contexts, n_read)]
        self._open(range(len(self.rows)))
        self.logits = torch.stack([row.logits for row in self.rows])

    def _read_contexts(self, contexts: list[torch.Tensor], n_read: list[int]) -> list[State]:
        """Each row's memory state after its whole segments: rows read together, longest first, each leaving the
        batch when its segments are read."""
        states: list[State] = [None] * len(contexts)
        active = sorted((i for i in range(len(contexts)) if n_read[i]), key=lambda i: -n_read[i])
        state, done = (self.memory.init_state(len(active), self.device) if active else None), 0
        while active:
            until = n_read[active[-1]]
            ids = torch.stack([contexts[i][done:until] for i in active])
            state = run_segments(self.model, self.memory, ids, segment_len=self.segment_len, state=state).state
            done = until
            for j, i in enumerate(active):
                if n_read[i] == until:
                    states[i] = select_rows(state, torch.tensor([j], device=self.device))
            keep = [j for j, i in enumerate(active) if n_read[i] > until]
            if keep:
                state = select_rows(state, torch.tensor(keep, device=self.device))
            active = [active[j] for j in keep]
        return [self.memory.init_state(1, self.device) if s is None else s for s in states]

    def _together(self, indices) -> list[list[int]]:
        """Rows that can go through one forward pass as they are: the same tail length and state shapes."""
        return _grouped(indices, lambda i: (self.rows[i].tail.shape[1], state_signature(self.rows[i].state)))

    def _open(self, indices) -> None:
        """Read the final segment's tokens so far under the memory's extras (no write tokens): the next logits, and
        with the cache the segment's keys/values after the memory's. The rows of a group have tails of one length
        (unpadded), so the next logits are the last position's: the lm head runs there only (`logits_to_keep=1`),
        and the keys/values are kept only for the cache."""
        for group in self._together(indices):
            extras = replace(self.memory.prepare(cat_states([self.rows[i].state for i in group])), suffix=None)
            out = self.model(torch.cat([self.rows[i].tail for i in group]), extras=extras, logits_to_keep=1,
                             keep_key_values=self.use_cache)
            for j, i in enumerate(group):
                row = self.rows[i]
                row.logits = out.logits[j, -1]
                if not self.use_cache:
                    continue
                row.extras = replace(self.memory.prepare(row.state), suffix=None)
                segment = [(k[j:j + 1], v[j:j + 1]) for k, v in out.present_key_values]
                e = row.extras
                row.past = [(torch.cat([pk, sk.to(pk.dtype)], dim=2), torch.cat([pv, sv.to(pv.dtype)], dim=2))
                            for (pk, pv), (sk, sv) in zip(e.past_key_values, segment)] if e.past_key_values \
                    else segment
                row.past_mask = None if e.past_mask is None else torch.cat(
                    [e.past_mask.bool(), torch.ones(1, segment[0][0].shape[2], dtype=torch.bool,
                                                    device=e.past_mask.device)], dim=1)

    def _push(self, indices) -> None:
        """Rows whose final segment is full: read it with the memory's write tokens into the memory state; what
        is left of the tail begins the next segment (no logits are needed here: the lm head does not run)."""
        seg = self.segment_len
        no_logits = torch.zeros(0, dtype=torch.long, device=self.device)
        for group in self._together(indices):
            state = cat_states([self.rows[i].state for i in group])
            out = self.model(torch.cat([self.rows[i].tail[:, :seg] for i in group]), extras=self.memory.prepare(state),
                             logits_to_keep=no_logits, keep_key_values=reads_segment_outputs(self.memory))
            state = self.memory.update(state, out)
            for j, i in enumerate(group):
                row = self.rows[i]
                row.state = select_rows(state, torch.tensor([j], device=self.device))
                row.tail = row.tail[:, seg:]

    def _layer_memory(self, group: list[int]):
        parts = [self.rows[i].extras.layer_memory for i in group]
        if len(group) == 1 or all(p is None for p in parts):
            return parts[0]
        states = [self.rows[i].state for i in group]
        if len({state_signature(s) for s in states}) == 1:  # stackable: the batch's own layer memory
            return self.memory.prepare(cat_states(states)).layer_memory
        return RowLayerMemories(parts)

    def _step(self, indices, tokens: torch.Tensor) -> None:
        """One cached decoding step of the rows `indices`: the new token against each row's cached keys/values."""
        rows = self.rows
        if all(_position_free(rows[i].extras) for i in indices):
            groups = [list(indices)]
        else:  # sinks or memory tokens under a window: only rows of the same cache lengths, unpadded
            groups = _grouped(indices, lambda i: (rows[i].extras.n_past, rows[i].past[0][0].shape[2]))
        for group in groups:
            lengths = [rows[i].past[0][0].shape[2] for i in group]
            n = max(lengths)
            past = [(torch.cat([_left_pad(rows[i].past[layer][0], n, 2) for i in group]),
                     torch.cat([_left_pad(rows[i].past[layer][1], n, 2) for i in group]))
                    for layer in range(len(rows[group[0]].past))]
            mask = None
            if min(lengths) < n or any(rows[i].past_mask is not None for i in group):
                mask = torch.cat([_left_pad(rows[i].past_mask if rows[i].past_mask is not None else
                                            torch.ones(1, length, dtype=torch.bool, device=self.device), n, 1, False)
                                  for i, length in zip(group, lengths)])
            e = rows[group[0]].extras
            # everything else the memory supplied (window, sinks) stays as it was
            extras = replace(e, prefix=None, suffix=None, past_key_values=past, past_mask=mask,
                             n_cached_prefix=e.n_prefix, prefix_start=n - lengths[0] + e.n_past,
                             layer_memory=self._layer_memory(group))
            out = self.model(tokens[group][:, None], extras=extras)
            for j, i in enumerate(group):
                row = rows[i]
                row.past = [(torch.cat([pk, k[j:j + 1].to(pk.dtype)], dim=2),
                             torch.cat([pv, v[j:j + 1].to(pv.dtype)], dim=2))
                            for (pk, pv), (k, v) in zip(row.past, out.present_key_values)]
                if row.past_mask is not None:
                    row.past_mask = F.pad(row.past_mask, (0, 1), value=True)
                row.logits = out.logits[j, -1]

    @torch.no_grad()
    def append(self, tokens: torch.Tensor, rows: Sequence[int] | None = None) -> torch.Tensor:
        """Add `tokens` (B,) to the final segments; returns (and keeps in `logits`) the next logits (B, V).
        `rows`: only these rows take their token and move on (finished rows need not); None: all of them."""
        indices = list(range(len(self.rows))) if rows is None else [int(i) for i in rows]
        seg = self.segment_len
        for i in indices:
            self.rows[i].tail = torch.cat([self.rows[i].tail, tokens[i].view(1, 1).to(self.rows[i].tail)], dim=1)
        full = [i for i in indices if seg is not None and self.push_full and self.rows[i].tail.shape[1] > seg]
        if full:  # the segment is full: into the memory with it
            self._push(full)
        if self.use_cache:
            self._open(full)
            stepped = [i for i in indices if i not in set(full)]
            if stepped:
                self._step(stepped, tokens)
        else:  # re-read the final segment
            self._open(indices)
        if indices:
            self.logits = torch.stack([row.logits for row in self.rows])
        return self.logits

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat or reorder) rows: `rows` (B',) indexes the current rows (beam search)."""
        self.rows = [replace(self.rows[int(r)]) for r in rows]
        self.logits = self.logits.index_select(0, rows)
