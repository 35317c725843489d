"""Horizon curves: gather the `horizon.json` of a sweep's runs (task=probe), tabulate and plot them.

    python -m stm.analysis.horizon logs/horizon/multiruns/<time> [more folders] --out horizon.json --plot horizon.png

Every folder is searched recursively for `horizon.json` files (one per run, written by `stm.tasks.ProbeTask`
after its last validation). A run's record is that file, plus where it lies and what else the run left there:
its CSV metrics (`csv/metrics.csv`) and wandb offline runs (`wandb/offline-run-*`). Runs of the same mechanism
(same memory config) are one curve: accuracy by distance bucket (correct / count summed over the runs, so
seeds pool), and the per-run numbers stay in the table, with how many runs `solved` the probe (accuracy over
`far` at least `solve_at`).

The capacity view (`--capacity`, for `experiment=capacity`: multi-query recall at several K) tabulates the
overall accuracy (per query, pooled over seeds) by mechanism and number of pairs K, and plots it against K:

    python -m stm.analysis.horizon logs/capacity/multiruns/<time> --capacity --out capacity.json --plot capacity.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from stm.tasks.horizon_report import HORIZON_FILE, horizon_table

MECHANISM_ORDER = ("none", "full", "swa", "xl", "rmt", "armt")


def find_runs(roots: Iterable[str | Path], filename: str = HORIZON_FILE) -> list[Path]:
    """The `filename` files under each root (a file itself is taken as is), sorted by path."""
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_file():
            found.append(root)
        elif root.is_dir():
            found += sorted(root.rglob(filename))
        else:
            raise FileNotFoundError(f"stm.analysis.horizon: {root} does not exist")
    return found


def read_record(path: str | Path, keys: Sequence[str], reader: str = "stm.analysis.horizon") -> dict:
    """The JSON record a probe run wrote at `path`, with `path` and `run_dir` added; a file that cannot be read
    or lacks one of `keys` is an error naming it (`reader` names who reads it)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{reader}: cannot read {path} as JSON ({err})") from err
    for key in keys:
        if key not in record:
            raise ValueError(f"{reader}: {path} has no {key!r}: not a {path.name} written by task=probe")
    record.update(path=str(path), run_dir=str(path.parent))
    return record


def load_run(path: str | Path) -> dict:
    """A run's horizon record with `run_dir`, `csv` (path or None) and `wandb` (offline run folders) added."""
    record = read_record(path, ("mechanism", "edges", "buckets", "overall", "score"))
    path = Path(path)
    run_dir = path.parent
    metrics = run_dir / "csv" / "metrics.csv"
    record.update(path=str(path), run_dir=str(run_dir), csv=str(metrics) if metrics.is_file() else None,
                  wandb=[str(p) for p in sorted((run_dir / "wandb").glob("offline-run-*"))])
    return record


def load_runs(roots: Iterable[str | Path]) -> list[dict]:
    """Every run under `roots`, in mechanism order (none, full, swa, xl, rmt, then others), then by seed."""
    runs = [load_run(p) for p in find_runs(roots)]
    if not runs:
        raise FileNotFoundError(f"stm.analysis.horizon: no {HORIZON_FILE} under {[str(r) for r in roots]}")
    return sorted(runs, key=_order)


