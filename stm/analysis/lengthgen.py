"""Length generalisation: gather the `babilong.json` of a sweep's runs into one table, mechanism x task x length.

    python -m stm.analysis.lengthgen logs/babilong_lengthgen/multiruns/<time> \\
        --out benchmarks/results/babilong_lengthgen.json

Every folder is searched recursively for `babilong.json` (one per run, written by `stm.tasks.ProbeTask` after a
validation of several lengths or of BABILong examples: counts and correct answers per length and task). Runs of
the same mechanism (same memory config, told apart as `stm.analysis.horizon` does) are pooled: their correct answers and
counts are summed per length and task (so seeds pool), the accuracy and its binomial standard error computed
from the sums, and "mean" is the tasks' accuracies averaged (BABILong's QA1-5 average).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from stm.analysis.horizon import _order, _plain, find_runs, label_of, read_record
from stm.tasks.scores_by_length import LENGTHS_FILE, _natural, binomial_stderr, lengths_table, mean_stderr


def load_run(path: str | Path) -> dict:
    """A run's babilong.json with `path` and `run_dir` added; a file that is not one is an error naming it."""
    return read_record(path, ("mechanism", "score", "lengths", "tasks", "cells"), reader="stm.analysis.lengthgen")


def load_runs(roots: Iterable[str | Path]) -> list[dict]:
    """Every run under `roots`, in mechanism order (as stm.analysis.horizon: none, full, swa, xl, rmt, armt, others)."""
    roots = list(roots)
    runs = [load_run(p) for p in find_runs(roots, LENGTHS_FILE)]
    if not runs:
        raise FileNotFoundError(f"stm.analysis.lengthgen: no {LENGTHS_FILE} under {[str(r) for r in roots]}")
    return sorted(runs, key=_order)


def lengthgen(runs: Sequence[dict], score: str | None = None) -> dict:
    """Pooled accuracy per (mechanism label, length, task): {"score", "lengths", "tasks", "labels", "cells":
    [{"label", "mechanism", "length", "task", "n", "correct", "accuracy", "stderr", "runs"}, ...] (tasks, then
    "mean" of a label's tasks at a length), "runs": [{"label", "mechanism", "seed", "step", "path"}], "table"}."""
    if not runs:
        raise ValueError("stm.analysis.lengthgen: no runs")
    score = score or runs[0]["score"]
    pooled: dict[tuple[str, str, str], dict] = {}
    for run in runs:
        if score not in run.get("scores", [run["score"]]):
            raise ValueError(f"stm.analysis.lengthgen: {run['path']} has no score {score!r} "
                             f"(it has {run.get('scores')})")
        label = label_of(run, runs)
        for c in run["cells"]:
            if c["task"] in ("all", "mean"):
                continue  # recomputed from the pooled tasks
            cell = pooled.setdefault((label, c["length"], c["task"]), {
                "label": label, "mechanism": run["mechanism"], "length": c["length"], "task": c["task"], "n": 0,
                "correct": 0.0, "runs": 0})
            cell["n"] += c["n"]
            cell["correct"] += c["correct"][score]
            cell["runs"] += 1
    labels = list(dict.fromkeys(label for label, _, _ in pooled))  # the runs come in mechanism order
    lengths = sorted({length for _, length, _ in pooled}, key=_natural)
    tasks = sorted({task for _, _, task in pooled}, key=_natural)
    cells = []
    for label in labels:
        for length in lengths:
            row = []
            for task in tasks:
                cell = pooled.get((label, length, task))
                if cell is not None:
                    accuracy = cell["correct"] / cell["n"] if cell["n"] else None
                    row.append({**cell, "accuracy": accuracy, "stderr": binomial_stderr(accuracy, cell["n"])})
            cells += row
            if len(row) > 1 and all(c["accuracy"] is not None for c in row):
                cells.append({"label": label, "mechanism": row[0]["mechanism"], "length": length, "task": "mean",
                              "n": sum(c["n"] for c in row), "n_tasks": len(row),
                              "accuracy": sum(c["accuracy"] for c in row) / len(row),
                              "stderr": mean_stderr([(c["correct"], c["n"]) for c in row]),
                              "runs": max(c["runs"] for c in row)})
    result = {"score": score, "lengths": lengths, "tasks": tasks, "labels": labels, "cells": cells,
              "length_unit": runs[0].get("length_unit"), "segment_len": runs[0].get("segment_len"),
              "runs": [{"label": label_of(run, runs), "mechanism": run["mechanism"], "seed": run.get("seed"),
                        "step": run.get("step"), "path": run["path"]} for run in runs]}
    result["table"] = lengthgen_table(result)
    return result


def lengthgen_table(result: dict) -> str:
    """One block per mechanism: task rows (and their mean) by length columns, accuracy ± standard error (n)."""
    blocks = []
    score, unit = result["score"], result.get("length_unit")
    for label in result["labels"]:
        cells = [{**c, "accuracy": {score: c["accuracy"]}, "stderr": {score: c["stderr"]}}
                 for c in result["cells"] if c["label"] == label]
        record = {"score": score, "lengths": result["lengths"], "tasks": result["tasks"], "cells": cells}
        blocks.append(lengths_table(record, score, title=f"{label}: accuracy % ({score}) by task and length"
                                    f"{f' ({unit})' if unit else ''}, ± binomial standard error, (examples)"))
    return "\n\n".join(blocks)


def collect(roots: Iterable[str | Path], score: str | None = None) -> dict:
    """The table of the runs under `roots` (`lengthgen`), with the roots."""
    roots = list(roots)
    return {"roots": [str(r) for r in roots], **lengthgen(load_runs(roots), score)}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stm.analysis.lengthgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help=f"sweep folders (searched for {LENGTHS_FILE}) or such files")
    parser.add_argument("--out", help="write the pooled cells, the runs and the table to this JSON file")
    parser.add_argument("--score", help="which score (default: each run's first, e.g. first_sentence)")
    args = parser.parse_args(argv)
    result = collect(args.roots, args.score)
    print(result["table"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=_plain) + "\n")
        print(f"written {args.out}")
    return result


if __name__ == "__main__":
    main()
