"""`memory=swa`: sliding-window attention across segment borders (Longformer's local attention, Mistral).

Every token attends to the previous `window` tokens (itself included), whether they are in its segment or
in earlier ones: a rolling cache holds the last `window - 1` tokens' keys/values per layer. Streaming a text
segment by segment therefore equals token-level local attention over the whole text at once.
The cache keeps its graph until the segment loop detaches the state (every `bptt_depth` segments), so
training over a chunk equals training local attention on the whole chunk; `stop_gradient: true` cuts it at
every segment instead. Over a pretrained model, keep a few `sink_tokens` (StreamingLLM).
"""

from __future__ import annotations

from stm.memory.base import BackboneOutput, Memory, SegmentExtras
from stm.memory.kv_cache import KVCache, append_and_trim, empty_cache


class SlidingWindow(Memory):
    def __init__(self, window: int = 256, sink_tokens: int = 0, stop_gradient: bool = False):
        super().__init__()
        if window is None or window <= 0:
            raise ValueError(f"memory.swa.window must be a positive integer, got {window}")
        if sink_tokens < 0:
            raise ValueError(f"memory.swa.sink_tokens must be non-negative, got {sink_tokens}")
        self.window, self.sink_tokens, self.stop_gradient = window, sink_tokens, stop_gradient

    def init_state(self, batch_size, device) -> KVCache:
        return empty_cache(batch_size, device)

    def prepare(self, state: KVCache) -> SegmentExtras:
        return SegmentExtras(
            past_key_values=state.as_past_key_values(),
            past_mask=state.mask,
            window=self.window,
            n_sink=state.n_sink,
        )

    def update(self, state: KVCache, outputs: BackboneOutput) -> KVCache:
        return append_and_trim(state, outputs, self.window - 1, self.sink_tokens, self.stop_gradient)

    def detach(self, state: KVCache) -> KVCache:
        return state.detach()

    def extra_repr(self) -> str:
        return f"window={self.window}, sink_tokens={self.sink_tokens}, stop_gradient={self.stop_gradient}"
