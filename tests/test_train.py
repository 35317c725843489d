"""Real training runs: fast_dev_run for every model/memory/task, loggers, the default job, eval.py."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import KEEP_TASK, KeepTask, load_json, read_csv_metrics, recomputed_val_loss, run_script
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
                        "data.batch_size=2", "data.val_batch_size=2", KEEP_TASK])
    val_loss = train(cfg)
    # one training and one validation batch: the loss train() returns is the one of the model after its step on
    # that validation batch, recomputed here
    kept = KeepTask.last
    assert math.isclose(val_loss, recomputed_val_loss(kept["task"], kept["datamodule"], n_batches=1), rel_tol=1e-6)
    written = OmegaConf.to_container(OmegaConf.load(Path(cfg.paths.output_dir, "config_resolved.yaml")))
    assert written == OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("memory", ["xl", "rmt"])
def test_stream_lanes_training_carries_memory(train_config, memory):
    """data.mode=lanes: contiguous lanes, the memory state carried from batch to batch during a real run."""
    cfg = train_config(["debug=limit", "data.mode=lanes", f"memory={memory}", "data.batch_size=4",
                        "data.val_batch_size=4", "trainer.limit_val_batches=3", KEEP_TASK])
    val_loss = train(cfg)
    # the validation loss over 3 batches with the memory carried from batch to batch, recomputed here; read
    # from a fresh memory at every batch, the same model scores another loss
    task, datamodule = KeepTask.last["task"], KeepTask.last["datamodule"]
    assert math.isclose(val_loss, recomputed_val_loss(task, datamodule, n_batches=3), rel_tol=1e-6)
    # (after 6 steps the memory changes little: xl 4e-6 of the loss, rmt 5e-5; float32 rounding is 1e-7)
    assert not math.isclose(val_loss, recomputed_val_loss(task, datamodule, n_batches=3, carry_lanes=False),
                            rel_tol=1e-6)
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


def tensorboard_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard event file: {tag: [(step, value), ...]}. The file is a sequence of records
    (a uint64 length, its crc32, the serialised Event, the data's crc32)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, at, scalars = path.read_bytes(), 0, {}
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_tensorboard_run(train_config):
    cfg = train_config(["debug=limit", "logger=tensorboard", "data.batch_size=4"])
    train(cfg)
    events = list(Path(cfg.paths.output_dir, "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    logged = tensorboard_scalars(events[0])
    csv = read_csv_metrics(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")
    for tag in ("train/loss", "val/loss", "val/bpb"):  # the values the CSV holds, at the same steps
        assert [step for step, _ in logged[tag]] == [step for step, _ in csv[tag]], tag
        assert np.allclose([v for _, v in logged[tag]], [v for _, v in csv[tag]], rtol=1e-6), tag
    assert len(logged["val/loss"]) == 2 and len(logged["train/loss"]) == 6


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
    """The run folder: Hydra's composed config, the CSV, last.ckpt at the final step and the best checkpoint named
    by its step, and the log file with the end-of-run report that names them."""
    assert OmegaConf.load(default_job / ".hydra" / "config.yaml").task._target_ == "stm.tasks.ProbeTask"
    last = default_job / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1000
    (best,) = (default_job / "checkpoints").glob("best-step*.ckpt")
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == int(best.stem[len("best-step"):])
    metrics = read_csv_metrics(default_job / "csv" / "metrics.csv")
    assert [step for step, _ in metrics["val/loss"]] == [999]  # validated once, at the end (steps count from 0)
    log = (default_job / "train.log").read_text()
    assert "curriculum: stage 5 of 5" in log and "stm: finished in" in log
    assert f"last checkpoint: {last}" in log and f"best checkpoint: {best}" in log


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
