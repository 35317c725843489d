"""Faults under DDP: a rank killed mid-step ends the job within a bounded time with an error naming it, leaves
last.ckpt whole, and resume=auto continues the job to its end; the launcher ends a job that would wait for a dead
rank; a rank whose rank 0 died stops; checkpoints are written whole or not at all."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import open_dict
from torch.distributed.constants import default_pg_timeout

from stm.app.checkpoint_io import AtomicCheckpointIO
from stm.app.resume import read_checkpoint
from stm.app.run import build_trainer
from stm.app.sweeps import JobDDPStrategy

# tiny and quick: a checkpoint every 5 steps, so that one is there soon after training starts
FAULT = ["task=lm", "trainer=ddp_cpu", "model.d_model=32", "model.n_layers=1", "task.segment_len=32",
         "data.batch_size=4", "data.val_batch_size=8", "trainer.max_steps=60", "trainer.val_check_interval=30",
         "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1", "task.scheduler.warmup_steps=2",
         "+callbacks.model_checkpoint.every_n_train_steps=5", "trainer.strategy.dead_rank_timeout_s=10",
         "callbacks.progress_bar=null", "callbacks.model_summary=null"]


def python_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), **extra)


def has_ended(pid: int) -> bool:
    """Whether a process that is not our child has ended (gone, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def kill_and_wait(job: subprocess.Popen, pid: int, both: bool = False):
    """SIGKILL `pid` (a rank of `job`), then wait for `job` to end: (its output, or (stdout, stderr) with `both`;
    the seconds from the kill to its end). `job` is killed if it has not ended within 300 s."""
    try:
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        output = job.communicate(timeout=300)
        return (output if both else output[0]), time.monotonic() - killed_at
    finally:
        if job.poll() is None:
            job.kill()


@pytest.mark.slow
def test_a_rank_killed_mid_step_ends_the_job_naming_it_and_resume_auto_continues(tmp_path):
    """`train.py trainer=ddp_cpu`: rank 1 SIGKILLed after the first last.ckpt. The job ends within a bounded time
    (not gloo's 30-minute collective timeout) with an error naming rank 1 and SIGKILL; last.ckpt reads as a whole
    checkpoint; the same command with resume=auto continues from it in the same folder to max_steps."""
    logs = tmp_path / "logs"
    env = python_env(STM_LOG_DIR=str(logs))
    job = subprocess.Popen([sys.executable, "train.py", *FAULT], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list(logs.glob("train/runs/*/checkpoints/last.ckpt")):
            assert job.poll() is None, f"the job ended before it could be killed:\n{job.stdout.read()[-3000:]}"
            assert time.monotonic() < deadline, "no last.ckpt within 300 s"
            time.sleep(0.05)
        run_dir = next(logs.glob("train/runs/*"))
        rank1 = int(re.search(r"DDP: started 1 more rank\(s\) .* \(pids \[(\d+)\]\)",
                              (run_dir / "train.log").read_text()).group(1))
    except BaseException:
        job.kill()
        raise
    output, ended_after = kill_and_wait(job, rank1)
    assert job.returncode == 1, output[-3000:]
    # gloo would wait 30 minutes; the job ends at its next collective (plus the interpreter's exit)
    assert ended_after < 45, f"the job took {ended_after:.0f} s to end after rank 1 was killed"
    assert f"RankDiedError: DDP: rank 1 (pid {rank1}) was killed by SIGKILL (exit code -9) while the job ran" in output
    assert "resume=auto continues from last.ckpt" in output

    checkpoints = run_dir / "checkpoints"
    killed = read_checkpoint(checkpoints / "last.ckpt")  # weights-only: a whole, plain-data checkpoint
    killed_step = killed["global_step"]
    assert 5 <= killed_step < 60 and killed_step % 5 == 0
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".")) == []  # no partial file left

    resumed = subprocess.run([sys.executable, "train.py", *FAULT, "resume=auto"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert list(logs.glob("train/runs/*")) == [run_dir]  # the same folder, no new one
    assert f"resuming from {checkpoints / 'last.ckpt'}" in (run_dir / "train.log").read_text()
    assert read_checkpoint(checkpoints / "last.ckpt")["global_step"] == 60


@pytest.mark.slow  # starts real processes: 5-20 s
def test_the_launcher_ends_a_job_that_waits_for_a_dead_rank(tmp_path):
    """Where the transport does not notice a dead rank (rank 0 stays in a collective), the launcher's observer
    ends the job `dead_rank_timeout_s` after the death, with exit code 1 and a message naming the rank and signal.
    Here rank 0's collective is a sleep, and rank 1 a process that is killed."""
    script = textwrap.dedent("""
        import logging, subprocess, sys, threading, time
        from lightning.fabric.plugins.environments import LightningEnvironment
        from stm.app.sweeps import JobLauncher
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        launcher = JobLauncher(LightningEnvironment(), 2, 1, dead_rank_timeout_s=2.0)
        launcher.procs.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
        launcher.ranks.append(1)
        threading.Thread(target=launcher._observe, daemon=True).start()
        print(launcher.procs[0].pid, flush=True)
        time.sleep(600)  # rank 0 in a collective that never returns
    """)
    job = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=python_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    rank1 = int(job.stdout.readline())
    (_, err), ended_after = kill_and_wait(job, rank1, both=True)
    assert job.returncode == 1, err[-2000:]
    assert 2.0 <= ended_after < 2.0 + 0.5 + 15, ended_after  # the timeout, a poll of 0.5 s, a loaded machine
    assert (f"rank 1 (pid {rank1}) was killed by SIGKILL (exit code -9), and the job did not end within "
            f"trainer.strategy.dead_rank_timeout_s=2 s after it") in err


@pytest.mark.slow  # starts real processes: 5-20 s
def test_a_rank_whose_rank_0_died_stops(tmp_path):
    """A rank started by rank 0 (`stm.app.ddp_worker`) ends by itself once rank 0 is gone, saying so."""
    rank1_log = tmp_path / "rank1.txt"
    rank1 = ("import time; from stm.app.ddp_worker import stop_when_orphaned; stop_when_orphaned(1, poll_s=0.2); "
             "print('watching', flush=True); time.sleep(600)")
    rank0 = (f"import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', {rank1!r}], "
             f"stdout=open({str(rank1_log)!r}, 'w'), stderr=subprocess.STDOUT); print(p.pid, flush=True); "
             f"time.sleep(600)")
    job = subprocess.Popen([sys.executable, "-c", rank0], env=python_env(), stdout=subprocess.PIPE, text=True)
    rank1_pid = int(job.stdout.readline())
    try:
        deadline = time.monotonic() + 120
        while "watching" not in (rank1_log.read_text() if rank1_log.exists() else ""):
            assert time.monotonic() < deadline and not has_ended(rank1_pid), "rank 1 did not start watching"
            time.sleep(0.05)
        job.kill()
        job.wait()
        killed_at = time.monotonic()
        while not has_ended(rank1_pid):
            assert time.monotonic() - killed_at < 15, "rank 1 still runs 15 s after rank 0 died"
            time.sleep(0.05)
    finally:
        if not has_ended(rank1_pid):
            os.kill(rank1_pid, signal.SIGKILL)
    assert f"rank 1: rank 0 (pid {job.pid}), which started this rank, has ended while this rank ran" \
        in rank1_log.read_text()


def test_dead_rank_timeout_is_a_strategy_setting_with_a_documented_default(tmp_path):
    """`trainer.strategy.dead_rank_timeout_s`: 30 s in both DDP presets and in the README, checked on build."""
    for preset in ("ddp_cpu", "ddp"):
        assert compose_config("train", [f"trainer={preset}"], tmp_path).trainer.strategy.dead_rank_timeout_s == 30
    readme = (ROOT / "README.md").read_text()
    assert "`trainer.strategy.dead_rank_timeout_s`, 30 s by default" in readme
    assert "until the process group's timeout (30 minutes for gloo)" in readme
    assert default_pg_timeout == timedelta(minutes=30)  # torch's, for gloo
    assert "requires the job to end within 45 s" in readme and "assert ended_after < 45," in Path(__file__).read_text()
    with pytest.raises(ValueError, match=r"trainer.strategy.dead_rank_timeout_s must be a number of seconds > 0, "
                                         r"got 0"):
        JobDDPStrategy(process_group_backend="gloo", dead_rank_timeout_s=0)


class FailsToPickle:
    """Pickling this raises: a save that fails after part of the checkpoint was written."""

    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """`AtomicCheckpointIO`: the file is written next to the checkpoint and renamed into place, whatever the temp
    folder is (Lightning's own goes through $TMPDIR: a copy where that is another file system); a save that fails
    halfway leaves the previous checkpoint byte for byte and no partial file."""
    monkeypatch.setenv("TMPDIR", str(tmp_path / "no such folder"))  # nothing may be written through $TMPDIR
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # tempfile caches the folder it chose; choose again
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    first = {"global_step": 5, "state_dict": {"w": torch.arange(1000.0)}}
    io.save_checkpoint(first, path)
    assert read_checkpoint(path)["global_step"] == 5
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], first["state_dict"]["w"])
    before = path.read_bytes()

    with pytest.raises(RuntimeError, match="cannot pickle this"):
        io.save_checkpoint({"global_step": 10, "state_dict": {"w": torch.zeros(1000)}, "x": FailsToPickle()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_training_writes_checkpoints_through_the_atomic_writer(tmp_path):
    """build_trainer gives the strategy `AtomicCheckpointIO`, unless the config chose a CheckpointIO."""
    trainer, _ = build_trainer(compose_config("train", ["trainer=ddp_cpu"], tmp_path))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    cfg = compose_config("train", [], tmp_path)
    with open_dict(cfg):  # a CheckpointIO the config chose is kept
        cfg.trainer.plugins = [{"_target_": "lightning.pytorch.plugins.io.TorchCheckpointIO"}]
    trainer, _ = build_trainer(cfg)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
