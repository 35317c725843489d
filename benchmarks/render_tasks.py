"""The markdown sections of the task benchmarks: one CPU-sized training run per task (task_runs.py) and SmolLM2
zero-shot on the real task sets (real_tasks.py), rendered by report.py."""

from __future__ import annotations

from report_format import fmt, provenance, table

TASK_METRICS = {"summarization": ["rouge1", "rouge2", "rougeL"], "translation": ["bleu", "chrf"],
                "dialogue": ["token_f1", "bleu"], "qa": ["exact_match", "answer_in_first_sentence"]}


def render_tasks(data: dict, small: bool) -> str:
    rows = []
    for r in data["results"]:
        if "error" in r:
            rows.append([f"`{r['command']}`", "failed", "", "", ""])
            continue
        m = r["metrics"]
        scores = ", ".join(f"{k} {m['val/' + k]:.3g}" for k in TASK_METRICS.get(r["task"], []) if "val/" + k in m)
        rows.append([f"`{r['command']}`", f"{r['wall_s']:.0f}", fmt(m.get("val/loss")), fmt(m.get("val/ppl")), scores])
    return (f"**One CPU-sized run per task** (the tiny byte-level transformer, the task's shipped or generated data, "
            f"the steps in the command; loss and perplexity on the validation targets; ROUGE, BLEU and "
            f"chrF on 0-100, the rest 0-1).\n\n{provenance(data, small)}\n\n"
            + table(["command", "wall s", "val loss", "val ppl", "generation metrics"], rows))


SET_NAMES = {"summarization": "QMSum (query-based summarisation)", "dialogue": "SGD (dialogue responses)",
             "translation": "Bible en->es (the chapter so far)"}
SHOWN_SCORES = {"summarization": ["rouge1", "rouge2", "rougeL"], "dialogue": ["token_f1", "bleu"],
                "translation": ["bleu", "chrf"]}
PPL_GOAL = 1.03  # issue #13: xl / swa within 3% of full attention's target perplexity


def _scores_cell(cell: dict) -> str:
    scores = cell.get("scores") or {}
    keys = [k for k in SHOWN_SCORES.get(cell["set"], []) if k in scores] or list(scores)
    parts = [f"{k} {fmt(scores[k]['value'])}" + (f" ± {fmt(scores[k]['stderr'], 2)}" if scores[k]["stderr"]
                                                 is not None else "") for k in keys]
    n = {scores[k]["n"] for k in keys}
    return ", ".join(parts) + (f" (n {n.pop()})" if len(n) == 1 else "") if parts else "–"


def real_tasks_rows(data: dict) -> list[list[str]]:
    """One row per set and mechanism run: set, mechanism, target ppl, ppl / full's, task metrics ± standard error
    (n generated), wall s, peak RSS MiB."""
    rows = []
    for c in data["cells"]:
        if "error" in c:
            rows.append([c["set"], f"`{c['mechanism']}`", "failed: " + c["error"].splitlines()[0][:60], "–", "–",
                         fmt(c.get("wall_s")), fmt(c.get("peak_rss_mib"))])
            continue
        ratio, se, ratio_se = c.get("ppl_over_full"), c.get("ppl_stderr"), c.get("ppl_over_full_stderr")
        vs_full = "–" if ratio is None else f"{100 * (ratio - 1):+.1f}%" + (
            f" ± {100 * ratio_se:.1f}" if ratio_se and c["mechanism"] != "full" else "")
        rows.append([c["set"], f"`{c['mechanism']}`", f"{c['ppl']:.3f}" + (f" ± {se:.2f}" if se else ""), vs_full,
                     _scores_cell(c),
                     f"{c['wall_s']:.0f}", f"{c['peak_rss_mib']:,.0f}"])
    return rows


def real_tasks_goals(data: dict) -> list[str]:
    """Per set: xl / swa within 3% of full's target perplexity; how much worse none is."""
    lines = []
    for s in data["config"]["sets"]:
        cells = {c["mechanism"]: c for c in data["cells"] if c["set"] == s and c.get("ppl_over_full")}

        def pm(m, cells=cells):
            se = cells[m].get("ppl_over_full_stderr")
            return f" ± {100 * se:.1f}" if se else ""

        said = [f"`{m}` {100 * (cells[m]['ppl_over_full'] - 1):+.1f}%{pm(m)} ("
                + ("within 3%" if cells[m]["ppl_over_full"] <= PPL_GOAL else "not within 3%") + ")"
                for m in ("xl", "swa") if m in cells]
        if "none" in cells:
            said.append(f"`none` {100 * (cells['none']['ppl_over_full'] - 1):+.1f}%{pm('none')}")
        if said:
            lines.append(f"- {s}: " + ", ".join(said) + ".")
    return lines


