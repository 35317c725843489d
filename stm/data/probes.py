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
"""

from __future__ import annotations

import copy
import re
import zlib
from functools import lru_cache

import numpy as np

from stm.data.babi import FACT_LIKE, GENERATORS, BabiFile, BabiQuestion
from stm.data.fieldmap import Record, _plain
from stm.data.sources import Source

QUESTION_FORMAT = "\n\nQuestion: {question}\nAnswer:"


def sample_rng(seed: int, split: str | None, index: int, stream: int = 0) -> np.random.Generator:
    """The generator of sample `index`: from (seed, a stable code of split, stream, index); stream 1 draws
    per-split choices such as the order of a bAbI file's questions."""
    if int(seed) < 0:
        raise ValueError(f"probe seed must be a non-negative integer, got {seed}")
    return np.random.default_rng([int(seed), zlib.crc32((split or "").encode()), stream, int(index)])


def _draw(rng: np.random.Generator, value, name: str) -> int:
    """An int, or one drawn uniformly from an inclusive [lo, hi] range."""
    value = _plain(value)
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] > value[1]:
            raise ValueError(f"{name}: a range is [lo, hi] with lo <= hi, got {value}")
        return int(rng.integers(value[0], value[1] + 1))
    return int(value)


# ------------------------------------------------------------------------------------------------ distances

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


# ------------------------------------------------------------------------------------- associative recall

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


# ------------------------------------------------------------------------------------------- copy / reverse

def copy_sequence(n_samples: int, seed: int = 0, split: str | None = "train", length=256,
         alphabet: str = "abcdefghijklmnopqrstuvwxyz", marker: str = "|", reverse: bool = False) -> list[Record]:
    """Copy (or reverse): a random sequence of `length` symbols from `alphabet` (an int or an inclusive
    [lo, hi] range), then `marker`; the target is the sequence (reversed when `reverse`)."""
    if not alphabet or marker in alphabet:
        raise ValueError(f"copy: the alphabet must be non-empty and not contain the marker {marker!r}")
    kind = "reverse" if reverse else "copy"
    records = []
    for i in range(n_samples):
        rng = sample_rng(seed, split, i)
        n = _draw(rng, length, "copy.length")
        seq = "".join(alphabet[j] for j in rng.integers(len(alphabet), size=n))
        records.append(Record(
            id=f"{kind}-{split}-{seed}-{i}", context=seq + marker, target=seq[::-1] if reverse else seq,
            origin=f"probe:{kind}:{split}:{seed}#{i}",
            meta={"probe": kind, "fact_chars": [[0, n]], "question_char": n, "distance_chars": n, "length": n,
                  "alphabet_size": len(alphabet), "seed": seed, "split": split, "index": i}))
    return records


# ------------------------------------------------------------------------------------------------ babilong

_LOOKAHEAD = 64  # sentences tried after one that would overshoot target_length
_BOUNDARY = re.compile(r"(?<!\bMr)(?<!\bMrs)(?<!\bDr)(?<!\bSt)(?<!\bMs)[.!?][\"'’”)_]*(?= [\"'‘“(_]*[A-Z])")


@lru_cache(maxsize=4)
def background_sentences(sample: str = "austen") -> tuple[tuple[str, str], ...]:
    """(sentence, separator after it) of a shipped sample's texts, in file order: paragraphs (blank-line
    separated) unwrapped to one line, split after . ! ? (and closing quotes) before a capital or an opening
    quote (not after Mr., Mrs., Dr., St., Ms.); the separator is " " inside a paragraph, "\\n\\n" at its end.
    Sentences that read like a bAbI fact (a bAbI name ... "to the <bAbI place>") are left out."""
    from stm.data.text import sample_files

    out = []
    for f in sample_files(sample):
        for para in re.split(r"\n\s*\n", f.read_text(encoding="utf-8")):
            para = " ".join(para.split())
            cuts = [0] + [m.end() + 1 for m in _BOUNDARY.finditer(para)] + [len(para) + 1]
            sentences = [para[a:b - 1] for a, b in zip(cuts, cuts[1:]) if b - 1 > a]
            out += [(s, " " if j < len(sentences) - 1 else "\n\n") for j, s in enumerate(sentences)
                    if not FACT_LIKE.search(s)]
    return tuple(out)


