"""Inference over long streams: time per token and peak extra memory as the stream grows.

Batch 1, no gradients, float32, the small shape of train_speed.py (6 layers, width 256, 4 heads, byte
vocabulary), segments of 512 tokens, streams of 4k, 16k, 64k, 256k and 1M tokens.

- `none`, `rmt`, `armt`, `xl`, `swa` (FLAT) carry a state of constant size, so time per token and memory
  should stay flat. (armt: rmt's 16 memory tokens plus an associative matrix in every layer, key_dim 32,
  nu 3.) Each streams in its own worker process, segment by segment (`run_segments(..., state=state)`), with
  its input made one segment at a time so the stream itself takes no memory; they advance side by side in
  rounds of `--chunk` segments, and each stream length is a checkpoint on the way (the figures at 16k are
  those of the first 16k tokens of the longer stream, which is what a 16k stream would give). At each
  checkpoint the carried state's size is recorded too (its tensors' elements and bytes: rmt's memory
  tokens, armt's tokens and matrices, xl's and swa's key/value caches), which should not grow either.
- `full` reads the whole stream in one forward pass, in a fresh worker per length, its input made before
  the memory baseline. It stops growing after a length takes more than `--full-limit-s`, or when the
  next length is projected (b*L + c*L^2 through the last two lengths) to take over 3 times that, or
  when it does not fit in `--full-memory-gib` (the worker's address space is capped, so a length that would
  not fit fails there and is recorded, instead of waking the OOM killer of a shared machine).

The whole run keeps to `--budget-s`: the flat streams go first, and before each next length their time is
projected from their steady per-segment time; `full` follows with what is left. Lengths that would not fit
are recorded as skipped, with the time they were projected to take.

Reported per mechanism and length: seconds per token (over the whole stream so far) and per segment
lately (median of the last segments, the marginal cost at that point of the stream), peak extra memory,
the carried state's size (flat mechanisms), and flatness = value at the longest length / value at 4k.

    python benchmarks/stream_inference.py                      # default: about 10 minutes on 2 cores
    python benchmarks/stream_inference.py --budget-s 0         # no budget: every length up to 1M (with five
                                                               # flat streams, more than 10 minutes)
    python benchmarks/stream_inference.py --quick              # tiny sizes, to check that everything runs
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import memory_meter  # noqa: E402
from workers import Worker, WorkerError  # noqa: E402

FLAT = ("none", "rmt", "armt", "xl", "swa")
MECHANISMS = FLAT + ("full",)
LENGTHS = (4096, 16384, 65536, 262144, 1048576)
SHAPE = dict(vocab_size=256, d_model=256, n_layers=6, n_heads=4, segment_len=512, memory_tokens=16,
             mem_len=512, window=512, key_dim=32, nu=3)
QUICK_SHAPE = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=2, segment_len=64, memory_tokens=4,
                   mem_len=64, window=64, key_dim=32, nu=3)
QUICK_LENGTHS = (256, 1024, 4096)


def state_size(state) -> dict:
    """The size of a carried state: its tensors, their elements and bytes (each tensor's own elements, not the
    storage a view of it may keep alive)."""
    from stm.memory.base import map_state

    tensors = []
    map_state(state, tensors.append)
    return {"tensors": len(tensors), "elements": sum(t.numel() for t in tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors)}


def build_model_and_memory(mechanism: str, shape: dict):
    from stm.memory import (
        AssociativeMemory,
        FullAttention,
        NoMemory,
        RecurrentMemoryTokens,
        SegmentRecurrence,
        SlidingWindow,
    )
    from stm.models import Transformer

    model = Transformer(vocab_size=shape["vocab_size"], d_model=shape["d_model"], n_layers=shape["n_layers"],
                        n_heads=shape["n_heads"], attention="sdpa").eval()
    memory = {
        "none": lambda: NoMemory(),
        "full": lambda: FullAttention(),
        "rmt": lambda: RecurrentMemoryTokens(num_memory_tokens=shape["memory_tokens"]),
        # rmt's memory tokens plus an associative matrix in every layer (layers=None: all)
        "armt": lambda: AssociativeMemory(num_memory_tokens=shape["memory_tokens"], key_dim=shape["key_dim"],
                                          nu=shape["nu"], layers=None),
        "xl": lambda: SegmentRecurrence(mem_len=shape["mem_len"]),
        "swa": lambda: SlidingWindow(window=shape["window"]),
    }[mechanism]()
    memory.bind(model)
    memory.eval()
    return model, memory


class FlatStream:
    """A stream read segment by segment with a carried state (in its worker process)."""

    def __init__(self, mechanism: str, shape: dict, threads: int, seed: int = 0, warmup_segments: int = 2):
        warnings.filterwarnings("ignore")
        import torch

        from stm.loop.segments import run_segments

        common.set_threads(threads)
        torch.manual_seed(seed)
        self.torch, self.run_segments, self.shape = torch, run_segments, shape
        self.model, self.memory = build_model_and_memory(mechanism, shape)
        self.info = {"params": sum(p.numel() for p in self.model.parameters())
                     + sum(p.numel() for p in self.memory.parameters())}
        self.generator = torch.Generator().manual_seed(1234)
        self.peak = memory_meter.PeakMemory("cpu")
        self.peak.start()
        state = None
        with torch.no_grad():  # warm-up: the same work as the stream, then start afresh
            for _ in range(warmup_segments):
                state = self._segment(state)[0]
        self.state, self.tokens, self.seconds, self.segment_times = None, 0, 0.0, []

    def _segment(self, state):
        ids = self.torch.randint(0, self.shape["vocab_size"], (1, self.shape["segment_len"]),
                                 generator=self.generator)
        start = time.perf_counter()
        run = self.run_segments(self.model, self.memory, ids, segment_len=self.shape["segment_len"], state=state)
        return run.state, time.perf_counter() - start

    def advance(self, n_segments: int) -> dict:
        with self.torch.no_grad():
            for _ in range(n_segments):
                self.state, seconds = self._segment(self.state)
                self.segment_times.append(seconds)
                self.seconds += seconds
                self.tokens += self.shape["segment_len"]
        return self.status()

    def status(self, recent: int = 8) -> dict:
        last = self.segment_times[-recent:]
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "s_per_token": self.seconds / max(1, self.tokens),
            "recent_s_per_token": common.median(last) / self.shape["segment_len"] if last else None,
            "memory": self.peak.record(),
            "state": state_size(self.state),
        }


class FullStream:
    """One forward pass over a whole stream of `length` tokens (in a fresh worker process)."""

    def __init__(self, length: int, shape: dict, threads: int, memory_cap_gib: float, seed: int = 0):
        warnings.filterwarnings("ignore")
        import torch

        from stm.loop.segments import run_segments

        common.set_threads(threads)
        torch.manual_seed(seed)
        self.torch, self.run_segments, self.shape, self.length = torch, run_segments, shape, length
        self.model, self.memory = build_model_and_memory("full", shape)
        generator = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, shape["vocab_size"], (1, length), generator=generator)
        self.warm = torch.randint(0, shape["vocab_size"], (1, min(length, shape["segment_len"])), generator=generator)
        self.cap = memory_meter.limit_address_space(memory_cap_gib * 2**30)
        self.info = {"params": sum(p.numel() for p in self.model.parameters()), "address_space_cap": self.cap}
        self.peak = memory_meter.PeakMemory("cpu")
        self.peak.start()

    def forward(self) -> dict:
        with self.torch.no_grad():
            self.run_segments(self.model, self.memory, self.warm, segment_len=None)
            start = time.perf_counter()
            run = self.run_segments(self.model, self.memory, self.ids, segment_len=None)
            seconds = time.perf_counter() - start
            del run
        return {"tokens": self.length, "seconds": seconds, "s_per_token": seconds / self.length,
                "memory": self.peak.record()}


def project_full(points: list[tuple[int, float]], length: int) -> float:
    """Seconds a full forward over `length` tokens should take, from (length, seconds) measured so far:
    through the origin with a linear and a quadratic term (two or more points), or quadratic alone (one)."""
    if len(points) == 1:
        n, s = points[0]
        return s * (length / n) ** 2
    (n1, s1), (n2, s2) = points[-2], points[-1]
    # s = b*n + c*n^2 through both points
    c = (s2 / n2 - s1 / n1) / (n2 - n1)
    b = s1 / n1 - c * n1
    c = max(c, 0.0)
    return max(b * length + c * length ** 2, s2 * length / n2)


def run_full(args, shape, lengths, deadline, results) -> None:
    points = []
    for length in lengths:
        rec = {"tokens": length}
        results.setdefault("full", {})[str(length)] = rec
        if points:
            projected = project_full(points, length)
            rec["projected_s"] = projected
            if points[-1][1] > args.full_limit_s:
                rec["skipped"] = f"the previous length took {points[-1][1]:.0f} s > {args.full_limit_s:.0f} s"
                continue
            if projected > 3 * args.full_limit_s:  # one length may overshoot the limit, not by this much
                rec["skipped"] = f"projected {projected:.0f} s > 3 x {args.full_limit_s:.0f} s"
                continue
            if deadline and time.perf_counter() + projected > deadline:
                rec["skipped"] = f"projected {projected:.0f} s does not fit the time budget"
                continue
        common.progress(f"full: one forward over {length} tokens")
        worker = None
        try:
            worker = Worker(FullStream, dict(length=length, shape=shape, threads=args.threads,
                                             memory_cap_gib=args.full_memory_gib), f"full-{length}")
            out = worker.call("forward", timeout=max(4 * args.full_limit_s, 120))
            rec.update(out)
            points.append((length, out["seconds"]))
            common.progress(f"full {length}: {out['seconds']:.1f} s, "
                            f"{memory_meter.mib(out['memory']['peak_extra_bytes'])} MiB extra")
        except WorkerError as exc:
            oom = "out of memory" in str(exc) or "died" in str(exc)
            rec["skipped"] = ("did not fit: " if oom else "failed: ") + str(exc).splitlines()[0]
            rec["error"] = str(exc)
            common.progress(f"full {length}: {rec['skipped']}")
        finally:
            if worker is not None:
                worker.close()


def run_flat(args, shape, mechanisms, lengths, deadline, results) -> None:
    seg = shape["segment_len"]
    workers = {}
    for mech in mechanisms:
        common.progress(f"building {mech}")
        try:
            workers[mech] = Worker(FlatStream, dict(mechanism=mech, shape=shape, threads=args.threads), mech)
        except WorkerError as exc:
            results[mech] = {"error": str(exc)}
    for mech in workers:
        results[mech] = {}
    status = {m: {"tokens": 0} for m in workers}

    for length in lengths:
        if deadline and workers:
            need = 0.0  # seconds to bring every live stream to `length`, at its recent pace
            for m in workers:
                pace = status[m].get("recent_s_per_token") or 0.0
                need += pace * (length - status[m]["tokens"])
            if time.perf_counter() + need > deadline:
                for m in workers:
                    pace = status[m].get("recent_s_per_token") or 0.0
                    results[m][str(length)] = {
                        "tokens": length,
                        "projected_s": status[m]["seconds"] + pace * (length - status[m]["tokens"]),
                        "skipped": f"does not fit the time budget (needs ~{need:.0f} s more for the "
                                   f"{len(workers)} streams)"}
                continue
        while workers and min(status[m]["tokens"] for m in workers) < length:
            for m in list(workers):
                todo = min(args.chunk, (length - status[m]["tokens"]) // seg)
                if todo <= 0:
                    continue
                try:
                    status[m] = workers[m].call("advance", todo)
                except WorkerError as exc:
                    results[m][str(length)] = {"tokens": length, "error": str(exc),
                                               "skipped": "failed: " + str(exc).splitlines()[0]}
                    workers.pop(m).kill()
        for m in workers:
            results[m][str(length)] = dict(status[m])
            common.progress(f"{m} {length}: {status[m]['s_per_token'] * 1e3:.3f} ms/token, "
                            f"{memory_meter.mib(status[m]['memory']['peak_extra_bytes'])} MiB extra")
    for w in workers.values():
        w.close()


def flatness(per_length: dict) -> dict | None:
    done = {int(k): v for k, v in per_length.items() if isinstance(v, dict) and "s_per_token" in v}
    if len(done) < 2:
        return None
    first, last = min(done), max(done)
    a, b = done[first], done[last]
    out = {"from_tokens": first, "to_tokens": last, "time_per_token": b["s_per_token"] / a["s_per_token"]}
    if a.get("recent_s_per_token") and b.get("recent_s_per_token"):
        out["recent_time_per_token"] = b["recent_s_per_token"] / a["recent_s_per_token"]
    ma, mb = a["memory"]["peak_extra_bytes"], b["memory"]["peak_extra_bytes"]
    out["memory"] = mb / ma if ma else None
    if "state" in a and "state" in b:
        sa, sb = a["state"]["bytes"], b["state"]["bytes"]
        out["state"] = sb / sa if sa else (1.0 if sb == sa else None)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mechanisms", default=",".join(MECHANISMS),
                   help="comma-separated subset of " + ", ".join(MECHANISMS))
    p.add_argument("--lengths", default=None, help="comma-separated stream lengths (default 4k..1M)")
    p.add_argument("--budget-s", type=float, default=570, help="wall-clock budget, 0 for none (default 570)")
    p.add_argument("--full-limit-s", type=float, default=60, help="stop growing full past this (default 60)")
    p.add_argument("--full-memory-gib", type=float, default=6.0, help="address-space cap of a full worker")
    p.add_argument("--chunk", type=int, default=8, help="segments per worker call in the flat rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny shape and lengths: checks that all runs")
    p.add_argument("--name", default=None, help="result name (default stream_inference[_quick])")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    args.name = args.name or ("stream_inference_quick" if args.quick else "stream_inference")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    shape = dict(QUICK_SHAPE if args.quick else SHAPE)
    lengths = tuple(int(x) for x in args.lengths.split(",")) if args.lengths else \
        (QUICK_LENGTHS if args.quick else LENGTHS)
    bad = [n for n in lengths if n % shape["segment_len"]]
    if bad:
        raise SystemExit(f"stream lengths must be multiples of the segment length {shape['segment_len']}: {bad}")
    mechanisms = [m.strip() for m in args.mechanisms.split(",") if m.strip()]
    unknown = [m for m in mechanisms if m not in MECHANISMS]
    if unknown:
        raise SystemExit(f"unknown mechanisms {unknown}; choose from {MECHANISMS}")
    deadline = t0 + args.budget_s if args.budget_s else None
    load_before = common.load_average()

    results: dict = {}
    flat = [m for m in mechanisms if m in FLAT]
    if flat:  # first: the long streams are the point; full takes what is left of the budget
        run_flat(args, shape, flat, lengths, deadline, results)
    if "full" in mechanisms:
        run_full(args, shape, lengths, deadline, results)

    summary = {}
    for mech, per_length in results.items():
        done = [int(k) for k, v in per_length.items() if isinstance(v, dict) and "s_per_token" in v]
        summary[mech] = {"longest_tokens": max(done) if done else None, "flatness": flatness(per_length)}
        if done and "state" in per_length[str(max(done))]:  # the carried state at the longest length reached
            summary[mech]["state"] = per_length[str(max(done))]["state"]
        recent = [v.get("recent_s_per_token") for v in per_length.values() if isinstance(v, dict)]
        recent = [r for r in recent if r]
        if mech in FLAT and recent and lengths[-1] not in done:
            seconds_so_far = max(v["seconds"] for v in per_length.values() if isinstance(v, dict) and "seconds" in v)
            summary[mech]["projected_s_for_longest"] = seconds_so_far + recent[-1] * (lengths[-1] - max(done))

    result = {
        "benchmark": "stream_inference",
        "command": common.command_line(),
        "environment": common.environment(),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "config": {**shape, "lengths": list(lengths), "batch": 1, "dtype": "float32", "grad": False,
                   "threads": args.threads, "budget_s": args.budget_s, "full_limit_s": args.full_limit_s,
                   "full_memory_gib": args.full_memory_gib, "chunk_segments": args.chunk,
                   "memory": "peak extra resident memory of the worker (high-water minus resident size after "
                   "model build; full: after its input was made too)",
                   "s_per_token": "seconds spent in run_segments over the stream so far / tokens so far",
                   "recent_s_per_token": "median seconds of the last 8 segments / segment length",
                   "state": "flat mechanisms: the carried state after the stream so far (batch 1): its tensors, "
                   "their elements and bytes"},
        "results": results,
        "summary": summary,
        "wall_s": time.perf_counter() - t0,
    }
    path = common.save_result(args.name, result, args.results_dir)
    common.progress(f"wrote {path} in {result['wall_s']:.0f} s")
    for mech, s in summary.items():
        f = s["flatness"]
        if f:
            state = f", state {s['state']['bytes'] / 1024:.1f} KiB (x{f['state']:.2f})" \
                if s.get("state") and f.get("state") is not None else ""
            print(f"{mech:5s} {f['from_tokens']}->{f['to_tokens']}: time/token x{f['time_per_token']:.2f}, "
                  f"memory x{f['memory'] if f['memory'] is None else round(f['memory'], 2)}{state}")
    return result


if __name__ == "__main__":
    main()
