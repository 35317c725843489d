"""The markdown sections of the memory probes: horizon and capacity curves (horizon.py) and BABILong zero-shot
(babilong_zeroshot.py), rendered by report.py."""

from __future__ import annotations

from report_format import fmt, provenance, short_len, table


def render_horizon(data: dict, small: bool) -> str:
    solved = ", ".join(f"{name} {count}" for name, count in data.get("solved", {}).items())
    return (f"**Horizon curves** (associative recall: accuracy against the distance from the fact to the question, "
            f"in segments; `python benchmarks/horizon.py --plot benchmarks/results/horizon.png`, which runs "
            f"`python train.py -m experiment=horizon`).\n\n{provenance(data, small)}\n\n"
            f"![horizon curves](benchmarks/results/horizon.png)\n\n```\n{data['table'].rstrip()}\n```\n\n"
            f"Runs that solve the probe (far accuracy >= 99%): {solved or '-'}.")


def render_capacity(data: dict, small: bool) -> str:
    seconds = data.get("sweep_seconds")
    took = f", the whole sweep {seconds / 60:.0f} min" if seconds else ""
    circuit = data.get("circuit") or {}
    start = (f" Every job started from the same recall circuit (`experiment=capacity_circuit`, seed "
             f"{circuit.get('seed')}: {circuit['accuracy']:.1%} per query inside one segment, n = {circuit['n']}, "
             f"at step {circuit['step']}) and trained its memory for the same steps." if "accuracy" in circuit else "")
    return (f"**Capacity** (multi-query associative recall: K pairs spread over the context, every key asked at "
            f"the end; accuracy per query, chance {fmt(data['chance'])}; `python benchmarks/horizon.py --capacity "
            f"--plot benchmarks/results/capacity.png hydra/launcher=joblib`, which trains the circuit and runs "
            f"`python train.py -m experiment=capacity init_from=...`{took}).{start}\n\n{provenance(data, small)}\n\n"
            f"![capacity curves](benchmarks/results/capacity.png)\n\n```\n{data['table'].rstrip()}\n```")


def render_capacity_variants(data: dict, small: bool) -> str:
    """Runs of one capacity cell trained in other ways (steps, learning rate, memory sizes, seeds pooled), from
    the same circuit: the collector's table, one row per way, and the note saying what was varied."""
    note = f" {data['note']}" if data.get("note") else ""
    seeds = "; ".join(f"{row['label']}: seed{'s' if len(row['seeds']) > 1 else ''} "
                      f"{', '.join(str(s) for s in row['seeds'])}" for row in data["rows"])
    return (f"**Capacity, one cell tried in other ways** (same circuit and data as the capacity table; each row a "
            f"way of training, its seeds pooled; accuracy per query, queries scored in brackets).{note}\n\n"
            f"{provenance(data, small)}\n\n```\n{data['table'].rstrip()}\n```\n\nSeeds: {seeds}.")


def render_horizon_lengths(data: dict, small: bool) -> str:
    """Probe runs evaluated at several context lengths (the collector's rows, one per run and length) with the note
    saying how they were trained and evaluated."""
    note = f" {data['note']}" if data.get("note") else ""
    return (f"**Length generalisation on BABILong-style QA1** (accuracy by distance from the fact to the question, "
            f"one row per run and evaluation length; n: questions scored).{note}\n\n{provenance(data, small)}\n\n"
            f"```\n{data['table'].rstrip()}\n```")


def render_babilong_zeroshot(data: dict, small: bool) -> str:
    """Per mechanism a task x length table (accuracy % ± binomial standard error, n), the figure, what was read."""
    cfg, lengths, tasks = data["config"], data["lengths"], data["tasks"]
    cells = {(c["label"], c["length"], c["task"]): c for c in data["cells"]}
    header = ["task"] + [short_len(int(n)) if int(n) else "0" for n in lengths]

    def cell(c: dict | None) -> str:
        if c is None or c.get("accuracy") is None:
            return "–"
        return f"{100 * c['accuracy']:.0f} ± {100 * c['stderr']:.0f} ({c['n']})"

    counts = ", ".join(f"{short_len(int(n)) if int(n) else '0'}: {c}" for n, c in cfg["per_task"].items())
    full = f"; full attention up to {short_len(cfg['full_max'])}" if cfg.get("full_max") else ""
    out = [f"**BABILong zero-shot**: {data.get('model', 'the model')} as it is, QA1-QA5 (bAbI test stories hidden in "
           f"the Austen novels), accuracy % (the answer in the output's first sentence) ± binomial standard error "
           f"(n). Lengths in the model's tokens of the whole prompt (0: the story alone); segments of "
           f"{cfg.get('segment_len')}; samples per task and length {counts}{full}.", "", provenance(data, small), "",
           "![BABILong zero-shot](benchmarks/results/babilong_zeroshot.png)", ""]
    for label in data["labels"]:
        memory = (cfg.get("memory") or {}).get(label) or {}
        knobs = ", ".join(f"{k} {v}" for options in memory.values() for k, v in options.items()
                          if k not in ("_target_", "stop_gradient"))
        rows = [[t.upper() if t.startswith("qa") else t] + [cell(cells.get((label, n, t))) for n in lengths]
                for t in [*tasks, "mean"]]
        out += [f"`{label}`" + (f" ({knobs})" if knobs else ""), "", table(header, rows), ""]
    tokens = data.get("context_tokens") or {}
    if tokens:
        rows = [[label] + [f"{t['mean']:.0f} ({t['min']}-{t['max']})" if (t := tokens.get(label, {}).get(n)) else "–"
                           for n in lengths] for label in data["labels"]]
        out += ["Tokens the model read per example, mean (min-max):", "", table(["mechanism"] + header[1:], rows)]
    walls: dict[str, list[float]] = {}
    for r in data.get("eval_runs") or []:
        if r.get("wall_s") is not None:
            walls.setdefault(r["mechanism"], []).append(r["wall_s"])
    if walls:
        out += ["", "Wall time of the eval.py runs (model loading included): " + ", ".join(
            f"{m} {sum(w) / 60:.1f} min" + (f" ({len(w)} runs)" if len(w) > 1 else "") for m, w in walls.items()) + "."]
    return "\n".join(out)