def _cost(tokenizer, texts: list[str]) -> list[int]:
    """Length of each text (tokens of `tokenizer`, else characters), as it adds to a longer text: measured
    before a following word, so that a BPE space merging into the next word is not counted twice."""
    if tokenizer is None:
        return [len(t) for t in texts]
    probe = [t + "The" for t in texts] + ["The"]
    if hasattr(tokenizer, "encode_batch_with_byte_counts"):
        lengths = [len(ids) for ids, _ in tokenizer.encode_batch_with_byte_counts(probe)]
    else:
        lengths = [len(tokenizer.encode(t)) for t in probe]
    return [n - lengths[-1] for n in lengths[:-1]]


def hide_in_background(rng: np.random.Generator, question: BabiQuestion, target_length: int, tokenizer=None,
                       depth: float | None = None, distractors: bool = True, background: str = "austen",
                       question_format: str = QUESTION_FORMAT, prefix: str = "") -> tuple[str, dict]:
    """(context, meta): `prefix`, then the story lines inserted in order at sentence boundaries of background text
    (from a random sentence on), then the question, all of it about `target_length` (tokens of `tokenizer`, else
    characters; the prefix and the question counted: e.g. an instruction and a chat template's frame).
    Sentences are taken in order while they fit; one that would overshoot is skipped (up to 64 in a row), so the
    context is never longer than target_length (in tokens: as estimated by the sum of the pieces' tokens, which
    the tokens of the whole can exceed by a few merges) and rarely shorter by more than a short sentence.
    depth=None: each line at a random boundary; depth=x: the lines together at the boundary nearest fraction x
    of the background."""
    sentences = background_sentences(background)
    if distractors:
        lines, support = question.story, question.supporting
    else:
        lines, support = [question.story[j] for j in question.supporting], list(range(len(question.supporting)))
    tail = question_format.format(question=question.question)
    fixed = sum(_cost(tokenizer, [prefix] + [line + " " for line in lines] + [tail]))
    if fixed > target_length:
        raise ValueError(f"babilong: target_length {target_length} is shorter than the story and question ({fixed})")
    start, chosen, costs, total, pos, misses = int(rng.integers(len(sentences))), [], [], fixed, 0, 0
    n_batch = 16  # sentences measured per tokenizer call, doubling up to 256: a short context needs only a few
    while total < target_length and misses < _LOOKAHEAD and pos < len(sentences):
        batch = [sentences[(start + pos + j) % len(sentences)] for j in range(min(n_batch, len(sentences) - pos))]
        n_batch = min(2 * n_batch, 256)
        for (s, sep), c in zip(batch, _cost(tokenizer, [s + sep for s, sep in batch])):
            pos += 1
            if total + c > target_length:  # would overshoot: skip it, try the next ones
                misses += 1
            else:
                chosen.append((s, sep))
                costs.append(c)
                total, misses = total + c, 0
            if total >= target_length or misses >= _LOOKAHEAD:
                break
    cum = np.concatenate([[0], np.cumsum(costs)])
    if depth is None:
        bounds = np.sort(rng.integers(0, len(chosen) + 1, size=len(lines)))
    else:
        bounds = np.full(len(lines), int(np.argmin(np.abs(cum - float(depth) * cum[-1]))))
    pieces, pos, spans, j = [prefix], len(prefix), [], 0
    for k in range(len(chosen) + 1):
        while j < len(lines) and bounds[j] == k:
            spans.append([pos, pos + len(lines[j])])
            pieces.append(lines[j] + " ")
            pos += len(lines[j]) + 1
            j += 1
        if k < len(chosen):
            pieces.append(chosen[k][0] + chosen[k][1])
            pos += len(pieces[-1])
    body = "".join(pieces).rstrip()  # the prefix and the background with the story in it
    context = body + tail
    facts = [spans[s] for s in support]
    question_char = len(body) + len(tail) - len(tail.lstrip())
    meta = {"probe": "babilong", "task": question.task, "fact_chars": facts, "question_char": question_char,
            "distance_chars": question_char - facts[0][0], "story_chars": spans, "n_story_lines": len(lines),
            "question": question.question, "answer": question.answer, "target_length": target_length,
            "length_unit": "chars" if tokenizer is None else "tokens",
            "length": len(context) if tokenizer is None else len(tokenizer.encode(context)),
            "depth": depth, "background": background, "background_sentence": start, "story_origin": question.origin}
    return context, meta


