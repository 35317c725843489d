"""Record sources: the field mapping, the real data configs (conf/source/), and errors that name the place."""

from __future__ import annotations

import json
import logging
import math
import sys
import types
from pathlib import Path

import pytest
from conftest import KEEP_TASK, KeepTask, recomputed_val_loss
from hydra.utils import instantiate

from stm.data.sources import (
    FieldMap,
    HubDataset,
    JsonFile,
    JsonLines,
    ParquetFile,
    Record,
    RecordError,
    ShippedSample,
    TextFiles,
    fill,
    resolve,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the shared real data sets are not at {SHARED_DATA} (a user's own clone)")


@pytest.fixture
def source_config(tmp_path, monkeypatch):
    """compose conf/source/<name>.yaml (as `+source=<name>`) and instantiate it."""
    from conftest import compose_config

    monkeypatch.setenv("STM_SHARED_DATA", str(SHARED_DATA))

    def build(name, overrides=()):
        cfg = compose_config("train", [f"+source={name}", *overrides], tmp_path)
        return instantiate(cfg.source)

    return build


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ---------------------------------------------------------------------------------------------- field mapping

MEETING = {
    "meeting_transcripts": [{"speaker": "A", "content": "hello"}, {"speaker": "B", "content": "hi there"}],
    "general_query_list": [{"query": "Summarize", "answer": "They met."}],
    "specific_query_list": [{"query": "What did B say?", "answer": "hi"}, {"query": "Who began?", "answer": "A"}],
    "title": "m1",
}


def test_paths_collect_over_lists_and_mappings():
    assert resolve(MEETING, "meeting_transcripts[*].speaker") == ["A", "B"]
    assert resolve(MEETING, "meeting_transcripts[1].content") == "hi there"
    assert resolve(MEETING, "meeting_transcripts[-1].speaker") == "B"
    assert resolve({"x": {"a": {"v": 1}, "b": {"v": 2}}}, "x.*.v") == [1, 2]
    assert resolve({"m": [[1, 2], [3]]}, "m[*][*]") == [1, 2, 3]
    assert resolve([{"a": 1}, {"a": 2}], "[*].a") == [1, 2]
    with pytest.raises(LookupError, match=r"no key 'text' in 'meeting_transcripts\[\*\]' \(keys: speaker, content"):
        resolve(MEETING, "meeting_transcripts[*].text")
    with pytest.raises(ValueError, match="malformed field path"):
        resolve(MEETING, "a..b")


def test_templates_render_elements_with_fallback_to_the_record():
    m = FieldMap({"context": {"path": "meeting_transcripts[*]", "template": "{speaker}: {content} ({title})",
                              "join": " | "},
                  "target": "{{literal}} {title}"})
    (scope, _), = m.scopes(MEETING, {}, "here")
    r = m.record(scope, "here", "id0")
    assert r.context == "A: hello (m1) | B: hi there (m1)"
    assert r.target == "{literal} m1"
    assert fill("{a.b}-{c}", {"a": {"b": 1}, "c": "x"}) == "1-x"
    with pytest.raises(LookupError, match="is a list"):
        fill("{meeting_transcripts[*].speaker}", MEETING)


def test_explode_makes_one_record_per_item():
    m = FieldMap({"id": "{title}-{_item}",
                  "context": {"parts": [{"template": "Query: {item.query}"},
                                        {"path": "meeting_transcripts[*]", "template": "{speaker}: {content}"}]},
                  "target": "item.answer",
                  "meta": {"query": "item.query", "speakers": "meeting_transcripts[*].speaker"}},
                 explode=["general_query_list[*]", "specific_query_list[*]"], required=["context", "target"])
    records = [m.record(s, f"f#{k}", "x") for s, k in m.scopes(MEETING, {}, "f")]
    assert [r.id for r in records] == ["m1-0", "m1-1", "m1-2"]
    assert [r.target for r in records] == ["They met.", "hi", "A"]
    assert records[1].context == "Query: What did B say?\n\nA: hello\nB: hi there"
    assert records[2].meta == {"query": "Who began?", "speakers": ["A", "B"]}  # a plain path keeps the list


def test_turns_from_elements_and_from_parallel_lists():
    m = FieldMap({"turns": {"path": "content[*]", "speaker": "agent", "text": "message",
                            "speakers": {"agent_1": "user"}}})
    raw = {"content": [{"agent": "agent_1", "message": "hi"}, {"agent": "agent_2", "message": "yo"}]}
    (scope, _), = m.scopes(raw, {}, "o")
    assert m.record(scope, "o", "i").turns == [{"speaker": "user", "text": "hi"}, {"speaker": "agent_2", "text": "yo"}]
    m = FieldMap({"turns": {"parts": [{"zip": {"speaker": "s1", "text": "d1"}},
                                      {"zip": {"speaker": {"path": "s2", "default": []},
                                               "text": {"path": "d2", "default": []}}}]}})
    (scope, _), = m.scopes({"s1": ["a", "b"], "d1": ["x", "y"], "s2": None}, {}, "o")
    assert [t["text"] for t in m.record(scope, "o", "i").turns] == ["x", "y"]
    (scope, _), = m.scopes({"s1": ["a"], "d1": ["x", "y"]}, {}, "o")
    with pytest.raises(RecordError, match=r"o: field 'turns': zip: 1 speakers but 2 texts"):
        m.record(scope, "o", "i")


@pytest.mark.parametrize("fields,kwargs,message", [
    ({"context": "a", "summary": "b"}, {}, r"unknown canonical field\(s\) \['summary'\]"),
    ({"context": {"path": "a", "sep": " "}}, {}, r"fields.context: unknown option\(s\) \['sep'\]"),
    ({"target": "a"}, {}, "map at least 'context'"),
    ({"context": "a"}, {"required": ["target"]}, r"required lists \['target'\], which fields does not map"),
    ({"context": "a"}, {"on_bad_record": "ignore"}, "on_bad_record must be one of"),
    ({"context": "a"}, {"records_at": "a[*].b"}, "only a trailing"),
    ({"context": "a[x]"}, {}, "malformed field path"),
])
def test_bad_configs_are_named(tmp_path, fields, kwargs, message):
    f = write_lines(tmp_path / "ok.json", [{"a": "x"}])
    with pytest.raises(ValueError, match=message):
        JsonFile(str(f), fields=fields, **kwargs)


# ------------------------------------------------------------------------------------------------ bad input

def test_malformed_json_line_names_file_and_line(tmp_path):
    f = write_lines(tmp_path / "bad.jsonl", [{"text": "one"}, '{"text": "two"', {"text": "three"}])
    with pytest.raises(RecordError, match=rf"{f}:2: malformed JSON line"):
        list(JsonLines(str(f), fields={"context": "text"}))


def test_missing_field_names_field_file_and_line(tmp_path):
    f = write_lines(tmp_path / "data.jsonl", [{"text": "one"}, "", {"body": "two"}])
    with pytest.raises(RecordError, match=rf"{f}:3: field 'context': path 'text': no key 'text' .*keys: body"):
        list(JsonLines(str(f), fields={"context": "text"}))


def test_empty_context_and_required_target(tmp_path):
    f = write_lines(tmp_path / "e.jsonl", [{"src": "a", "tgt": "b"}, {"src": "  ", "tgt": "c"}])
    with pytest.raises(RecordError, match=rf"{f}:2: field 'context': is empty"):
        list(JsonLines(str(f), fields={"context": "src", "target": "tgt"}))
    f = write_lines(tmp_path / "t.jsonl", [{"src": "a", "tgt": ""}])
    assert list(JsonLines(str(f), fields={"context": "src", "target": "tgt"}))[0].target == ""  # target optional
    with pytest.raises(RecordError, match=rf"{f}:1: field 'target': is empty"):
        list(JsonLines(str(f), fields={"context": "src", "target": "tgt"}, required=["context", "target"]))
    t = tmp_path / "empty.txt"
    t.write_text("\n")
    with pytest.raises(RecordError, match=rf"{t}: field 'context': is empty"):
        list(TextFiles([str(t)]))


def test_missing_file_and_glob(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"JsonLines.path: {tmp_path}/nope.jsonl does not exist"):
        JsonLines(str(tmp_path / "nope.jsonl"), fields={"context": "text"})
    with pytest.raises(FileNotFoundError, match=r"JsonFile.path: no file matches .*/\*.json"):
        JsonFile("*.json", root=str(tmp_path), fields={"context": "text"})
    with pytest.raises(FileNotFoundError, match=r"TextFiles.paths\[1\]: .*b.txt does not exist"):
        (tmp_path / "a.txt").write_text("a")
        TextFiles(["a.txt", "b.txt"], root=str(tmp_path))


def test_malformed_json_file_and_empty_turn(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[{"turns": []},\n {"turns": [}]')
    with pytest.raises(RecordError, match=rf"{f}: malformed JSON \(.* at line 2 column"):
        list(JsonFile(str(f), records_at="*", fields={"turns": {"path": "turns[*]", "speaker": "s", "text": "t"}}))
    f.write_text(json.dumps([{"turns": [{"s": "a", "t": "hi"}]}, {"turns": [{"s": "b", "t": ""}]}, {"turns": []}]))
    src = JsonFile(str(f), records_at="*", fields={"turns": {"path": "turns[*]", "speaker": "s", "text": "t"}})
    with pytest.raises(RecordError, match=rf"{f}#1: field 'turns': turn 0 \(speaker 'b'\) has empty text"):
        list(src)
    src.on_bad_record = "skip"
    assert [r.id for r in src] == ["d#0"] and src.skipped.count == 2
    assert "has no turns" in src.skipped.reasons[1]


def test_skip_counts_and_logs_and_keeps_the_good_records(tmp_path, caplog):
    f = write_lines(tmp_path / "mixed.jsonl", [
        {"src": "good 1", "tgt": "g"}, "{not json", {"tgt": "no source"}, {"src": "", "tgt": "x"},
        {"src": "good 2", "tgt": "g"}, [1, 2],
    ])
    src = JsonLines(str(f), fields={"context": "src", "target": "tgt"}, on_bad_record="skip")
    with caplog.at_level(logging.WARNING, logger="stm.data.sources"):
        records = list(src)
    assert [r.context for r in records] == ["good 1", "good 2"]
    assert [r.origin for r in records] == [f"{f}:1", f"{f}:5"]
    assert src.skipped.count == 4
    assert [r.split(": ", 1)[0] for r in src.skipped.reasons] == [f"{f}:{i}" for i in (2, 3, 4, 6)]
    assert "skipped 4 bad record(s)" in caplog.text and f"{f}:2: malformed JSON line" in caplog.text
    list(src)
    assert src.skipped.count == 4  # counted afresh on each pass


def test_explode_missing_list_is_named(tmp_path):
    f = write_lines(tmp_path / "q.jsonl", [{"doc": "d", "qs": [{"q": "a"}]}, {"doc": "d"}])
    src = JsonLines(str(f), fields={"context": "doc", "target": "item.q"}, explode="qs[*]")
    with pytest.raises(RecordError, match=rf"{f}:2: field 'explode': path 'qs\[\*\]': no key 'qs'"):
        list(src)


# ---------------------------------------------------------------------------------------- parquet and the hub

def test_parquet_without_pyarrow_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        ParquetFile(str(tmp_path / "x.parquet"), fields={"context": "text"})


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is not installed")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a", "b"], "label": ["x", "y"]}), tmp_path / "t.parquet")
    records = list(ParquetFile(str(tmp_path / "t.parquet"), fields={"context": "text", "target": "label"}))
    assert [(r.context, r.target, r.origin.rsplit("#", 1)[1]) for r in records] == [("a", "x", "0"), ("b", "y", "1")]


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        HubDataset("tau/scrolls", config="gov_report", fields={"context": "input"})


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in `datasets` module whose load_dataset returns local rows (the hub is unreachable here)."""
    rows: dict = {}
    calls: list = []

    def load_dataset(name, config=None, split="train", cache_dir=None, **kwargs):
        calls.append((name, config, split, cache_dir))
        if (name, config) not in rows:
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub or cannot be accessed")
        return rows[(name, config)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return rows, calls


def test_hub_configs_map_their_fields(source_config, fake_hub):
    rows, calls = fake_hub
    rows[("tau/scrolls", "gov_report")] = [{"id": "r1", "pid": "r1_0", "input": "A long report.", "output": "Short."}]
    rows[("nayohan/msc-raw", None)] = [{
        "dataID": "e1", "first_session_speakers": ["Speaker 1", "Speaker 2"], "first_session_dialogue": ["hi", "yo"],
        "second_session_speakers": ["Speaker 1"], "second_session_dialogue": ["again"],
        "third_session_speakers": [], "third_session_dialogue": [], "summary": ["s1"], "time_interval": ["1 day"],
    }]
    (r,) = list(source_config("hub_gov_report"))
    assert (r.id, r.context, r.target) == ("r1_0", "A long report.", "Short.")
    assert r.origin == "tau/scrolls/gov_report:train#0"
    assert calls[-1] == ("tau/scrolls", "gov_report", "train", None)
    (r,) = list(source_config("hub_msc", ["source.split=valid"]))
    assert [t["text"] for t in r.turns] == ["hi", "yo", "again"] and r.meta["summary"] == ["s1"]
    assert calls[-1][2] == "valid"
    with pytest.raises(OSError, match="could not load hub dataset 'tau/scrolls' config 'qmsum'.*network"):
        list(source_config("hub_qmsum"))


def test_hub_with_a_local_datasets_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the datasets library is not installed")
    local = datasets.Dataset.from_list([{"input": "text", "output": "sum"}])
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: local)
    (r,) = list(HubDataset("any/name", fields={"context": "input", "target": "output"}))
    assert (r.context, r.target) == ("text", "sum")


# ------------------------------------------------------------------------------------------------- real data

def test_shipped_austen_sample(source_config):
    src = source_config("austen_text")
    assert isinstance(src, ShippedSample)
    records = list(src)
    assert sorted(r.id for r in records) == ["mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
                                             "sensesensibility"]
    assert all(isinstance(r, Record) and len(r.context) > 400_000 and r.target == "" for r in records)


@needs_data
def test_qmsum_general(source_config):
    train = list(source_config("qmsum_general"))
    assert len(train) == 162 and len({r.id for r in train}) == 162  # one general query per meeting file
    r = train[0]
    assert r.id == "Bdb001" and r.context.startswith("Grad C: Yeah , we had a long discussion")
    assert r.target.startswith("Meeting participants wanted to agree upon a standard database")
    assert r.meta["query"] == "Summarize the whole meeting" and r.meta["split"] == "train"
    assert len(list(source_config("qmsum_general", ["source.split=val"]))) == 35


@needs_data
def test_qmsum_query(source_config):
    train = list(source_config("qmsum_query"))
    assert len(train) == 162 + 1095
    assert all(r.context.startswith("Query: ") and r.target for r in train)
    assert train[1].context.startswith(f"Query: {train[1].meta['query']}\n\nGrad C: ")
    assert len(list(source_config("qmsum_query", ["source.split=val"]))) == 35 + 237


@needs_data
def test_bible_chapters(source_config):
    records = list(source_config("bible_kjv_rv1909"))
    assert len(records) == 929
    gen1 = records[0]
    assert gen1.id == "Gen.1" and gen1.meta["book"] == "Genesis" and gen1.meta["chapter"] == 1
    assert gen1.context.startswith("In the beginning God created the heaven and the earth.\n")
    assert gen1.target.startswith("EN el principio crió Dios los cielos y la tierra.")
    assert len(gen1.meta["en"]) == len(gen1.meta["es"]) == 31 == gen1.context.count("\n") + 1


@needs_data
def test_sgd_dialogues(source_config):
    records = list(source_config("sgd"))
    assert len(records) == 384
    assert all(r.turns and {t["speaker"] for t in r.turns} == {"USER", "SYSTEM"} for r in records)
    assert records[0].id == "1_00000" and records[0].turns[0]["speaker"] == "USER"
    assert records[0].context == ""


@needs_data
def test_topical_chat(source_config):
    records = list(source_config("topical_chat"))
    assert len(records) == 539 and sum(len(r.turns) for r in records) == 11681
    r = records[0]
    assert r.id == "t_a2b769a0-c082-4c26-8d8d-e2c5b8a79d93" and r.origin.endswith(f"valid_freq.json#{r.id}")
    assert r.turns[0] == {"speaker": "agent_1", "text": "Are you a football fan?"}
    assert all({t["speaker"] for t in r.turns} <= {"agent_1", "agent_2"} for r in records)


@needs_data
def test_language_modelling_over_a_record_source(train_config):
    """data=records with a real source: QMSum meetings become documents, the run trains on them."""
    from stm.app.run import train

    cfg = train_config(["data=records", "source@data.source=qmsum_general", "debug=fast_dev_run",
                        f"data.source.root={SHARED_DATA}", "data.batch_size=2", "data.val_batch_size=2", KEEP_TASK])
    assert cfg.data.source.path == "summarization/qmsum/train/*.json"
    val_loss = train(cfg)
    kept = KeepTask.last
    assert math.isclose(val_loss, recomputed_val_loss(kept["task"], kept["datamodule"], n_batches=1), rel_tol=1e-6)
