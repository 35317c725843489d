"""Lay a document out in segments: context first, the target after it (kept whole), padded with masks.

One example of a conditional task is `[context ... | target]` read segment by segment; labels sit on the
target tokens (and, if asked, on the context too). A context longer than the budget of `max_segments`
segments is truncated from the left (keep its end, nearest the target) or the right; a target that can
never fit is an error, never a silent cut. With `overlap > 0` each segment starts with the last `overlap`
tokens of the previous one, as seen-again context without labels (the sliding evaluation of long texts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stm.constants import IGNORE_INDEX


@dataclass
class Layout:
    """input_ids, labels, attention_mask: (n_segments * segment_len,) each; n_context: context tokens kept."""

    input_ids: np.ndarray
    labels: np.ndarray
    attention_mask: np.ndarray
    n_context: int
    truncated: int


def layout_example(context: np.ndarray, target: np.ndarray, *, segment_len: int, max_segments: int,
                   pad_token_id: int, truncation: str = "left", context_loss: bool = False,
                   origin: str = "") -> Layout:
    """Context then target as next-token pairs, padded to whole segments of `segment_len`.

    The inputs are tokens 0..n-2 of [context, target] and the labels tokens 1..n-1, so the first label on
    the target is predicted from the last context token. Labels on the context only if `context_loss`.
    """
    if segment_len <= 0 or max_segments <= 0:
        raise ValueError(f"segment_len and max_segments must be positive, got {segment_len}, {max_segments}")
    if truncation not in ("left", "right"):
        raise ValueError(f"truncation must be 'left' or 'right', got {truncation!r}")
    budget = segment_len * max_segments + 1  # +1: the last token is only a label
    if len(target) == 0:
        raise ValueError(f"{origin}: empty target")
    if len(target) + 1 > budget:
        raise ValueError(f"{origin}: the target has {len(target)} tokens and can never fit in {max_segments} "
                         f"segments of {segment_len} (with at least one context token)")
    room = budget - len(target)
    truncated = max(0, len(context) - room)
    if truncated:
        context = context[truncated:] if truncation == "left" else context[:room]
    tokens = np.concatenate([context, target]).astype(np.int64)
    n_pairs = len(tokens) - 1
    n_segments = -(-n_pairs // segment_len)
    size = n_segments * segment_len
    input_ids = np.full(size, pad_token_id, dtype=np.int64)
    labels = np.full(size, IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros(size, dtype=np.int64)
    input_ids[:n_pairs], mask[:n_pairs] = tokens[:-1], 1
    first_label = 0 if context_loss else len(context) - 1
    labels[first_label:n_pairs] = tokens[first_label + 1:]
    return Layout(input_ids, labels, mask, len(context), truncated)


def overlapping_segments(ids: np.ndarray, segment_len: int, overlap: int = 0) -> list[tuple[np.ndarray, int]]:
    """Cut a document into segments of at most `segment_len` tokens, each after the first starting with the
    last `overlap` tokens of the one before. Returns (segment, n_new) pairs: the segment's last `n_new`
    tokens are new (the ones that take a loss), the ones before them were seen in the previous segment."""
    if not 0 <= overlap < segment_len:
        raise ValueError(f"overlap must be in [0, segment_len), got {overlap} with segment_len {segment_len}")
    stride = segment_len - overlap
    out, start = [], 0
    while start < len(ids):
        begin = max(0, start - overlap)
        segment = ids[begin:start + stride]
        out.append((segment, len(segment) - (start - begin)))
        start += stride
    return out
