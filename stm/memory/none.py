"""`memory=none`: each segment sees only itself. The memoryless baseline."""

from stm.memory.base import Memory


class NoMemory(Memory):
    """Segments are read independently: nothing is carried from one segment to the next."""
