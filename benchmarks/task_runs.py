"""One CPU-sized training run per task (and memory=none vs a memory for some), through the real `train.py`.

    python benchmarks/task_runs.py                   # every run below, one after another
    python benchmarks/task_runs.py --only summarization/xl --steps 100

Each run is `python train.py task=<task> memory=<memory> <overrides>` in its own output folder; the
script records the wall time of the whole command, and the final validation metrics stm wrote to the run's
CSV log (the last row holding them) and its sample table. Results go to benchmarks/results/task_runs.json
(rendered into the README by `python benchmarks/report.py --write-readme`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

RUNS = [  # (task, memory, extra overrides): translation and summarization with and without memory
    ("summarization", "none", []),
    ("summarization", "xl", ["memory.xl.mem_len=512"]),
    ("translation", "none", []),
    ("translation", "xl", ["memory.xl.mem_len=512"]),
    ("dialogue", "none", []),
    ("qa", "none", []),
]


def final_validation(out: Path) -> dict[str, float]:
    """The last logged value of every val/ metric in the run's metrics.csv."""
    files = sorted(out.rglob("metrics.csv"))
    if not files:
        raise FileNotFoundError(f"no metrics.csv under {out}")
    last: dict[str, float] = {}
    with open(files[-1]) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("val/") and value not in ("", None):
                    last[key] = float(value)
    return last


def samples(out: Path, n: int = 2) -> list[dict]:
    files = sorted(out.rglob("samples/val_samples_step*.jsonl"), key=lambda p: int(p.stem.rsplit("step", 1)[1]))
    if not files:
        return []
    rows = [json.loads(line) for line in files[-1].read_text().splitlines()][:n]
    return [{"reference": r["reference"][:200], "output": r["output"][:200]} for r in rows]


def run_one(task: str, memory: str, extra: list[str], steps: int | None, root: Path) -> dict:
    out = root / f"{task}-{memory}"
    args = [f"task={task}", f"memory={memory}", f"hydra.run.dir={out}", *extra]
    if steps is not None:
        args += [f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}"]
    command = "python train.py " + " ".join(args[:2] + args[3:])
    print(f"[task_runs] {command}", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", *args], cwd=common.REPO_ROOT, capture_output=True,
                            text=True, env=dict(os.environ, WANDB_MODE="offline"))
    wall = time.perf_counter() - started
    if result.returncode != 0:
        return {"task": task, "memory": memory, "command": command, "error": result.stderr[-2000:]}
    metrics = final_validation(out)
    print(f"[task_runs]   {wall:.0f} s  " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()), flush=True)
    return {"task": task, "memory": memory, "command": command, "wall_s": round(wall, 1), "metrics": metrics,
            "samples": samples(out)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", help="task/memory pairs to run, e.g. summarization/xl")
    p.add_argument("--steps", type=int, default=300, help="trainer.max_steps (validation at the end)")
    p.add_argument("--out", default=str(common.RESULTS_DIR / "task_runs.json"))
    args = p.parse_args(argv)
    runs = [r for r in RUNS if not args.only or f"{r[0]}/{r[1]}" in args.only]
    with tempfile.TemporaryDirectory(prefix="stm-task-runs-") as tmp:
        results = [run_one(task, memory, extra, args.steps, Path(tmp)) for task, memory, extra in runs]
    data = {"benchmark": "task_runs", "environment": common.environment(), "command": common.command_line(),
            "config": {"steps": args.steps}, "results": results}
    Path(args.out).write_text(json.dumps(data, indent=2))
    print(f"[task_runs] wrote {args.out}")


if __name__ == "__main__":
    main()
