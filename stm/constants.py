"""Values shared across layers, with no imports: the lowest layer of stm (docs/architecture.md)."""

IGNORE_INDEX = -100  # a label that takes no loss (the data layer writes it, the segment loop skips it)
CACHE_DIR_ENV = "STM_CACHE_DIR"  # where stm keeps what it computes once: tokenized corpora, converted GGUF models
DEFAULT_CACHE_DIR = "~/.cache/stm"
