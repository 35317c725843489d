"""Faithful BABILong QA1-QA5 (stm.data.babilong), several validation lengths in one run (data.val_lengths) with
task=probe's accuracy by length and task (babilong.json), and the sweep collector (stm.analysis.lengthgen)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import SHARED_DATA, compose_config

from stm.analysis import lengthgen
from stm.app.run import build_components, build_trainer
from stm.data.babilong import BabiLongQASource, babi_file_path, read_babi_file
from stm.data.conditional import val_set_overrides
from stm.data.probes import RecallSource, background_sentences
from stm.data.tokenizers import ByteTokenizer
from stm.tasks.probe import SCORES
from stm.tasks.scores_by_length import accuracy_by_length, lengths_table, mean_stderr

TASKS = ["qa1", "qa2", "qa3", "qa4", "qa5"]
pytestmark = pytest.mark.skipif(not (SHARED_DATA / "probes" / "babi_en10k").is_dir(),
                                reason=f"the shared bAbI files are not at {SHARED_DATA / 'probes'} (a user's clone)")


def source(split="val", n=50, **params):
    params = {"target_length": 1024, "too_long": "skip", **params}
    return BabiLongQASource(root=str(SHARED_DATA), n_samples=n, split=split, **params)


def questions(task: str, split: str) -> dict[tuple, object]:
    """(story lines, question, answer) -> question, of the task's bAbI file for split."""
    babi = read_babi_file(str(babi_file_path(task, split, SHARED_DATA)))
    return {(tuple(q.story), q.question, q.answer): q for q in babi.questions}


def story_of(record) -> tuple:
    lines = tuple(record.context[s:e] for s, e in record.meta["story_chars"])
    return lines, record.meta["question"], record.target


# ------------------------------------------------------------------------------------------- the samples

@pytest.mark.parametrize("split, other", [("val", "train"), ("test", "train"), ("train", "test")])
def test_each_split_reads_only_its_own_bAbI_files(split, other):
    """val/test samples are stories of the *_test.txt files, train samples of the *_train.txt ones (QA3 from en-1k):
    by the whole story and by every inserted sentence."""
    records = source(split, n=100).generate(100)
    own_split, not_own = 0, 0
    for r in records:
        task = r.meta["task"]
        mine, theirs = questions(task, split), questions(task, other)
        assert story_of(r) in mine, r.meta["story_origin"]
        sentences = {line for q in mine.values() for line in q.story}
        assert all(line in sentences for line in story_of(r)[0])
        expected = "train" if split == "train" else "test"
        assert r.meta["story_origin"].split(":")[0].endswith(f"_{expected}.txt")
        if task == "qa3" and split == "train":
            assert "babi_en1k" in r.meta["story_origin"]
        own_split += story_of(r) not in theirs
        not_own += story_of(r) in theirs and story_of(r) not in mine
    assert not_own == 0
    assert own_split >= 80  # QA4's two-line stories repeat across bAbI's splits; the others (nearly) never do


def test_tasks_take_turns_and_answers_are_bAbI_answers():
    records = source(n=25).generate(25)
    assert [r.meta["task"] for r in records] == TASKS * 5
    for r in records:
        q = questions(r.meta["task"], "val")[story_of(r)]
        assert r.target == q.answer and r.context.endswith(f"Question: {q.question}\nAnswer:")
        assert r.id == f"babilong_qa-{r.meta['task']}-val-0-{r.meta['index']}"
    assert len({r.meta["story_origin"] for r in records}) == 25


def test_whole_story_in_order_with_its_distractors():
    for r in source(n=30, target_length=4096).generate(30):
        q = questions(r.meta["task"], "val")[story_of(r)]
        spans = r.meta["story_chars"]
        assert [r.context[s:e] for s, e in spans] == q.story  # every line, supporting and distractor, in order
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))
        assert [r.context[s:e] for s, e in r.meta["fact_chars"]] == [q.story[j] for j in q.supporting]
        assert r.meta["distance_chars"] == r.meta["question_char"] - r.meta["fact_chars"][0][0]
        assert spans[-1][1] < r.meta["question_char"]


