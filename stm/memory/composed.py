"""Several mechanisms at once (`memory=[rmt,swa]`, `memory=[rmt,xl]`): their extras are merged.

Memory tokens (prefix/suffix) come from one mechanism and cached keys/values from another; at most one of
them may supply each; layer memories read together; the window is the narrowest of those given
(`stm.memory.base.merge_extras`, the one merge rule). Auxiliary losses of all of them count, each under its name.
"""

from __future__ import annotations

from torch import nn

from stm.memory.base import BackboneOutput, Memory, SegmentExtras, merge_extras


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
            merged = merge_extras(merged, m.prepare(s))
        return merged

    def update(self, state, outputs: BackboneOutput):
        return tuple(m.update(s, outputs) for m, s in zip(self.mechanisms, state))

    def auxiliary_losses(self, state, outputs: BackboneOutput):
        losses = {}
        for m, s in zip(self.mechanisms, state):
            for name, value in m.auxiliary_losses(s, outputs).items():
                if name in losses:
                    raise ValueError(f"memory: two composed mechanisms both report an auxiliary loss {name!r}")
                losses[name] = value
        return losses

    def detach(self, state):
        return tuple(m.detach(s) for m, s in zip(self.mechanisms, state))
