"""Ranks 1..N-1 of a DDP job started by `stm.app.sweeps.JobLauncher`:

    python -c "from stm.app.ddp_worker import worker_main; worker_main()" <output dir>/.stm_ddp_job.yaml

runs the job's entry (`stm.app.run.train` / `evaluate`) on the job's resolved config, appending to its log file.
If rank 0, the process that started this one, dies, this rank stops within a second or two (`stop_when_orphaned`)
instead of waiting in a collective until the process group's timeout.
It lives apart from `stm.app.sweeps` (which launches these processes, and which `run` imports) so that the
imports go one way: run -> sweeps, and ddp_worker -> run.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from omegaconf import OmegaConf

from stm.app.sweeps import NonFiniteMetricError

log = logging.getLogger("stm")


def worker_main(argv: list[str] | None = None) -> None:
    """Rank > 0 of a job started by `JobLauncher`: run the job's entry on its resolved config."""
    argv = sys.argv[1:] if argv is None else argv
    job = OmegaConf.load(argv[0])
    rank = int(os.environ.get("STM_RANK", os.environ.get("LOCAL_RANK", "1")))
    _log_to(list(job.get("log_files") or []), rank)
    stop_when_orphaned(rank)
    from stm.app import run

    try:
        getattr(run, job.entry)(job.config)
    except NonFiniteMetricError as err:  # rank 0 raises the same error; the job, not this rank, reports it
        log.warning("rank %d: %s", rank, err)
    log.info("rank %d of the job ended", rank)


def _log_to(files: list[str], rank: int) -> None:
    """This rank's log lines go to the job's log file(s) (appended, marked with the rank); only warnings to
    the console."""
    fmt = logging.Formatter(f"[%(asctime)s][%(name)s][%(levelname)s][rank {rank}] - %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for name in files:
        handler = logging.FileHandler(name, mode="a")
        handler.setFormatter(fmt)
        root.addHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    console.setLevel(logging.WARNING)
    root.addHandler(console)


def stop_when_orphaned(rank: int, poll_s: float = 1.0) -> threading.Thread:
    """Watch the parent process (rank 0, which started this rank): once it is gone (this process was handed to
    another parent), log that and end this process with exit code 1. Returns the watching (daemon) thread."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        log.error("rank %d: rank 0 (pid %d), which started this rank, has ended while this rank ran: stopping "
                  "this rank", rank, parent)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(1)  # the main thread may be stuck in a collective, where an exception would not reach it

    thread = threading.Thread(target=watch, daemon=True, name="stm-parent-watch")
    thread.start()
    return thread
