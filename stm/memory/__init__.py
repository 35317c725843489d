"""Pluggable memory mechanisms, one module per mechanism, behind the `Memory` interface."""

from stm.memory.base import BackboneOutput, KeyValues, Memory, SegmentExtras, State, detach_state
from stm.memory.full import FullAttention
from stm.memory.none import NoMemory

__all__ = [
    "BackboneOutput",
    "FullAttention",
    "KeyValues",
    "Memory",
    "NoMemory",
    "SegmentExtras",
    "State",
    "detach_state",
]
