"""`task=translation`: document-level translation; context = earlier sentence pairs and the current source
sentence, target = its translation; corpus SacreBLEU and chrF."""

from __future__ import annotations

from stm.tasks.conditional import ConditionalLMTask


class TranslationTask(ConditionalLMTask):
    """Scores corpus-level BLEU and chrF (0-100, as sacrebleu reports them). A target is one sentence, so
    decoding stops at the end of the line. The metrics and generation are set in conf/task/translation.yaml."""
