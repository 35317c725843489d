"""Values shared across layers, with no imports: the lowest layer of stm (docs/architecture.md)."""

IGNORE_INDEX = -100  # a label that takes no loss (the data layer writes it, the segment loop skips it)
