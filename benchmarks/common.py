"""What every benchmark shares: the environment record, result files, timing.

Memory measurement is in memory_meter.py, worker processes (each system under test in its own, timed side by
side) in workers.py.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
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


# -------------------------------------------------------------------------------------- threads, progress

def set_threads(n: int | None) -> None:
    """Fix torch's intra-op threads (and OpenMP's, for libraries that read it) in this process."""
    import torch

    if n:
        torch.set_num_threads(n)


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
