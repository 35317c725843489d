"""`memory=xl`: segment recurrence (Dai et al. 2019, Transformer-XL).

Each segment attends, in every layer, to the cached keys/values of the last `mem_len` tokens before it.
The cache is detached (the paper's stop-gradient): gradients never cross a segment border through it.
Positions are re-based every segment (cache first, segment after), so the result does not depend on
where in the stream a segment sits; with `mem_len` at least the history it equals full attention.
Over a pretrained model, keep a few `sink_tokens` (StreamingLLM): the stream's first tokens stay cached.
"""

from __future__ import annotations

from stm.memory.base import BackboneOutput, Memory, SegmentExtras
from stm.memory.kv_cache import KVCache, append_and_trim, empty_cache


class SegmentRecurrence(Memory):
    def __init__(self, mem_len: int = 256, sink_tokens: int = 0, stop_gradient: bool = True):
        super().__init__()
        if mem_len is None or mem_len < 0:
            raise ValueError(f"memory.xl.mem_len must be a non-negative integer, got {mem_len}")
        if sink_tokens < 0:
            raise ValueError(f"memory.xl.sink_tokens must be non-negative, got {sink_tokens}")
        self.mem_len, self.sink_tokens, self.stop_gradient = mem_len, sink_tokens, stop_gradient

    def init_state(self, batch_size, device) -> KVCache:
        return empty_cache(batch_size, device)

    def prepare(self, state: KVCache) -> SegmentExtras:
        if state.length == 0:
            return SegmentExtras()
        return SegmentExtras(past_key_values=state.as_past_key_values(), past_mask=state.mask)

    def update(self, state: KVCache, outputs: BackboneOutput) -> KVCache:
        return append_and_trim(state, outputs, self.mem_len, self.sink_tokens, self.stop_gradient)

    def detach(self, state: KVCache) -> KVCache:
        return state.detach()

    def extra_repr(self) -> str:
        return f"mem_len={self.mem_len}, sink_tokens={self.sink_tokens}, stop_gradient={self.stop_gradient}"
