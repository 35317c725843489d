"""BABILong-style probes: a bAbI story hidden at sentence boundaries of background text (the shipped
novels), then its question; the target is the answer word."""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from stm.data.babi import FACT_LIKE, GENERATORS, BabiFile, BabiQuestion
from stm.data.fieldmap import Record
from stm.data.probes.seeding import sample_rng

QUESTION_FORMAT = "\n\nQuestion: {question}\nAnswer:"

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
