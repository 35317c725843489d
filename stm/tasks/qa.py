"""`task=qa`: context = facts hidden in long text and a question, target = the answer; exact match and
answer-in-first-sentence (BABILong's scoring)."""

from __future__ import annotations

from stm.tasks.conditional import ConditionalLMTask


class QuestionAnsweringTask(ConditionalLMTask):
    """Scores exact match and whether the answer appears in the first sentence of the output (0-1); the metrics
    and generation are set in conf/task/qa.yaml."""
