"""The markdown sections of the speed and memory benchmarks: train_speed.py, stream_inference.py, gpu_check.py,
tokenize_throughput.py, long_context.py and full_attention_memory.py (rendered by report.py)."""

from __future__ import annotations

import memory_meter
from report_format import fmt, provenance, short_len, table

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
                row.append(f"{rec['s_per_token'] * 1e3:.3f} / {memory_meter.mib(rec['memory']['peak_extra_bytes'])}")
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
                f"{mark}{fmt(memory_meter.mib(rec['peak_extra_bytes']))}", fmt(memory_meter.mib(cache)),
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
        return (f"{memory_meter.mib(entry['live']['peak_live_bytes'])} / "
                f"{memory_meter.mib(entry['rss']['peak_extra_bytes'])} / {entry['seconds']:.3g}")

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
