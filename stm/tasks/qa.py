"""`task=qa`: context = facts hidden in long text and a question, target = the answer; exact match and
answer-in-first-sentence (BABILong's scoring)."""

from __future__ import annotations

from stm.tasks.conditional import ConditionalLMTask


class QuestionAnsweringTask(ConditionalLMTask):
    """Scores exact match and whether the answer appears in the first sentence of the output (0-1)."""

    default_metrics = ("exact_match", "first_sentence")
    default_generation = {"max_new_tokens": 16, "stop_strings": ["\n"]}
