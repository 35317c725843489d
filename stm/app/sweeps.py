"""DDP inside Hydra jobs and sweeps, wandb run identity, and what a sweeper sees of a failed run.

DDP. Lightning's DDP strategy starts ranks 1..N-1 by running the script again with `sys.argv`; under
`python train.py -m ...` that starts a nested sweep in every job, writes the ranks into other folders, and inside a
joblib or submitit worker there is no script to run again. `JobDDPStrategy` starts the other ranks of *this job*
instead: `train()` / `evaluate()` announce themselves with `ddp_job(entry, cfg)`, and when the Trainer launches,
the job's resolved config is written to `<output dir>/.stm_ddp_job.yaml` and each rank runs
`python -c "from stm.app.ddp_worker import worker_main; worker_main()" <that file>` (`stm.app.ddp_worker`): the
same config (the same output dir, checkpoint to resume, wandb id), appending to the job's one log file. When the
job ends, its ranks are waited for (killed if the job failed), the process group is destroyed and the environment
restored, so the next job of the sweep starts afresh on a new port. Where the cluster starts the processes itself
(SLURM `srun`, torchrun), nothing is launched: every rank runs the job.

A rank that dies. A rank killed mid-step (out of memory, `kill -9`, a crash) leaves the others in a collective
that would wait for it until the process group's timeout (30 minutes for gloo). Where the transport notices the
closed connection (gloo on one machine: at once), rank 0 fails and the job ends with a `RankDiedError` naming the
rank and its signal. Where it does not, the launcher's observer ends the job `dead_rank_timeout_s` after the death
(`trainer.strategy.dead_rank_timeout_s`, 30 s by default), with the same message, exit code 1. A rank whose rank 0
dies stops by itself (`stm.app.ddp_worker`). Checkpoints are written whole or not at all
(`stm.app.checkpoint_io`), so `resume=auto` continues the job from the `last.ckpt` before the death.

Sweepers. A run whose loss is not finite raises `NonFiniteMetricError`; Hydra records the exception in the
job's return, and the Optuna sweeper records the trial as FAIL and goes on (with `max_failure_rate: 1.0`).
A job must not return NaN: Optuna 2.x cannot record that (it raises while telling the failure).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import string
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("stm")

JOB_FILE = ".stm_ddp_job.yaml"
_WORKER = "from stm.app.ddp_worker import worker_main; worker_main()"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
_current: dict[str, Any] = {}


class NonFiniteMetricError(RuntimeError):
    """The training loss or the optimized metric is NaN or infinite: the run diverged (a failed trial)."""


class RankDiedError(RuntimeError):
    """A rank of a DDP job was killed by a signal (or failed) while the job ran; the job stopped."""


RESUME_HINT = "the checkpoints written before are whole: the same command with resume=auto continues from last.ckpt"


def describe_exit(rank: int, pid: int, code: int) -> str:
    """How a rank's process ended, from its exit code (negative: the signal that killed it)."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} (pid {pid}) was killed by {name} (exit code {code})"
    return f"rank {rank} (pid {pid}) exited with code {code} (its traceback is in the job's log)"


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (known from the environment before any Trainer exists)."""
    return getattr(rank_zero_only, "rank", 0) == 0


@contextmanager
def ddp_job(entry: str, cfg: DictConfig):
    """Run `stm.app.run.<entry>(cfg)` as one job: a DDP Trainer inside starts its other ranks on `cfg`.

    On leaving, the job's ranks are waited for (killed if the job raised) and the distributed state is undone.
    A rank killed by a signal while the job ran turns the job's error (rank 0's view of it: a collective that
    failed) into a `RankDiedError` naming the rank and the signal, raised from it.
    """
    previous = dict(_current)
    launchers: list[JobLauncher] = []
    _current.clear()
    _current.update(entry=entry, cfg=cfg, launchers=launchers)
    try:
        yield
    except BaseException as err:
        _restore(previous)
        died = [d for launcher in launchers for d in launcher.finish(failed=True)]
        killed = [describe_exit(*d) for d in died if d[2] < 0]
        if killed and not isinstance(err, KeyboardInterrupt):
            first = (str(err).strip().splitlines() or [""])[0][:300]
            raise RankDiedError(f"DDP: {'; '.join(killed)} while the job ran, so the job stopped (rank 0 then failed "
                                f"with {type(err).__name__}: {first}); {RESUME_HINT}") from err
        raise
    _restore(previous)
    for launcher in launchers:
        launcher.finish(failed=False)


def _restore(previous: dict[str, Any]) -> None:
    _current.clear()
    _current.update(previous)


class JobDDPStrategy(DDPStrategy):
    """Lightning's `DDPStrategy` whose launcher starts the other ranks of the current Hydra job (see the module
    docstring). Takes the same arguments; `process_group_backend: gloo` on CPUs, `nccl` (the default) on GPUs;
    and `dead_rank_timeout_s`: after a rank it started died, how long the job may take to end by itself before the
    launcher ends it (seconds, > 0)."""

    def __init__(self, *args, dead_rank_timeout_s: float = 30.0, **kwargs):
        if isinstance(dead_rank_timeout_s, bool) or not isinstance(dead_rank_timeout_s, (int, float)) \
                or not dead_rank_timeout_s > 0:
            raise ValueError(f"trainer.strategy.dead_rank_timeout_s must be a number of seconds > 0, got "
                             f"{dead_rank_timeout_s!r}")
        super().__init__(*args, **kwargs)
        self.dead_rank_timeout_s = float(dead_rank_timeout_s)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = JobLauncher(self.cluster_environment, self.num_processes, self.num_nodes,
                                         dead_rank_timeout_s=self.dead_rank_timeout_s)


class JobLauncher(_SubprocessScriptLauncher):
    """Starts ranks 1..N-1 on the job's resolved config; see `JobDDPStrategy`."""

    wait_s = 600.0  # at the end of a job: how long the other ranks may take to finish

    def __init__(self, *args, dead_rank_timeout_s: float = 30.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dead_rank_timeout_s = dead_rank_timeout_s  # after a rank died: how long the job may take to end
        self.ranks: list[int] = []  # the global rank of each of self.procs
        self._saved_env: dict[str, str | None] = {}
        self._saved_threads: int | None = None
        self._done = threading.Event()

    def launch(self, function, *args, trainer=None, **kwargs):
        from lightning.fabric.utilities.distributed import _set_num_threads_if_needed

        if not _current:  # not inside train()/evaluate(): Lightning's own behaviour
            return super().launch(function, *args, trainer=trainer, **kwargs)
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._saved_threads = torch.get_num_threads()
            self._call_children_scripts()
            threading.Thread(target=self._observe, daemon=True, name="stm-rank-observer").start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)

    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        cfg: DictConfig = _current["cfg"]
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        job_file = out / JOB_FILE
        log_files = [h.baseFilename for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        OmegaConf.save(OmegaConf.create({"entry": _current["entry"], "log_files": log_files,
                                         "config": OmegaConf.to_container(cfg, resolve=True)}), job_file)
        self._saved_env = {k: os.environ.get(k) for k in _DIST_ENV}
        os.environ["MASTER_ADDR"] = self.cluster_environment.main_address
        os.environ["MASTER_PORT"] = str(self.cluster_environment.main_port)
        os.environ["NODE_RANK"] = str(self.cluster_environment.node_rank())
        os.environ["LOCAL_RANK"] = str(self.cluster_environment.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            global_rank = self.cluster_environment.node_rank() * self.num_processes + local_rank
            env = dict(os.environ, LOCAL_RANK=str(local_rank), STM_RANK=str(global_rank))
            if os.environ.get("PL_GLOBAL_SEED") is None:
                env.pop("PL_GLOBAL_SEED", None)
            self.procs.append(subprocess.Popen([sys.executable, "-c", _WORKER, str(job_file)], env=env,
                                               cwd=os.getcwd()))
            self.ranks.append(global_rank)
        _current["launchers"].append(self)
        log.info("DDP: started %d more rank(s) of this job on %s (pids %s)", self.num_processes - 1, job_file,
                 [p.pid for p in self.procs])

    def dead_ranks(self) -> list[tuple[int, int, int]]:
        """(rank, pid, exit code) of each rank this launcher started that has ended with a non-zero code."""
        return [(rank, p.pid, p.returncode) for rank, p in zip(self.ranks, self.procs) if p.poll() not in (None, 0)]

    def _observe(self) -> None:
        """End the job if a rank died and the job does not end by itself within `dead_rank_timeout_s` (rank 0
        would wait in a collective until the process group's timeout); a job that raises, or ends, within that
        time goes on to the next job of the sweep."""
        poll_s = min(2.0, self.dead_rank_timeout_s / 4)
        while not self._done.wait(poll_s):
            dead = self.dead_ranks()
            if dead and not self._done.wait(self.dead_rank_timeout_s):
                self._end_job(dead)
            if all(p.poll() == 0 for p in self.procs):
                return

    def _end_job(self, dead: list[tuple[int, int, int]]) -> None:
        """Kill the other ranks and end this process (exit code 1), saying which rank died and how."""
        log.error("DDP: %s, and the job did not end within trainer.strategy.dead_rank_timeout_s=%g s after it "
                  "(rank 0 was waiting for it): ending the job; %s", "; ".join(describe_exit(*d) for d in dead),
                  self.dead_rank_timeout_s, RESUME_HINT)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(1)  # from this thread: the main thread is stuck in C++ and would not see an exception

    def finish(self, failed: bool) -> list[tuple[int, int, int]]:
        """End of the job: wait for the other ranks (kill them if the job failed), then undo the distributed
        state so the next job of a sweep initialises its own process group. Returns the ranks that had died
        before (`dead_ranks`); a job that did not fail raises `RankDiedError` if any rank failed."""
        import torch.distributed as dist

        self._done.set()
        died = self.dead_ranks()
        deadline = time.monotonic() + (5.0 if failed else self.wait_s)
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("DDP: rank process %d did not end; killing it", proc.pid)
                proc.kill()
                proc.wait()
        codes = [p.returncode for p in self.procs]
        log.info("DDP: the other ranks of this job ended (exit codes %s)", codes)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._saved_threads is not None:
            torch.set_num_threads(self._saved_threads)
        if any(codes) and not failed:
            ended = "; ".join(describe_exit(r, p.pid, p.returncode) for r, p in zip(self.ranks, self.procs)
                              if p.returncode)
            raise RankDiedError(f"DDP: {ended}, although rank 0 finished the job; see the job's log")
        return died


class MultirunHydraConfig(Callback):
    """A Hydra callback (conf/hydra/default.yaml): at the start of a multirun, make the sweep's config the current
    Hydra config. Hydra sets it only per job, but a sweeper resolves `hydra.sweep.dir` and its own settings
    (Optuna's storage) before any job, and those use `paths.log_dir`, i.e. `${hydra:runtime.cwd}`."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)


def sweep_info() -> dict[str, Any] | None:
    """The Hydra sweep this job belongs to (`group`, job `num`, `overrides`), or None outside a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized():
            return None
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        return {"group": Path(str(hc.sweep.dir)).name, "num": hc.job.num,
                "overrides": hc.job.override_dirname or str(hc.job.num)}
    except Exception:  # noqa: BLE001 - a config without Hydra's runtime parts (tests, notebooks): no sweep
        return None


def configure_wandb(cfg: DictConfig, out: Path) -> None:
    """Fill in `logger.wandb`: the run id (kept in `<out>/wandb_id.txt`, so a resumed job continues the same
    run), the group (the sweep) and the name (the job's overrides in a sweep)."""
    wandb_cfg = OmegaConf.select(cfg, "logger.wandb")
    if wandb_cfg is None:
        return
    id_file = out / "wandb_id.txt"
    if not wandb_cfg.get("id"):
        if id_file.is_file() and id_file.read_text().strip():
            wandb_cfg.id = id_file.read_text().strip()
        else:  # wandb's own format: 8 lowercase letters and digits
            wandb_cfg.id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if is_rank_zero():
        out.mkdir(parents=True, exist_ok=True)
        id_file.write_text(f"{wandb_cfg.id}\n")
    sweep = sweep_info()
    if sweep is not None:
        if wandb_cfg.get("group") is None:
            wandb_cfg.group = f"{cfg.task_name}-{sweep['group']}"
        if wandb_cfg.get("name") is None:
            wandb_cfg.name = f"{sweep['num']}:{sweep['overrides']}"
    elif wandb_cfg.get("name") is None:
        wandb_cfg.name = str(cfg.task_name)