def babilong(n_samples: int, seed: int = 0, split: str | None = "train", task: str = "qa1", n_facts: int = 1,
             target_length: int = 4096, tokenizer=None, depth: float | None = None, babi_file=None,
             distractors: bool = True, background: str = "austen",
             question_format: str = QUESTION_FORMAT) -> list[Record]:
    """BABILong-style QA: a story (generated by `task` with `n_facts` lines, or the next question of the
    bAbI file `babi_file`, a path or BabiFile, in an order drawn from seed and split) hidden in background
    text by `hide_in_background`; the target is the answer word."""
    if babi_file is not None and not isinstance(babi_file, BabiFile):
        babi_file = BabiFile(babi_file)
    if babi_file is None and task not in GENERATORS:
        raise ValueError(f"babilong: task must be one of {sorted(GENERATORS)} (or give a babi_file), got {task!r}")
    order = None if babi_file is None else sample_rng(seed, split, 0, stream=1).permutation(len(babi_file))
    records = []
    for i in range(n_samples):
        rng = sample_rng(seed, split, i)
        q = GENERATORS[task](rng, n_facts) if babi_file is None else babi_file.questions[order[i % len(order)]]
        context, meta = hide_in_background(rng, q, target_length, tokenizer, depth, distractors, background,
                                           question_format)
        meta.update(seed=seed, split=split, index=i, n_facts=len(q.story))
        records.append(Record(id=f"babilong-{meta['task']}-{split}-{seed}-{i}", context=context, target=q.answer,
                              origin=f"probe:babilong:{split}:{seed}#{i}", meta=meta))
    return records


# ----------------------------------------------------------------------------------------------- sources

class ProbeSource(Source):
    """A probe generator as a record source (`list(source)` gives its records, built once per iteration)."""

    kind = ""
    length_key = "length"  # the parameter a list of lengths overrides (data.val_lengths)

    def __init__(self, n_samples: int = 1000, seed: int = 0, split: str | None = "train", limit: int | None = None,
                 **params):
        super().__init__(fields={"context": "context"}, limit=limit, split=split)
        if not isinstance(n_samples, int) or n_samples <= 0:
            raise ValueError(f"{type(self).__name__}.n_samples must be a positive integer, got {n_samples!r}")
        self.n_samples, self.seed = n_samples, seed
        self.params = {k: _plain(v) for k, v in params.items()}

    def generate(self, n: int) -> list[Record]:
        raise NotImplementedError

    def with_params(self, **overrides) -> ProbeSource:
        """A copy with some generator parameters (or n_samples / seed) overridden; the original is unchanged."""
        copied = copy.copy(self)
        copied.params = dict(self.params)
        for key, value in overrides.items():
            if key in ("n_samples", "seed"):
                setattr(copied, key, value)
            else:
                copied.params[key] = _plain(value)
        return copied

    def __iter__(self):
        n = self.n_samples if self.limit is None else min(self.n_samples, self.limit)
        yield from self.generate(n)

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(n_samples={self.n_samples}, seed={self.seed}, split={self.split!r}, {knobs})"


class RecallSource(ProbeSource):
    """`recall` as a source: RecallSource(n_samples, seed, split, n_pairs=..., length=..., distance=...)."""

    def generate(self, n: int) -> list[Record]:
        return recall(n, self.seed, self.split, **self.params)


class MQARSource(ProbeSource):
    """`mqar` as a source: MQARSource(n_samples, seed, split, n_pairs=..., n_queries=..., length=...)."""

    def generate(self, n: int) -> list[Record]:
        return mqar(n, self.seed, self.split, **self.params)


class CopySource(ProbeSource):
    """`copy_sequence` as a source: CopySource(n_samples, seed, split, length=..., reverse=...)."""

    def generate(self, n: int) -> list[Record]:
        return copy_sequence(n, self.seed, self.split, **self.params)


class BabiLongSource(ProbeSource):
    """`babilong` as a source; `path` (relative to `root`) reads the stories from a bAbI file."""

    length_key = "target_length"

    def __init__(self, path: str | None = None, root: str | None = None, **kwargs):
        from stm.data.sources import expand_paths

        super().__init__(**kwargs)
        if path is not None:
            self.params["babi_file"] = BabiFile(expand_paths(path, root, key="BabiLongSource.path")[0])

    def generate(self, n: int) -> list[Record]:
        return babilong(n, self.seed, self.split, **self.params)
