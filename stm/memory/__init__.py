"""Pluggable memory mechanisms, one module per mechanism, behind the `Memory` interface."""

from stm.memory.armt import AssociativeMemory
from stm.memory.base import (
    BackboneOutput,
    KeyValues,
    LayerMemory,
    Memory,
    SegmentExtras,
    State,
    detach_state,
    merge_extras,
)
from stm.memory.composed import ComposedMemory
from stm.memory.full import FullAttention
from stm.memory.kv_cache import KVCache
from stm.memory.none import NoMemory
from stm.memory.rmt import RecurrentMemoryTokens
from stm.memory.swa import SlidingWindow
from stm.memory.xl import SegmentRecurrence

__all__ = [
    "AssociativeMemory",
    "BackboneOutput",
    "ComposedMemory",
    "FullAttention",
    "KVCache",
    "KeyValues",
    "LayerMemory",
    "Memory",
    "NoMemory",
    "RecurrentMemoryTokens",
    "SegmentExtras",
    "SegmentRecurrence",
    "SlidingWindow",
    "State",
    "build_memory",
    "detach_state",
    "merge_extras",
]


def build_memory(section, backbone) -> Memory:
    """Build the mechanism(s) of a `memory` config section and bind them to the backbone.

    `section` maps each chosen mechanism's name to its config (`memory=[rmt,swa]` gives two entries);
    one entry gives that mechanism, several give a `ComposedMemory` in the order chosen.
    """
    from hydra.utils import instantiate

    if section is None or len(section) == 0:
        raise ValueError("memory: no mechanism chosen; use memory=none, full, rmt, armt, xl, swa or a list")
    if "_target_" in section:  # a single mechanism given directly
        mechanisms = [instantiate(section)]
    else:
        for name, cfg in section.items():
            if not hasattr(cfg, "get") or "_target_" not in cfg:
                raise ValueError(
                    f"memory.{name} holds options ({cfg}) but no mechanism: memory={name} was not chosen. A preset set "
                    f"them (e.g. conf/probe_memory/{name}.yaml): pick the mechanism with that preset's group "
                    f"(probe_memory=...) instead of memory=..., or choose memory={name}")
        mechanisms = [instantiate(cfg) for cfg in section.values()]
    memory = mechanisms[0] if len(mechanisms) == 1 else ComposedMemory(mechanisms)
    memory.bind(backbone)
    return memory
