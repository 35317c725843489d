"""stm.metrics.text against the reference implementations (rouge_score, sacrebleu), under DDP, and sample tables."""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path

import pytest
import sacrebleu
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rouge_score import rouge_scorer

from stm.metrics.text import (
    ROUGE_TYPES,
    answer_in_first_sentence,
    build_text_metrics,
    exact_match,
    first_sentence,
    normalize_answer,
    token_f1,
)

ALL_METRICS = ["rouge", "sacrebleu", "chrf", "token_f1", "exact_match", "first_sentence"]

# a mix: English, multi-sentence summaries with one sentence per line, Spanish with accents, an empty prediction
PREDS = [
    "the cat sat on the mat",
    "The report was released on Monday.\nIt says growth slowed in the third quarter.\nMarkets fell sharply.",
    "El niño comió una manzana roja en la cocina.",
    "",
    "a quick brown fox jumps over the lazy dog",
    "¿Dónde está la biblioteca? Está cerca de la plaza.",
    "Researchers are running new experiments.\nResults come next year.",
    "The kitchen.",
]
TARGETS = [
    "the cat is sitting on the mat",
    "Markets fell sharply on Monday.\nThe report says growth slowed in the third quarter.",
    "El niño se comió una manzana roja en la cocina.",
    "Hola, señor.",
    "the quick brown fox jumped over the lazy dog",
    "¿Dónde queda la biblioteca? Queda cerca de la plaza mayor.",
    "The researchers ran new experiments.\nThe results will come next year.",
    "kitchen",
]


def values(metrics) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.compute().items()}


def reference_rouge(preds: list[str], targets: list[str], use_stemmer: bool = True) -> dict[str, float]:
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    scores = [scorer.score(target, pred) for pred, target in zip(preds, targets)]
    return {key: 100 * sum(s[key].fmeasure for s in scores) / len(scores) for key in ROUGE_TYPES}


# --- reference implementations --------------------------------------------------------------------------------


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_equals_rouge_score(use_stemmer):
    metrics = build_text_metrics(["rouge"], use_stemmer=use_stemmer)
    metrics.update(PREDS, TARGETS)
    got = values(metrics)
    assert set(got) == set(ROUGE_TYPES)
    want = reference_rouge(PREDS, TARGETS, use_stemmer)
    for key in ROUGE_TYPES:
        assert got[key] == pytest.approx(want[key], abs=1e-4), key
    # the newline-split summaries make rougeLsum differ from rougeL, so the sentence split is really exercised
    assert abs(got["rougeLsum"] - got["rougeL"]) > 1.0


def test_rouge_stemmer_changes_the_score():
    stemmed, plain = build_text_metrics(["rouge"]), build_text_metrics(["rouge"], use_stemmer=False)
    for metrics in (stemmed, plain):
        metrics.update(["the dogs were running"], ["the dog runs"])
    assert values(stemmed)["rouge1"] > values(plain)["rouge1"]


def test_rouge_of_the_multi_sentence_summary_alone():
    """rougeLsum of one two-line summary, against rouge_score's own number."""
    metrics = build_text_metrics(["rouge"])
    metrics.update(PREDS[1:2], TARGETS[1:2])
    want = reference_rouge(PREDS[1:2], TARGETS[1:2])
    assert values(metrics)["rougeLsum"] == pytest.approx(want["rougeLsum"], abs=1e-4)
    assert want["rougeLsum"] > want["rougeL"] + 1.0


@pytest.mark.parametrize("subset", [slice(None), slice(2, 4), slice(5, 6), slice(0, 1)],
                         ids=["all", "spanish+empty", "spanish", "one-pair"])
def test_bleu_and_chrf_equal_sacrebleu(subset):
    preds, targets = PREDS[subset], TARGETS[subset]
    metrics = build_text_metrics(["sacrebleu", "chrf"])
    metrics.update(preds, targets)
    got = values(metrics)
    assert set(got) == {"bleu", "chrf"}
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [targets]).score, abs=1e-4)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, [targets]).score, abs=1e-4)


