"""Resuming runs exactly: mid-epoch from a checkpoint, after a SIGKILL with resume=auto, after a signal or a time
limit; and how resume=auto finds the run of the same experiment."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import ROOT, compose_config, read_csv_metrics, run_script
from omegaconf import OmegaConf

from stm.analysis.wandb_offline import read_offline_run
from stm.app.config import ConfigError, validate_train_config
from stm.app.resume import experiment_overrides, resume_dir
from stm.app.run import build_components, build_trainer, seed_everything, train

# a small model on stream lanes with a carried xl memory: data position and lane memory must both come back
SMALL = ["task=lm",
         "model.d_model=64", "model.n_layers=2", "task.segment_len=32", "data.mode=lanes",
         "memory=xl", "memory.xl.mem_len=32", "data.batch_size=4", "data.val_batch_size=4",
         "trainer.val_check_interval=10", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
         "task.scheduler.warmup_steps=5", "+callbacks.model_checkpoint.every_n_train_steps=5",
         "callbacks.progress_bar=null", "callbacks.model_summary=null"]


class RecordBatches(L.pytorch.Callback):
    """Keeps the first row of every training batch the model sees."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.rows.append(batch["input_ids"][0, :16].clone())


class SendSignal(L.pytorch.Callback):
    """Sends this process `signum` at the end of training step `at_step` (as a cluster would, at any time)."""

    def __init__(self, at_step: int, signum: str = "SIGUSR1"):
        self.at_step, self.signum = at_step, signum

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), getattr(signal, self.signum))


class RecordHandlers(L.pytorch.Callback):
    """Keeps the handlers of SIGUSR1 and SIGUSR2 while the run trains (in the class: the callback is built from
    the config)."""

    during: dict = {}

    def on_train_start(self, trainer, module):
        RecordHandlers.during = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGUSR1", "SIGUSR2")}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("mode", ["chunks", "lanes"])
def test_resume_mid_epoch_reads_the_batches_an_uninterrupted_run_would(tmp_path, mode):
    """A run resumed from its step-3 checkpoint trains on exactly the batches 4-6 of an uninterrupted run,
    and ends with the same weights (CPU, deterministic)."""

    def run(max_steps, out, ckpt_path=None):
        cfg = compose_config("train", [
            "debug=limit", f"data.mode={mode}", "data.batch_size=4", "data.val_batch_size=4", "memory=xl",
            "memory.xl.mem_len=32", "model.d_model=64", "model.n_layers=2", "task.segment_len=32",
            f"trainer.max_steps={max_steps}",
            "trainer.val_check_interval=3", "task.scheduler.total_steps=6",  # the first run stops at step 3 of 6
            "+callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.model_checkpoint.save_top_k=-1",
            "callbacks.progress_bar=null", "callbacks.lr_monitor=null", "logger=none"], out)
        seed_everything(cfg.seed)
        parts = build_components(cfg)
        recorder = RecordBatches()
        trainer, _ = build_trainer(cfg, callbacks=[recorder])
        trainer.fit(parts["task"], datamodule=parts["datamodule"], ckpt_path=ckpt_path)
        state = {k: v.clone() for k, v in parts["task"].state_dict().items()}
        return recorder.rows, Path(cfg.callbacks.model_checkpoint.dirpath), state

    full, _, full_weights = run(6, tmp_path / "full")
    _, ckpt_dir, _ = run(3, tmp_path / "first")
    step3 = next(p for p in ckpt_dir.glob("*.ckpt") if "000003" in p.name)
    resumed, _, resumed_weights = run(6, tmp_path / "resumed", ckpt_path=str(step3))
    where = [[i for i, f in enumerate(full) if torch.equal(r, f)] for r in resumed]
    assert len(full) == 6 and len(resumed) == 3, (len(full), len(resumed))
    assert where == [[3], [4], [5]], where
    assert_same_weights(resumed_weights, full_weights)


def _run_folder(tmp_path: Path, name: str, overrides: list[str], checkpoint: bool = True) -> Path:
    folder = tmp_path / "train" / "runs" / name
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), folder / ".hydra" / "overrides.yaml")
    if checkpoint:
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    return folder


