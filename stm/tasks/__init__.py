"""LightningModules, one per task, all over the one segment loop."""

from stm.tasks.conditional import ConditionalLMTask
from stm.tasks.dialogue import DialogueTask
from stm.tasks.lm import LanguageModelTask, warmup_cosine
from stm.tasks.probe import ProbeTask as ProbeTask
from stm.tasks.qa import QuestionAnsweringTask
from stm.tasks.summarization import SummarizationTask
from stm.tasks.translation import TranslationTask

__all__ = ["ConditionalLMTask", "DialogueTask", "LanguageModelTask", "QuestionAnsweringTask", "SummarizationTask",
           "TranslationTask", "warmup_cosine"]