def test_bleu_without_any_4gram_match_uses_sacrebleus_smoothing():
    """No 4-gram matches: unsmoothed BLEU would be 0, sacrebleu's default exp smoothing is not."""
    preds, targets = ["the cat sat down", "dogs bark loudly"], ["the cat sat", "dogs bark"]
    metrics = build_text_metrics(["sacrebleu"])
    metrics.update(preds, targets)
    want = sacrebleu.corpus_bleu(preds, [targets]).score
    assert want > 0
    assert values(metrics)["bleu"] == pytest.approx(want, abs=1e-4)


def test_bleu_options_reach_sacrebleu():
    preds, targets = ["The Cat Sat On The Mat."], ["the cat sat on the mat."]
    metrics = build_text_metrics(["sacrebleu"], lowercase=True, tokenize="intl")
    metrics.update(preds, targets)
    want = sacrebleu.corpus_bleu(preds, [targets], lowercase=True, tokenize="intl").score
    assert values(metrics)["bleu"] == pytest.approx(want, abs=1e-4)
    assert want == pytest.approx(100.0)


def test_two_updates_equal_one_and_are_corpus_statistics():
    one, two = build_text_metrics(ALL_METRICS), build_text_metrics(ALL_METRICS)
    one.update(PREDS, TARGETS)
    two.update(PREDS[:5], TARGETS[:5])
    two.update(PREDS[5:], TARGETS[5:])
    got_one, got_two = values(one), values(two)
    assert set(got_one) == {*ROUGE_TYPES, "bleu", "chrf", "token_f1", "exact_match", "answer_in_first_sentence"}
    for key in got_one:
        assert got_two[key] == pytest.approx(got_one[key], abs=1e-4), key
    # the mean of the two batches' BLEU is not corpus BLEU: the accumulated value must be the corpus one
    batch_mean = (sacrebleu.corpus_bleu(PREDS[:5], [TARGETS[:5]]).score
                  + sacrebleu.corpus_bleu(PREDS[5:], [TARGETS[5:]]).score) / 2
    corpus = sacrebleu.corpus_bleu(PREDS, [TARGETS]).score
    assert abs(batch_mean - corpus) > 1.0
    assert got_two["bleu"] == pytest.approx(corpus, abs=1e-4)


