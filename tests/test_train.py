"""Real training runs: fast_dev_run for every model/memory/task, loggers, the default job, eval.py."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_json, read_csv_metrics, run_script
from omegaconf import OmegaConf

from stm.analysis.wandb_offline import read_offline_run
from stm.app.run import train
from stm.data import ByteTokenizer, sample_files


@pytest.mark.parametrize("model,memory,task", [
    ("tiny", "none", "lm"), ("tiny", "full", "lm"), ("tiny", "rmt", "lm"), ("tiny", "xl", "lm"),
    ("tiny", "swa", "lm"), ("tiny", "[rmt,swa]", "lm"), ("tiny", "[rmt,xl]", "lm"),
    ("small", "none", "lm"), ("small", "rmt", "lm"),
])
def test_fast_dev_run(train_config, model, memory, task):
    cfg = train_config([f"model={model}", f"memory={memory}", f"task={task}", "debug=fast_dev_run",
                        "data.batch_size=2", "data.val_batch_size=2"])
    val_loss = train(cfg)
    # one training and one validation batch on the real text: an untrained model is near uniform
    # over the byte vocabulary, ln(259) = 5.56 nats
    assert val_loss is not None and 4.0 < val_loss < 7.0
    assert Path(cfg.paths.output_dir, "config_resolved.yaml").is_file()


@pytest.mark.parametrize("memory", ["xl", "rmt"])
def test_stream_lanes_training_carries_memory(train_config, memory):
    """data.mode=lanes: contiguous lanes, the memory state carried from batch to batch during a real run."""
    cfg = train_config(["debug=limit", "data.mode=lanes", f"memory={memory}", "data.batch_size=4",
                        "data.val_batch_size=4", "trainer.limit_val_batches=3"])
    val_loss = train(cfg)
    assert val_loss is not None and 2.0 < val_loss < 6.0
    metrics = read_csv_metrics(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")
    assert len(metrics["train/loss"]) == 6


def test_short_run_writes_checkpoints_and_csv(train_config):
    cfg = train_config(["debug=limit", "data.batch_size=4"])
    train(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "checkpoints").glob("best-step*.ckpt"))
    metrics = read_csv_metrics(out / "csv" / "metrics.csv")
    assert len(metrics["val/loss"]) == 2  # validated after steps 3 and 6
    assert all(math.isfinite(v) for _, v in metrics["train/loss"])
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["stm"]["config"]["task"]["segment_len"] == 128
    assert math.isclose(ckpt["stm"]["val_metrics"]["val/loss"], metrics["val/loss"][-1][1], rel_tol=1e-6)


def test_wandb_offline_run(train_config):
    cfg = train_config(["debug=limit", "logger=wandb", "data.batch_size=4", "tags=[test,wandb]"])
    assert cfg.logger.wandb.offline is True
    train(cfg)
    runs = list(Path(cfg.paths.output_dir, "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    run = read_offline_run(runs[0])
    assert run.project == "stm" and run.tags == ["test", "wandb"]
    assert run.config["task"]["segment_len"] == 128  # the resolved config, interpolations filled in
    assert run.config["task"]["scheduler"]["total_steps"] == 6
    assert run.config["model"]["_target_"] == "stm.models.Transformer"
    logged = [row["val/loss"] for row in run.history if "val/loss" in row]
    assert len(logged) == 2 and all(math.isfinite(v) for v in logged)
    assert (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").is_file()  # CSV always


def test_tensorboard_run(train_config):
    cfg = train_config(["debug=limit", "logger=tensorboard", "data.batch_size=4"])
    train(cfg)
    events = list(Path(cfg.paths.output_dir, "tensorboard").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def printed_rows(log: str) -> dict[str, tuple[float, float]]:
    """The near/far table a probe run prints at its end -> {mechanism: (near, far)} as fractions."""
    rows = {}
    for line in log.splitlines():
        match = re.match(r"^(\S+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)%\s+(\d+)$", line.strip())
        if match:
            rows[match[1]] = (float(match[2]) / 100, float(match[3]) / 100)
    return rows


@pytest.mark.slow
def test_default_job_is_the_rmt_recall_probe_and_remembers_far(default_job):
    """`python train.py`: rmt on associative recall; it ends by printing mechanism, accuracy near and far, and
    recalls facts 6-16 segments back (where a memoryless model is at chance, 10%)."""
    resolved = OmegaConf.load(default_job / "config_resolved.yaml")
    assert resolved.task._target_ == "stm.tasks.ProbeTask" and list(resolved.memory) == ["rmt"]
    assert resolved.model.n_layers == 2 and resolved.memory.rmt.num_memory_tokens == 8
    assert resolved.trainer.max_steps == 1000 and resolved.task.segment_len == 16

    log = (default_job / "stdout.txt").read_text()
    assert "mechanism      near (1-3 seg)     far (6+ seg)" in log and "chance: 10.0% (one value of 10)" in log
    near, far = printed_rows(log)["rmt"]
    horizon = load_json(default_job / "horizon.json")
    assert horizon["mechanism"] == "rmt" and horizon["step"] == 1000 and horizon["overall"]["count"] == 512
    assert math.isclose(horizon["near"]["accuracy"]["exact_match"], near, abs_tol=6e-4)
    assert math.isclose(horizon["far"]["accuracy"]["exact_match"], far, abs_tol=6e-4)
    metrics = read_csv_metrics(default_job / "csv" / "metrics.csv")
    assert math.isclose(metrics["val/acc_far"][-1][1], horizon["far"]["accuracy"]["exact_match"], rel_tol=1e-6)
    # far holds ~350 of the 512 validation examples; chance is 10%
    assert near >= 0.95 and far >= 0.9, (near, far)


@pytest.mark.slow
def test_default_job_outputs(default_job):
    for path in (".hydra/config.yaml", "config_resolved.yaml", "csv/metrics.csv", "checkpoints/last.ckpt",
                 "train.log", "horizon.json"):
        assert (default_job / path).is_file(), path
    assert list((default_job / "checkpoints").glob("best-step*.ckpt"))
    log = (default_job / "stdout.txt").read_text()
    assert "curriculum: stage 5 of 5" in log and "last checkpoint" in log


@pytest.mark.slow
def test_eval_reproduces_checkpoint_validation_metrics(default_job, tmp_path):
    best = next((default_job / "checkpoints").glob("best-step*.ckpt"))
    result = run_script("eval.py", [f"ckpt_path={best}", f"hydra.run.dir={tmp_path}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = load_json(tmp_path / "eval_metrics.json")
    ckpt = torch.load(best, weights_only=False)
    recorded = ckpt["stm"]["val_metrics"]
    best_score = next(v["best_model_score"] for k, v in ckpt["callbacks"].items() if "ModelCheckpoint" in k)
    assert math.isclose(report["metrics"]["val/loss"], recorded["val/loss"], rel_tol=1e-5)
    assert math.isclose(report["metrics"]["val/loss"], float(best_score), rel_tol=1e-5)
    for key in ("val/acc", "val/acc_near", "val/acc_far", "val/bpb"):
        assert math.isclose(report["metrics"][key], recorded[key], rel_tol=1e-5), key
    horizon = load_json(tmp_path / "horizon.json")  # eval's own horizon.json: the checkpoint's step, not 0
    assert horizon["step"] == ckpt["global_step"] == 1000


@pytest.mark.slow
def test_language_model_beats_unigram(tmp_path):
    """`python train.py task=lm` (the Austen novels, 600 steps) falls below a unigram model of the same text."""
    result = run_script("train.py", ["task=lm", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    text = "".join(f.read_text() for f in sample_files("austen"))
    ids = np.asarray(ByteTokenizer().encode(text))
    p = np.bincount(ids, minlength=259) / len(ids)
    unigram_entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())  # nats per byte: the unigram's loss
    metrics = read_csv_metrics(tmp_path / "csv" / "metrics.csv")
    final_train = np.mean([v for _, v in metrics["train/loss"][-5:]])
    assert final_train < 0.6 * unigram_entropy, (final_train, unigram_entropy)
    final_val_bpb = metrics["val/bpb"][-1][1]
    assert final_val_bpb < 0.6 * unigram_entropy / math.log(2)
    assert "unigram baseline" in result.stdout + result.stderr


def test_eval_rejects_bad_checkpoints(tmp_path):
    from stm.app.run import load_checkpoint_config

    with pytest.raises(FileNotFoundError, match="ckpt_path: .*nothing.ckpt does not exist"):
        load_checkpoint_config(tmp_path / "nothing.ckpt")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read .*garbage.ckpt"):
        load_checkpoint_config(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.ckpt is not an stm checkpoint"):
        load_checkpoint_config(foreign)