def _order(run: dict) -> tuple:
    name = run["mechanism"]
    rank = MECHANISM_ORDER.index(name) if name in MECHANISM_ORDER else len(MECHANISM_ORDER)
    probe = run.get("val_source") or {}
    size = probe.get("target_length", probe.get("length"))
    return rank, name, str(run.get("memory")), size if isinstance(size, (int, float)) else 0, run.get("seed") or 0, \
        run["path"]


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A Lightning CSV log -> {metric: [(step, value), ...]} for the cells that hold a value."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def label_of(run: dict, runs: Sequence[dict], ignore: Collection[str] = ()) -> str:
    """The mechanism, with the memory, probe and training options (e.g. the context length, the learning rate)
    that tell it apart from other runs of the same mechanism; seeds do not, nor the options named in `ignore`
    (e.g. "probe.n_pairs")."""
    def options(r: dict) -> dict:
        flat = {**_flat(r.get("memory") or {}), **_flat(r.get("val_source") or {}, "probe."),
                **_flat(r.get("training") or {}, "train.")}
        return {k: v for k, v in flat.items() if k not in ignore}

    same = [options(r) for r in runs if r["mechanism"] == run["mechanism"]]
    mine = options(run)  # an option a run does not record (an older horizon.json) is no difference
    differing = {k: v for k, v in mine.items() if any(k in o and o[k] != v for o in same)}
    if not differing:
        return run["mechanism"]
    shown = ", ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in sorted(differing.items()))
    return f"{run['mechanism']} ({shown})"


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def curves(runs: Sequence[dict], score: str | None = None) -> dict[str, dict]:
    """One curve per label: {label: {"lo": [...], "hi": [...], "count": [...], "correct": [...],
    "accuracy": [...] (None where no example), "runs": n, "seeds": [...]}}, correct and count summed over runs."""
    out: dict[str, dict] = {}
    for run in runs:
        s = score or run["score"]
        label = label_of(run, runs)
        curve = out.get(label)
        if curve is None:
            curve = out[label] = {"mechanism": run["mechanism"], "memory": run.get("memory"), "score": s,
                                  "lo": [b["lo"] for b in run["buckets"]], "hi": [b["hi"] for b in run["buckets"]],
                                  "names": [b["name"] for b in run["buckets"]], "count": [0] * len(run["buckets"]),
                                  "correct": [0.0] * len(run["buckets"]), "runs": 0, "seeds": [],
                                  "segment_len": run.get("segment_len"), "baselines": run.get("baselines", {})}
        if [b["name"] for b in run["buckets"]] != curve["names"]:
            raise ValueError(f"stm.analysis.horizon: {run['path']} has buckets {[b['name'] for b in run['buckets']]}, "
                             f"other runs of {label} have {curve['names']}: use the same task.edges")
        for k, bucket in enumerate(run["buckets"]):
            curve["count"][k] += bucket["count"]
            curve["correct"][k] += bucket["correct"][s]
        curve["runs"] += 1
        curve["seeds"].append(run.get("seed"))
    for curve in out.values():
        curve["accuracy"] = [c / n if n else None for c, n in zip(curve["correct"], curve["count"])]
    return out


def summary(runs: Sequence[dict], solve_at: float = 0.99) -> list[dict]:
    """Per run: label, seed, near, far, overall, truncated count, solved (far >= solve_at), steps."""
    rows = []
    for run in runs:
        s = run["score"]
        far = run["far"]["accuracy"].get(s)
        rows.append({"label": label_of(run, runs), "mechanism": run["mechanism"], "seed": run.get("seed"),
                     "near": run["near"]["accuracy"].get(s), "far": far, "overall": run["overall"]["accuracy"].get(s),
                     "n": run["overall"]["count"], "truncated": run["truncated"]["count"],
                     "near_range": [run["near"]["lo"], run["near"]["hi"]],
                     "far_range": [run["far"]["lo"], run["far"]["hi"]],
                     "solved": far is not None and far >= solve_at, "step": run.get("step"), "run_dir": run["run_dir"]})
    return rows


def solved_counts(rows: Sequence[dict]) -> dict[str, str]:
    """{label: "k/n"}: how many of a label's runs solved the probe."""
    out: dict[str, list[int]] = {}
    for row in rows:
        k, n = out.get(row["label"], [0, 0])
        out[row["label"]] = [k + int(row["solved"]), n + 1]
    return {label: f"{k}/{n}" for label, (k, n) in out.items()}


def table(runs: Sequence[dict]) -> str:
    """The per-run table of `stm.tasks.horizon_report.horizon_table`, labelled, with seeds."""
    labelled = [{**run, "mechanism": label_of(run, runs) + (f" s{run['seed']}" if _many_seeds(runs) else "")}
                for run in runs]
    return horizon_table(labelled)


def _many_seeds(runs: Sequence[dict]) -> bool:
    return len({run.get("seed") for run in runs}) > 1


def memory_reach(memory: dict | None, segment_len: int | None) -> float | None:
    """How many segments back a cache or window reaches directly: xl's mem_len or swa's window over the
    segment length (a window relayed through L layers can reach up to L times further); None for others."""
    if not memory or not segment_len or len(memory) != 1:
        return None
    name, options = next(iter(memory.items()))
    tokens = {"xl": "mem_len", "swa": "window"}.get(name)
    if tokens is None or not isinstance(options, dict) or options.get(tokens) is None:
        return None
    return options[tokens] / segment_len


def figure_and_axes(ax=None):
    """(figure, axes): a new 6.4 x 4 in figure on the Agg backend when `ax` is None, else `ax` and its figure."""
    if ax is not None:
        return ax.figure, ax
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0), dpi=120)


