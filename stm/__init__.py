"""stm: short-term memory for transformer language models.

The backbone (`stm.models`, `stm.memory`, `stm.loop`) needs only torch; the Hydra app (`stm.app`; its
`stm.app.resolvers` registers the OmegaConf resolvers that `conf/` uses) is imported where it is used.
"""

__version__ = "0.1.0"