def test_target_length_in_characters_and_in_byte_tokens():
    longest = max(len(s) + len(sep) for s, sep in background_sentences())
    for r in source(n=20, target_length=3000).generate(20):
        assert r.meta["length_unit"] == "chars" and r.meta["length"] == len(r.context)
        assert 3000 - longest <= len(r.context) <= 3000
    tok = ByteTokenizer()
    longest_bytes = max(len((s + sep).encode()) for s, sep in background_sentences())
    for r in source(n=20, target_length=2000, tokenizer=tok).generate(20):
        n = len(tok.encode(r.context))
        assert r.meta["length_unit"] == "tokens" and r.meta["length"] == n
        assert 2000 - longest_bytes <= n <= 2000


def test_story_length_asks_the_same_questions_at_every_length():
    short = source(n=20, target_length=512, story_length=512)
    long = short.with_params(target_length=8192)
    a, b = short.generate(20), long.generate(20)
    assert [r.meta["story_origin"] for r in a] == [r.meta["story_origin"] for r in b]
    assert all(r.meta["story_cost"] <= 512 for r in a) and all(len(r.context) > 7000 for r in b)
    # without story_length, longer contexts take stories that only they can hold
    free = short.with_params(story_length=None, target_length=8192).generate(20)
    assert max(r.meta["story_cost"] for r in free) > 512


@pytest.mark.parametrize("params, error, message", [
    ({"tasks": ["qa1", "qa21"]}, ValueError, "babilong_qa.tasks"),
    ({"tasks": "qa1"}, ValueError, "babilong_qa.tasks"),
    ({"split": "dev"}, ValueError, "babilong_qa.split"),
    ({"too_long": "truncate"}, ValueError, "babilong_qa.too_long"),
    ({"target_length": -1}, ValueError, "babilong_qa.target_length"),
    ({"story_length": 0}, ValueError, "babilong_qa.story_length must be a positive integer"),
    ({"story_length": 2048}, ValueError, "babilong_qa.story_length .2048. exceeds target_length"),
])
def test_bad_parameters_name_their_key(params, error, message):
    split = params.pop("split", "val")
    with pytest.raises(error, match=message):
        source(split, **params)


def test_bad_files_and_short_lengths_name_their_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="babilong_qa.root: .*nowhere"):
        BabiLongQASource(root=str(tmp_path / "nowhere"), n_samples=2).generate(2)
    with pytest.raises(FileNotFoundError, match=r"babilong_qa.tasks: no bAbI train file of qa6"):
        BabiLongQASource(root=str(SHARED_DATA), tasks=["qa6"], n_samples=2).generate(2)
    with pytest.raises(ValueError, match=r"babilong_qa.target_length: 512 characters cannot hold the story of "
                                         r".*qa3_three-supporting-facts_train.txt:\d+ .*too_long: skip"):
        BabiLongQASource(root=str(SHARED_DATA), target_length=512, n_samples=20).generate(20)
    with pytest.raises(ValueError, match=r"no story of qa3 .* fits in 150 characters .*shortest needs 1\d\d"):
        source("train", target_length=150).generate(5)


def test_val_lengths_forms_and_errors():
    src = source()
    assert val_set_overrides([512, 2048], src) == {"512": {"target_length": 512}, "2048": {"target_length": 2048}}
    assert val_set_overrides(None, src) == {}
    assert val_set_overrides({"far": {"target_length": 9000, "depth": 0.0}}, src) == {
        "far": {"target_length": 9000, "depth": 0.0}}
    assert val_set_overrides([64], RecallSource(n_samples=2)) == {"64": {"length": 64}}
    for bad in ([512, 512], [-1], ["long"], {"far": 9000}):
        with pytest.raises(ValueError, match="data.val_lengths"):
            val_set_overrides(bad, src)
    with pytest.raises(ValueError, match="data.val_lengths .* needs a probe source"):
        val_set_overrides([512], object())


