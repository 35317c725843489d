"""The one segment loop: every task reads its context through here.

A long (B, T) token stream is cut into segments of `segment_len` tokens; the memory mechanism decides what
each segment sees of the ones before it (`stm.memory.base`). The same loop serves

- training, with truncated backpropagation through time (the state is detached every `bptt_depth`
  segments, so gradients reach at most that many segments back),
- evaluation (the same call under `torch.no_grad()`), and
- generation: the context is read once into the memory state, then tokens are decoded in the final
  segment; when it fills up it is pushed into the memory and a new one begins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stm.constants import IGNORE_INDEX
from stm.memory.base import Memory, State


@dataclass
class SegmentRun:
    """Result of reading a stream.

    token_nll: (B, T) negative log-likelihood (nats) of each label, 0 where the label is ignored; None
               when no labels were given.
    n_tokens:  number of labels that count (a 0-dim tensor).
    logits:    (B, T, V) when requested, else None.
    state:     the memory state after the last segment.
    aux_losses: the memory's auxiliary losses by name (`Memory.auxiliary_losses`), each summed over segments.
    """

    token_nll: torch.Tensor | None
    n_tokens: torch.Tensor | None
    state: State
    logits: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nll_sum(self) -> torch.Tensor:
        return self.token_nll.sum()

    @property
    def loss(self) -> torch.Tensor:
        """Mean NLL per counted label (nats)."""
        return self.token_nll.sum() / self.n_tokens.clamp(min=1)


def segment_bounds(length: int, segment_len: int | None) -> list[tuple[int, int]]:
    """[start, end) of each segment of a stream of `length` tokens; the last one may be shorter."""
    if segment_len is None or segment_len >= length:
        return [(0, length)]
    if segment_len <= 0:
        raise ValueError(f"segment_len must be a positive integer, got {segment_len}")
    return [(s, min(s + segment_len, length)) for s in range(0, length, segment_len)]


def run_segments(
    model: nn.Module,
    memory: Memory,
    input_ids: torch.Tensor,
    *,
    segment_len: int | None,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    state: State = None,
    bptt_depth: int | None = None,
    return_logits: bool = False,
    checkpoint_segments: bool = False,
) -> SegmentRun:
    """Read `input_ids` (B, T) segment by segment under `memory`.

    labels:         (B, T) next-token targets aligned with `input_ids`; IGNORE_INDEX where no loss is taken.
    attention_mask: (B, T) 1 at real tokens, 0 at padding.
    state:          the state to start from (stream lanes carry it across batches); None starts afresh.
    bptt_depth:     detach the state after segments bptt_depth, 2 * bptt_depth, ... (block truncation: the
                    loss of the last segment of each block reaches exactly bptt_depth segments back, and
                    no loss reaches further); None keeps the whole graph.
    checkpoint_segments: recompute each segment's activations in the backward pass instead of keeping
                    them (activation checkpointing per segment): training over k segments then holds one
                    segment's activations plus the memory states, not k segments' worth.
    """
    B, T = input_ids.shape
    if bptt_depth is not None and bptt_depth <= 0:
        raise ValueError(f"bptt_depth must be a positive integer or None, got {bptt_depth}")
    if state is None:
        state = memory.init_state(B, input_ids.device)
    bounds = segment_bounds(T, segment_len if memory.segmented else None)
    keep_key_values = reads_segment_outputs(memory)

    nll_parts, logit_parts, aux_losses = [], [], {}
    for k, (start, end) in enumerate(bounds):
        segment_mask = attention_mask[:, start:end] if attention_mask is not None else None
        segment_labels = labels[:, start:end] if labels is not None else None
        args = (model, input_ids[:, start:end], segment_mask, memory.prepare(state), segment_labels, return_logits,
                keep_key_values)
        if checkpoint_segments and torch.is_grad_enabled():
            outputs, nll = checkpoint(_read_segment, *args, use_reentrant=False)
        else:
            outputs, nll = _read_segment(*args)
        if nll is not None:
            nll_parts.append(nll)
        if return_logits:
            logit_parts.append(outputs.logits)
        for name, value in memory.auxiliary_losses(state, outputs).items():
            aux_losses[name] = aux_losses[name] + value if name in aux_losses else value
        state = memory.update(state, outputs)
        if bptt_depth is not None and (k + 1) % bptt_depth == 0:
            state = memory.detach(state)

    token_nll = n_tokens = None
    if labels is not None:
        token_nll = torch.cat(nll_parts, dim=1)
        n_tokens = (labels != IGNORE_INDEX).sum()
    logits = torch.cat(logit_parts, dim=1) if return_logits else None
    return SegmentRun(token_nll=token_nll, n_tokens=n_tokens, state=state, logits=logits, aux_losses=aux_losses)


def reads_segment_outputs(memory: Memory) -> bool:
    """Whether `memory` may read what the backbone gives for a segment (its keys/values above all): False when
    neither its `update` nor its `auxiliary_losses` is its own, since the base class's take nothing from the
    outputs (`FullAttention`, which reads everything in one segment, and `NoMemory`). Then the backbone need not
    keep every layer's keys/values to the end of the segment (`keep_key_values=False`): at 32K tokens under
    memory=full they were most of the working memory."""
    kind = type(memory)
    return kind.update is not Memory.update or kind.auxiliary_losses is not Memory.auxiliary_losses


def _read_segment(model, input_ids, attention_mask, extras, labels, all_logits, keep_key_values=True):
    """One segment through the backbone: (outputs, per-token NLL (B, T) or None).

    Unless `all_logits`, the backbone computes logits only where some row has a label (none without labels):
    with a large vocabulary the lm head and its logits (B, T, V) are most of a segment's cost when the loss is
    taken at a few answer tokens. `outputs.logits` then holds those positions only. Without `keep_key_values`
    the backbone frees each layer's keys/values after the layer (`outputs.present_key_values` is empty)."""
    keep = 0 if all_logits else _labelled_positions(labels, input_ids.shape[1])
    outputs = model(input_ids, attention_mask=attention_mask, extras=extras, logits_to_keep=keep,
                    keep_key_values=keep_key_values)
    if labels is None:
        return outputs, None
    kept_labels = labels if isinstance(keep, int) else labels[:, keep]
    nll = F.cross_entropy(outputs.logits.float().flatten(0, 1), kept_labels.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none").view(kept_labels.shape)
    if not isinstance(keep, int):  # back to (B, T): zero where no row has a label, as cross_entropy gives there
        nll = nll.new_zeros(labels.shape).index_copy(1, keep, nll)
    return outputs, nll


def _labelled_positions(labels: torch.Tensor | None, n_tokens: int) -> int | torch.Tensor:
    """The segment positions (1-D) where any row has a label; 0 (all) when that is every position."""
    if labels is None:
        return torch.zeros(0, dtype=torch.long)
    positions = (labels != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    return 0 if positions.numel() == n_tokens else positions