def test_resume_auto_picks_the_newest_run_of_the_same_experiment(tmp_path):
    parent = str(tmp_path / "train" / "runs")
    _run_folder(tmp_path, "2026-01-01_10-00-00", ["memory=xl", "trainer.max_steps=40"])
    newest = _run_folder(tmp_path, "2026-01-02_10-00-00", ["trainer.max_steps=40", "memory=xl", "resume=auto"])
    _run_folder(tmp_path, "2026-01-03_10-00-00", ["memory=xl", "trainer.max_steps=40"], checkpoint=False)
    _run_folder(tmp_path, "2026-01-04_10-00-00", ["memory=rmt", "trainer.max_steps=40"])

    def choose(overrides, resume="auto", default="2026-02-01_00-00-00"):
        root = OmegaConf.create({"resume": resume, "hydra": {"overrides": {"task": overrides}}})
        return resume_dir("run", parent, default, _root_=root)

    # the same overrides in any order, resume/ckpt_path aside; the newest that has a last.ckpt
    assert choose(["memory=xl", "trainer.max_steps=40", "resume=auto"]) == str(newest)
    assert choose(["resume=auto", "trainer.max_steps=40", "memory=xl"], default="b") == str(newest)
    assert choose(["memory=xl", "trainer.max_steps=50", "resume=auto"], default="c") == f"{parent}/c"
    assert choose(["memory=xl", "trainer.max_steps=40"], resume=None, default="d") == f"{parent}/d"
    assert choose(["memory=swa", "resume=auto"], default="e") == f"{parent}/e"
    assert experiment_overrides(["b=1", "+ckpt_path=x", "resume=auto", "a=2"]) == ["a=2", "b=1"]


