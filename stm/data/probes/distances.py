"""Where a probe's facts and question fall once tokenized and cut into segments: character offsets (a record's
`meta`) to token indices, and the distance from the earliest fact to the question in tokens and in segments."""

from __future__ import annotations

import numpy as np


def token_index_of_char(text: str, byte_counts: np.ndarray, char_offset: int) -> int:
    """Index of the token containing character `char_offset` of `text`, given the UTF-8 byte count of each
    token of text's tokenization (`encode_with_byte_counts`). Tokens with no bytes (specials such as a bos
    in front) are counted but never contain a character. `byte_counts` may cover more text after `text`."""
    if not 0 <= char_offset < len(text):
        raise ValueError(f"char offset {char_offset} is outside the text ({len(text)} characters)")
    byte = char_offset if text.isascii() else len(text[:char_offset].encode("utf-8"))
    ends = np.cumsum(np.asarray(byte_counts, dtype=np.int64))
    if not len(ends) or byte >= ends[-1]:
        raise ValueError(f"char offset {char_offset} (byte {byte}) is beyond the tokens' {ends[-1] if len(ends) else 0}"
                         " bytes")
    return int(np.searchsorted(ends, byte, side="right"))


def token_index_after(text: str, byte_counts: np.ndarray) -> int:
    """Index of the first token after `text` (the number of tokens that lie within its bytes), given the byte
    counts of its tokenization (which may cover more text after it): where a text that follows it begins."""
    ends = np.cumsum(np.asarray(byte_counts, dtype=np.int64))
    n_bytes = len(text) if text.isascii() else len(text.encode("utf-8"))
    if len(ends) and ends[-1] < n_bytes:
        raise ValueError(f"the tokens cover {ends[-1]} bytes, less than the text's {n_bytes}")
    return int(np.searchsorted(ends, n_bytes, side="right"))


def char_span_tokens(text: str, byte_counts: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """[first, last + 1) of the tokens that hold any of characters [start, end) of `text` (a token that also
    holds characters outside the span is included): the tokens a span of characters needs."""
    if not 0 <= start < end <= len(text):
        raise ValueError(f"char span [{start}, {end}) is empty or outside the text ({len(text)} characters)")
    return token_index_of_char(text, byte_counts, start), token_index_of_char(text, byte_counts, end - 1) + 1


def probe_distances(meta: dict, context: str, byte_counts: np.ndarray, n_context_tokens_kept: int,
                    n_truncated_left: int, segment_len: int) -> dict:
    """Token and segment distances from the earliest supporting fact to the question, after truncation.

    `byte_counts`: of the tokenization of the whole context (or of context + separator, as the conditional data
    module encodes it); token indices below are in that untruncated tokenization. The data module keeps tokens
    [n_truncated_left, n_truncated_left + n_context_tokens_kept) and cuts them into segments of `segment_len`
    from the first kept token (`Layout.truncated` with truncation=left, `Layout.n_context`).

    Returns distance_tokens (question token - earliest fact token; truncation does not change it),
    fact_token / question_token (indices), fact_segment / question_segment (segment numbers counted from the
    first kept token; a fact cut off on the left gets a negative one), distance_segments (their difference: how
    many segment boundaries the memory must carry the fact across), facts_kept (every fact token survived
    truncation: otherwise the answer cannot be recovered) and question_kept.
    """
    if "fact_chars" not in meta or "question_char" not in meta:
        raise ValueError("probe_distances: meta has no 'fact_chars'/'question_char' (not a probe record)")
    if segment_len <= 0:
        raise ValueError(f"segment_len must be positive, got {segment_len}")
    spans = [(token_index_of_char(context, byte_counts, s), token_index_of_char(context, byte_counts, e - 1))
             for s, e in meta["fact_chars"]]
    lo, hi = n_truncated_left, n_truncated_left + n_context_tokens_kept
    if meta["question_char"] == len(context):  # the questions are the target (mqar): the token after the context,
        question = token_index_after(context, byte_counts)  # which truncation never cuts
        question_kept = True
    else:
        question = token_index_of_char(context, byte_counts, meta["question_char"])
        question_kept = lo <= question < hi
    first = min(s for s, _ in spans)
    fact_segment, question_segment = (first - lo) // segment_len, (question - lo) // segment_len
    return {"fact_token": first, "question_token": question, "distance_tokens": question - first,
            "fact_segment": fact_segment, "question_segment": question_segment,
            "distance_segments": question_segment - fact_segment,
            "facts_kept": all(lo <= s and e < hi for s, e in spans), "question_kept": question_kept}
