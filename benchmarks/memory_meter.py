"""Memory measurement for the benchmarks: resident set and its high-water mark, peak extra memory of a piece of
work (`PeakMemory`), live tensor bytes (`LiveTensorBytes`), handing free pages back, capping the address space,
telling an out-of-memory error, bytes as MiB. (Moved out of common.py.)

Peak memory on CPU: torch's allocations are invisible to tracemalloc, so we read the process's resident
set instead. Each worker takes its resident size after imports and model build as a baseline, resets the
kernel's high-water mark (`/proc/self/clear_refs`, Linux >= 4.0) and later reports high-water minus
baseline: the *peak extra memory* of the work, on top of the code and weights it needs anyway. On CUDA it
is `torch.cuda.max_memory_allocated` after `torch.cuda.reset_peak_memory_stats`. Where the resident set is
too coarse (the allocator keeps and reuses pages), `LiveTensorBytes` counts the bytes of tensor storage alive at
once, on any device.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path
from typing import Any


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