# ---------------------------------------------------------------------------- several lengths, one validation

def test_one_validation_scores_every_length_apart(tmp_path):
    """A real (untrained) validation of QA1-5 at two lengths: one metric per length and task with the right counts,
    equal to the fractions computed by hand from babilong.json's per-example outputs. Every third example's output
    is replaced by its reference, so that the accuracies are not all zero."""
    cfg = compose_config("train", [
        "experiment=babilong_lengthgen", "probe_memory=none", "model.d_model=32", "model.n_heads=2",
        "data.val_source.n_samples=10", "data.val_source.target_length=256", "data.val_source.story_length=256",
        "data.val_lengths=[256,1024]", "data.train_source.n_samples=8", "data.max_segments=12",
        "task.generation.max_new_tokens=3", "callbacks.progress_bar=null", "callbacks.model_summary=null"], tmp_path)
    parts = build_components(cfg)
    task = parts["task"]
    score = task.on_generation
    task.on_generation = lambda index, info, output: score(index, info, info.reference if index % 3 == 0 else output)
    trainer, _ = build_trainer(cfg)
    metrics = trainer.validate(task, datamodule=parts["datamodule"])[0]
    record = json.loads((tmp_path / "babilong.json").read_text())
    assert record["lengths"] == ["256", "1024"] and record["tasks"] == TASKS
    assert record["target_lengths"] == {"256": 256, "1024": 1024} and record["mechanism"] == "none"
    examples = record["examples"]
    assert [e["index"] for e in examples] == list(range(20))
    assert [e["length"] for e in examples] == ["256"] * 10 + ["1024"] * 10
    for length in ("256", "1024"):
        mine = [e for e in examples if e["length"] == length]
        for name, key in (("first_sentence", "acc"), ("exact_match", "exact_match")):
            by_hand = sum(SCORES[name](e["output"], e["reference"]) for e in mine) / len(mine)
            assert 0.3 <= by_hand <= 1 and math.isclose(metrics[f"val/{length}/{key}"], by_hand, abs_tol=1e-6)
        assert metrics[f"val/{length}/n"] == 10
        for t in TASKS:
            cell = next(c for c in record["cells"] if c["length"] == length and c["task"] == t)
            right = [SCORES["first_sentence"](e["output"], e["reference"]) for e in mine if e["task"] == t]
            assert cell["n"] == len(right) == 2
            assert math.isclose(cell["accuracy"]["first_sentence"], sum(right) / 2, abs_tol=1e-9)
            assert math.isclose(metrics[f"val/{length}/acc_{t}"], sum(right) / 2, abs_tol=1e-6)
            p = sum(right) / 2
            assert math.isclose(cell["stderr"]["first_sentence"], math.sqrt(p * (1 - p) / 2), abs_tol=1e-9)
        mean = next(c for c in record["cells"] if c["length"] == length and c["task"] == "mean")
        assert math.isclose(mean["accuracy"]["first_sentence"], metrics[f"val/{length}/acc_mean"], abs_tol=1e-6)
    horizon = json.loads((tmp_path / "horizon.json").read_text())
    assert horizon["overall"]["count"] == 20  # the distance buckets still see every example, both lengths pooled
    assert math.isclose(horizon["overall"]["accuracy"]["first_sentence"],
                        sum(SCORES["first_sentence"](e["output"], e["reference"]) for e in examples) / 20)
    pooled = lengthgen.collect([tmp_path])
    assert [(c["length"], c["task"], c["n"]) for c in pooled["cells"] if c["task"] != "mean"] == [
        (length, t, 2) for length in ("256", "1024") for t in TASKS]


# ------------------------------------------------------------------------------------------ the collector

