"""Render benchmarks/results/*.json as markdown tables (stdout), and optionally into README.md and
benchmarks/README.md.

    python benchmarks/report.py                    # print every section
    python benchmarks/report.py --write-readme     # also replace the sections between markers

Each section is written into whichever of the two files holds its markers (README.md keeps the probes'
headline tables, benchmarks/README.md the rest); a section whose markers are in neither is reported. Sections
are replaced only where both markers already exist, e.g.

    <!-- bench:train_speed -->  ...  <!-- /bench:train_speed -->
    <!-- bench:train_speed_bf16 -->  ...  <!-- /bench:train_speed_bf16 -->
    <!-- bench:stream -->       ...  <!-- /bench:stream -->
    <!-- bench:gpu -->          ...  <!-- /bench:gpu -->

Each table names the command that produced it and the machine, torch version and threads it ran on.
For every benchmark the full-size result (train_speed.json, ...) is used; its --quick/--smoke variant only
when no full-size result exists (and the section says so). Links in a section (the figures) are written
relative to the repository root and made relative to the file they go into.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

SECTIONS = {  # README marker name -> (benchmark field, full-size file, small variant)
    "train_speed": ("train_speed", "train_speed.json", "train_speed_quick.json"),
    "train_speed_bf16": ("train_speed", "train_speed_fp32_bf16.json", "train_speed_quick_fp32_bf16.json"),
    "stream": ("stream_inference", "stream_inference.json", "stream_inference_quick.json"),
    "stream_armt_1m": ("stream_inference", "stream_inference_armt_1m.json", "stream_inference_armt_1m_quick.json"),
    "gpu": ("gpu_check", "gpu_check.json", "gpu_check_smoke.json"),
    "tokenize": ("tokenize_throughput", "tokenize_throughput.json", "tokenize_throughput_quick.json"),
    "tasks": ("task_runs", "task_runs.json", "task_runs_quick.json"),
    "horizon": ("horizon", "horizon.json", "horizon_quick.json"),
    "capacity": ("horizon", "capacity.json", "capacity_quick.json"),
    "capacity_armt_k8": ("horizon", "capacity_armt_k8.json", "capacity_armt_k8_quick.json"),
    "babilong_zeroshot": ("babilong_zeroshot", "babilong_zeroshot.json", "babilong_zeroshot_quick.json"),
    "long_context": ("long_context", "long_context.json", "long_context_quick.json"),
    "full_attention_memory": ("full_attention_memory", "full_attention_memory.json",
                              "full_attention_memory_quick.json"),
    "real_tasks": ("real_tasks", "real_tasks.json", "real_tasks_quick.json"),
    "real_tasks_summary": ("real_tasks", "real_tasks.json", "real_tasks_quick.json"),
}


def load(results_dir: Path, section: str) -> tuple[dict | None, bool]:
    _, full, small = SECTIONS[section]
    for name, is_small in ((full, False), (small, True)):
        path = results_dir / name
        if path.is_file():
            return json.loads(path.read_text()), is_small
    return None, False


# ------------------------------------------------------------------------------------------- helpers

def fmt(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def provenance(data: dict, small: bool) -> str:
    env = data.get("environment", {})
    cuda = env.get("cuda")
    where = f"{cuda['device']} (CUDA {cuda.get('cuda_version')})" if cuda else \
        f"{env.get('cpu_model', '?')}, {env.get('cpu_count', '?')} CPUs"
    threads = data.get("config", {}).get("threads", env.get("torch_num_threads"))
    git = env.get("git", {}) or {}
    commit = (git.get("commit") or "?")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    load = data.get("load_average_before") or env.get("load_average")
    after = data.get("load_average_after")
    load_txt = f"; load average before {load[0]}" if load else ""
    load_txt += f", after {after[0]}" if after else ""
    note = " **(small check run, not the full-size benchmark)**" if small else ""
    return (f"`{data.get('command', '?')}`{note}  \n{where}, torch {env.get('torch', '?')}, {threads} threads, "
            f"Python {env.get('python', '?')}; {env.get('date', '?')}, commit {commit}{load_txt}.")


# ---------------------------------------------------------------------------------------- train speed

def render_train_speed(data: dict, small: bool) -> str:
    cfg = data["config"]
    out = [f"**Training speed** ({cfg['n_layers']} layers, width {cfg['d_model']}, {cfg['n_heads']} heads, "
           f"vocab {cfg['vocab_size']}, batch {cfg['batch']} x {cfg['tokens_per_sample']} tokens, {cfg['dtype']}; "
           f"segments of {cfg['segment_len']}; {cfg['warmup']} warm-up + {cfg['repeats']} measured steps each, "
           "median)", "", provenance(data, small), ""]
    rows = []
    for name, rec in data["systems"].items():
        if "error" in rec and "tokens_per_s" not in rec:
            rows.append([name, rec.get("family", "?"), "–", "–", "–", "–", "failed: "
                         + rec["error"].splitlines()[0][:80]])
            continue
        kernel = (f"{rec['kernel_s']:.2f} ({100 * rec['kernel_s'] / rec['seconds_per_step']:.0f}%)"
                  if rec.get("kernel_s") and rec.get("seconds_per_step") else "–")
        rows.append([f"**{name}**" if rec.get("family") == "stm" else name, rec.get("family"),
                     fmt(rec.get("params")), fmt(rec.get("seconds_per_step")), kernel, fmt(rec.get("tokens_per_s")),
                     fmt(rec.get("peak_extra_mib")), rec.get("description", "")])
    out.append(table(["system", "", "params", "s/step", "of which matmul + attention kernels", "tokens/s",
                      "peak extra MiB", "what"], rows))
    out += ["", "Ours against the fastest matching peer (tokens/s ratio > 1: ours faster; memory ratio < 1: "
            f"ours smaller; goal {data['comparisons'][0]['goal'] if data['comparisons'] else 1.3}x). The ceiling is "
            "the ratio ours would reach if everything but its matmul and attention kernels took no time (the "
            "peer's s/step over our kernel time, from one profiled step): below the goal, no rewrite around the "
            "same kernels reaches it.", ""]
    rows = []
    for c in data["comparisons"]:
        if "speed_ratio" not in c:
            rows.append([c["ours"], " / ".join(c["peers"]), "–", "–", "–", "–"])
            continue
        ceiling = f"{c['ceiling_ratio']:.2f}x" if c.get("ceiling_ratio") else "–"
        rows.append([c["ours"], f"{c['fastest_peer']} (of {', '.join(c['peers'])})", f"{c['speed_ratio']:.2f}x",
                     ceiling, "yes" if c["meets_goal"] else "no", fmt(c.get("memory_ratio"), 2)])
    out.append(table(["ours", "fastest matching peer", "speed ratio", "ceiling", "meets goal", "memory ratio"], rows))
    if data.get("own_comparisons"):  # results before armt have none: their tables stay as they were
        out += ["", "Ours against the mechanism of ours it extends, in the same run (slowdown = the baseline's "
                "tokens/s / ours: 1.25 means ours runs at 80% of the baseline's speed; memory and parameter ratios: "
                "ours / the baseline's):", ""]
        rows = []
        for c in data["own_comparisons"]:
            if "slowdown" not in c:
                rows.append([c["ours"], c["baseline"], "–", "–", f"– (goal <= {c['max_slowdown']}x)",
                             c.get("note", "–"), "–"])
                continue
            rows.append([c["ours"], c["baseline"], fmt(c["tokens_per_s"]), fmt(c["baseline_tokens_per_s"]),
                         f"{c['slowdown']:.2f}x (goal <= {c['max_slowdown']}x)", "yes" if c["meets_goal"] else "no",
                         f"{fmt(c.get('memory_ratio'), 2)} / {fmt(c.get('params_ratio'), 3)}"])
        out.append(table(["ours", "baseline", "tokens/s", "baseline tokens/s", "slowdown", "meets goal",
                          "memory / params ratio"], rows))
    if data.get("bf16_speedups"):
        out += ["", "bf16 autocast against float32, the same system side by side in this run (s/step fp32 / s/step "
                "bf16):", ""]
        out.append(table(["system", "bf16 speed-up"], [[name, f"{x:.2f}x"] for name, x in
                                                       data["bf16_speedups"].items()]))
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- stream

def short_len(n: int) -> str:
    return f"{n // 1048576}M" if n % 1048576 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


def state_cell(state: dict | None, growth: float | None) -> str:
    if not state:
        return "–"
    size = state["bytes"]
    size_txt = f"{size / 2**20:.2f} MiB" if size >= 2**20 else f"{size / 1024:.1f} KiB" if size else "0"
    return (f"{size_txt}: {state['elements']:,} values in {state['tensors']} tensor{'s' * (state['tensors'] != 1)}"
            + (f", x{growth:.2f}" if growth is not None else ""))


def render_stream(data: dict, small: bool) -> str:
    cfg = data["config"]
    lengths = cfg["lengths"]
    out = [f"**Inference over a stream** (batch 1, no grad, {cfg['dtype']}, {cfg['n_layers']} layers, width "
           f"{cfg['d_model']}, segments of {cfg['segment_len']}; full = one forward over the whole stream). "
           "Cells: ms per token (over the whole stream) / peak extra MiB.", "", provenance(data, small), ""]
    rows = []
    for mech, per_len in data["results"].items():
        if "error" in per_len and not isinstance(per_len.get("error"), dict):
            rows.append([mech] + ["failed"] * len(lengths))
            continue
        row = [mech]
        for n in lengths:
            rec = per_len.get(str(n))
            if rec is None:
                row.append("–")
            elif "s_per_token" in rec:
                row.append(f"{rec['s_per_token'] * 1e3:.3f} / {common.mib(rec['memory']['peak_extra_bytes'])}")
            else:
                row.append("skipped" + (f" (projected {rec['projected_s']:.0f} s)" if rec.get("projected_s") else ""))
        rows.append(row)
    out.append(table(["mechanism"] + [short_len(n) for n in lengths], rows))
    out += ["", "Flatness = value at the longest length measured / value at the shortest (1.0 = flat):", ""]
    # results from before the state was recorded have no state column: their tables stay as they were
    with_state = any(s.get("state") for s in data["summary"].values())
    rows = []
    for mech, s in data["summary"].items():
        state = [state_cell(s.get("state"), (s.get("flatness") or {}).get("state"))] if with_state else []
        f = s.get("flatness")
        if not f:
            rows.append([mech, fmt(s.get("longest_tokens")), "–", "–", "–", "–"] + state)
            continue
        proj = s.get("projected_s_for_longest")
        rows.append([mech, f"{short_len(f['from_tokens'])} → {short_len(f['to_tokens'])}",
                     f"{f['time_per_token']:.2f}", fmt(f.get("recent_time_per_token"), 3),
                     fmt(f.get("memory"), 3), f"{proj:.0f} s" if proj else "–"] + state)
    out.append(table(["mechanism", "lengths", "time/token", "recent time/token", "peak memory",
                      f"projected time for {short_len(lengths[-1])}"]
                     + (["carried state at the longest length (growth)"] if with_state else []), rows))
    skipped = sorted({rec["skipped"] for per_len in data["results"].values() if isinstance(per_len, dict)
                      for rec in per_len.values() if isinstance(rec, dict) and "skipped" in rec})
    if skipped:
        out += ["", "Skipped: " + "; ".join(skipped) + "."]
    return "\n".join(out)


# -------------------------------------------------------------------------------------------------- gpu

def render_gpu(data: dict, small: bool) -> str:
    out = [f"**GPU check** on {data.get('device')}" + (" (smoke sizes)" if data.get("smoke") else ""), "",
           provenance(data, small), "", "flex vs sdpa, same weights (max abs difference; relative to the largest "
           "value in brackets; bf16: beside it what bf16 itself changes on the sdpa path):", ""]
    rows = []
    for r in data.get("agreement", []):
        if "logits_max_abs_diff" not in r:
            rows.append([r["case"], r["dtype"], r.get("skipped") or r.get("error", "").splitlines()[0][:100],
                         "", "", ""])
            continue
        grad = f"{r['grad_max_abs_diff']:.3g} ({r['grad_rel_diff']:.2g})" if "grad_max_abs_diff" in r else "–"
        y = r.get("bf16_vs_fp32_sdpa", {})
        rows.append([r["case"], r["dtype"], f"{r['logits_max_abs_diff']:.3g} ({r['logits_rel_diff']:.2g})",
                     f"{r['loss_abs_diff']:.3g}", grad,
                     f"{y['logits_max_abs_diff']:.3g}" if y else "–"])
    out.append(table(["case", "dtype", "logits", "loss", "gradients", "bf16 vs fp32 logits"], rows))
    tc = data.get("throughput_config")
    if tc:
        m = tc["model"]
        out += ["", f"Training throughput ({m['n_layers']} layers, width {m['d_model']}, {m['n_heads']} heads, "
                f"d_ff {m['d_ff']}, vocab {m['vocab_size']}; batch {tc['batch']} x "
                f"{tc['segment_len'] * tc['n_segments']} tokens, {tc['autocast']} autocast; median of "
                f"{tc['steps']} steps). {data.get('mfu_formula', '')}", ""]
    rows = []
    for r in data.get("throughput", []):
        if "tokens_per_s" not in r:
            rows.append([r["system"], r.get("skipped") or r.get("error", "").splitlines()[0][:100], "", "", "", ""])
            continue
        rows.append([r["system"], fmt(r["tokens_per_s"]), fmt(r["seconds_per_step"]), f"{r['mfu'] * 100:.1f}%",
                     fmt(r.get("peak_memory_gib")), fmt(r.get("params"))])
    if rows:
        out.append(table(["system", "tokens/s", "s/step", "MFU", "peak GiB", "params"], rows))
    return "\n".join(out)




def render_tokenize(data: dict, small: bool) -> str:
    rows = []
    for r in data["results"]:
        tps = r["tokens_per_s"]
        rows.append([r["tokenizer"], f"{r['tokens']:,}", f"{tps['baseline']:,.0f}", f"{tps['first']:,.0f}",
                     f"{tps['cached']:,.0f}", f"{r['stm_first_vs_baseline']:.2f}x", f"{r['cached_vs_first']:.1f}x"])
    goals = data.get("goals", {})
    return (f"**Tokenize + chunk** the five Austen novels into chunks of {data['config']['chunk_len']} tokens "
            f"(median of {data['config']['repeats']} runs).\n\n{provenance(data, small)}\n\n"
            + table(["tokenizer", "tokens", "baseline tokens/s (per-document loop)", "stm first pass tokens/s",
                     "stm cached pass tokens/s", "first pass vs baseline", "cached vs first pass"], rows)
            + f"\n\nGoals: first pass >= {goals.get('first_pass_tokens_per_s', 0):,.0f} tokens/s, cached pass "
              f">= {goals.get('cached_vs_first', '?')}x faster than the first.")


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
    runs = [r for r in data.get("eval_runs") or [] if r.get("wall_s") is not None]
    if runs:
        out += ["", "Wall time of each eval.py run (model loading included): "
                + ", ".join(f"{r['mechanism']} {r['wall_s'] / 60:.1f} min" for r in runs) + "."]
    return "\n".join(out)


def render_long_context(data: dict, small: bool) -> str:
    """Per length and system: read time, ms per generated token, peak memory, carried bytes, target ppl (hf's
    projected points marked ~); then hf against each stm system per length, and the issue's goals."""
    cfg, results = data["config"], data["results"]
    systems = [s for s in cfg["systems"] if s in results]
    stm_systems = [s for s in systems if s != "hf"]
    untrained = [n for n, info in (data.get("systems") or {}).items() if info.get("untrained_parameters")]
    out = [f"**Long-context decoding** ({data['config']['model']}, batch 1, {cfg['dtype']}): the context is the L "
           f"tokens of {cfg['text']} before token {cfg['target_start']:,}; {cfg['new_tokens']} tokens generated "
           f"greedily; stm reads it in segments of {cfg['segment_len']}, hf is `generate` with the whole context in "
           f"its key/value cache. Read = time to the first next-token logits; ms/token = mean of the decoding steps "
           f"after it; peak = resident-set high-water above the worker's size before the read; carried = live bytes "
           f"of the caches/state at the end; target ppl = teacher-forced perplexity of the {cfg['new_tokens']} real "
           f"tokens after the context. `~`: projected from hf's measured lengths (prefill quadratic, the rest "
           f"linear; its point would have taken over {cfg['point_budget_s']:.0f} s)."
           + (f" {', '.join(untrained)}: memory tokens untrained (cost only; its ppl means nothing)." if untrained
              else ""), "", provenance(data, small), ""]

    def cells(rec: dict | None) -> list[str]:
        if not rec:
            return ["–"] * 5
        if "prefill_s" not in rec:
            return ["failed: " + str(rec.get("error", "?")).splitlines()[0][:60]] + ["–"] * 4
        mark = "~" if rec.get("projected") else ""
        cache = rec.get("cache_bytes")
        return [f"{mark}{fmt(rec['prefill_s'])}", f"{mark}{fmt(rec['decode_s_per_token'] * 1e3)}",
                f"{mark}{fmt(common.mib(rec['peak_extra_bytes']))}", fmt(common.mib(cache)),
                f"{rec['target_ppl']:.2f}" if rec.get("target_ppl") is not None else "–"]

    rows = []
    for n in cfg["lengths"]:
        for name in systems:
            per = results[name]  # {length: record}, or {"error": ...} where the system could not be built
            rec = {"error": per["error"]} if isinstance(per.get("error"), str) else per.get(str(n))
            rows.append([short_len(n), name + (" (projected)" if rec and rec.get("projected") else ""), *cells(rec)])
    out.append(table(["context", "system", "read s", "ms / token", "peak MiB", "carried MiB", "target ppl"], rows))
    comparisons = data.get("comparisons") or {}
    if comparisons and stm_systems:
        out += ["", "hf against stm at each length: hf's ms per generated token / ours (x faster), our peak memory / "
                "hf's, our target ppl / hf's (full attention on the same text), greedy tokens equal to hf's (of "
                f"{cfg['new_tokens']}); `~`: against hf's projection.", ""]
        rows = []
        for n in cfg["lengths"]:
            row = [short_len(n)]
            for name in stm_systems:
                c = comparisons.get(str(n), {}).get(name)
                if not c:
                    row.append("–")
                    continue
                mark = "~" if c["hf_projected"] else ""
                parts = [f"{mark}{c['speedup_per_token']:.1f}x faster"]
                if c.get("memory_fraction") is not None:
                    parts.append(f"{mark}{c['memory_fraction']:.2f} of the memory")
                if c.get("ppl_ratio") is not None:
                    parts.append(f"ppl {100 * (c['ppl_ratio'] - 1):+.1f}%")
                if c.get("tokens_agree") is not None:
                    parts.append(f"{c['tokens_agree']} tokens equal")
                row.append(", ".join(parts))
            rows.append(row)
        out.append(table(["context", *stm_systems], rows))
    goals = data.get("goals") or {}
    lines = []
    for name, g in goals.items():
        said = []
        if "flat" in g:
            f = g["flat"]
            said.append(f"{short_len(f['from_tokens'])} → {short_len(f['to_tokens'])} time/token "
                        f"x{f['time_per_token']:.2f}, peak memory x{fmt(f['peak_memory'], 3)} (goal <= "
                        f"x{cfg['goals']['flat_within']}: {fmt(f['met'])})")
        for key, v in g.items():
            if key.startswith(("speedup_", "memory_fraction_")):
                what, n = key.rsplit("_", 1)
                sign = ">=" if what == "speedup" else "<="
                value = f"{v['value']:.1f}x" if what == "speedup" else f"{v['value']:.2f}"
                projected = " (hf projected)" if v["hf_projected"] else ""
                said.append(f"{what.replace('_', ' ')} at {short_len(int(n))} {value}{projected} (goal {sign} "
                            f"{v['goal']}: {fmt(v['met'])})")
        if "ppl" in g:
            said.append(f"worst target ppl vs hf {100 * (g['ppl']['worst'] - 1):+.1f}% (goal within "
                        f"{100 * (g['ppl']['goal'] - 1):.0f}%: {fmt(g['ppl']['met'])})")
        if said:
            lines.append(f"- `{name}`: " + "; ".join(said) + ".")
    if lines:
        out += ["", "Goals (issue #13):", "", *lines]
    return "\n".join(out)