def test_resume_auto_picks_the_sweep_of_the_same_command(tmp_path):
    parent = tmp_path / "train" / "multiruns"
    sweep_overrides = ["memory=none,rmt", "trainer=ddp_cpu"]
    for name, overrides, job_with_checkpoint in (("2026-01-01_10-00-00", sweep_overrides, True),
                                                 ("2026-01-02_10-00-00", sweep_overrides, False),
                                                 ("2026-01-03_10-00-00", ["memory=none,xl"], True)):
        (parent / name).mkdir(parents=True)
        OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": overrides}}}), parent / name / "multirun.yaml")
        if job_with_checkpoint:
            (parent / name / "1" / "checkpoints").mkdir(parents=True)
            (parent / name / "1" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    root = OmegaConf.create({"resume": "auto", "hydra": {"overrides": {"task": sweep_overrides + ["resume=auto"]}}})
    assert resume_dir("sweep", str(parent), "new", _root_=root) == str(parent / "2026-01-01_10-00-00")


def test_resume_and_run_switches_are_checked(tmp_path):
    cfg = compose_config("train", ["resume=yes"], tmp_path)
    with pytest.raises(ConfigError, match="resume must be null or 'auto', got 'yes'"):
        validate_train_config(cfg)
    cfg = compose_config("train", ["run.checkpoint_signals=[SIGNOPE]"], tmp_path)
    with pytest.raises(ConfigError, match="run.checkpoint_signals: 'SIGNOPE' is not a signal name"):
        validate_train_config(cfg)
    cfg = compose_config("train", ["run.compile=fast"], tmp_path)
    with pytest.raises(ConfigError, match="run.compile must be true, false or a mapping"):
        validate_train_config(cfg)


def test_the_moved_trainer_switches_are_refused_naming_their_new_keys(tmp_path, monkeypatch):
    """trainer.compile / trainer.checkpoint_signals, now run.*: on the command line (refused before Hydra
    composes) and from a composed config (a config file of one's own), a ConfigError naming the new key."""
    from stm.app.cli import train_main
    from stm.app.config import check_retired_overrides

    monkeypatch.setattr(sys, "argv", ["train.py", "memory=xl", "trainer.compile=true"])
    with pytest.raises(ConfigError, match=r"^trainer.compile=true: trainer.compile moved to run.compile \(stm's own "
                                          r"switches have their own section, run; trainer holds only the Lightning "
                                          r"Trainer's arguments\): write run.compile=<value>$"):
        train_main()
    with pytest.raises(ConfigError, match=r"^~trainer.checkpoint_signals: trainer.checkpoint_signals moved to "
                                          r"run.checkpoint_signals .*: write run.checkpoint_signals=<value>$"):
        check_retired_overrides(["-m", "++trainer.max_steps=3", "~trainer.checkpoint_signals"])
    check_retired_overrides(["-m", "run.compile=true", "trainer.max_steps=3"])  # the new keys pass
    cfg = compose_config("train", ["+trainer.checkpoint_signals=[SIGUSR1]"], tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer.checkpoint_signals moved to run.checkpoint_signals .*: "
                                          r"write run.checkpoint_signals=<value>$"):
        validate_train_config(cfg)


def test_signal_writes_last_checkpoint_and_resume_auto_continues_exactly(tmp_path):
    """run.checkpoint_signals=[SIGUSR2], SIGUSR2 at step 7 (between two periodic checkpoints): last.ckpt at step
    7, the run stops cleanly, SIGUSR1 was left alone; the same command with resume=auto ends with the weights and
    the loss curve of an uninterrupted run."""
    steps = ["trainer.max_steps=20"]
    full = compose_config("train", SMALL + steps, tmp_path / "full")
    train(full)
    signalled_overrides = SMALL + steps + ["run.checkpoint_signals=[SIGUSR2]",
                                           "+callbacks.send_signal._target_=test_resume.SendSignal",
                                           "+callbacks.send_signal.at_step=7", "+callbacks.send_signal.signum=SIGUSR2",
                                           "+callbacks.handlers._target_=test_resume.RecordHandlers"]
    first = compose_config("train", signalled_overrides, tmp_path / "run")
    before = {name: signal.getsignal(getattr(signal, name)) for name in ("SIGUSR1", "SIGUSR2")}
    train(first)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 7
    assert type(getattr(RecordHandlers.during["SIGUSR2"], "__self__", None)).__name__ == "RunGuard"
    assert RecordHandlers.during["SIGUSR1"] == before["SIGUSR1"]  # not in run.checkpoint_signals: not handled
    assert {name: signal.getsignal(getattr(signal, name)) for name in before} == before  # given back after the run
    train(compose_config("train", signalled_overrides + ["resume=auto"], tmp_path / "run"))
    assert_same_weights(weights(last), weights(tmp_path / "full" / "checkpoints" / "last.ckpt"))
    resumed_csv = read_csv_metrics(tmp_path / "run" / "csv" / "metrics.csv")
    full_csv = read_csv_metrics(tmp_path / "full" / "csv" / "metrics.csv")
    assert resumed_csv["train/loss"] == full_csv["train/loss"]  # steps 0..19 once each, same values
    assert resumed_csv["val/loss"] == full_csv["val/loss"]


def test_time_limit_writes_last_checkpoint(tmp_path):
    cfg = compose_config("train", SMALL + ["trainer.max_steps=100000", "trainer.max_time=00:00:00:02"], tmp_path)
    started = time.monotonic()
    train(cfg)
    assert time.monotonic() - started < 120
    step = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < step < 100000
    assert max(s for s, _ in read_csv_metrics(tmp_path / "csv" / "metrics.csv")["train/loss"]) == step - 1


@pytest.mark.slow
def test_killed_run_resumed_with_resume_auto_ends_with_the_same_weights(tmp_path, monkeypatch):
    """`train.py` SIGKILLed mid-epoch after a checkpoint, then the same command with `resume=auto`: it continues
    in the same folder (same wandb run id) and ends bitwise equal (torch.equal) to an uninterrupted run."""
    command = SMALL + ["trainer.max_steps=40"]  # on a CPU the kernels are deterministic as they are
    full = run_script("train.py", command + [f"hydra.run.dir={tmp_path / 'full'}"], timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]

    logs = tmp_path / "logs"
    monkeypatch.setenv("STM_LOG_DIR", str(logs))
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline")
    killed = subprocess.Popen([sys.executable, "train.py", *command, "logger=wandb"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(logs.glob("train/runs/*/checkpoints/last.ckpt")):
        assert killed.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    run_dir = next(logs.glob("train/runs/*"))
    killed_step = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    assert 0 < killed_step < 40

    resumed = run_script("train.py", command + ["logger=wandb", "resume=auto"], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(logs.glob("train/runs/*")) == [run_dir]  # the same folder, no new one
    assert f"resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in (run_dir / "train.log").read_text()
    final = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 40
    assert_same_weights(final["state_dict"], weights(tmp_path / "full" / "checkpoints" / "last.ckpt"))
    # the loss curve continues: each step once, the same values as the uninterrupted run
    ours = read_csv_metrics(run_dir / "csv" / "metrics.csv")
    theirs = read_csv_metrics(tmp_path / "full" / "csv" / "metrics.csv")
    assert [s for s, _ in ours["train/loss"]] == list(range(40))
    assert ours["train/loss"] == theirs["train/loss"] and ours["val/loss"] == theirs["val/loss"]
    # one wandb run, continued: both offline folders carry the id kept in the run folder
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(offline) == 2 and {p.name.rsplit("-", 1)[1] for p in offline} == {run_id}  # offline-run-<time>-<id>
    assert read_offline_run(offline[-1]).run_id == run_id  # (the killed run's log may end before its run record)
    history = [row["val/loss"] for row in read_offline_run(offline[-1]).history if "val/loss" in row]
    assert history and math.isclose(history[-1], theirs["val/loss"][-1][1], rel_tol=1e-6)
