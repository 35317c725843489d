"""Long-context decoding cost: a pretrained LM reads a long context and generates, under stm's memories and under
Hugging Face `generate` with the whole context in its key/value cache, side by side.

SmolLM2-135M-Instruct (`model=smollm2_135m`, offline) reads the last L tokens of real text before a fixed point of
an Austen novel (L = 4K, 8K, 16K, 32K, 64K of its tokens) and generates `--new-tokens` (64) greedily:

- `xl`, `swa`: stm's segment recurrence and sliding window as conf/lm_memory/ sets them for a pretrained model
  (1,024 tokens and 4 attention sinks), `rmt`: stm's recurrent memory tokens (conf/memory/rmt.yaml; its memory
  tokens are untrained, a cost measurement only: their names are recorded, as eval.py's allow_untrained=true
  does). Each is built as eval.py builds it (the composed eval config: tokenizer, model, `build_memory`, the
  config's seed) and decodes through stm's own generation (`stm.loop.decoder.SegmentDecoder`, the loop of
  `generate` with temperature 0): the context is read in segments of `--segment-len` (512) tokens, then the new
  tokens are decoded in the final segment.
- `hf`: what a user would otherwise run: `model.generate(..., do_sample=False)` on the same LlamaForCausalLM
  (the model inside stm's wrapper, SDPA attention), the whole context in its DynamicCache.

Measured per system and length (each system in its own worker process, built once; per length the systems run one
after another in an order that rotates from length to length, so a slow patch of the machine falls on all alike):

- read time (prefill): stm, the `SegmentDecoder` reading the context up to the first next-token logits; hf, the
  time from calling `generate` to its first logits (taken by a logits processor that notes the clock each step);
- time per generated token: the remaining `--new-tokens - 1` decoding steps, mean (and median) per step (stm's
  mean includes the step where the final segment fills up and is read into the memory);
- peak memory: the worker's resident-set high-water mark during read + generation, above its resident size before
  it (model, input and code excluded; `memory_meter.PeakMemory`), and the live bytes of what it carries at the end (stm:
  the memory state and the final segment's cache; hf: its key/value cache);
- target perplexity: the teacher-forced NLL of the `--new-tokens` real tokens that follow the context in the text
  (stm: the decoder's row is duplicated after the read and the copy is fed the real tokens; hf: the generated
  cache cropped back to the context, then one forward of the real tokens), so that xl / swa can be compared with
  full attention on the same text. (SmolLM2 was trained on up to 8,192 tokens: past that, full attention reads
  positions it never saw; xl and swa read at most 1,024 + a segment.)

HF's prefill is quadratic: on 2 CPU cores it takes tens of minutes past 32K. An hf point is measured only while it
is projected to fit `--point-budget-s` (600 s) from the growth of the points measured before it; the rest are
projected from the measured points (prefill time quadratic, time per token and peak memory linear in the length,
least squares; see `growth_fit.fit_growth`) and marked `projected: true`.

    python benchmarks/long_context.py                          # 4K..64K, xl, swa, rmt, hf: an hour or more
    python benchmarks/long_context.py --lengths 4096,8192      # a shorter check
    python benchmarks/long_context.py --quick                  # 256 and 512 tokens, segments of 128: a minute or two
    python benchmarks/long_context.py --quick model=hf model.name_or_path=<folder>   # any causal LM (Hydra overrides)

Results go to benchmarks/results/long_context.json (--quick: long_context_quick.json) with the environment; the
README table comes from `benchmarks/report.py` (`render_speed.render_long_context`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_meter  # noqa: E402
from growth_fit import GROWTH, project_growing, projected_hf  # noqa: E402
from long_context_systems import TEXT_FILE, HFSystem, StmSystem, compose, model_name, text_tokens  # noqa: E402
from workers import Worker, WorkerError  # noqa: E402

SYSTEMS = ("xl", "swa", "rmt", "hf")
STM_SYSTEMS = {  # the eval.py overrides that choose each stm system's memory
    "xl": ["+lm_memory=xl"],
    "swa": ["+lm_memory=swa"],
    "rmt": ["memory=rmt"],
}
HF_OVERRIDES = ["memory=full"]  # hf uses only the model section
MODEL = ["model=smollm2_135m"]
LENGTHS = (4096, 8192, 16384, 32768, 65536)
QUICK_LENGTHS = (256, 512)
SEGMENT_LEN, QUICK_SEGMENT_LEN = 512, 128
GOALS = {"flat_within": 1.2, "speedup_at": {32768: 3.0, 65536: 5.0}, "memory_fraction_at": {32768: 0.25},
         "ppl_within": 0.03, "compared": ("xl", "swa")}


# ----------------------------------------------------------------------------------------------------- driver

def start_workers(systems: list[str], model_overrides: list[str], vocab_size: int, args, warmup: list[int]) -> dict:
    workers, failed = {}, {}
    for name in systems:
        common.progress(f"building {name}")
        try:
            if name == "hf":
                spec = dict(overrides=[*model_overrides, *HF_OVERRIDES], vocab_size=vocab_size,
                            threads=args.threads, warmup=warmup)
                workers[name] = Worker(HFSystem, spec, name)
            else:
                spec = dict(name=name, overrides=[*model_overrides, *STM_SYSTEMS[name]], vocab_size=vocab_size,
                            threads=args.threads, segment_len=args.segment_len, warmup=warmup)
                workers[name] = Worker(StmSystem, spec, name)
        except WorkerError as exc:
            failed[name] = str(exc)
            common.progress(f"{name}: {str(exc).splitlines()[0]}")
    return workers, failed


def compare(results: dict, lengths: list[int]) -> dict:
    """Per length, each stm system against hf: hf's time per token / ours (speed-up), hf's read time / ours, our
    peak memory / hf's, our target ppl / hf's, and how many leading greedy tokens agree."""
    out = {}
    hf = results.get("hf", {})
    for n in lengths:
        h = hf.get(str(n))
        if not h or "decode_s_per_token" not in h:
            continue
        row = {}
        for name, per_len in results.items():
            ours = per_len.get(str(n))
            if name == "hf" or not ours or "decode_s_per_token" not in ours:
                continue
            c = {"hf_projected": bool(h.get("projected")),
                 "speedup_per_token": h["decode_s_per_token"] / ours["decode_s_per_token"],
                 "prefill_speedup": h["prefill_s"] / ours["prefill_s"],
                 "memory_fraction": ours["peak_extra_bytes"] / h["peak_extra_bytes"] if h["peak_extra_bytes"] else None}
            if "target_ppl" in h:
                c["ppl_ratio"] = ours["target_ppl"] / h["target_ppl"]
                agree = 0
                for a, b in zip(ours["generated"], h["generated"]):
                    if a != b:
                        break
                    agree += 1
                c["tokens_agree"] = agree
            row[name] = c
        out[str(n)] = row
    return out


def flatness(per_len: dict) -> dict | None:
    done = sorted(int(n) for n, r in per_len.items() if "decode_s_per_token" in r and not r.get("projected"))
    if len(done) < 2:
        return None
    a, b = per_len[str(done[0])], per_len[str(done[-1])]
    return {"from_tokens": done[0], "to_tokens": done[-1],
            "time_per_token": b["decode_s_per_token"] / a["decode_s_per_token"],
            "peak_memory": b["peak_extra_bytes"] / a["peak_extra_bytes"] if a["peak_extra_bytes"] else None}


def check_goals(results: dict, comparisons: dict) -> dict:
    """The issue's goals for xl and swa, each None where its lengths were not run."""
    goals = {}
    for name in GOALS["compared"]:
        if name not in results:
            continue
        g = {}
        flat = flatness(results[name])
        if flat:
            g["flat"] = {**flat, "met": max(flat["time_per_token"], flat["peak_memory"] or 0) <= GOALS["flat_within"]}
        for n, want in GOALS["speedup_at"].items():
            c = comparisons.get(str(n), {}).get(name)
            if c:
                g[f"speedup_{n}"] = {"value": c["speedup_per_token"], "goal": want, "hf_projected": c["hf_projected"],
                                     "met": c["speedup_per_token"] >= want}
        for n, want in GOALS["memory_fraction_at"].items():
            c = comparisons.get(str(n), {}).get(name)
            if c and c.get("memory_fraction") is not None:
                g[f"memory_fraction_{n}"] = {"value": c["memory_fraction"], "goal": want,
                                             "hf_projected": c["hf_projected"], "met": c["memory_fraction"] <= want}
        ratios = {n: c[name]["ppl_ratio"] for n, c in comparisons.items() if "ppl_ratio" in c.get(name, {})}
        if ratios:
            worst = max(ratios.values())
            g["ppl"] = {"ratios": ratios, "worst": worst, "goal": 1 + GOALS["ppl_within"],
                        "met": worst <= 1 + GOALS["ppl_within"]}
        goals[name] = g
    return goals