def plot(runs: Sequence[dict], path: str | Path | None = None, ax=None, title: str | None = None):
    """Accuracy against distance in segments, one line per mechanism (seeds pooled), the chance level dashed.

    Each bucket is drawn at its mean distance (lo..hi; the open last bucket at lo). Returns the figure;
    writes it to `path` (PNG, SVG, ... by suffix) when given. Uses the Agg backend when it makes the figure.
    """
    fig, ax = figure_and_axes(ax)
    data = curves(runs)
    for label, curve in data.items():
        points = [((lo + hi) / 2 if hi is not None else lo, acc)
                  for lo, hi, acc in zip(curve["lo"], curve["hi"], curve["accuracy"]) if acc is not None]
        if not points:
            continue
        xs, ys = zip(*points)
        seeds = f", {curve['runs']} runs" if curve["runs"] > 1 else ""
        reach = memory_reach(curve["memory"], curve["segment_len"])
        reach_note = f", reach {reach:g} seg" if reach is not None else ""
        (line,) = ax.plot(xs, [100 * y for y in ys], marker="o", label=f"{label}{seeds}{reach_note}")
        if reach is not None:
            ax.axvline(reach, color=line.get_color(), linestyle=":", linewidth=1)
    chance = {c["baselines"].get("uniform_value") for c in data.values()} - {None}
    if len(chance) == 1:
        ax.axhline(100 * chance.pop(), color="grey", linestyle="--", linewidth=1, label="chance")
    first = next(iter(data.values()))
    ax.set_xlabel(f"distance from fact to question (segments of {first['segment_len']} tokens)")
    ax.set_ylabel(f"accuracy (%, {first['score']})")
    return _finish_figure(fig, ax, title, path)


def _finish_figure(fig, ax, title: str | None, path):
    """Percent axis, grid, legend and title of an accuracy plot; saved to `path` (its folder made) if given."""
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    return fig


def collect(roots: Iterable[str | Path], solve_at: float = 0.99) -> dict:
    """Everything a report needs: the runs' rows, the pooled curves, solved counts and the text table."""
    runs = load_runs(roots)
    rows = summary(runs, solve_at)
    return {"roots": [str(r) for r in roots], "solve_at": solve_at, "rows": rows, "solved": solved_counts(rows),
            "curves": curves(runs), "table": table(runs)}


# ------------------------------------------------------------------------------------------------ capacity

def n_pairs_of(run: dict) -> int:
    """K of a run: horizon.json's `n_pairs` (what the validation examples held), else its val_source's."""
    k = run.get("n_pairs")
    if k is None:
        k = (run.get("val_source") or {}).get("n_pairs")
    if not isinstance(k, int) or isinstance(k, bool):
        raise ValueError(f"stm.analysis.horizon --capacity: {run.get('path')} records no single number of pairs "
                         f"(n_pairs: {k!r}): not a run of one K (experiment=capacity)")
    return k


def capacity(runs: Sequence[dict], score: str | None = None) -> dict:
    """Accuracy by mechanism and K: overall correct / count summed over the runs (seeds) of each (label, K).

    Returns {"unit", "score", "n_pairs": [K, ...], "chance", "rows": [{label, mechanism, n_pairs, correct, count,
    accuracy, runs, seeds}, ...], "curves": {label: {"mechanism", "n_pairs", "correct", "count", "accuracy",
    "runs"}}, "table"}. Labels tell runs of one mechanism apart by their other options, as `label_of` does,
    K aside. The unit is the query (multi-query probes) or the example; runs that count different units
    are refused."""
    if not runs:
        raise ValueError("stm.analysis.horizon --capacity: no runs")
    units = {run.get("unit", "example") for run in runs}
    if len(units) > 1:
        raise ValueError(f"stm.analysis.horizon --capacity: the runs count different units {sorted(units)} (query: "
                         f"multi-query probes, example: generated answers); collect them apart")
    cells: dict[tuple[str, int], dict] = {}
    for run in runs:
        s = score or run["score"]
        label, k = label_of(run, runs, ignore=("probe.n_pairs",)), n_pairs_of(run)
        cell = cells.setdefault((label, k), {"label": label, "mechanism": run["mechanism"], "n_pairs": k,
                                             "correct": 0.0, "count": 0, "runs": 0, "seeds": []})
        cell["correct"] += run["overall"]["correct"][s]
        cell["count"] += run["overall"]["count"]
        cell["runs"] += 1
        cell["seeds"].append(run.get("seed"))
    labels = list(dict.fromkeys(label for label, _ in cells))  # runs come in mechanism order (load_runs)
    ks = sorted({k for _, k in cells})
    rows = []
    for label in labels:
        for k in ks:
            if (label, k) in cells:
                cell = cells[(label, k)]
                rows.append({**cell, "accuracy": cell["correct"] / cell["count"] if cell["count"] else None})
    curves_ = {}
    for row in rows:
        curve = curves_.setdefault(row["label"], {"mechanism": row["mechanism"], "n_pairs": [], "correct": [],
                                                  "count": [], "accuracy": [], "runs": []})
        for key in ("n_pairs", "correct", "count", "accuracy", "runs"):
            curve[key].append(row[key])
    chances = {run.get("baselines", {}).get("uniform_value") for run in runs} - {None}
    out = {"unit": units.pop(), "score": score or runs[0]["score"], "n_pairs": ks,
           "chance": chances.pop() if len(chances) == 1 else None, "rows": rows, "curves": curves_,
           "segment_len": runs[0].get("segment_len")}
    out["table"] = capacity_table(out)
    return out


