"""Associative recall (`recall`: one pair queried) and multi-query associative recall (`mqar`: every key
asked in the target), key-value pairs at known places in filler."""

from __future__ import annotations

import numpy as np

from stm.data.fieldmap import Record
from stm.data.probes.seeding import _draw, sample_rng


def _scatter(rng: np.random.Generator, region: int, k: int, width: int) -> np.ndarray:
    """Starts of k non-overlapping items of `width` placed uniformly at random in [0, region)."""
    gaps = np.sort(rng.integers(0, region - k * width + 1, size=k))
    return gaps + np.arange(k) * width


def recall(n_samples: int, seed: int = 0, split: str | None = "train", n_pairs: int = 16, key_vocab: int = 1000,
           value_vocab: int = 1000, length: int = 2048, distance=None, placement: str = "random",
           filler: str = "char", filler_char: str = ".") -> list[Record]:
    """Associative recall: key-value pairs `kKKK:vVVV;` in a body of `length` characters, then `?kKKK:`.

    Keys and values are zero-padded to the width of their vocabulary (`k037` for key_vocab=1000); the keys of a
    sample are distinct. `distance` (an int, an inclusive [lo, hi] range, or null) is question_char minus the
    queried pair's start. filler="char": the body is `filler_char` with `n_pairs` pairs in it; placement=random
    puts the queried pair exactly at `distance` (null: a random pair is queried) and the others at random
    places; placement=spread puts the pairs evenly (every length // n_pairs chars) and queries the one nearest
    `distance` (exact to half that step). filler="pairs": the body is length // width pairs back to back (the
    others are distractors), the one nearest `distance` queried: exact to half a pair width (10 chars at
    vocab 1000).
    """
    kw, vw = len(str(key_vocab - 1)), len(str(value_vocab - 1))
    width = len(f"k{0:0{kw}d}:v{0:0{vw}d};")
    if filler not in ("char", "pairs") or placement not in ("random", "spread"):
        raise ValueError(f"recall: filler is 'char' or 'pairs' and placement 'random' or 'spread', got "
                         f"{filler!r}, {placement!r}")
    if filler == "char" and (len(filler_char) != 1 or filler_char in "kv:;?0123456789"):
        raise ValueError(f"recall: filler_char must be one character not used by pairs, got {filler_char!r}")
    records = []
    for i in range(n_samples):
        rng = sample_rng(seed, split, i)
        d = None if distance is None else _draw(rng, distance, "recall.distance")
        if d is not None and not width <= d <= length:
            raise ValueError(f"recall: distance {d} must be in [{width}, length={length}] (a pair is {width} chars)")
        if filler == "pairs" or placement == "spread":
            n = length // width if filler == "pairs" else n_pairs
            step = width if filler == "pairs" else length // n_pairs
            if n < 1 or step < width:
                raise ValueError(f"recall: length {length} holds no {n_pairs} pairs of {width} chars")
            starts = np.arange(n) * step
            body_len = n * width if filler == "pairs" else length
            q = int(rng.integers(n)) if d is None else int(np.argmin(np.abs(body_len - starts - d)))
        else:
            body_len = length
            if d is None:
                if n_pairs * width > length:
                    raise ValueError(f"recall: length {length} holds no {n_pairs} pairs of {width} chars")
                starts, q = _scatter(rng, length, n_pairs, width), int(rng.integers(n_pairs))
            else:
                at = length - d
                before, after = at // width, (length - at - width) // width
                if n_pairs - 1 > before + after:
                    raise ValueError(f"recall: length {length} holds no {n_pairs} pairs with one at distance {d}")
                chosen = rng.choice(before + after, size=n_pairs - 1, replace=False)
                k = int((chosen < before).sum())
                starts = np.concatenate([_scatter(rng, at, k, width), [at],
                                         at + width + _scatter(rng, length - at - width, n_pairs - 1 - k, width)])
                q = k
        n_total = len(starts)
        if n_total > key_vocab:
            raise ValueError(f"recall: {n_total} pairs need key_vocab >= {n_total}, got {key_vocab}")
        keys, values = rng.choice(key_vocab, size=n_total, replace=False), rng.integers(value_vocab, size=n_total)
        body = [filler_char] * body_len
        pairs = [f"k{k:0{kw}d}:v{v:0{vw}d}" for k, v in zip(keys, values)]
        for s, p in zip(starts, pairs):
            body[s:s + width] = p + ";"
        key, value = pairs[q].split(":")
        start = int(starts[q])
        records.append(Record(
            id=f"recall-{split}-{seed}-{i}", context="".join(body) + f"?{key}:", target=value,
            origin=f"probe:recall:{split}:{seed}#{i}",
            meta={"probe": "recall", "fact_chars": [[start, start + width - 1]], "question_char": body_len,
                  "distance_chars": body_len - start, "n_pairs": n_total, "query_index": q, "key": key,
                  "key_vocab": key_vocab, "value_vocab": value_vocab, "length": body_len, "filler": filler,
                  "placement": placement, "seed": seed, "split": split, "index": i}))
    return records


