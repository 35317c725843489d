"""`task=summarization`: context = a long document (a meeting transcript), target = its summary; ROUGE."""

from __future__ import annotations

from stm.tasks.conditional import ConditionalLMTask


class SummarizationTask(ConditionalLMTask):
    """Scores ROUGE-1/2/L/Lsum (F-measure, 0-100) of the generated summaries; the metrics and generation are set
    in conf/task/summarization.yaml."""
