"""LightningModules, one per task, all over the one segment loop."""

from stm.tasks.lm import LanguageModelTask, warmup_cosine

__all__ = ["LanguageModelTask", "warmup_cosine"]
