"""Memory horizon: run a horizon sweep (or take finished ones), collect the curves, save them with the machine.

    python benchmarks/horizon.py                      # experiment=horizon, every conf/probe_memory/ preset (CPU)
    python benchmarks/horizon.py --seeds 0,1,2,3,4 --memory rmt --name horizon_rmt_seeds
    python benchmarks/horizon.py --collect logs/horizon/multiruns/<time> --name horizon
    python benchmarks/horizon.py --capacity hydra/launcher=joblib   # experiment=capacity, 2 jobs at a time
    python benchmarks/horizon.py --capacity --init-from <last.ckpt>  # reuse a trained capacity_circuit run

Runs `train.py -m experiment=<experiment> probe_memory=<memory> seed=<seeds> [overrides]` one job at a time
(torch threads as set by --threads), then `stm.analysis.horizon.collect` over the sweep folder(s), and writes
`benchmarks/results/<name>.json` (the command, environment, per-run rows, pooled curves, table) and, with
--plot, the figure. The per-run `horizon.json` and `csv/metrics.csv` are copied under
`benchmarks/results/<name>/` so that the notebook can show them without the logs folder. With --capacity
(experiment=capacity, name capacity) the collected view is the capacity one: accuracy by mechanism and K; the
sweep starts from the two-layer recall circuit, trained first by `train.py experiment=capacity_circuit` (one job,
checked to solve recall inside a segment before the sweep starts) unless --init-from names its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import REPO_ROOT, RESULTS_DIR, command_line, environment, progress, save_result, set_threads

from stm.analysis import horizon


def run_sweep(experiment: str, memory: str, seeds: str, overrides: list[str], sweep_dir: Path, threads: int) -> float:
    """`train.py -m` of the sweep into `sweep_dir`; returns its wall time in seconds."""
    args = [sys.executable, "train.py", "-m", f"experiment={experiment}", f"probe_memory={memory}", f"seed={seeds}",
            f"hydra.sweep.dir={sweep_dir}", "callbacks.progress_bar=null", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    progress(" ".join(args[1:]))
    started = time.time()
    result = subprocess.run(args, cwd=REPO_ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"the sweep failed (exit code {result.returncode}); its jobs are under {sweep_dir}")
    return time.time() - started


def train_circuit(seed: str, stamp: str, threads: int, solve_at: float) -> dict:
    """`train.py experiment=capacity_circuit`: the recall circuit every capacity job starts from. Returns its
    checkpoint, accuracy (per query, inside one segment), step and wall time; exits if it did not solve recall."""
    run_dir = REPO_ROOT / "logs" / "capacity_circuit" / "runs" / f"circuit_{stamp}"
    args = [sys.executable, "train.py", "experiment=capacity_circuit", f"seed={seed}", f"hydra.run.dir={run_dir}",
            "callbacks.progress_bar=null"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    progress(" ".join(args[1:]))
    started = time.time()
    if subprocess.run(args, cwd=REPO_ROOT, env=env).returncode != 0:
        raise SystemExit(f"the circuit run failed; its log is under {run_dir}")
    return {**check_circuit(run_dir / "checkpoints" / "last.ckpt", solve_at), "seconds": time.time() - started}


def check_circuit(checkpoint: Path, solve_at: float) -> dict:
    """The circuit run's final accuracy (its horizon.json, next to `checkpoints/`); exits below `solve_at`."""
    run_dir = checkpoint.resolve().parent.parent
    record = horizon.read_record(run_dir / horizon.HORIZON_FILE, ("overall", "step", "score"), "benchmarks/horizon.py")
    overall = record["overall"]
    accuracy = overall["accuracy"][record["score"]]
    if accuracy is None or accuracy < solve_at:
        raise SystemExit(f"the circuit run ({run_dir}) reached {accuracy} per query (n = {overall['count']}) at step "
                         f"{record['step']}, below {solve_at}: it did not leave the plateau; try another --seeds")
    return {"init_from": str(checkpoint), "accuracy": accuracy, "n": overall["count"], "step": record["step"],
            "seed": record.get("seed")}


def keep_runs(roots: list[Path], target: Path) -> None:
    """Copy each run's horizon.json and CSV log under `target` (one folder per run, named by its place)."""
    if any(target.resolve() in (r.resolve(), *r.resolve().parents) for r in roots):
        return  # collecting the kept runs themselves
    if target.exists():
        shutil.rmtree(target)
    for path in horizon.find_runs(roots):
        run_dir = path.parent
        name = "_".join(run_dir.relative_to(run_dir.parents[1]).parts)
        (target / name).mkdir(parents=True)
        shutil.copy2(path, target / name / path.name)
        metrics = run_dir / "csv" / "metrics.csv"
        if metrics.is_file():
            (target / name / "csv").mkdir()
            shutil.copy2(metrics, target / name / "csv" / "metrics.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", help="default: horizon, or capacity with --capacity")
    parser.add_argument("--capacity", action="store_true",
                        help="experiment=capacity and its view: accuracy by mechanism and number of pairs K")
    parser.add_argument("--memory", default="glob(*)", help="probe_memory choices, comma-separated (default: every "
                        "preset in conf/probe_memory/)")
    parser.add_argument("--seeds", default="0", help="run seeds, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads per job")
    parser.add_argument("--collect", nargs="*", help="only collect these finished sweep folders")
    parser.add_argument("--name", help="results/<name>.json (default: the experiment's name)")
    parser.add_argument("--plot", help="also write the figure here (e.g. docs/horizon.png)")
    parser.add_argument("--solve-at", type=float, default=0.99)
    parser.add_argument("--note", help="free text kept with the result (e.g. the command that ran a collected sweep)")
    parser.add_argument("--init-from", help="with --capacity: the capacity_circuit checkpoint to start every job from "
                        "(default: train one first); with --collect, the one the collected jobs started from")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides for every job")
    args = parser.parse_args()
    args.experiment = args.experiment or ("capacity" if args.capacity else "horizon")
    args.name = args.name or args.experiment
    set_threads(args.threads)
    seconds = None
    circuit = check_circuit(Path(args.init_from), args.solve_at) if args.capacity and args.init_from else None
    if args.collect:
        roots = [Path(p) for p in args.collect]
    else:
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        if args.capacity:
            circuit = circuit or train_circuit(args.seeds.split(",")[0], stamp, args.threads, args.solve_at)
            args.overrides = [f"init_from={circuit['init_from']}", *args.overrides]
        sweep_dir = REPO_ROOT / "logs" / args.experiment / "multiruns" / f"{args.name}_{stamp}"
        seconds = run_sweep(args.experiment, args.memory, args.seeds, args.overrides, sweep_dir, args.threads)
        roots = [sweep_dir]
    result = horizon.collect_capacity(roots) if args.capacity else horizon.collect(roots, args.solve_at)
    print(result["table"])
    if not args.capacity:
        print("solved:", result["solved"])
    keep_runs(roots, RESULTS_DIR / args.name)
    payload = {"command": command_line(), "note": args.note, "environment": environment(),
               "threads_per_job": args.threads, "sweep_seconds": seconds, "circuit": circuit, **result}
    print(f"written {save_result(args.name, payload)}")
    if args.plot and args.capacity:
        horizon.plot_capacity(result, args.plot)
        print(f"written {args.plot}")
    elif args.plot:
        horizon.plot(horizon.load_runs(roots), args.plot)
        print(f"written {args.plot}")


if __name__ == "__main__":
    main()
