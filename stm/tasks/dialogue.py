"""`task=dialogue`: context = the earlier turns (and sessions), target = the next response; perplexity of the
response, token F1 and BLEU of the generated one."""

from __future__ import annotations

from stm.tasks.conditional import ConditionalLMTask


class DialogueTask(ConditionalLMTask):
    """Scores the response's perplexity (val/ppl, on the target tokens), token F1 and corpus BLEU. A response
    is one turn: decoding stops at the end of the line. The metrics and generation are set in
    conf/task/dialogue.yaml."""