# ------------------------------------------------------------------------------- multi-query associative recall

KEY_SYMBOLS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VALUE_SYMBOLS = "0123456789!#$%&()*+,-/;<=>@[]^_{|}~"


def mqar(n_samples: int, seed: int = 0, split: str | None = "train", n_pairs: int = 8, n_queries: int | None = None,
         key_vocab: int = 64, value_vocab: int = 64, length: int = 256, placement: str = "spread",
         filler_char: str = ".", format: str = "pairs") -> list[Record]:
    """Multi-query associative recall (MQAR, Arora et al. 2023, "Zoology") across segments.

    format="symbols" writes each key and each value as one character (keys from `KEY_SYMBOLS`, at most 52;
    values from `VALUE_SYMBOLS`, at most 35): a pair is "Q7" and a query "Q7", as Zoology's one-token keys and
    values: with byte tokens, the classic two-layer induction circuit solves it (the query key finds its earlier
    copy and reads the token after it), which a model learns in far fewer steps than the multi-token format
    below. The rest (spans, placement, meta) is the same.

    The context is a body of `length` characters of `filler_char` holding `n_pairs` pairs `kKK:vVV;` with
    distinct keys (zero-padded to the width of key_vocab / value_vocab); placement=spread puts pair j at
    j * (length // n_pairs) (evenly over the body, so at 256 characters and segments of 16 the pairs span the
    16 segments), placement=random anywhere without overlap (pairs in order of place). The target is the query
    section `?k07:v05;?k03:v12;...`: `n_queries` (null: all n_pairs) distinct keys of the sample in random
    order, each followed by its value. The keys are not predictable; only the values are:

        answer_chars     [[start, end), ...] of each query's value ("v05") in the target, in query order
        query_fact_chars [[start, end), ...] of each query's pair ("k07:v05") in the context, in query order
        fact_chars       the same spans, sorted; question_char = len(context) (the questions are the target)
        query_keys, answers, query_pairs (which pair, by place, each query asks), n_pairs, n_queries, ...
    """
    for name, value in (("n_pairs", n_pairs), ("key_vocab", key_vocab), ("value_vocab", value_vocab),
                        ("length", length)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"mqar: {name} must be a positive integer, got {value!r}")
    n_queries = n_pairs if n_queries is None else n_queries
    if not isinstance(n_queries, (int, np.integer)) or isinstance(n_queries, bool) or not 1 <= n_queries <= n_pairs:
        raise ValueError(f"mqar: n_queries must be an integer in [1, n_pairs={n_pairs}] (distinct keys of the "
                         f"sample) or null (all of them), got {n_queries!r}")
    if key_vocab < n_pairs:
        raise ValueError(f"mqar: key_vocab must be >= n_pairs (the keys of a sample are distinct), got key_vocab="
                         f"{key_vocab} < n_pairs={n_pairs}")
    if placement not in ("spread", "random"):
        raise ValueError(f"mqar: placement must be 'spread' or 'random', got {placement!r}")
    if format not in ("pairs", "symbols"):
        raise ValueError(f"mqar: format must be 'pairs' (k03:v12;) or 'symbols' (one character each), got {format!r}")
    used = KEY_SYMBOLS + VALUE_SYMBOLS if format == "symbols" else "kv:;?0123456789"
    if not isinstance(filler_char, str) or len(filler_char) != 1 or filler_char in used:
        raise ValueError(f"mqar: filler_char must be one character not used by pairs, got {filler_char!r}")
    if format == "symbols":
        for name, vocab, symbols in (("key_vocab", key_vocab, KEY_SYMBOLS),
                                     ("value_vocab", value_vocab, VALUE_SYMBOLS)):
            if vocab > len(symbols):
                raise ValueError(f"mqar: format=symbols has {len(symbols)} one-character symbols for {name}, got "
                                 f"{name}={vocab}")

        def key_text(k):
            return KEY_SYMBOLS[k]

        def value_text(v):
            return VALUE_SYMBOLS[v]

        def pair_text(key, value):
            return key + value

        query_prefix = pair_text
    else:
        kw, vw = len(str(key_vocab - 1)), len(str(value_vocab - 1))

        def key_text(k):
            return f"k{k:0{kw}d}"

        def value_text(v):
            return f"v{v:0{vw}d}"

        def pair_text(key, value):
            return f"{key}:{value};"

        def query_prefix(key, value):
            return f"?{key}:{value};"
    width = len(pair_text(key_text(0), value_text(0)))
    if n_pairs * width > length:
        raise ValueError(f"mqar: length {length} holds no {n_pairs} pairs of {width} chars (n_pairs={n_pairs} "
                         f"needs length >= {n_pairs * width})")
    records = []
    for i in range(n_samples):
        rng = sample_rng(seed, split, i)
        keys, values = rng.choice(key_vocab, size=n_pairs, replace=False), rng.integers(value_vocab, size=n_pairs)
        if placement == "spread":
            starts = np.arange(n_pairs) * (length // n_pairs)
        else:
            starts = _scatter(rng, length, n_pairs, width)
        asked = [int(j) for j in rng.permutation(n_pairs)[:n_queries]]
        body = [filler_char] * length
        pairs = [(key_text(k), value_text(v)) for k, v in zip(keys, values)]
        for s, (k, v) in zip(starts, pairs):
            body[s:s + width] = pair_text(k, v)
        target, answer_chars, query_fact_chars = [], [], []
        at = 0
        for j in asked:
            key, value = pairs[j]
            query = query_prefix(key, value)
            value_start = at + query.index(value, query.index(key) + len(key))
            answer_chars.append([value_start, value_start + len(value)])
            target.append(query)
            at += len(query)
            fact_end = int(starts[j]) + (width - 1 if format == "pairs" else width)  # the pair without its ';'
            query_fact_chars.append([int(starts[j]), fact_end])
        fact_chars = sorted(query_fact_chars)
        records.append(Record(
            id=f"mqar-{split}-{seed}-{i}", context="".join(body), target="".join(target),
            origin=f"probe:mqar:{split}:{seed}#{i}",
            meta={"probe": "mqar", "answer_chars": answer_chars, "query_fact_chars": query_fact_chars,
                  "fact_chars": fact_chars, "question_char": length, "distance_chars": length - fact_chars[0][0],
                  "n_pairs": int(n_pairs), "n_queries": int(n_queries), "query_pairs": asked,
                  "query_keys": [pairs[j][0] for j in asked], "answers": [pairs[j][1] for j in asked],
                  "key_vocab": key_vocab, "value_vocab": value_vocab, "length": length, "placement": placement,
                  "format": format, "seed": seed, "split": split, "index": i}))
    return records