def render_full_attention_memory(data: dict, small: bool) -> str:
    """Per system and length: peak live tensor MiB / peak extra resident MiB / seconds; stm's figures before a
    change (another run, `before`) beside them; stm against Hugging Face per length, and the goal."""
    cfg, shape, lengths = data["config"], data["config"]["shape"], data["config"]["lengths"]

    def cell(entry: dict | None) -> str:
        if entry is None:
            return "–"
        if "live" not in entry:
            return "failed: " + entry.get("error", "?").splitlines()[0][:60]
        return (f"{common.mib(entry['live']['peak_live_bytes'])} / {common.mib(entry['rss']['peak_extra_bytes'])} / "
                f"{entry['seconds']:.3g}")

    out = [f"**Working memory of full attention** (one forward pass over random tokens, batch 1, no grad, "
           f"{cfg['dtype']}, {shape['n_layers']} layers, width {shape['d_model']}, {shape['n_heads']} heads, SwiGLU "
           f"{cfg['d_ff']}, vocab {shape['vocab_size']}, logits of every position; each system and length alone in "
           "a fresh worker). Cells: peak live tensor MiB (storage alive at once, above weights and input) / peak "
           "extra resident MiB / seconds.", "", provenance(data, small), ""]
    before = data.get("before") or {}
    rows = []
    for name, per_length in data["results"].items():
        rows.append([f"**{name}**" if name.startswith("stm") else name]
                    + [cell(per_length.get(str(n))) for n in lengths])
        if name in before.get("results", {}):
            commits = {(e.get("stm") or {}).get("commit") or "?" for e in before["results"][name].values()}
            rows.append([f"{name}, before (stm {', '.join(c[:10] for c in sorted(commits))})"]
                        + [cell(before["results"][name].get(str(n))) for n in lengths])
    out.append(table(["system"] + [short_len(n) for n in lengths], rows))
    out += ["", "; ".join(f"`{name}`: {what}" for name, what in cfg["systems"].items()) + "."]
    if before:
        out += ["", f"Before: `{before.get('command')}`, {before.get('environment', {}).get('date', '?')}."]
    ratios = [c for c in data.get("comparisons", []) if c["ours"] == "stm-full"]
    if ratios:
        out += ["", "stm-full over each Hugging Face system (peak live bytes; resident in brackets; < 1: stm smaller):",
                ""]
        peers = sorted({c["peer"] for c in ratios})
        by = {(c["peer"], c["tokens"]): c for c in ratios}
        out.append(table(["peer"] + [short_len(n) for n in lengths], [
            [peer] + [f"{by[peer, n]['live_ratio']:.2f} ({fmt(by[peer, n]['rss_ratio'], 2)})" if (peer, n) in by
                      else "–" for n in lengths] for peer in peers]))
    if "meets_goal" in data:
        out += ["", f"Goal: {data['goal']}: {'met' if data['meets_goal'] else 'not met'}."]
    loads = [e["load_average_before"][0] for per_length in data["results"].values() for e in per_length.values()
             if e.get("load_average_before")]
    if loads:
        out += ["", f"Load average (1 min) before each measurement: {min(loads)} to {max(loads)}: the seconds "
                "are those of a shared CPU; the live bytes do not depend on it."]
    return "\n".join(out)


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


