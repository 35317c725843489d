"""`memory=rmt`: recurrent memory tokens (Bulatov et al. 2022, Recurrent Memory Transformer).

M memory embeddings are read at the start of a segment (prepended) and written at its end (appended):
the write tokens see the whole segment, and their final hidden states become the next segment's memory.
The state stays in the autograd graph, so gradients flow back through up to `bptt_depth` segments (the
segment loop detaches it after every `bptt_depth` segments; see `stm.loop.segments.run_segments`).

Options the papers use: the number of memory tokens, where memory goes (`placement`: read at the start and
write at the end as in the decoder RMT, or `write` only), a learned initial memory (or zeros), and no write
tokens while decoding (the generation loop drops the suffix until a segment is complete).
"""

from __future__ import annotations

import torch
from torch import nn

from stm.memory.base import BackboneOutput, Memory, SegmentExtras

PLACEMENTS = ("read_write", "write")


class RecurrentMemoryTokens(Memory):
    """State: (B, M, D) memory embeddings."""

    def __init__(self, num_memory_tokens: int = 16, placement: str = "read_write", learned_init: bool = True,
                 init_std: float = 0.02):
        super().__init__()
        if num_memory_tokens is None or num_memory_tokens < 0:
            raise ValueError(f"memory.rmt.num_memory_tokens must be a non-negative integer, got {num_memory_tokens}")
        if placement not in PLACEMENTS:
            raise ValueError(f"memory.rmt.placement must be one of {PLACEMENTS}, got {placement!r}")
        self.num_memory_tokens, self.placement = num_memory_tokens, placement
        self.learned_init, self.init_std = learned_init, init_std
        self.initial_memory: nn.Parameter | None = None
        self.d_model: int | None = None

    def bind(self, backbone: nn.Module) -> None:
        self.d_model = backbone.d_model
        init = torch.randn(self.num_memory_tokens, self.d_model) * self.init_std
        if self.learned_init:
            self.initial_memory = nn.Parameter(init)
        else:
            self.register_buffer("initial_memory", torch.zeros(self.num_memory_tokens, self.d_model))

    def init_state(self, batch_size, device) -> torch.Tensor:
        if self.initial_memory is None:
            raise RuntimeError("RecurrentMemoryTokens.bind(backbone) must be called before use")
        return self.initial_memory.to(device).unsqueeze(0).expand(batch_size, -1, -1)

    def prepare(self, state: torch.Tensor) -> SegmentExtras:
        if self.num_memory_tokens == 0:
            return SegmentExtras()
        prefix = state if self.placement == "read_write" else None
        return SegmentExtras(prefix=prefix, suffix=state)

    def update(self, state: torch.Tensor, outputs: BackboneOutput) -> torch.Tensor:
        if self.num_memory_tokens == 0:
            return state
        if outputs.n_suffix < self.num_memory_tokens:  # a decoding step without write tokens
            return state
        return outputs.hidden_states[:, -self.num_memory_tokens:]

    def extra_repr(self) -> str:
        return (f"num_memory_tokens={self.num_memory_tokens}, placement={self.placement}, "
                f"learned_init={self.learned_init}")