def fake_run(folder, mechanism: str, seed: int, right: dict[tuple[str, str], list[int]]):
    """A babilong.json as task=probe writes it, from per-example results {(length, task): [1, 0, ...]}."""
    metas, values = [], []
    for (length, task), results in right.items():
        for ok in results:
            metas.append({"val_set": length, "task": task, "probe": "babilong"})
            values.append([float(ok)])
    record = {"mechanism": mechanism, "memory": {mechanism: {}}, "val_source": {"n_samples": 4}, "seed": seed,
              "score": "first_sentence", "scores": ["first_sentence"], "length_unit": "chars",
              **accuracy_by_length(metas, range(len(metas)), values, ["first_sentence"])}
    folder.mkdir(parents=True)
    (folder / "babilong.json").write_text(json.dumps(record))


def test_mean_of_tasks_keeps_an_error_when_every_task_is_at_0_or_100_percent():
    # five tasks, two questions each: one task all right, four all wrong -> mean 20%; the plug-in variances are
    # all 0, the smoothed ones (1/4 resp. 3/4 right) are not: sqrt(5 * (3/16) / 2) / 5
    metas = [{"set": "1K", "task": f"qa{t}"} for t in range(1, 6) for _ in range(2)]
    values = [[1.0] if m["task"] == "qa1" else [0.0] for m in metas]
    record = {"score": "first_sentence", **accuracy_by_length(metas, range(len(metas)), values, ["first_sentence"])}
    mean = next(c for c in record["cells"] if c["task"] == "mean")
    assert math.isclose(mean["accuracy"]["first_sentence"], 0.2)
    assert math.isclose(mean["stderr"]["first_sentence"], math.sqrt(5 * 3 / 16 / 2) / 5)
    assert "20.0±13.7 (10)" in lengths_table(record)
    assert mean_stderr([]) is None and mean_stderr([(1, 0)]) is None


def test_collector_pools_seeds_into_mechanism_task_length(tmp_path):
    fake_run(tmp_path / "sweep" / "0", "rmt", 0, {("512", "qa1"): [1, 1], ("512", "qa2"): [0, 1],
                                                  ("2048", "qa1"): [1, 0], ("2048", "qa2"): [0, 0]})
    fake_run(tmp_path / "sweep" / "1", "rmt", 1, {("512", "qa1"): [1, 0], ("512", "qa2"): [1, 1],
                                                  ("2048", "qa1"): [0, 0], ("2048", "qa2"): [0, 1]})
    fake_run(tmp_path / "sweep" / "2", "none", 0, {("512", "qa1"): [1, 1, 1, 0], ("2048", "qa1"): [0, 0, 0, 1]})
    out = tmp_path / "results" / "lengthgen.json"
    lengthgen.main([str(tmp_path / "sweep"), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["labels"] == ["none", "rmt"] and result["lengths"] == ["512", "2048"]
    cells = {(c["label"], c["length"], c["task"]): c for c in result["cells"]}
    assert (cells[("rmt", "512", "qa1")]["n"], cells[("rmt", "512", "qa1")]["accuracy"]) == (4, 0.75)
    assert (cells[("rmt", "2048", "qa2")]["n"], cells[("rmt", "2048", "qa2")]["accuracy"]) == (4, 0.25)
    assert cells[("rmt", "512", "qa1")]["runs"] == 2
    assert math.isclose(cells[("rmt", "512", "qa1")]["stderr"], math.sqrt(0.75 * 0.25 / 4))
    assert math.isclose(cells[("rmt", "512", "mean")]["accuracy"], (0.75 + 0.75) / 2)
    # the mean's error from the smoothed per-task accuracies (1 + 1) / (4 + 2) = 1/3: sqrt(2 * (1/3)(2/3) / 4) / 2
    assert math.isclose(cells[("rmt", "2048", "mean")]["stderr"], 1 / 6)
    assert cells[("none", "2048", "qa1")]["accuracy"] == 0.25 and ("none", "512", "mean") not in cells
    assert " 75.0±21.7 (4)" in result["table"] and result["table"].index("none") < result["table"].index("rmt")
    with pytest.raises(FileNotFoundError, match="no babilong.json"):
        lengthgen.collect([tmp_path / "results"])