def render_real_tasks(data: dict, small: bool) -> str:
    """The table of sets x mechanisms, what each set's examples hold, the goals of issue #13."""
    cfg = data["config"]
    out = ["**The task sets on a real model**: SmolLM2-135M-Instruct zero-shot (`python eval.py "
           "experiment=<set>_zeroshot lm_memory=<mechanism>`, no checkpoint). Target ppl: exp of the mean loss over "
           "every target token (eos included) of the validation examples, teacher-forced, ± a bootstrap standard "
           "error over the examples; vs full: over full attention's on the same examples, ± a paired bootstrap's "
           "(the same examples resampled for both, so the examples' own difficulty cancels). Task metrics (as the "
           "task logs them; ROUGE, BLEU, chrF 0-100, token F1 0-1) on the first n examples, generated greedily, ± "
           "standard error (a mean's over examples; a corpus score's from a bootstrap over the examples): n is "
           "small, so differences below about two standard errors say nothing. Wall s: the whole eval.py process, "
           "model loading included; peak RSS: its resident-set high-water mark (the model's 0.5 GB of float32 "
           "weights included).", "", provenance(data, small), ""]
    if data.get("note"):
        out += [f"Note: {data['note']}", ""]
    out.append(table(["set", "mechanism", "target ppl", "vs full", "task metrics ± s.e. (n generated)", "wall s",
                      "peak RSS MiB"], real_tasks_rows(data)))
    out += ["", "What the model read (tokens of SmolLM2; contexts after truncation to the budget; `none` reads each "
            "segment alone, so a context longer than one segment is partly lost to it):", ""]
    rows = []
    for s in cfg["sets"]:
        d = data["data"][s]
        ctx, gen = d["context_tokens"], d["generated"]
        rows.append([SET_NAMES.get(s, s), f"`{d['experiment']}`", fmt(d["n_examples"]), fmt(d["target_tokens"]),
                     f"{ctx['mean']:.0f} ({ctx['min']}-{ctx['max']})",
                     f"{d['segment_len']} x {d['max_segments']}", f"{d['longer_than_segment']} of {d['n_examples']}",
                     f"{gen['n']} ({gen['longer_than_segment']} longer than a segment), up to {d['max_new_tokens']} "
                     f"tokens"])
    out.append(table(["set", "experiment", "examples", "target tokens", "context tokens mean (min-max)",
                      "segments", "context longer than a segment", "generated"], rows))
    memory = {}
    for c in data["cells"]:
        for options in (c.get("memory") or {}).values():
            knobs = {k: v for k, v in options.items() if k not in ("_target_", "stop_gradient")}
            if knobs:
                memory[c["mechanism"]] = ", ".join(f"{k} {v}" for k, v in knobs.items())
    if memory:
        out += ["", "Mechanisms: " + "; ".join(f"`{m}` {k}" for m, k in memory.items()) + "."]
    goals = real_tasks_goals(data)
    if goals:
        out += ["", "Target perplexity against full attention's (issue #13: xl / swa within 3%; none worse where the "
                "context matters):", "", *goals]
    return "\n".join(out)


def render_real_tasks_summary(data: dict, small: bool) -> str:
    """A few generated lines for README.md: per set full attention's target ppl and the others' difference."""
    lines = []
    for s in data["config"]["sets"]:
        cells = [c for c in data["cells"] if c["set"] == s and c.get("ppl")]
        full = next((c for c in cells if c["mechanism"] == "full"), None)
        if full is None:
            continue
        others = ", ".join(f"`{c['mechanism']}` {100 * (c['ppl_over_full'] - 1):+.1f}%"
                           + (f" ± {100 * c['ppl_over_full_stderr']:.1f}" if c.get("ppl_over_full_stderr") else "")
                           for c in cells if c["mechanism"] != "full")
        lines.append(f"- {SET_NAMES.get(s, s)}: target ppl {full['ppl']:.2f} under `full` ({others}); "
                     f"{_scores_cell(full)} under `full`.")
    n = ", ".join(f"{s} {data['data'][s]['n_examples']}" for s in data["config"]["sets"])
    took = f"{data['wall_s'] / 60:.0f} min" if data.get("wall_s") else "?"
    return "\n".join([f"`{data.get('command', '?')}`" + (" (small check run)" if small else "")
                      + f": examples per set {n}; {took} in all.", "", *lines])
