"""Resuming runs: `resume=auto` finds the run to continue, and runs stop cleanly where a cluster wants them to.

The same experiment: the same `task_name` and the same command-line overrides, apart from `resume` and
`ckpt_path` (their order does not matter). With `resume=auto`:

1. the run folder (`hydra.run.dir`, or `hydra.sweep.dir` for a multirun) is the newest folder of the same
   experiment that holds a `last.ckpt`, instead of a new time-stamped one (`resume_dir`, a config resolver);
2. `train()` continues from `<output dir>/checkpoints/last.ckpt` when there is one (`checkpoint_to_resume`);
   the checkpoint holds the model, optimizer, scheduler, the data position and the memory state of stream
   lanes; the wandb run id is kept in the folder (`stm.app.sweeps.configure_wandb`);
3. `metrics.csv` keeps its rows from before the checkpoint (`continue_csv_logs`).

A job requeued by a cluster (submitit, SLURM `--requeue`) runs in the folder it had, so step 2 alone resumes it.
`RunGuard` writes `last.ckpt` and stops when the cluster signals (SIGUSR1 / SIGUSR2 before a time limit or a
preemption) or when `trainer.max_time` is reached, and fails a run whose loss is no longer finite.

Checkpoints are read as data only (`read_checkpoint`: `torch.load(..., weights_only=True)`), and Lightning is
told to read them so too: a checkpoint whose pickle would call code is refused unless the command says
`trust_checkpoint=true`.
"""

from __future__ import annotations

import csv
import logging
import os
import pickle
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Checkpoint, Timer
from omegaconf import DictConfig, ListConfig, OmegaConf

from stm.app.config import ConfigError
from stm.app.sweeps import NonFiniteMetricError, is_rank_zero

log = logging.getLogger("stm")

_IGNORED_KEYS = {"resume", "ckpt_path", "trust_checkpoint"}
_chosen: dict[tuple[str, str, str], str] = {}  # a run's folder, once chosen, stays (Hydra resolves it repeatedly)


def experiment_overrides(overrides) -> list[str]:
    """The overrides that define an experiment: all but `resume`, `ckpt_path` and `trust_checkpoint`, sorted."""
    kept = []
    for item in overrides or []:
        key = str(item).split("=", 1)[0].lstrip("+~")
        if key not in _IGNORED_KEYS:
            kept.append(str(item))
    return sorted(kept)


def _recorded_overrides(folder: Path, kind: str) -> list[str] | None:
    try:
        if kind == "sweep":
            recorded = OmegaConf.select(OmegaConf.load(folder / "multirun.yaml"), "hydra.overrides.task")
        else:
            recorded = OmegaConf.load(folder / ".hydra" / "overrides.yaml")
    except Exception:  # noqa: BLE001 - an unreadable or foreign folder is no candidate
        return None
    return experiment_overrides(list(recorded)) if isinstance(recorded, ListConfig) else None


def _has_checkpoint(folder: Path, kind: str) -> bool:
    pattern = "*/checkpoints/last*.ckpt" if kind == "sweep" else "checkpoints/last*.ckpt"
    return any(folder.glob(pattern))