RENDER = {"train_speed": render_train_speed, "train_speed_bf16": render_train_speed, "stream": render_stream,
          "stream_armt_1m": render_stream, "gpu": render_gpu, "tokenize": render_tokenize, "tasks": render_tasks,
          "horizon": render_horizon, "capacity": render_capacity, "capacity_armt_k8": render_capacity_variants,
          "babilong_zeroshot": render_babilong_zeroshot,
          "long_context": render_long_context,
          "full_attention_memory": render_full_attention_memory, "real_tasks": render_real_tasks,
          "real_tasks_summary": render_real_tasks_summary}


LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")


def relink(body: str, root: Path, readme: Path) -> str:
    """`body` with its markdown links (relative to the repository `root`) made relative to `readme`'s folder;
    absolute paths, URLs and anchors stay as they are."""
    folder = readme.resolve().parent
    if folder == root.resolve():
        return body

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if re.match(r"[a-z][a-z0-9+.-]*:|#|/", target):
            return m.group(0)
        return m.group(1) + Path(os.path.relpath(root.resolve() / target, folder)).as_posix() + m.group(3)

    return LINK.sub(fix, body)


def write_readme(readme: Path, sections: dict[str, str], root: Path | None = None) -> list[str]:
    """Replace each section between its markers; returns the names replaced (others are left alone). With `root`
    (the folder the sections' links are relative to), the links are made relative to `readme`."""
    text = readme.read_text()
    done = []
    for name, body in sections.items():
        if root is not None:
            body = relink(body, root, readme)
        pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->)(.*?)(<!-- /bench:{re.escape(name)} -->)", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m, body=body: f"{m.group(1)}\n{body}\n{m.group(3)}", text, count=1)
            done.append(name)
    if done:
        readme.write_text(text)
    return done


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--write-readme", action="store_true",
                   help="fill the sections between markers, in whichever --readme file holds them")
    p.add_argument("--readme", action="append", default=None,
                   help="a markdown file to fill (repeatable; default README.md and benchmarks/README.md)")
    p.add_argument("--root", default=str(common.REPO_ROOT),
                   help="the folder the sections' links are relative to (default the repository root)")
    args = p.parse_args(argv)
    readmes = [Path(r) for r in args.readme or (common.REPO_ROOT / "README.md", common.BENCH_DIR / "README.md")]

    sections = {}
    for name in SECTIONS:
        data, small = load(Path(args.results_dir), name)
        if data is None:
            continue
        try:
            sections[name] = RENDER[name](data, small)
        except (KeyError, TypeError, ValueError) as exc:
            sections[name] = f"(could not render {name}: {type(exc).__name__}: {exc})"
    if not sections:
        print(f"no results in {args.results_dir}", file=sys.stderr)
        return
    print("\n\n".join(f"### {name}\n\n{body}" for name, body in sections.items()))
    if args.write_readme:
        written = set()
        for readme in readmes:
            done = write_readme(readme, sections, Path(args.root)) if readme.is_file() else []
            written.update(done)
            print(f"\n{readme}: replaced {done or 'nothing'}", file=sys.stderr)
        missing = [n for n in sections if n not in written]
        if missing:
            print(f"no markers for {missing} in {', '.join(map(str, readmes))} (add <!-- bench:NAME --> ... "
                  "<!-- /bench:NAME -->)", file=sys.stderr)


if __name__ == "__main__":
    main()
