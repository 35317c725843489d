"""Deterministic memory probes: long contexts with facts at known places, and a question at the end.

Every generator takes `n_samples`, `seed` and `split` and returns `Record`s; sample i depends only on
(seed, split, i), so the same seed gives the same records and train/val (different `split`) draw different
ones. `meta` says where the facts and the question are, as character offsets into `context`:

    probe          the kind: "recall", "copy", "reverse", "babilong"
    fact_chars     [[start, end), ...] of the supporting fact(s) (sorted)
    question_char  where the question starts (len(context) when the questions are the target: mqar)
    distance_chars question_char - the earliest fact's start
    + the generator's parameters (n_pairs, length, target_length, ...) and what was drawn (key, answer, ...)

Distances in tokens and segments depend on the tokenizer and the segment length: `probe_distances` computes
them from these offsets and the token byte counts the data module has anyway.

Formats (every context ends with the question; the target follows it):

    recall    "....k037:v012;..k512:v003;......?k037:"  -> "v012"   (filler="char", the default)
              "k037:v012;k512:v003;k101:v944;?k037:"    -> "v012"   (filler="pairs": every slot a pair)
    mqar      "k03:v12;....k07:v05;....k11:v30;...."    -> "?k07:v05;?k03:v12;"  (multi-query recall: the
              target asks several keys; only the values take the loss, `answer_chars` says where they are)
    copy      "qzmfe...x|" -> "qzmfe...x"  (reverse: the sequence reversed)
    babilong  Austen sentences with the story lines inserted at sentence boundaries, then
              "\\n\\nQuestion: Where is Mary?\\nAnswer:" -> "kitchen"

Modules: `seeding` (the per-sample generators), `distances` (character offsets to tokens and segments),
`recall` (recall, mqar), `copy_reverse`, `hidden_story` (babilong: a story hidden in background text) and
`sources` (each generator as a record source). Everything is imported from here: `stm.data.probes.RecallSource`.
"""

from __future__ import annotations

from stm.data.probes.copy_reverse import copy_sequence
from stm.data.probes.distances import char_span_tokens, probe_distances, token_index_after, token_index_of_char
from stm.data.probes.hidden_story import QUESTION_FORMAT, babilong, background_sentences, hide_in_background
from stm.data.probes.recall import KEY_SYMBOLS, VALUE_SYMBOLS, mqar, recall
from stm.data.probes.seeding import sample_rng
from stm.data.probes.sources import BabiLongSource, CopySource, MQARSource, ProbeSource, RecallSource

__all__ = ["KEY_SYMBOLS", "QUESTION_FORMAT", "VALUE_SYMBOLS", "BabiLongSource", "CopySource", "MQARSource",
           "ProbeSource", "RecallSource", "babilong", "background_sentences", "char_span_tokens", "copy_sequence",
           "hide_in_background", "mqar", "probe_distances", "recall", "sample_rng", "token_index_after",
           "token_index_of_char"]