def test_reset_and_empty_update():
    metrics = build_text_metrics(ALL_METRICS)
    metrics.update(PREDS, TARGETS)
    metrics.update([], [])
    before = values(metrics)
    metrics.reset()
    metrics.update(PREDS[:1], TARGETS[:1])
    after = values(metrics)
    assert after["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS[:1], [TARGETS[:1]]).score, abs=1e-4)
    assert after["rouge1"] != pytest.approx(before["rouge1"])


def test_clone_with_prefix_and_pickle():
    """What a LightningModule does with the collection: clone per stage, pickle for spawned workers."""
    import pickle

    metrics = build_text_metrics(ALL_METRICS)
    val = metrics.clone(prefix="val/")
    restored = pickle.loads(pickle.dumps(metrics))
    for m in (val, restored):
        m.update(PREDS, TARGETS)
    assert values(val) == {f"val/{key}": value for key, value in values(restored).items()}
    assert values(restored)["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [TARGETS]).score, abs=1e-4)


# --- hand-computed scores ----------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  The Cat,  sat on AN old mat!  ") == "cat sat on old mat"
    assert normalize_answer("theatre a-ha") == "theatre aha"  # articles only as whole words


def test_token_f1_and_exact_match_by_hand():
    assert token_f1("The cat sat on a mat", "the cat is on the mat!") == pytest.approx(0.75)  # 3 of 4 both ways
    assert token_f1("Paris, France.", "paris") == pytest.approx(2 / 3)  # P 1/2, R 1
    assert token_f1("", "kitchen") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("garden", "kitchen") == 0.0
    assert exact_match("The Kitchen.", "kitchen") == 1.0
    assert exact_match("kitchens", "kitchen") == 0.0

    preds = ["The cat sat on a mat", "Paris, France.", "", "The Kitchen."]
    targets = ["the cat is on the mat!", "paris", "kitchen", "kitchen"]
    metrics = build_text_metrics(["token_f1", "exact_match"])
    metrics.update(preds, targets)
    got = values(metrics)
    assert got["token_f1"] == pytest.approx((0.75 + 2 / 3 + 0 + 1) / 4, abs=1e-6)
    assert got["exact_match"] == pytest.approx(0.25)


@pytest.mark.parametrize(("output", "answer", "correct"), [
    ("The apple is in the kitchen. It was moved there.", "kitchen", True),
    ("Mary went to the garden. The apple is in the kitchen.", "kitchen", False),  # only in the 2nd sentence
    ("Kitchens are big", "kitchen", False),  # whole words only
    ("\n  Bathroom! Then the hallway.", "bathroom", True),  # leading whitespace is not a sentence
    ("Answer: hallway\nkitchen", "kitchen", False),  # a newline ends the first sentence
    ("Is it in the living room? No.", "the living room", True),  # multi-word answers, articles dropped
    ("room, living", "living room", False),  # the words must be in order
    ("It is the office", "Office.", True),
])
def test_answer_in_first_sentence_by_hand(output, answer, correct):
    assert answer_in_first_sentence(output, answer) == float(correct)


def test_first_sentence_metric_mean():
    assert first_sentence("  One. Two") == "One"
    metrics = build_text_metrics(["first_sentence"])
    metrics.update(["kitchen.", "the garden. kitchen", "It is the kitchen!"], ["kitchen"] * 3)
    assert values(metrics) == {"answer_in_first_sentence": pytest.approx(2 / 3)}


# --- errors --------------------------------------------------------------------------------------------------------


def test_unknown_metric_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown text metric\(s\) \['bleurt'\]; known: .*'rouge'.*'sacrebleu'"):
        build_text_metrics(["rouge", "bleurt"])
    with pytest.raises(ValueError, match="no text metric"):
        build_text_metrics([])


@pytest.mark.parametrize("name", ALL_METRICS)
def test_length_mismatch_and_wrong_types(name):
    metrics = build_text_metrics([name])
    with pytest.raises(ValueError, match="2 predictions, 1 targets"):
        metrics.update(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="not a single string"):
        metrics.update("a cat", "a cat")
    with pytest.raises(TypeError, match="strings only"):
        metrics.update([1], ["a"])


# --- DDP -----------------------------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Each rank scores a different part of the examples (unequal halves, two updates on rank 1)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metrics = build_text_metrics(ALL_METRICS)
        if rank == 0:
            metrics.update(PREDS[:3], TARGETS[:3])
        else:
            metrics.update(PREDS[3:5], TARGETS[3:5])
            metrics.update(PREDS[5:], TARGETS[5:])
        torch.save(values(metrics), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = build_text_metrics(ALL_METRICS)
    single.update(PREDS, TARGETS)
    want = values(single)
    rank0_alone = build_text_metrics(ALL_METRICS)
    rank0_alone.update(PREDS[:3], TARGETS[:3])
    assert all(abs(value - want[key]) > 1e-3 for key, value in values(rank0_alone).items())  # so a sync is needed
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got) == set(want)
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-4), (rank, key)
    assert want["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [TARGETS]).score, abs=1e-4)


# --- sample tables ---------------------------------------------------------------------------------------------


LONG_SOURCE = "S" * 10 + "x" * 1000 + "E" * 10

ROWS = [
    {"index": 0, "source": LONG_SOURCE, "reference": "kitchen", "output": "The apple is in the kitchen."},
    {"index": 1, "source": "short | piped\nsource", "reference": "garden", "output": "hallway"},
]


def test_excerpt_and_table():
    from stm.tasks.sample_tables import excerpt, sample_table

    assert excerpt("abcdef", 3) == "abcdef"
    assert excerpt("abcdefg", 3) == "abc ... efg"
    columns, data = sample_table(ROWS + [{"index": torch.tensor(2), "extra": 1.5}], excerpt_chars=10)
    assert columns == ["index", "source", "reference", "output", "extra"]
    assert data[0][1] == "S" * 10 + " ... " + "E" * 10
    assert data[1][1] == ROWS[1]["source"]
    assert data[2] == [2, None, None, None, 1.5]


def test_samples_to_csv_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from stm.tasks.sample_tables import log_generation_samples

    logger = CSVLogger(tmp_path, name="csv", version="")
    log_generation_samples([logger], ROWS, step=7, excerpt_chars=10)
    path = Path(logger.log_dir) / "samples" / "val_samples_step7.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [list(line) for line in lines] == [["index", "source", "reference", "output"]] * 2
    assert lines[0]["source"] == "S" * 10 + " ... " + "E" * 10
    assert lines[1] == ROWS[1]


def _tfrecords(path: Path) -> list[bytes]:
    """The records of a TFRecord file: u64 length, u32 crc, payload, u32 crc."""
    data, records, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        records.append(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
    return records


def test_samples_to_tensorboard_logger(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboardX.proto.event_pb2 import Event

    from stm.tasks.sample_tables import log_generation_samples, markdown_table

    logger = TensorBoardLogger(tmp_path, name=None, version="", default_hp_metric=False)
    log_generation_samples([logger], ROWS, step=5, key="val/samples", excerpt_chars=10)
    logger.finalize("success")
    texts = []
    for event_file in Path(logger.log_dir).glob("events.out.tfevents.*"):
        for record in _tfrecords(event_file):
            event = Event.FromString(record)
            texts += [(event.step, v.tag, v.tensor.string_val[0].decode()) for v in event.summary.value]
    assert len(texts) == 1
    step, tag, text = texts[0]
    assert (step, tag) == (5, "val/samples/text_summary")
    lines = text.splitlines()
    assert lines[0] == "| index | source | reference | output |"
    assert lines[2] == "| 0 | SSSSSSSSSS ... EEEEEEEEEE | kitchen | The apple is in the kitchen. |"
    assert lines[3] == "| 1 | short \\| piped<br>source | garden | hallway |"
    assert text == markdown_table(["index", "source", "reference", "output"],
                                  [[0, "SSSSSSSSSS ... EEEEEEEEEE", "kitchen", "The apple is in the kitchen."],
                                   [1, "short | piped\nsource", "garden", "hallway"]])


def test_samples_to_offline_wandb_logger(tmp_path, monkeypatch):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    from stm.tasks.sample_tables import log_generation_samples

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="stm-test", save_dir=str(tmp_path), offline=True)
    try:
        log_generation_samples([logger], ROWS, step=3, excerpt_chars=10)
    finally:
        wandb.finish()
    tables = list(tmp_path.glob("wandb/*run-*/files/media/table/**/*.table.json"))
    assert len(tables) == 1, list(tmp_path.rglob("*"))
    assert "val" in tables[0].relative_to(tmp_path).parts  # the key "val/samples" is a folder path
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["index", "source", "reference", "output"]
    assert table["data"] == [[0, "S" * 10 + " ... " + "E" * 10, "kitchen", "The apple is in the kitchen."],
                             [1, ROWS[1]["source"], "garden", "hallway"]]


class _Unknown:
    """A logger with none of the features (no log_table, not TensorBoard, no log_dir)."""


class _Broken:
    log_dir = None

    def log_table(self, **kwargs):
        raise RuntimeError("service down")


def test_unknown_and_broken_loggers_do_not_crash(tmp_path, caplog):
    from lightning.pytorch.loggers import CSVLogger

    from stm.tasks import sample_tables

    sample_tables._SKIPPED_KINDS.discard("_Unknown")
    csv = CSVLogger(tmp_path, name="csv", version="")
    with caplog.at_level(logging.INFO, logger="stm"):
        for step in (1, 2):
            sample_tables.log_generation_samples([_Unknown(), _Broken(), csv], ROWS, step=step)
    skipped = [r for r in caplog.records if "_Unknown" in r.getMessage()]
    assert len(skipped) == 1  # one message for the kind, not one per call
    assert sum("_Broken" in r.getMessage() for r in caplog.records) == 2
    assert sorted(p.name for p in (Path(csv.log_dir) / "samples").iterdir()) == [
        "val_samples_step1.jsonl", "val_samples_step2.jsonl"]