def capacity_table(result: dict) -> str:
    """Mechanism x K: accuracy (and how many queries or examples it is over) per cell."""
    ks, unit = result["n_pairs"], result["unit"]
    cells = {(row["label"], row["n_pairs"]): row for row in result["rows"]}
    labels = list(result["curves"])
    width = max(12, *(len(label) for label in labels))
    col = 15

    def cell(label: str, k: int) -> str:
        row = cells.get((label, k))
        if row is None or row["accuracy"] is None:
            return "-"
        return f"{100 * row['accuracy']:5.1f}% ({row['count']})"

    header = f"{'mechanism':<{width}}" + "".join(f"{f'K={k}':>{col}}" for k in ks)
    units = {"query": "queries"}.get(unit, f"{unit}s")
    lines = [f"accuracy per {unit} ({result['score']}; in brackets: {units} scored) by the number of pairs K",
             header, "-" * len(header)]
    lines += [f"{label:<{width}}" + "".join(f"{cell(label, k):>{col}}" for k in ks) for label in labels]
    if result.get("chance") is not None:
        lines.append(f"chance: {100 * result['chance']:.1f}% (one value of {round(1 / result['chance'])})")
    return "\n".join(lines)


def plot_capacity(result: dict, path: str | Path | None = None, ax=None, title: str | None = None):
    """Accuracy against K (log2 axis), one line per mechanism, the chance level dashed; `result` is
    `capacity(...)`. Returns the figure; writes it to `path` when given."""
    fig, ax = figure_and_axes(ax)
    for label, curve in result["curves"].items():
        points = [(k, acc) for k, acc in zip(curve["n_pairs"], curve["accuracy"]) if acc is not None]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    if result.get("chance") is not None:
        ax.axhline(100 * result["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
    ks = result["n_pairs"]
    if ks and min(ks) > 0:
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K: key-value pairs in the context" + (f" (segments of {result['segment_len']} tokens)"
                                                         if result.get("segment_len") else ""))
    ax.set_ylabel(f"accuracy per {result['unit']} (%)")
    return _finish_figure(fig, ax, title, path)


def collect_capacity(roots: Iterable[str | Path]) -> dict:
    """The capacity view of the runs under `roots` (`capacity`), with the roots."""
    roots = list(roots)
    return {"roots": [str(r) for r in roots], **capacity(load_runs(roots))}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m stm.analysis.horizon", description=__doc__.split("\n\n")[0])
    parser.add_argument("roots", nargs="+", help="sweep folders (searched for horizon.json) or horizon.json files")
    parser.add_argument("--out", help="write the collected runs, curves and table to this JSON file")
    parser.add_argument("--plot", help="write the figure to this file (.png, .svg, ...)")
    parser.add_argument("--title", help="figure title")
    parser.add_argument("--solve-at", type=float, default=0.99, help="far accuracy that counts as solved")
    parser.add_argument("--capacity", action="store_true",
                        help="the capacity view (experiment=capacity): accuracy by mechanism and number of pairs K; "
                             "--out and --plot then write its numbers and its figure (accuracy against K)")
    args = parser.parse_args(argv)
    if args.capacity:
        result = collect_capacity(args.roots)
        print(result["table"])
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2, default=_plain) + "\n")
            print(f"written {args.out}")
        if args.plot:
            plot_capacity(result, args.plot, title=args.title)
            print(f"written {args.plot}")
        return result
    result = collect(args.roots, args.solve_at)
    print(result["table"])
    solved = ", ".join(f"{label} {k_of_n}" for label, k_of_n in result["solved"].items())
    print(f"solved (far >= {args.solve_at:.0%}): {solved}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2, default=_plain) + "\n")
        print(f"written {args.out}")
    if args.plot:
        plot(load_runs(args.roots), args.plot, title=args.title)
        print(f"written {args.plot}")
    return result


def _plain(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
