"""Accuracy by validation set (length) and task, for probes validated at several lengths (`data.val_lengths`)
or over several BABILong tasks: every scored unit's scores, gathered across ranks (`ExampleScores`), counted
per (set, task) with the binomial standard error (`accuracy_by_length`), and shown as a task x length table
(`lengths_table`). `task=probe` writes the counts to `LENGTHS_FILE` in the run folder; `stm.analysis.lengthgen` pools
the files of a sweep."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

LENGTHS_FILE = "babilong.json"


class ExampleScores(Metric):
    """The index of every scored unit (a validation example, or a query of one) and its scores, gathered across
    ranks: grouped afterwards by what the example's meta says (its set, its task). Rows with index -1 are
    placeholders (every rank updates at least once) and are dropped by `compute`."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, n_scores: int, **kwargs):
        super().__init__(**kwargs)
        self.n_scores = n_scores
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, index: int, values) -> None:
        self.index.append(torch.tensor([int(index)], dtype=torch.long, device=self.device))
        self.values.append(torch.tensor([[float(v) for v in values]], dtype=torch.float64, device=self.device))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (N,), values (N, n_scores)) of the units scored on all ranks, placeholders dropped."""
        index = dim_zero_cat(self.index) if len(self.index) else torch.zeros(0, dtype=torch.long)
        values = dim_zero_cat(self.values) if len(self.values) else torch.zeros(0, self.n_scores)
        values = values.reshape(-1, self.n_scores)
        keep = index >= 0
        return index[keep], values[keep]


def set_and_task(meta: dict) -> tuple[str, str]:
    """What an example is counted under by length and task: its validation set (`val_set`, else its target
    length, else "all") and its task (`task`, else the probe's kind)."""
    name = meta.get("val_set")
    if name is None:
        name = str(meta["target_length"]) if "target_length" in meta else "all"
    return str(name), str(meta.get("task") or meta.get("probe") or "all")


def _natural(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def binomial_stderr(accuracy: float | None, n: int) -> float | None:
    """sqrt(p (1 - p) / n): the standard error of an accuracy over n independent examples."""
    return None if accuracy is None or n <= 0 else math.sqrt(max(accuracy * (1 - accuracy), 0.0) / n)


def mean_stderr(counts: Sequence[tuple[float, int]]) -> float | None:
    """Standard error of the mean of several tasks' accuracies, from each task's (correct, n): sqrt(sum_t
    v_t / n_t) / T, where v_t = q (1 - q) with q = (correct + 1) / (n + 2), the smoothed (Laplace) accuracy, so
    that a task at 0% or 100% still adds its uncertainty (the plug-in p (1 - p) would add none: five tasks at 0
    or 100% of 2 each would report a mean of, e.g., 20% with no error at all)."""
    if not counts or any(n <= 0 for _, n in counts):
        return None
    variances = [q * (1 - q) / n for q, n in (((c + 1) / (n + 2), n) for c, n in counts)]
    return math.sqrt(sum(variances)) / len(counts)


def accuracy_by_length(metas: Sequence[dict], index: Sequence[int], values, scores: Sequence[str]) -> dict:
    """Accuracy per (set, task) of scored units: `index[k]` is unit k's example (its meta `metas[index[k]]`) and
    `values[k]` its scores, in the order of `scores`. Returns {"lengths": set names (in the order of their
    first example), "tasks": task names (natural order), "cells": [{"length", "task", "n", "correct",
    "accuracy", "stderr"}, ...]} with, per set, the task "all" (every unit pooled) and, with several tasks, "mean"
    (the tasks' accuracies averaged, as BABILong reports; its stderr from theirs, n the units it covers)."""
    sums: dict[tuple[str, str], list] = {}
    first: dict[str, int] = {}
    for k, i in enumerate(index):
        i = int(i)
        length, task = set_and_task(metas[i])
        first[length] = min(first.get(length, i), i)
        for key in ((length, task), (length, "all")):
            cell = sums.setdefault(key, [0, [0.0] * len(scores)])
            cell[0] += 1
            cell[1] = [c + float(v) for c, v in zip(cell[1], values[k])]
    lengths = sorted(first, key=first.get)
    tasks = sorted({task for _, task in sums if task != "all"}, key=_natural)

    def cell(length: str, task: str, n: int, correct: list[float]) -> dict:
        accuracy = {s: c / n if n else None for s, c in zip(scores, correct)}
        return {"length": length, "task": task, "n": n, "correct": dict(zip(scores, correct)),
                "accuracy": accuracy, "stderr": {s: binomial_stderr(accuracy[s], n) for s in scores}}

    cells = []
    for length in lengths:
        per_task = [cell(length, t, *sums[(length, t)]) for t in tasks if (length, t) in sums]
        cells += per_task + [cell(length, "all", *sums[(length, "all")])]
        if len(per_task) > 1:
            cells.append({"length": length, "task": "mean", "n": sum(c["n"] for c in per_task),
                          "n_tasks": len(per_task),
                          "accuracy": {s: sum(c["accuracy"][s] for c in per_task) / len(per_task) for s in scores},
                          "stderr": {s: mean_stderr([(c["correct"][s], c["n"]) for c in per_task]) for s in scores}})
    return {"lengths": lengths, "tasks": tasks, "cells": cells}


def lengths_table(record: dict, score: str | None = None, title: str | None = None) -> str:
    """Task x length: accuracy ± binomial standard error (n) per cell, from `accuracy_by_length`'s record (or a
    babilong.json); the rows "mean" (tasks averaged) and "all" (examples pooled) last."""
    score = score or record["score"]
    cells = {(c["length"], c["task"]): c for c in record["cells"]}
    rows = [t for t in record["tasks"]] + [t for t in ("mean", "all") if any(k[1] == t for k in cells)]
    if len(record["tasks"]) == 1 and "all" in rows:
        rows.remove("all")
    col = 20

    def fmt(c: dict | None) -> str:
        if c is None or c["accuracy"][score] is None:
            return "-"
        return f"{100 * c['accuracy'][score]:5.1f}±{100 * c['stderr'][score]:.1f} ({c['n']})"

    width = max(8, *(len(r) for r in rows))
    header = f"{'task':<{width}}" + "".join(f"{name:>{col}}" for name in record["lengths"])
    unit = record.get("length_unit")
    lines = [title or f"accuracy % ({score}) by task and length{f' ({unit})' if unit else ''}: ± binomial standard "
             f"error, (examples)", header, "-" * len(header)]
    lines += [f"{row:<{width}}" + "".join(f"{fmt(cells.get((length, row))):>{col}}" for length in record["lengths"])
              for row in rows]
    return "\n".join(lines)