def run_length(length: int, order: list[str], workers: dict, results: dict, hf_measured: dict, args,
               context: list[int], target: list[int]) -> None:
    for name in order:
        if name not in workers:
            continue
        if name == "hf" and hf_measured:
            estimate = project_growing([(n, r["point_s"]) for n, r in sorted(hf_measured.items())], 2, length)
            if estimate > args.point_budget_s:
                reason = f"projected {estimate:.0f} s for the point > --point-budget-s {args.point_budget_s:.0f}"
                results["hf"][str(length)] = projected_hf(hf_measured, length, reason)
                common.progress(f"hf {length}: {reason}; projected")
                workers.pop("hf").close()  # longer lengths cost more still
                continue
        common.progress(f"{name} {length}: reading {len(context)} tokens, generating {args.new_tokens}")
        timeout = max(3 * args.point_budget_s, 120) if name == "hf" else None
        try:
            rec = workers[name].call("run", context, target, args.new_tokens, timeout=timeout)
        except WorkerError as exc:
            results[name][str(length)] = {"tokens": length, "error": str(exc)}
            common.progress(f"{name} {length}: failed: {str(exc).splitlines()[0]}")
            workers.pop(name).kill()
            continue
        results[name][str(length)] = rec
        if name == "hf":
            hf_measured[length] = rec
        common.progress(f"{name} {length}: read {rec['prefill_s']:.1f} s, {rec['decode_s_per_token'] * 1e3:.1f} ms/"
                        f"token, peak +{memory_meter.mib(rec['peak_extra_bytes'])} MiB, "
                        f"target ppl {rec['target_ppl']:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default=None, help="context lengths in the model's tokens, comma-separated "
                   "(default 4096,...,65536; --quick 256,512)")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of " + ", ".join(SYSTEMS))
    p.add_argument("--threads", type=int, default=2, help="torch threads of each worker")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated, and real tokens scored, per point")
    p.add_argument("--segment-len", type=int, default=None, help=f"stm's segment length (default {SEGMENT_LEN}; "
                   f"--quick {QUICK_SEGMENT_LEN})")
    p.add_argument("--target-start", type=int, default=None, help="the token where the scored target begins; each "
                   "context is the L tokens before it (default max(65536, the longest length); --quick the longest)")
    p.add_argument("--point-budget-s", type=float, default=600, help="measure an hf point only while it is "
                   "projected to take at most this; project the rest")
    p.add_argument("--quick", action="store_true", help="tiny lengths, to check that everything runs")
    p.add_argument("--out", default=None, help="results file (default benchmarks/results/long_context[_quick].json)")
    p.add_argument("--note", default=None, help="free text kept with the result")
    p.add_argument("overrides", nargs="*", help=f"eval.py overrides choosing the model (default {' '.join(MODEL)})")
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",")] if args.lengths else \
        list(QUICK_LENGTHS if args.quick else LENGTHS)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        raise SystemExit(f"--systems: unknown {unknown}; choose from {SYSTEMS}")
    if args.new_tokens < 2:
        raise SystemExit(f"--new-tokens must be at least 2 (one read, then decoding steps), got {args.new_tokens}")
    args.segment_len = args.segment_len or (QUICK_SEGMENT_LEN if args.quick else SEGMENT_LEN)
    longest = max(args.lengths)
    args.target_start = args.target_start or (longest if args.quick else max(LENGTHS[-1], longest))
    if longest > args.target_start:
        raise SystemExit(f"--target-start {args.target_start} is before the longest context ({longest} tokens)")
    if min(args.lengths) < 8:
        raise SystemExit(f"--lengths must be at least 8 tokens, got {min(args.lengths)}")
    args.out = Path(args.out) if args.out else \
        common.RESULTS_DIR / ("long_context_quick.json" if args.quick else "long_context.json")
    args.overrides = args.overrides or list(MODEL)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    load_before = common.load_average()
    cfg = compose([*args.overrides, *HF_OVERRIDES])
    from stm.app.run import build

    tokenizer = build(cfg.tokenizer)
    ids = text_tokens(tokenizer, args.target_start + args.new_tokens)
    target = ids[args.target_start:]
    warmup = ids[:2 * args.segment_len + 8]
    workers, failed = start_workers(args.systems, args.overrides, tokenizer.vocab_size, args, warmup)
    infos = {name: w.info for name, w in workers.items()}
    results: dict = {name: {} for name in args.systems}
    for name, error in failed.items():
        results[name] = {"error": error}
    hf_measured: dict[int, dict] = {}
    try:
        for i, length in enumerate(sorted(args.lengths)):
            order = args.systems[i % len(args.systems):] + args.systems[:i % len(args.systems)]
            context = ids[args.target_start - length:args.target_start]
            run_length(length, order, workers, results, hf_measured, args, context, target)
    finally:
        for w in workers.values():
            w.close()
    if "hf" in results and hf_measured:  # lengths hf never reached (its worker stopped or failed): projected too
        for length in args.lengths:
            rec = results["hf"].get(str(length))
            if rec is None or ("error" in rec and length > max(hf_measured)):
                results["hf"][str(length)] = {**projected_hf(hf_measured, length, "not measured"),
                                              **({"error": rec["error"]} if rec else {})}
    comparisons = compare(results, sorted(args.lengths))
    result = {
        "benchmark": "long_context",
        "command": common.command_line(),
        "environment": common.environment(),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "config": {"model": model_name(cfg), "overrides": args.overrides, "lengths": sorted(args.lengths),
                   "systems": args.systems, "threads": args.threads, "new_tokens": args.new_tokens,
                   "segment_len": args.segment_len, "target_start": args.target_start, "text": TEXT_FILE,
                   "point_budget_s": args.point_budget_s, "batch": 1, "dtype": str(cfg.model.get("torch_dtype")),
                   "quick": args.quick, "stm_overrides": {n: STM_SYSTEMS[n] for n in args.systems if n in STM_SYSTEMS},
                   "goals": {**GOALS, "speedup_at": {str(k): v for k, v in GOALS["speedup_at"].items()},
                             "memory_fraction_at": {str(k): v for k, v in GOALS["memory_fraction_at"].items()}},
                   "growth_degrees": GROWTH,
                   "definitions": {
                       "prefill_s": "seconds to read the context up to the first next-token logits",
                       "decode_s_per_token": "mean seconds of the decoding steps after the first token",
                       "peak_extra_bytes": "resident-set high-water during read and generation above the resident "
                       "size before them (model, input and code excluded)",
                       "cache_bytes": "live bytes carried at the end of generation (stm: memory state and final "
                       "segment's cache; hf: its key/value cache)",
                       "target_ppl": "exp of the mean teacher-forced NLL of the new_tokens real tokens after the "
                       "context (the same tokens at every length: the context is the L tokens before target_start)"}},
        "systems": infos,
        "results": results,
        "comparisons": comparisons,
        "flatness": {name: flatness(per) for name, per in results.items() if name != "hf" and "error" not in per},
        "goals": check_goals(results, comparisons),
        "note": args.note,
        "wall_s": time.perf_counter() - t0,
    }
    path = common.save_result(args.out.stem, result, args.out.parent)
    common.progress(f"wrote {path} in {result['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
