"""Several mechanisms at once (`memory=[rmt,swa]`, `memory=[rmt,xl]`): their extras are merged.

Memory tokens (prefix/suffix) come from one mechanism and cached keys/values from another; at most one of
them may supply each. The window is the narrowest of those given.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from stm.memory.base import BackboneOutput, Memory, SegmentExtras


class ComposedMemory(Memory):
    def __init__(self, mechanisms: list[Memory]):
        super().__init__()
        if not mechanisms:
            raise ValueError("memory: compose at least one mechanism")
        if any(not m.segmented for m in mechanisms):
            raise ValueError("memory=full reads the whole context at once and composes with nothing")
        self.mechanisms = nn.ModuleList(mechanisms)
        self._check_compatible()

    def _check_compatible(self) -> None:
        from stm.memory.swa import SlidingWindow
        from stm.memory.xl import SegmentRecurrence

        caches = [type(m).__name__ for m in self.mechanisms if isinstance(m, (SlidingWindow, SegmentRecurrence))]
        if len(caches) > 1:
            raise ValueError(f"memory: {caches} would each supply cached keys/values; compose at most one of them")

    def bind(self, backbone) -> None:
        for m in self.mechanisms:
            m.bind(backbone)

    def init_state(self, batch_size, device):
        return tuple(m.init_state(batch_size, device) for m in self.mechanisms)

    def prepare(self, state) -> SegmentExtras:
        merged = SegmentExtras()
        for m, s in zip(self.mechanisms, state):
            e = m.prepare(s)
            if e.prefix is not None or e.suffix is not None:
                if merged.prefix is not None or merged.suffix is not None:
                    raise ValueError("memory: two composed mechanisms both add memory tokens")
                merged = replace(merged, prefix=e.prefix, suffix=e.suffix)
            if e.past_key_values is not None:
                merged = replace(merged, past_key_values=e.past_key_values, past_mask=e.past_mask, n_sink=e.n_sink)
            if e.window is not None:
                merged = replace(merged, window=e.window if merged.window is None else min(merged.window, e.window))
                merged = replace(merged, n_sink=e.n_sink)
        return merged

    def update(self, state, outputs: BackboneOutput):
        return tuple(m.update(s, outputs) for m, s in zip(self.mechanisms, state))

    def detach(self, state):
        return tuple(m.detach(s) for m, s in zip(self.mechanisms, state))
