"""The task sets on a real model: SmolLM2-135M-Instruct zero-shot (no training) on QMSum query-based summarisation,
SGD dialogue responses and Bible translation (the chapter so far as context), under each memory mechanism.

    python benchmarks/real_tasks.py              # 3 sets x none, xl, swa, full; about 35 min on one CPU thread
    python benchmarks/real_tasks.py --quick      # 2 examples per set, 1 generated, contexts of at most 256 tokens
    python benchmarks/real_tasks.py --sets dialogue --mechanisms none,full --examples dialogue:64

One `python eval.py experiment=<set>_zeroshot lm_memory=<mechanism>` per set and mechanism (the "evaluate without
training" path; conf/experiment/*_zeroshot.yaml hold the sizes), one at a time, each with --threads torch threads.
For each: the target perplexity (exp of the mean loss over every target token of the --examples validation
examples, teacher-forced) with a bootstrap standard error over the examples, and its ratio to full attention's with
a paired bootstrap's (the same examples resampled for both; from each run's per-example target losses,
task.losses_file), the task's own metrics on the first --generate of them (greedy decoding of at most the
experiment's max_new_tokens; ROUGE-1/2/L for summarisation, token F1 and corpus BLEU for dialogue, corpus BLEU and
chrF for translation, as the task logs them), with a standard error over the generated examples (for a mean over
examples: its standard deviation / sqrt(n); for a corpus score: a bootstrap over the examples), the wall time of the
whole eval.py process (model loading included) and its peak resident set (ru_maxrss of the child, `os.wait4`).
What the model read is counted once per set, in this process, from the same config: the number of examples and
target tokens, the context tokens per example (after truncation to the budget of max_segments segments), and how
many contexts are longer than one segment (where `none`, which reads each segment alone, loses context).

Results go to benchmarks/results/<name>.json (default real_tasks, real_tasks_quick with --quick); each run's
eval_metrics.json and generated samples stay in its folder under --runs-dir. `benchmarks/report.py` renders them.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

from common import REPO_ROOT, command_line, environment, progress, save_result
from workers import run_python

SETS = {  # set -> its zero-shot experiment (conf/experiment/)
    "summarization": "summarization_qmsum_zeroshot",
    "dialogue": "dialogue_sgd_zeroshot",
    "translation": "translation_bible_zeroshot",
}
MECHANISMS = "none,xl,swa,full"
EXAMPLES = "summarization:8,dialogue:64,translation:32"  # validation examples (target perplexity)
GENERATE = "summarization:4,dialogue:16,translation:8"  # of which generated and scored
QUICK = {"examples": 2, "generate": 1, "overrides": ["task.segment_len=64", "data.max_segments=4",
                                                     "task.generation.max_new_tokens=8"]}
BOOTSTRAP = 1000  # resamples for the standard error of a corpus score


def per_set(spec: str, sets: list[str], what: str) -> dict[str, int]:
    """"summarization:8,dialogue:32" or "8" (every set) -> {set: count} for `sets`."""
    counts: dict[str, int] = {}
    default = None
    for part in str(spec).split(","):
        name, _, n = part.rpartition(":")
        if name and name not in SETS:
            raise SystemExit(f"--{what}: unknown set {name!r}; sets: {', '.join(SETS)}")
        if name:
            counts[name] = int(n)
        else:
            default = int(n)
    out = {s: counts.get(s, default) for s in sets}
    if any(n is None or n < 0 for n in out.values()):
        raise SystemExit(f"--{what} {spec!r} gives no count (>= 0) for {[s for s, n in out.items() if n is None]}")
    return out


def set_overrides(name: str, examples: int, generate: int, quick: bool, extra: list[str]) -> list[str]:
    """eval.py overrides for one set (the mechanism and the run folder apart)."""
    out = [f"experiment={SETS[name]}", f"data.max_examples.val={examples}", f"task.n_generate={generate}",
           f"task.n_samples={generate}"]
    return out + (QUICK["overrides"] if quick else []) + list(extra)


# ----------------------------------------------------------------------------------------------------- running

def run_eval(overrides: list[str], mechanism: str, out: Path, threads: int) -> dict:
    """`python eval.py <overrides> lm_memory=<mechanism>` into `out`: its command, wall time, exit code and peak
    resident set (`workers.run_python`: the child's own); its output goes to out/eval.log."""
    args = ["eval.py", *overrides, f"lm_memory={mechanism}", f"hydra.run.dir={out}"]
    out.mkdir(parents=True, exist_ok=True)
    progress(" ".join(args))
    return {"mechanism": mechanism, "command": "python " + " ".join(args[:-1]), "threads": threads,
            **run_python(args, threads, out / "eval.log"), "dir": str(out)}


def read_run(record: dict) -> dict:
    """Add a finished run's metrics (eval_metrics.json), memory options and generated samples to its record."""
    out = Path(record["dir"])
    if record["returncode"] != 0 or not (out / "eval_metrics.json").is_file():
        tail = (out / "eval.log").read_text()[-1500:] if (out / "eval.log").is_file() else ""
        return {**record, "error": f"eval.py exit code {record['returncode']}: {tail}"}
    metrics = json.loads((out / "eval_metrics.json").read_text())["metrics"]
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(out / "config_resolved.yaml")
    samples = sorted(out.rglob("samples/val_samples_step*.jsonl"))
    rows = [json.loads(line) for line in samples[-1].read_text().splitlines()] if samples else []
    losses_file = out / str(cfg.task.get("losses_file") or "target_losses.json")
    losses = json.loads(losses_file.read_text())["examples"] if losses_file.is_file() else None
    return {**record, "metrics": metrics, "memory": OmegaConf.to_container(cfg.memory), "losses": losses,
            "task_metrics": list(cfg.task.metrics), "generated": [
                {"index": r["index"], "reference": r["reference"], "output": r["output"]} for r in rows]}


# ----------------------------------------------------------------------------------------------------- scoring

def score_generated(names: list[str], generated: list[dict], bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict:
    """{key: {value, stderr, n, kind}} of the task's text metrics (`stm.metrics.text`, the names in task.metrics)
    on the generated (reference, output) pairs: the value as the task computes it; stderr the standard deviation
    of the per-example scores / sqrt(n) for a mean over examples, a bootstrap over the examples (`bootstrap`
    resamples) for a corpus score (BLEU, chrF)."""
    from stm.metrics.text import ExampleMeanMetric, SacrebleuCorpusMetric, build_text_metrics

    preds, refs = [g["output"] for g in generated], [g["reference"] for g in generated]
    n = len(generated)
    out: dict = {}
    if n == 0:
        return out
    rng = random.Random(seed)
    for metric in build_text_metrics(names).values():
        if isinstance(metric, ExampleMeanMetric):
            per = [metric.score(p, r) for p, r in zip(preds, refs)]
            for key in metric.keys:
                xs = [metric.scale * s[key] for s in per]
                sd = statistics.stdev(xs) if n > 1 else None
                out[key] = {"value": statistics.fmean(xs), "stderr": None if sd is None else sd / math.sqrt(n),
                            "n": n, "kind": "mean over examples"}
        elif isinstance(metric, SacrebleuCorpusMetric):
            stats = metric._segment_stats(preds, refs)

            def corpus(rows, scorer=metric._scorer):
                return scorer._compute_score_from_stats([sum(col) for col in zip(*rows)]).score

            draws = [corpus([stats[rng.randrange(n)] for _ in range(n)]) for _ in range(bootstrap)] if n > 1 else []
            out[metric.key] = {"value": corpus(stats), "stderr": statistics.stdev(draws) if draws else None,
                               "n": n, "kind": f"corpus score, bootstrap over examples ({bootstrap})"}
    return out


def perplexity_errors(losses: dict[str, list[dict]], reference: str = "full", bootstrap: int = BOOTSTRAP,
                      seed: int = 0) -> dict[str, dict]:
    """{mechanism: {ppl, ppl_stderr, ratio_stderr}} from each mechanism's per-example target losses (the runs'
    losses_file: index, nll summed over the target tokens, tokens) on the same examples: the perplexity exp(sum nll /
    sum tokens) and its bootstrap standard error over examples; and the standard error of its ratio to
    `reference`'s, resampling the same examples for both (a paired bootstrap: the examples' own difficulty, shared
    by both, cancels)."""
    tables = {m: {e["index"]: (e["nll"], e["tokens"]) for e in rows} for m, rows in losses.items() if rows}
    if not tables:
        return {}
    indices = sorted(set.intersection(*(set(t) for t in tables.values())))
    rng = random.Random(seed)

    def ppl(table, picks):
        nll = sum(table[i][0] for i in picks)
        tokens = sum(table[i][1] for i in picks)
        return math.exp(nll / tokens) if tokens else float("nan")

    draws = [[indices[rng.randrange(len(indices))] for _ in indices] for _ in range(bootstrap)] \
        if len(indices) > 1 else []
    out = {}
    for m, table in tables.items():
        values = [ppl(table, picks) for picks in draws]
        out[m] = {"ppl": ppl(table, indices), "n": len(indices),
                  "ppl_stderr": statistics.stdev(values) if len(values) > 1 else None, "ratio_stderr": None}
        if reference in tables and len(draws) > 1:
            ratios = [v / ppl(tables[reference], picks) for v, picks in zip(values, draws)]
            out[m]["ratio_stderr"] = statistics.stdev(ratios)
    return out


# ------------------------------------------------------------------------------------------------- the data read

def data_stats(overrides: list[str]) -> dict:
    """What the model reads in a set's validation examples, from the composed config (tokenizer and data only):
    examples, target tokens (the labels taking the loss, eos included), context tokens after truncation, how many
    contexts are longer than one segment or were truncated; the same for the generated examples."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from stm.app.builders import build
    from stm.app.config import config_dir
    from stm.constants import IGNORE_INDEX

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("eval", overrides=[o for o in overrides if not o.startswith("hydra.")],
                      return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    tokenizer = build(cfg.tokenizer)
    examples = build(cfg.data, tokenizer=tokenizer).build("val")
    segment_len, n_generate = int(cfg.task.segment_len), cfg.task.n_generate
    context = [len(info.context_ids) for info in examples.infos]
    target = [int((lay.labels != IGNORE_INDEX).sum()) for lay in examples.layouts]

    def spread(xs):
        return {"min": min(xs), "mean": round(statistics.fmean(xs), 1), "max": max(xs)} if xs else None

    generated = context[:n_generate] if n_generate is not None else context
    return {"n_examples": len(context), "target_tokens": sum(target), "context_tokens": spread(context),
            "longer_than_segment": sum(c > segment_len for c in context),
            "truncated": sum(lay.truncated > 0 for lay in examples.layouts),
            "generated": {"n": len(generated), "context_tokens": spread(generated),
                          "longer_than_segment": sum(c > segment_len for c in generated)},
            "segment_len": segment_len, "max_segments": int(cfg.data.max_segments),
            "max_new_tokens": int(cfg.task.generation.max_new_tokens),
            "stop_strings": list(cfg.task.generation.get("stop_strings") or []),
            "metrics": list(cfg.task.metrics), "source": str(cfg.data.val_source.get("path"))}


# ----------------------------------------------------------------------------------------------------- collecting

def collect(runs: list[dict], data: dict, bootstrap: int = BOOTSTRAP) -> dict:
    """The results' cells: per set and mechanism the target loss / perplexity, the perplexity over full
    attention's on the same set, the scored metrics with standard errors, wall time and peak RSS."""
    cells = []
    for run in runs:
        cell = {k: run.get(k) for k in ("set", "mechanism", "command", "wall_s", "peak_rss_mib", "dir", "memory")}
        if "error" in run:
            cells.append({**cell, "error": run["error"]})
            continue
        m = run["metrics"]
        cell.update({"loss": m.get("val/loss"), "ppl": m.get("val/ppl"), "bpb": m.get("val/bpb"),
                     "logged": {k.removeprefix("val/"): v for k, v in m.items()
                                if k not in ("val/loss", "val/ppl", "val/bpb")},
                     "scores": score_generated(run["task_metrics"], run["generated"], bootstrap),
                     "n_examples": data[run["set"]]["n_examples"],
                     "target_tokens": data[run["set"]]["target_tokens"],
                     "samples": [{k: g[k][:300] for k in ("reference", "output")} for g in run["generated"][:2]]})
        cells.append(cell)
    full = {c["set"]: c["ppl"] for c in cells if c["mechanism"] == "full" and c.get("ppl")}
    for c in cells:
        if c.get("ppl") and c["set"] in full:
            c["ppl_over_full"] = c["ppl"] / full[c["set"]]
    for s in dict.fromkeys(r["set"] for r in runs):
        losses = {r["mechanism"]: r.get("losses") for r in runs if r["set"] == s and "error" not in r}
        errors = perplexity_errors(losses, bootstrap=bootstrap)
        for c in cells:
            if c["set"] == s and c["mechanism"] in errors:
                e = errors[c["mechanism"]]
                c.update({"ppl_stderr": e["ppl_stderr"], "ppl_over_full_stderr": e["ratio_stderr"],
                          "ppl_from_losses": e["ppl"], "n_losses": e["n"]})
    return {"cells": cells}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    p.add_argument("--mechanisms", default=MECHANISMS, help="conf/lm_memory presets, comma-separated")
    p.add_argument("--examples", default=None, help=f"validation examples per set (default {EXAMPLES}; "
                   f"--quick {QUICK['examples']})")
    p.add_argument("--generate", default=None, help=f"of which generated and scored (default {GENERATE}; "
                   f"--quick {QUICK['generate']})")
    p.add_argument("--quick", action="store_true", help="tiny: 2 examples, 1 generated of 8 tokens, contexts of "
                   "at most 4 segments of 64 tokens")
    p.add_argument("--threads", type=int, default=1, help="torch / OpenMP threads of each eval.py")
    p.add_argument("--bootstrap", type=int, default=BOOTSTRAP, help="resamples for a corpus score's standard error")
    p.add_argument("--runs-dir", help="the eval.py run folders (default logs/real_tasks/multiruns/<name>_<time>)")
    p.add_argument("--results-dir", help="where <name>.json goes (default benchmarks/results)")
    p.add_argument("--name", help="results/<name>.json (default real_tasks, real_tasks_quick with --quick)")
    p.add_argument("--note", help="free text kept with the result")
    p.add_argument("overrides", nargs="*", help="more eval.py overrides for every run")
    args = p.parse_args(argv)
    sets = args.sets.split(",")
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise SystemExit(f"--sets: unknown {unknown}; sets: {', '.join(SETS)}")
    mechanisms = args.mechanisms.split(",")
    examples = per_set(args.examples or (str(QUICK["examples"]) if args.quick else EXAMPLES), sets, "examples")
    generate = per_set(args.generate or (str(QUICK["generate"]) if args.quick else GENERATE), sets, "generate")
    name = args.name or ("real_tasks_quick" if args.quick else "real_tasks")
    runs_dir = Path(args.runs_dir) if args.runs_dir else \
        REPO_ROOT / "logs" / "real_tasks" / "multiruns" / f"{name}_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    env_before = environment()
    started = time.perf_counter()
    data, runs = {}, []
    for s in sets:
        overrides = set_overrides(s, examples[s], generate[s], args.quick, args.overrides)
        data[s] = {"experiment": SETS[s], "overrides": overrides, **data_stats(overrides)}
        progress(f"{s}: {data[s]['n_examples']} examples, {data[s]['target_tokens']} target tokens, contexts "
                 f"{data[s]['context_tokens']} tokens ({data[s]['longer_than_segment']} longer than a segment of "
                 f"{data[s]['segment_len']})")
        for mechanism in mechanisms:
            run = read_run(run_eval(overrides, mechanism, runs_dir / s / mechanism, args.threads))
            runs.append({"set": s, **run})
            progress(f"{s}/{mechanism}: {run['wall_s']} s, peak RSS {run['peak_rss_mib']} MiB, "
                     + (run["error"].splitlines()[0] if "error" in run else f"ppl {run['metrics'].get('val/ppl'):.3f}"))
    payload = {"benchmark": "real_tasks", "command": command_line(), "note": args.note, "environment": env_before,
               "config": {"threads": args.threads, "quick": args.quick, "sets": sets, "mechanisms": mechanisms,
                          "examples": examples, "generate": generate, "bootstrap": args.bootstrap,
                          "overrides": args.overrides, "runs_dir": str(runs_dir)},
               "data": data, **collect(runs, data, args.bootstrap),
               "wall_s": round(time.perf_counter() - started, 1), "load_average_after": environment()["load_average"]}
    path = save_result(name, payload, args.results_dir)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from render_tasks import render_real_tasks

    print(render_real_tasks(payload, args.quick))
    print(f"written {path}")


if __name__ == "__main__":
    main()
