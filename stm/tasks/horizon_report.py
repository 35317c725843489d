"""What `task=probe` reports about a run's horizon: the file it writes (`horizon.json`), the mechanism's name in it,
and the text table of horizon records that the run prints and `stm.analysis.horizon` gathers."""

from __future__ import annotations

import math
from collections.abc import Sequence

HORIZON_FILE = "horizon.json"  # what stm.analysis.horizon looks for; conf/task/probe.yaml sets task.horizon_file to it


def mechanism_name(run_config: dict | None, memory) -> str:
    """The memory mechanism(s) as chosen in the config ("rmt", "rmt+swa"), else the module's class name."""
    chosen = (run_config or {}).get("memory")
    if isinstance(chosen, dict) and chosen:
        if "_target_" in chosen:
            return chosen["_target_"].rsplit(".", 1)[-1]
        return "+".join(chosen)
    return type(memory).__name__


def training_record(run_config: dict | None) -> dict:
    """How the run was trained, for telling runs of one mechanism apart: the learning rate, the steps and the
    batch size as configured, and `trained_length`, the longest training context (the last curriculum stage's
    `length` / `target_length`, else the training source's) ({} without a config)."""
    cfg = run_config or {}
    optimizer = ((cfg.get("task") or {}).get("optimizer") or {})
    data = cfg.get("data") or {}
    return {key: value for key, value in (("lr", optimizer.get("lr")),
                                          ("max_steps", (cfg.get("trainer") or {}).get("max_steps")),
                                          ("batch_size", data.get("batch_size")),
                                          ("trained_length", _trained_length(data)))
            if value is not None}


def _trained_length(data: dict) -> int | None:
    """The training context length in the source's unit: the last curriculum stage's, else the train source's."""
    stages = data.get("curriculum") or []
    for tree in ([stages[-1]] if stages else []) + [data.get("train_source") or {}]:
        for key in ("length", "target_length"):
            if isinstance(tree, dict) and tree.get(key) is not None:
                return tree[key]
    return None


def _one_or_all(values: set) -> int | list[int] | None:
    """The one value of a set as itself, several as a sorted list, none as None."""
    return None if not values else next(iter(values)) if len(values) == 1 else sorted(values)


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def horizon_table(records: Sequence[dict]) -> str:
    """A text table of horizon records: mechanism, accuracy near, far and overall (with their ranges), and
    the chance level when the records know it."""
    def fmt(group: dict, score: str) -> str:
        acc = group["accuracy"].get(score)
        return "-" if acc is None else f"{100 * acc:5.1f}%"

    def span(group: dict) -> str:
        return f"{group['lo']}+" if group["hi"] is None else f"{group['lo']}-{group['hi']}"

    if not records:
        return "(no horizon records)"
    first = records[0]
    width = max(12, *(len(r["mechanism"]) for r in records))
    near, far = f"near ({span(first['near'])} seg)", f"far ({span(first['far'])} seg)"
    header = f"{'mechanism':<{width}} {near:>16} {far:>16} {'overall':>9} {'n':>6}"
    unit = " per query" if first.get("unit") == "query" else ""
    lines = [f"accuracy{unit} ({first['score']}) by distance from fact to question, in segments of "
             f"{first.get('segment_len')} tokens", header, "-" * len(header)]
    for r in records:
        score = r["score"]
        lines.append(f"{r['mechanism']:<{width}} {fmt(r['near'], score):>16} {fmt(r['far'], score):>16} "
                     f"{fmt(r['overall'], score):>9} {r['overall']['count']:>6}")
    baselines = first.get("baselines", {})
    if baselines.get("uniform_value") is not None:
        chance = baselines["uniform_value"]
        lines.append(f"chance: {100 * chance:.1f}% (one value of {round(1 / chance)})")
    elif baselines.get("majority_answer") is not None:
        lines.append(f"always the most frequent answer: {100 * baselines['majority_answer']:.1f}%")
    return "\n".join(lines)
