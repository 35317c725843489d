"""stm: short-term memory for transformer language models."""

import stm.config  # noqa: F401  (registers the OmegaConf resolvers used by conf/)

__version__ = "0.1.0"
