"""BABILong zero-shot: a pretrained LM (SmolLM2-135M-Instruct by default) on QA1-QA5 at several lengths in its
tokens, under each memory mechanism, as it is (no training); results file, table and figure.

    python benchmarks/babilong_zeroshot.py      # none, xl, swa, full at 0-32K; 20 per task to 8K, fewer beyond
    python benchmarks/babilong_zeroshot.py --lengths 0,1024,2048 --per-task 10 --full-max 1024
    python benchmarks/babilong_zeroshot.py --collect logs/babilong/multiruns/<dir>      # runs already made
    python benchmarks/babilong_zeroshot.py --mechanisms none --sweep-dir <dir>   # (re)run one into a sweep

One `python eval.py experiment=babilong lm_memory=<mechanism>` per mechanism, one at a time (torch threads as
set by --threads), each validating every length in one run (`data.val_lengths` as a mapping: per length its
target_length and n_samples = --per-task x 5 tasks; full attention only up to --full-max). Then
`stm.analysis.lengthgen.collect` pools the runs' babilong.json into mechanism x task x length cells (accuracy, n,
binomial standard error), written to benchmarks/results/<name>.json with the machine, the commands, each run's
wall time (a run records its command and time in run.json beside its babilong.json) and the context lengths the
model read (tokens, from every example); each run's babilong.json (every output) is kept under
benchmarks/results/<name>/; the figure (one task x length heatmap per mechanism, as the BABILong paper draws
them) goes to --plot. `benchmarks/report.py` renders the README section. Cost on one CPU thread: about 5 ms per
context token (SmolLM2-135M), so 20 per task up to 8K under four mechanisms is hours; size it with the options.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import time
from pathlib import Path

from common import REPO_ROOT, RESULTS_DIR, command_line, environment, progress, save_result, set_threads
from workers import run_python

from stm.analysis import lengthgen
from stm.analysis.horizon import find_runs
from stm.tasks.scores_by_length import LENGTHS_FILE

MECHANISMS = "none,xl,swa,full"
LENGTHS = "0,1024,2048,4096,8192,16384,32768"
PER_TASK = "20,16384:10,32768:5"
N_TASKS = 5
RUN_FILE = "run.json"  # written beside each run's babilong.json: its command and wall time
SWEEP_FILE = "sweep.json"  # in the sweep's folder: the command that ran it


def parse_per_task(spec: str, lengths: list[int]) -> dict[int, int]:
    """"20,16384:10" -> {length: samples per task}: 20 everywhere but 10 at 16384."""
    default, special = None, {}
    for part in str(spec).split(","):
        if ":" in part:
            length, n = part.split(":")
            special[int(length)] = int(n)
        else:
            default = int(part)
    if default is None and set(lengths) - set(special):
        raise SystemExit(f"--per-task {spec!r} gives no count for {sorted(set(lengths) - set(special))}")
    counts = {length: special.get(length, default) for length in lengths}
    if any(n <= 0 for n in counts.values()):
        raise SystemExit(f"--per-task {spec!r}: counts must be positive")
    return counts


def length_label(n: int | str) -> str:
    """1024 -> "1K", 0 -> "0"."""
    n = int(n)
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def val_lengths_override(counts: dict[int, int]) -> list[str]:
    """eval.py overrides replacing data.val_lengths by a mapping {length: {target_length, n_samples}}."""
    sets = ",".join(f"{length}:{{target_length:{length},n_samples:{n * N_TASKS}}}" for length, n in counts.items())
    return ["~data.val_lengths", f"+data.val_lengths={{{sets}}}"]


def run_mechanism(mechanism: str, counts: dict[int, int], out: Path, threads: int, overrides: list[str]) -> dict:
    """One eval.py run of `mechanism` at the lengths of `counts`; returns its command, wall time and exit code."""
    args = ["eval.py", "experiment=babilong", f"lm_memory={mechanism}", *val_lengths_override(counts),
            f"hydra.run.dir={out}", *overrides]
    progress(" ".join(args))
    record = {"mechanism": mechanism, "command": "python " + " ".join(args), "threads": threads,
              **run_python(args, threads), "dir": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    (out / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_runs(roots: list[Path]) -> dict[Path, dict]:
    """{path: record} for every babilong.json under `roots`, each file read once."""
    return {path: json.loads(path.read_text()) for path in find_runs(roots, LENGTHS_FILE)}


def context_tokens(records: dict[Path, dict]) -> dict:
    """{mechanism: {length: {n, min, mean, max}}}: the context tokens each example was read with (prompt and
    template included), from the runs' babilong.json records (read_runs); several runs of one mechanism (e.g.
    short lengths in one run, long ones in another) are pooled."""
    read: dict[str, dict[str, list[int]]] = {}
    for record in records.values():
        by_length = read.setdefault(record["mechanism"], {})
        for e in record.get("examples") or []:
            if e.get("context_tokens") is not None:
                by_length.setdefault(e["length"], []).append(int(e["context_tokens"]))
    return {mechanism: {length: {"n": len(v), "min": min(v), "mean": round(statistics.fmean(v), 1), "max": max(v)}
                        for length, v in by_length.items()} for mechanism, by_length in read.items()}


def model_name(config_file: Path) -> str:
    """The evaluated model, from a run's config_resolved.yaml: its name_or_path, else its builder's name."""
    if not config_file.is_file():
        return "the model"
    from omegaconf import OmegaConf

    model = OmegaConf.load(config_file).model
    return str(model.get("name_or_path") or model["_target_"].rsplit(".", 1)[-1])


def kept_name(record: dict, several: bool) -> str:
    """The file a run's babilong.json is kept as: <mechanism>.json, or <mechanism>_<lengths>.json (e.g.
    xl_8K-16K-32K.json) where a mechanism has several runs."""
    if not several:
        return f"{record['mechanism']}.json"
    return f"{record['mechanism']}_{'-'.join(length_label(n) for n in record['lengths'])}.json"


def keep_runs(roots: list[Path], records: dict[Path, dict], target: Path) -> None:
    """Copy each run's babilong.json (`records`, from read_runs(roots)) to target/ (named by kept_name); two runs of
    one mechanism at the same lengths are an error (they would be pooled twice over if kept and collected again)."""
    if any(target.resolve() in (r.resolve(), *r.resolve().parents) for r in roots):
        return  # collecting the kept runs themselves
    per_mechanism = collections.Counter(r["mechanism"] for r in records.values())
    names: dict[str, Path] = {}
    for path, record in records.items():
        name = kept_name(record, per_mechanism[record["mechanism"]] > 1)
        if name in names:
            raise SystemExit(f"{path} and {names[name]}: two runs of {record['mechanism']} at the same lengths; "
                             "collect one of them")
        names[name] = path
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name, path in names.items():
        shutil.copy2(path, target / name)


def plot(result: dict, path: str | Path) -> None:
    """One heatmap per mechanism: tasks (rows) x lengths (columns), accuracy in % in each cell, blank where a
    mechanism was not run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels, lengths, tasks = result["labels"], result["lengths"], result["tasks"]
    cells = {(c["label"], c["length"], c["task"]): c for c in result["cells"]}
    fig, axes = plt.subplots(1, len(labels), figsize=(1.0 + 0.75 * len(lengths) * len(labels), 2.9), squeeze=False,
                             sharey=True)
    for ax, label in zip(axes[0], labels):
        grid = np.full((len(tasks), len(lengths)), np.nan)
        for i, task in enumerate(tasks):
            for j, length in enumerate(lengths):
                cell = cells.get((label, length, task))
                if cell is not None and cell["accuracy"] is not None:
                    grid[i, j] = 100 * cell["accuracy"]
        ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=100, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(tasks)), [t.upper() for t in tasks])
        ax.set_title(label)
        ax.set_xlabel("context length (tokens)")
    fig.suptitle(f"{result.get('model', 'zero-shot')}: BABILong accuracy (%)", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def collect(roots: list[Path], name: str) -> dict:
    """The results file's content from finished runs under `roots`: lengthgen's cells, and what the runs were
    (their commands and wall times, sample counts per task and length, mechanisms and their options, the
    tokens read); each run's babilong.json is kept under results/<name>/."""
    result = lengthgen.collect(roots)
    records = read_runs(roots)
    keep_runs(roots, records, RESULTS_DIR / name)
    first_path, first = next(iter(records.items()))
    sweeps = [json.loads(p.read_text()) for p in find_runs(roots, SWEEP_FILE)]
    eval_runs = [json.loads(p.read_text()) for p in find_runs(roots, RUN_FILE)]
    tasks = [c for c in result["cells"] if c["task"] not in ("mean", "all")]
    full = [int(c["length"]) for c in tasks if c["mechanism"] == "full"]
    threads = sorted({r.get("threads") for r in eval_runs if r.get("threads") is not None})
    commands = list(dict.fromkeys(s["command"] for s in sweeps)) or [command_line()]
    # the model from the first run that kept its config (runs collected from kept babilong.json files have none)
    configs = [c for c in (path.parent / "config_resolved.yaml" for path in records) if c.is_file()]
    return {"command": " && ".join(commands), "environment": environment(),
            "config": {"threads": threads[0] if len(threads) == 1 else threads or None,
                       "mechanisms": result["labels"], "lengths": [int(n) for n in result["lengths"]],
                       "per_task": {n: max(c["n"] for c in tasks if c["length"] == n) for n in result["lengths"]},
                       "full_max": max(full) if full else None, "segment_len": first.get("segment_len"),
                       "memory": {r["mechanism"]: r["memory"] for r in records.values()},
                       "val_source": first.get("val_source")},
            "eval_runs": eval_runs, "context_tokens": context_tokens(records),
            **result, "model": model_name(configs[0] if configs else first_path.parent / "config_resolved.yaml")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mechanisms", default=MECHANISMS, help="conf/lm_memory presets, comma-separated")
    parser.add_argument("--lengths", default=LENGTHS, help="target lengths in the model's tokens (0: story alone)")
    parser.add_argument("--per-task", default=PER_TASK, help="samples per task and length: a default count, then "
                        "LENGTH:COUNT exceptions, e.g. 20,16384:10,32768:5")
    parser.add_argument("--full-max", type=int, default=8192, help="full attention only up to this length")
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of each run")
    parser.add_argument("--collect", nargs="*", help="only collect these finished runs' folders")
    parser.add_argument("--sweep-dir", help="run into this folder (default: a new one under logs/babilong/multiruns); "
                        "its runs of other mechanisms are collected too")
    parser.add_argument("--name", default="babilong_zeroshot", help="results/<name>.json")
    parser.add_argument("--plot", help="the figure (default: results/<name>.png)")
    parser.add_argument("--note", help="free text kept with the result")
    parser.add_argument("overrides", nargs="*", help="more eval.py overrides for every run (e.g. model=...)")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.collect:
        roots = [Path(p) for p in args.collect]
    else:
        lengths = [int(n) for n in args.lengths.split(",")]
        counts = parse_per_task(args.per_task, lengths)
        sweep = Path(args.sweep_dir) if args.sweep_dir else \
            REPO_ROOT / "logs" / "babilong" / "multiruns" / f"{args.name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        sweep.mkdir(parents=True, exist_ok=True)
        if not (sweep / SWEEP_FILE).is_file():
            (sweep / SWEEP_FILE).write_text(json.dumps({"command": command_line()}, indent=2) + "\n")
        for mechanism in args.mechanisms.split(","):
            mine = {n: c for n, c in counts.items() if mechanism != "full" or n <= args.full_max}
            run = run_mechanism(mechanism, mine, sweep / mechanism, args.threads, args.overrides)
            if run["returncode"] != 0:
                progress(f"{mechanism}: eval.py failed (exit code {run['returncode']}); see {sweep / mechanism}")
        roots = [sweep]
    payload = collect(roots, args.name)
    payload["note"] = args.note
    print(payload["table"])
    print(f"written {save_result(args.name, payload)}")
    figure = args.plot or RESULTS_DIR / f"{args.name}.png"
    plot(payload, figure)
    print(f"written {figure}")

if __name__ == "__main__":
    main()
