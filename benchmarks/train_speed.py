"""Training speed and peak memory: stm's mechanisms next to peers from PyPI, side by side in one run.

Every system has the same shape (6 layers, width 256, 4 heads of 64, SwiGLU/GEGLU width 704, byte vocabulary
of 256), reads batches of 4 samples of 2048 tokens, float32, and takes one AdamW step per batch:

    ours   stm.models.Transformer + memory none | full | rmt (16 tokens) | armt (rmt's 16 tokens plus an
           associative matrix in every layer, key_dim 32, nu 3) | xl (mem_len 512) | swa (window 512),
           through stm.loop.segments.run_segments, segments of 512 (full: one segment of 2048)
    peers  x-transformers TransformerWrapper(Decoder): full causal over 2048; local attention
           (attn_max_attend_past=511: each token sees itself and the 511 before it, as our window 512);
           Transformer-XL memories (max_mem_len=512, 4 segments of 512 passing mems / return_mems)
           local-attention (lucidrains) LocalTransformer over 2048: blocked sliding-window attention
           (window_size=511, look_backward=1, exact_windowsize=True: itself and the 511 before it, see
           _build_la_local in train_speed_peers.py)
           recurrent-memory-transformer-pytorch: RecurrentMemoryTransformer (16 memory tokens, seq_len 512)
           through its RecurrentMemoryTransformerWrapper over 4 segments
           Hugging Face LlamaForCausalLM (attn_implementation="sdpa") over 2048 tokens

Each system is built in its own worker process; the driver gives every system one untimed and one timed
training step per round, rotating the order, for the same number of warm-up and measured steps everywhere
(measured rounds shrink to fit `--budget-s`, the shape never does). Between its turns a worker gives its
free memory back to the kernel, so that only one training footprint is resident at a time.

Reported: tokens/s, seconds/step (median), parameter count, peak extra memory (resident-set high-water
above the worker's size after build), the time one step spends inside the matmul and fused-attention kernels
(one profiled step after the timed ones), and for each of our mechanisms the ratio of its tokens/s to the
fastest matching peer, with its ceiling: the ratio it would reach if everything outside those kernels were
free (when the ceiling is below the goal, no rewrite around the same kernels can reach the goal). armt has
no peer on PyPI: it is compared with our own rmt in the same run instead (OWN_BASELINES: the goal is rmt's
tokens/s over armt's at most 1.25, i.e. armt at least 1/1.25 = 80% of rmt's speed).

    python benchmarks/train_speed.py                 # the full run (about 10 minutes on 2 cores)
    python benchmarks/train_speed.py --quick         # a tiny shape, to check that everything runs
    python benchmarks/train_speed.py --precision fp32,bf16   # each system in both, side by side
                                                             # (train_speed_fp32_bf16.json)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_meter  # noqa: E402
from train_speed_peers import d_ff_of  # noqa: E402
from train_speed_systems import KERNEL_OPS, TrainSystem  # noqa: E402
from workers import Worker, WorkerError  # noqa: E402

OURS = ("none", "full", "rmt", "armt", "xl", "swa")
PEERS = ("xt-full", "xt-local", "la-local", "xt-xl", "rmt-pytorch", "hf-llama")
# which peers each of our mechanisms is compared with (the fastest of them)
MATCHING_PEERS = {
    "none": ("xt-full", "hf-llama"),
    "full": ("xt-full", "hf-llama"),
    "swa": ("xt-local", "la-local"),
    "xl": ("xt-xl",),
    "rmt": ("rmt-pytorch",),
}
GOAL_RATIO = 1.3
# ours against ours, in the same run: mechanism -> (the mechanism of ours it extends, the largest slowdown
# allowed: the baseline's tokens/s / its tokens/s)
OWN_BASELINES = {
    "armt": ("rmt", 1.25),
}

FULL_SHAPE = dict(vocab_size=256, d_model=256, n_layers=6, n_heads=4, segment_len=512, n_segments=4, batch=4,
                  memory_tokens=16, mem_len=512, window=512, key_dim=32, nu=3)
QUICK_SHAPE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, segment_len=64, n_segments=4, batch=2,
                   memory_tokens=4, mem_len=64, window=64, key_dim=32, nu=3)


# -------------------------------------------------------------------------------------------- driver

def system_key(system: str, precision: str) -> str:
    """How a system is named in the results: `xl` in float32, `xl@bf16` under bf16 autocast."""
    return system if precision == "fp32" else f"{system}@{precision}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", default=",".join(OURS + PEERS),
                   help="comma-separated subset of: " + ", ".join(OURS + PEERS))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per system (default 2)")
    p.add_argument("--max-repeats", type=int, default=5, help="measured steps per system, at most (default 5)")
    p.add_argument("--min-repeats", type=int, default=3, help="measured steps per system, at least (default 3)")
    p.add_argument("--budget-s", type=float, default=570,
                   help="wall-clock budget; measured steps shrink (never below --min-repeats) to fit it")
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker (default 2)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (the goal's setting), bf16 (torch.autocast('cpu', bfloat16), weights and AdamW in "
                        "float32, as trainer.precision=bf16-mixed), or both: fp32,bf16 (side by side)")
    p.add_argument("--quick", action="store_true", help="tiny shape and 1+2 steps: checks that all runs")
    p.add_argument("--name", default=None, help="result name (default train_speed, or train_speed_quick)")
    p.add_argument("--results-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.min_repeats, args.max_repeats = 1, 2, 2
    args.precisions = [x.strip() for x in args.precision.split(",") if x.strip()]
    if not args.precisions or set(args.precisions) - {"fp32", "bf16"}:
        p.error(f"--precision: fp32, bf16 or fp32,bf16, got {args.precision!r}")
    suffix = "" if args.precisions == ["fp32"] else "_" + "_".join(args.precisions)
    args.name = args.name or ("train_speed_quick" if args.quick else "train_speed") + suffix
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    shape = dict(QUICK_SHAPE if args.quick else FULL_SHAPE)
    shape["d_ff"] = d_ff_of(shape["d_model"])
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in OURS + PEERS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}; choose from {OURS + PEERS}")
    load_before = common.load_average()

    workers, systems = {}, {}
    for precision in args.precisions:
        for system in names:
            name = system_key(system, precision)
            common.progress(f"building {name}")
            try:
                workers[name] = Worker(TrainSystem, dict(system=system, shape=shape, threads=args.threads,
                                                         precision=precision), name)
                systems[name] = {**workers[name].info, "times_s": [], "losses": []}
            except WorkerError as exc:
                systems[name] = {"error": str(exc)}
                common.progress(f"{name} failed to build: {str(exc).splitlines()[0]}")
            systems[name].update(system=system, precision=precision)

    def one_step(name):
        try:
            out = workers[name].call("step")
        except WorkerError as exc:
            systems[name]["error"] = str(exc)
            common.progress(f"{name} failed: {str(exc).splitlines()[0]}")
            workers.pop(name).kill()
            return None
        systems[name]["losses"].append(out["loss"])
        return out["seconds"]

    def trim(name):
        if name in workers:
            try:
                workers[name].call("trim")
            except WorkerError:
                pass

    # Warm-up: every system's first steps, one system after the other; each then gives its free memory
    # back, so that the idle workers hold only weights and optimizer state (ten resident training
    # footprints at once would not fit a small machine that others share).
    last_warmup = {}
    for name in list(workers):
        for w in range(args.warmup):
            seconds = one_step(name)
            if seconds is None:
                break
            last_warmup[name] = seconds
            common.progress(f"warm-up {w + 1}/{args.warmup} {name}: {seconds:.2f} s")
        trim(name)

    # A round gives every system one untimed step (its memory comes back from the kernel: page faults that
    # a steady training loop never pays) and then one timed step; the order rotates from round to round.
    round_s = 2 * sum(last_warmup.values()) or 1.0
    left = args.budget_s - (time.perf_counter() - t0) - 15
    repeats = max(args.min_repeats, min(args.max_repeats, int(left // round_s)))
    common.progress(f"{repeats} measured rounds of ~{round_s:.0f} s ({left:.0f} s of the budget left)")

    order = list(workers)
    for r in range(repeats):
        shift = r % max(1, len(order))
        for name in order[shift:] + order[:shift]:
            if name not in workers or one_step(name) is None:
                continue
            seconds = one_step(name)
            if seconds is not None:
                systems[name]["times_s"].append(seconds)
                common.progress(f"round {r + 1}/{repeats} {name}: {seconds:.2f} s")
            trim(name)

    for name, worker in workers.items():
        try:
            systems[name]["memory"] = worker.call("memory")
        except WorkerError as exc:
            systems[name]["memory"] = {"error": str(exc)}
        try:  # after the memory record: the profiled step may hold more
            systems[name].update(worker.call("profile"))
            common.progress(f"profiled {name}: {systems[name]['kernel_s']:.2f} s in matmul/attention kernels")
        except WorkerError as exc:
            systems[name]["profile_error"] = str(exc)
        worker.close()

    for rec in systems.values():
        rec["family"] = "stm" if rec["system"] in OURS else "peer"
        if rec.get("times_s"):
            rec["seconds_per_step"] = common.median(rec["times_s"])
            rec["tokens_per_s"] = rec["tokens_per_step"] / rec["seconds_per_step"]
            rec["loss_finite"] = all(math.isfinite(x) for x in rec["losses"])
        mem = rec.get("memory") or {}
        rec["peak_extra_mib"] = memory_meter.mib(mem.get("peak_extra_bytes"))

    comparisons = []
    for precision, base in ((p, o) for p in args.precisions for o in OURS if o in MATCHING_PEERS):
        ours = system_key(base, precision)
        if ours not in systems:
            continue
        peers = [system_key(p, precision) for p in MATCHING_PEERS[base]]
        candidates = [p for p in peers if systems.get(p, {}).get("tokens_per_s")]
        row = {"ours": ours, "peers": peers, "goal": GOAL_RATIO, "precision": precision}
        if candidates and systems[ours].get("tokens_per_s"):
            fastest = max(candidates, key=lambda p: systems[p]["tokens_per_s"])
            ratio = systems[ours]["tokens_per_s"] / systems[fastest]["tokens_per_s"]
            mem_ours, mem_peer = systems[ours]["peak_extra_mib"], systems[fastest]["peak_extra_mib"]
            row.update(fastest_peer=fastest, speed_ratio=ratio, meets_goal=ratio >= GOAL_RATIO,
                       memory_ratio=(mem_ours / mem_peer) if mem_ours and mem_peer else None)
            if systems[ours].get("kernel_s"):
                # the ratio ours would reach if everything outside its matmul/attention kernels took no time
                row["ceiling_ratio"] = systems[fastest]["seconds_per_step"] / systems[ours]["kernel_s"]
        comparisons.append(row)

    # ours against the mechanism of ours it extends, same precision, same run: what the extension costs
    own_comparisons = []
    for precision, (ours_base, (baseline_base, max_slowdown)) in (
            (p, item) for p in args.precisions for item in OWN_BASELINES.items()):
        ours, baseline = system_key(ours_base, precision), system_key(baseline_base, precision)
        if ours not in systems:
            continue
        row = {"ours": ours, "baseline": baseline, "precision": precision, "max_slowdown": max_slowdown}
        if baseline not in systems:
            row["note"] = f"{baseline} was not in this run (--systems)"
        tps_ours, tps_base = systems[ours].get("tokens_per_s"), systems.get(baseline, {}).get("tokens_per_s")
        if tps_ours and tps_base:
            slowdown = tps_base / tps_ours
            mem_ours, mem_base = systems[ours]["peak_extra_mib"], systems[baseline]["peak_extra_mib"]
            row.update(baseline_tokens_per_s=tps_base, tokens_per_s=tps_ours, slowdown=slowdown,
                       meets_goal=slowdown <= max_slowdown,
                       memory_ratio=(mem_ours / mem_base) if mem_ours and mem_base else None,
                       params_ratio=systems[ours]["params"] / systems[baseline]["params"])
        own_comparisons.append(row)

    # the same system in bf16 against fp32, when both ran (side by side in this run)
    def step_s(key):
        return systems.get(key, {}).get("seconds_per_step")

    bf16_speedups = {system: step_s(system) / step_s(system_key(system, "bf16")) for system in names
                     if step_s(system) and step_s(system_key(system, "bf16"))}

    result = {
        "benchmark": "train_speed",
        "command": common.command_line(),
        "environment": common.environment(),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "config": {**shape, "dtype": " and ".join({"fp32": "float32", "bf16": "bf16 autocast (mixed)"}[p]
                                                    for p in args.precisions),
                   "optimizer": "AdamW(lr=3e-4)", "threads": args.threads,
                   "tokens_per_sample": shape["segment_len"] * shape["n_segments"], "warmup": args.warmup,
                   "repeats": repeats, "timing": "median of measured steps; one worker process per system; "
                   "interleaved rounds with rotating order, each system's timed step preceded by an untimed one "
                   "(the worker gives its free memory back between turns)",
                   "memory": "peak extra resident memory of the worker over all its steps (high-water minus "
                   "resident size after build; includes activations, gradients and AdamW state)",
                   "kernels": "one more step per system under torch.profiler after the timed rounds: self time of "
                   + ", ".join(KERNEL_OPS) + " and SDPA's fused attention ops (forward and backward); "
                   "ceiling_ratio = the fastest peer's s/step / our kernel s/step",
                   "own_comparisons": "ours against the mechanism of ours it extends (" + ", ".join(
                       f"{a} vs {b}: goal slowdown <= {g}" for a, (b, g) in OWN_BASELINES.items())
                   + "); slowdown = the baseline's tokens/s / ours"},
        "systems": systems,
        "comparisons": comparisons,
        "own_comparisons": own_comparisons,
        "bf16_speedups": bf16_speedups,
        "wall_s": time.perf_counter() - t0,
    }
    path = common.save_result(args.name, result, args.results_dir)
    common.progress(f"wrote {path} in {result['wall_s']:.0f} s")
    for row in comparisons:
        if "speed_ratio" in row:
            ceiling = f", ceiling x{row['ceiling_ratio']:.2f}" if "ceiling_ratio" in row else ""
            print(f"{row['ours']:5s} vs {row['fastest_peer']:12s} speed x{row['speed_ratio']:.2f}{ceiling}")
    for row in own_comparisons:
        if "slowdown" in row:
            print(f"{row['ours']:5s} vs {row['baseline']:12s} {row['baseline']} tokens/s / {row['ours']} tokens/s "
                  f"x{row['slowdown']:.2f} (goal <= {row['max_slowdown']}: "
                  f"{'met' if row['meets_goal'] else 'not met'})")
    return result


if __name__ == "__main__":
    main()