def resume_dir(kind: str, parent: str, default: str, *, _root_: DictConfig) -> str:
    """Resolver `${stm_resume_dir:run|sweep,<parent>,<new name>}` for `hydra.run.dir` / `hydra.sweep.dir`:
    `<parent>/<new name>`, or with `resume=auto` the newest folder in `<parent>` of the same experiment that
    holds a `last.ckpt` (folder names are start times, so the newest is the last in name order)."""
    if OmegaConf.select(_root_, "resume", default=None) != "auto":
        return f"{parent}/{default}"
    key = (kind, parent, default)
    if key not in _chosen:
        _chosen[key] = f"{parent}/{default}"
        wanted = experiment_overrides(OmegaConf.select(_root_, "hydra.overrides.task", default=None))
        root = Path(parent)
        folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name, reverse=True) \
            if root.is_dir() else []
        for folder in folders:
            if _recorded_overrides(folder, kind) == wanted and _has_checkpoint(folder, kind):
                _chosen[key] = str(folder)
                log.info("resume=auto: continuing the run in %s", folder)
                break
    return _chosen[key]


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the run's checkpoints go: the ModelCheckpoint's `dirpath`, else `<output dir>/checkpoints`."""
    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None)
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def last_checkpoint(folder: Path) -> Path | None:
    """The newest `last.ckpt` (or `last-v<n>.ckpt`, which Lightning writes next to a last.ckpt it did not write)."""
    found = [p for p in folder.glob("last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


class UntrustedCheckpointError(ValueError):
    """A checkpoint that needs code to load: its pickle calls a function or builds an object that is not plain
    data, or its stored config names code outside stm to build. Refused unless the run says trust_checkpoint=true."""


TRUST_HINT = "If you trust this file and where it came from, run again with trust_checkpoint=true on the command line"


def trusts_checkpoints(cfg: DictConfig) -> bool:
    """`trust_checkpoint` of the config: true loads checkpoints with full unpickling (they may run code)."""
    value = cfg.get("trust_checkpoint", False)
    if value is None or isinstance(value, bool):
        return bool(value)
    raise ConfigError(f"trust_checkpoint must be true or false, got {value!r}")


def _refusal(path: Path, what: str, err: pickle.UnpicklingError) -> ValueError:
    """The error for a checkpoint that `torch.load(weights_only=True)` would not read, naming the global in it."""
    text = str(err)
    found = re.search(r"GLOBAL (\S+?)(?: was not an allowed global| whose module)", text)
    if found is None:  # not a global: a file torch.save did not write (or a pickle protocol it does not write)
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.S)
        reason = reason.group(1).strip() if reason else text.strip().splitlines()[0]
        return ValueError(f"{what}: could not read {path} as a PyTorch checkpoint of plain data (weights-only "
                          f"unpickling stopped at: {reason}); it is not a file torch.save wrote, or it holds "
                          f"objects that need code to load. Nothing in it was run. {TRUST_HINT}.")
    name = found.group(1)
    if name.startswith("omegaconf."):
        return UntrustedCheckpointError(
            f"{what}: refused to load {path}: it stores an omegaconf object ({name}), as checkpoints of older stm "
            f"versions did (the run config as a DictConfig), and unpickling that runs omegaconf code; stm reads "
            f"checkpoints with torch.load(weights_only=True), which takes only tensors, numbers, strings, lists and "
            f"dicts. Nothing in it was run. {TRUST_HINT}; training resumed from it then writes checkpoints of "
            f"plain data.")
    return UntrustedCheckpointError(
        f"{what}: refused to load {path}: its pickle calls {name}, which is code, not data (stm reads checkpoints "
        f"with torch.load(weights_only=True), which takes only tensors, numbers, strings, lists and dicts; a "
        f"checkpoint's pickle can run any code). Nothing in it was run. {TRUST_HINT} (from Python, "
        f"torch.serialization.add_safe_globals([{name}]) allows just that global).")


def read_checkpoint(path: str | Path, *, trust: bool = False, mmap: bool = False, what: str = "ckpt_path") -> dict:
    """A checkpoint file as a dict, read with `torch.load(weights_only=True)`: tensors and plain containers only,
    so that reading it cannot run code. A file that needs more is refused with an error naming the file and the
    global its pickle wanted (`UntrustedCheckpointError`). `trust=True` (trust_checkpoint=true) unpickles fully.
    `mmap` maps the tensors instead of reading them (cheap; files that torch.save did not zip are read whole)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if trust:
        log.warning("%s: trust_checkpoint=true: unpickling %s fully; its pickle can run code", what, path)

    def load(use_mmap: bool):
        return torch.load(path, map_location="cpu", weights_only=not trust, mmap=use_mmap)

    try:
        try:
            checkpoint = load(mmap)
        except RuntimeError as err:
            if not (mmap and "mmap" in str(err)):
                raise
            checkpoint = load(False)
    except pickle.UnpicklingError as err:
        if trust:
            raise ValueError(f"{what}: could not read {path} as a PyTorch checkpoint ({err})") from err
        raise _refusal(path, what, err) from None
    except Exception as err:  # a truncated or foreign file: say which and why
        raise ValueError(f"{what}: could not read {path} as a PyTorch checkpoint ({err})") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{what}: {path} is not a Lightning checkpoint (it holds a {type(checkpoint).__name__}, "
                         f"not a dict)")
    return checkpoint


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """`ckpt_path` if given; with `resume=auto` (or in a job SLURM requeued), the run folder's last checkpoint if
    there is one; else None. The checkpoint is checked to be plain data (`read_checkpoint`) before anything is
    built; a file that needs code to load stops the run here unless trust_checkpoint=true."""
    trust = trusts_checkpoints(cfg)
    if cfg.get("ckpt_path"):
        read_checkpoint(cfg.ckpt_path, trust=trust, mmap=True)
        return str(cfg.ckpt_path)
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if cfg.get("resume") == "auto" or requeued:
        last = last_checkpoint(checkpoint_dir(cfg))
        if last is not None:
            read_checkpoint(last, trust=trust, mmap=True, what="resume=auto")
            return str(last)
        log.info("resume=auto: no last.ckpt in %s yet, starting afresh", checkpoint_dir(cfg))
    return None


