"""Worker processes for the benchmarks: a system under test in its own spawned process (`Worker`), and a
`python ...` child run with its wall time and peak resident set (`run_python`). (Moved out of common.py.)

Benchmarks here report ratios measured side by side in one run, because these machines are noisy: two
systems timed minutes apart on a shared CPU can differ by more than the effect being measured. So each
system lives in its own worker process (its own model, its own allocator, its own peak-memory record)
and a driver times them in interleaved rounds: round r times a step of every system before round r + 1
begins, in an order that rotates, so a slow patch of the machine falls on all of them alike.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO_ROOT
from memory_meter import is_out_of_memory


class Worker:
    """A system under test in its own spawned process.

    `factory(**spec)` runs inside the worker and returns an object whose methods the driver calls by name
    (`worker.call("step")`); each call returns that method's result, or raises `WorkerError` with the
    worker's traceback. The object's `memory()` method, if any, reports its peak memory.
    """

    def __init__(self, factory: Callable[..., Any], spec: dict[str, Any], name: str = "worker"):
        ctx = mp.get_context("spawn")  # fresh interpreter: no torch state, allocator or threads shared
        self.name = name
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_worker_main, args=(child, factory, spec), name=name, daemon=True)
        self._proc.start()
        child.close()
        status, payload = self._conn.recv()
        if status != "ok":
            self._proc.join(timeout=10)
            raise WorkerError(f"{name}: could not build: {payload}")
        self.info = payload

    def call(self, method: str, *args, timeout: float | None = None, **kwargs) -> Any:
        self._conn.send((method, args, kwargs))
        if timeout is not None and not self._conn.poll(timeout):
            self.kill()
            raise WorkerTimeout(f"{self.name}: {method} took longer than {timeout:.0f} s; worker stopped")
        try:
            status, payload = self._conn.recv()
        except EOFError:
            code = self._proc.exitcode
            raise WorkerError(f"{self.name}: the worker process died during {method} (exit code {code}; "
                              "killed for memory?)") from None
        if status != "ok":
            raise WorkerError(f"{self.name}: {method} failed: {payload}")
        return payload

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(timeout=30)
            except (OSError, BrokenPipeError):
                pass
        if self._proc.is_alive():
            self.kill()

    def kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)


class WorkerError(RuntimeError):
    pass


class WorkerTimeout(WorkerError):
    pass


def _worker_main(conn, factory, spec) -> None:
    try:
        target = factory(**spec)
        conn.send(("ok", getattr(target, "info", {})))
    except BaseException as exc:  # noqa: BLE001 (report anything to the driver)
        conn.send(("error", _describe(exc)))
        return
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        method, args, kwargs = message
        try:
            conn.send(("ok", getattr(target, method)(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001
            conn.send(("error", _describe(exc)))


def _describe(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    out_of_memory = " [out of memory]" if is_out_of_memory(exc) else ""
    return f"{type(exc).__name__}: {exc}{out_of_memory}\n" + "".join(tb[-6:])


def run_python(args: list[str], threads: int, log: Path | None = None) -> dict[str, Any]:
    """`python <args>` from the repository root with `threads` OpenMP/torch threads, its output to `log` (else to
    this process's): {"wall_s", "returncode", "peak_rss_mib"}, the peak resident set being the child's own
    (ru_maxrss from os.wait4)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with open(log, "w") if log else contextlib.nullcontext() as out:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT if out else None)
        _, status, usage = os.wait4(proc.pid, 0)
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"wall_s": round(time.perf_counter() - started, 1), "returncode": os.waitstatus_to_exitcode(status),
            "peak_rss_mib": round(rss / 2**20, 1)}
