"""stm: short-term memory for transformer language models.

The backbone (`stm.models`, `stm.memory`, `stm.loop`) needs only torch; the Hydra app (`stm.run`,
`stm.config`, which registers the OmegaConf resolvers that `conf/` uses) is imported where it is used.
"""

__version__ = "0.1.0"