def checkpoint_step(path: str | Path, trust: bool = False) -> int:
    """The global step a checkpoint was written at (read lazily: the weights are not loaded)."""
    return int(read_checkpoint(path, trust=trust, mmap=True).get("global_step", 0))


def continue_csv_logs(loggers: list, step: int) -> None:
    """Keep the rows of `metrics.csv` from before `step` (the resumed checkpoint's step) when a resumed run
    writes into the same folder; Lightning's CSV logger would delete the file, and the killed run may have
    logged steps after its checkpoint, which the resumed run logs again."""
    from lightning.pytorch.loggers import CSVLogger

    if not is_rank_zero():
        return
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if row.get("step") not in (None, "") and int(row["step"]) < step]
        writer = logger.experiment  # Lightning removes the old file here
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(kept)
        writer.metrics_keys = list(header)
        log.info("resume: kept %d of %d rows of %s (steps before %d)", len(kept), len(rows), path, step)


class RunGuard(Checkpoint):
    """Stops a run cleanly, and fails one that diverged.

    - On one of `signals` (SLURM sends one before a time limit or a preemption: `--signal=USR1@120`; submitit
      uses USR2) or when `trainer.max_time` is up: writes `<dirpath>/last.ckpt` at the end of the current
      step and stops; `resume=auto` continues from there. After the run, `hand_over()` passes the signal on to
      the handler that was there before (submitit requeues the job), or on SLURM requeues the job itself.
    - A non-finite training loss raises `NonFiniteMetricError` at once (a failed trial for a sweeper).
    Under DDP the ranks decide together (one small all-reduce per step), so all stop at the same step.
    It is a `Checkpoint` so that Lightning runs it after the other callbacks (after the Timer and the
    ModelCheckpoint of the same step).
    """

    def __init__(self, dirpath: str | Path, signals: list[str] | tuple[str, ...] = ("SIGUSR1", "SIGUSR2")):
        self.dirpath = Path(dirpath)
        self.signals = [getattr(signal, name) for name in signals]
        self.received: int | None = None
        self.stopped_early = False
        self._previous: dict[int, Any] = {}

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: a signal cannot be handled here
                log.warning("RunGuard: cannot handle %s outside the main thread", signal.Signals(signum).name)

    def _on_signal(self, signum: int, frame) -> None:
        log.warning("received %s: writing last.ckpt after this step and stopping", signal.Signals(signum).name)
        self.received = signum

    def _time_is_up(self, trainer) -> bool:
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, Timer)), None)
        remaining = timer.time_remaining("train") if timer is not None else None
        return remaining is not None and remaining <= 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        diverged = isinstance(loss, torch.Tensor) and not bool(torch.isfinite(loss.detach()).all())
        stop = self.received is not None or self._time_is_up(trainer)
        if trainer.world_size > 1:  # one decision for all ranks
            flags = torch.tensor([float(diverged), float(stop)], device=pl_module.device)
            flags = trainer.strategy.reduce(flags, reduce_op="max")
            diverged, stop = bool(flags[0] > 0), bool(flags[1] > 0)
        if diverged:
            raise NonFiniteMetricError(f"train/loss is not finite at step {trainer.global_step}: the run diverged "
                                       f"(a lower task.optimizer.lr, or trainer.gradient_clip_val?)")
        if stop and not self.stopped_early:
            path = self.dirpath / "last.ckpt"
            model_checkpoint = trainer.checkpoint_callback
            if model_checkpoint is not None and Path(model_checkpoint.dirpath or "") == self.dirpath:
                model_checkpoint.last_model_path = str(path)  # its own last.ckpt: it overwrites it, not last-v1
            trainer.save_checkpoint(path)
            trainer.should_stop = True
            trainer.limit_val_batches = 0  # Lightning validates before stopping; there is no time for that here
            self.stopped_early = True
            log.warning("stopped at step %d; wrote %s (continue with resume=auto)", trainer.global_step, path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # what was logged up to a checkpoint reaches the disk with it (a killed run keeps its history)
        for logger in trainer.loggers:
            logger.save()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        for signum, handler in self._previous.items():
            try:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            except ValueError:
                pass

    def hand_over(self) -> None:
        """After a run stopped by a signal: let the previous handler act (submitit's requeues the job), or
        requeue the SLURM job on rank 0; elsewhere there is nothing more to do."""
        if self.received is None:
            return
        previous = self._previous.get(self.received)
        if callable(previous):
            previous(self.received, None)
            return
        job_id = os.environ.get("SLURM_JOB_ID")
        if job_id and is_rank_zero():
            array_id = os.environ.get("SLURM_ARRAY_JOB_ID")
            if array_id:
                job_id = f"{array_id}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
            log.warning("requeueing SLURM job %s", job_id)
            subprocess.call(["scontrol", "requeue", job_id])
