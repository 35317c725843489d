"""What every benchmark shares: the environment record, result files, timing, peak memory, worker processes.

Benchmarks here report ratios measured side by side in one run, because these machines are noisy: two
systems timed minutes apart on a shared CPU can differ by more than the effect being measured. So each
system lives in its own worker process (its own model, its own allocator, its own peak-memory record)
and a driver times them in interleaved rounds: round r times a step of every system before round r + 1
begins, in an order that rotates, so a slow patch of the machine falls on all of them alike.

Peak memory on CPU: torch's allocations are invisible to tracemalloc, so we read the process's resident
set instead. Each worker takes its resident size after imports and model build as a baseline, resets the
kernel's high-water mark (`/proc/self/clear_refs`, Linux >= 4.0) and later reports high-water minus
baseline: the *peak extra memory* of the work, on top of the code and weights it needs anyway. On CUDA it
is `torch.cuda.max_memory_allocated` after `torch.cuda.reset_peak_memory_stats`. Where the resident set is
too coarse (the allocator keeps and reuses pages), `LiveTensorBytes` counts the bytes of tensor storage alive at
once, on any device.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

if str(REPO_ROOT) not in sys.path:  # `import stm` from a checkout without an install
    sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------------------------- environment

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None}
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Where and with what a result was measured."""
    import torch

    env = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cuda": None,
        "load_average": load_average(),
        "git": git_commit(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["cuda"] = {
            "device": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda_version": torch.version.cuda,
        }
    for pkg in ("transformers", "x_transformers", "recurrent_memory_transformer_pytorch", "local_attention"):
        env[f"{pkg}_version"] = package_version(pkg)
    return env


def package_version(module: str) -> str | None:
    from importlib import metadata

    dist = {"x_transformers": "x-transformers",
            "recurrent_memory_transformer_pytorch": "recurrent-memory-transformer-pytorch",
            "local_attention": "local-attention"}.get(module, module)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def command_line() -> str:
    """The command that produced a result, as one would type it from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def save_result(name: str, payload: dict[str, Any], results_dir: Path | str | None = None) -> Path:
    """Write `payload` to `<results_dir>/<name>.json` (default `benchmarks/results/`) and return the path."""
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    tmp.replace(path)  # never leave a half-written result behind
    return path


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


# ------------------------------------------------------------------------------------------------- timing

def median(xs: list[float]) -> float:
    return statistics.median(xs)


def time_call(fn: Callable[[], Any], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of `fn` takes (`sync`, e.g. torch.cuda.synchronize, before reading the clock)."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def time_steps(fn: Callable[[], Any], warmup: int, repeats: int,
               sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; the median is the figure we report."""
    for _ in range(warmup):
        fn()
    times = [time_call(fn, sync) for _ in range(repeats)]
    return {"median_s": median(times), "times_s": times, "warmup": warmup, "repeats": repeats}


# ----------------------------------------------------------------------------------------- peak memory

def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return _ru_maxrss_bytes()


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def peak_rss_bytes() -> int:
    """High-water mark of the resident set (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return _ru_maxrss_bytes()


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current resident size; False where the kernel does not allow it
    (then the peak may include what imports touched before the baseline, and is an upper bound)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak extra memory of the work done after `start()`: on CUDA, bytes allocated by torch above what was
    allocated at `start()`; on CPU, resident-set high-water above the resident size at `start()`."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.baseline = 0
        self.exact_reset = True

    def start(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = rss_bytes()
            self.exact_reset = reset_peak_rss()

    def peak_extra(self) -> int:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.baseline)
        return max(0, peak_rss_bytes() - self.baseline)

    def record(self) -> dict[str, Any]:
        return {
            "peak_extra_bytes": self.peak_extra(),
            "baseline_bytes": self.baseline,
            "method": "cuda.max_memory_allocated" if self.device.startswith("cuda") else "rss_high_water",
            "high_water_reset": self.exact_reset,
        }


class LiveTensorBytes:
    """Peak bytes of tensor storage alive at once while the `with` block runs: the working memory of the
    tensors themselves, free of the allocator's caching, fragmentation and page reuse that blur the resident set.

        with LiveTensorBytes() as live:
            model(ids)
        live.peak          # bytes, above what was alive before the block

    Counted with a `TorchDispatchMode`, which sees every aten operation (CPU or GPU): each storage an operation
    creates is added when the operation returns (its inputs are still alive then, so the peak covers them both)
    and taken off when the storage is freed (a weak reference's callback). Storages that existed before the
    block (weights, the input) are not counted, nor views or in-place results of them. Not seen: scratch memory
    a kernel allocates and frees inside one operation (e.g. the blocks of a fused attention kernel), and
    tensors made outside torch's operations. `peak_op` names the operation at which the peak was reached.
    """

    def __init__(self):
        self.current = 0
        self.peak = 0
        self.peak_op: str | None = None
        self.n_storages = 0
        self._live: dict[int, Any] = {}
        self._mode = None

    def __enter__(self) -> LiveTensorBytes:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter._add(func, out, args, kwargs)
                return out

        self._mode = _Count()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._mode = None

    def _add(self, func, out, args, kwargs) -> None:
        import weakref

        import torch
        from torch.utils._pytree import tree_leaves

        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in inputs or key in self._live:
                continue  # empty, a view or in-place result of an input, or already counted
            self._live[key] = weakref.ref(storage, lambda _, key=key, size=size: self._free(key, size))
            self.current += size
            self.n_storages += 1
            if self.current > self.peak:
                self.peak, self.peak_op = self.current, str(func)

    def _free(self, key: int, size: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= size

    def record(self) -> dict[str, Any]:
        return {"peak_live_bytes": self.peak, "peak_op": self.peak_op, "storages_made": self.n_storages,
                "method": "live tensor storage (TorchDispatchMode + weak references)"}


def release_free_memory() -> bool:
    """Give the allocator's free pages back to the kernel (glibc `malloc_trim`), so that an idle worker
    holds only what it still uses; False where there is no glibc."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def limit_address_space(extra_bytes: int) -> int | None:
    """Cap this process's address space at its current size + `extra_bytes`, so that a configuration that
    would not fit fails with a MemoryError/RuntimeError here instead of waking the kernel's OOM killer on a
    shared machine. Returns the cap, or None where it could not be set."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                current = int(line.split()[1]) * 1024
                break
        else:
            return None
        cap = current + int(extra_bytes)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        return cap
    except (OSError, ValueError):
        return None


def is_out_of_memory(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text or "outofmemory" in text


def mib(n_bytes: int | float | None) -> float | None:
    return None if n_bytes is None else round(n_bytes / 2**20, 1)


# ------------------------------------------------------------------------------------- worker processes

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


def set_threads(n: int | None) -> None:
    """Fix torch's intra-op threads (and OpenMP's, for libraries that read it) in this process."""
    import torch

    if n:
        torch.set_num_threads(n)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
