"""`memory=full`: no segmenting at all; the whole context is read at once.

The upper bound every mechanism is compared against, at quadratic cost in context length.
"""

from stm.memory.base import Memory


class FullAttention(Memory):
    """Tells the segment loop to read the whole context as a single segment."""

    segmented = False
